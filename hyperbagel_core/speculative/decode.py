"""Speculative text decoding: draft k tokens, verify them in one target forward, accept, roll back.

Same contract and output as plain decoding (``hyperbagel_core.decoding.generate_text``): feed
``<|im_start|>`` at ``ctx.rope``, stop when the chosen token is ``<|im_end|>`` (not emitted) or after
``max_new_tokens``; greedy output is token-for-token that of plain greedy decoding, sampled output has
the same distribution. ``ctx`` ends holding exactly the tokens plain decoding would have fed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import InputError
from .accept import acceptance_on_device, greedy_accept_on_device, greedy_pick, probs

DEFAULT_DRAFT_TOKENS = 10     # the paper's chain length (Table 1: 10 draft steps)


def expected_tokens(alpha: float, k: int) -> float:
    """Mean tokens per round of a k-token chain with i.i.d. per-token acceptance alpha (bonus included)."""
    return float(k + 1) if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass
class AdaptiveDraftLength:
    """Cost-aware draft length. Every drafted position that was reached is a Bernoulli trial of the
    per-token acceptance alpha (estimated by an exponential moving average). Each round picks the k in
    [0, k_max] maximising expected tokens per unit cost,
        E(k) / (1 + [k>0] round_cost + k (step_cost + verify_cost)),
    costs in units of one target forward (the drafter's own ``step_cost``/``round_cost``; the extra
    verified token costs ``verify_cost``, ~0.02 on a memory-bound GPU). k = 0 means plain decoding:
    drafting pauses for ``cooldown`` rounds (doubling up to ``max_cooldown`` while the probes keep
    failing), then one k=1 probe refreshes the estimate. Disabled: always k_max."""
    k_max: int
    enabled: bool = True
    step_cost: float = 0.15
    round_cost: float = 0.05
    verify_cost: float = 0.02
    alpha: float = 0.7              # optimistic prior so that drafting starts
    weight: float = 0.15            # EMA weight of one trial
    max_cooldown: int = 64
    warmup: int = 2                 # first drafting rounds use k = min(k_max, 4), to measure
    measure: bool = True            # rescale the cost priors by the measured drafter/target speed
    _t_target: float = 0.0
    _scale: float = 0.0
    _rounds: int = 0
    _pause: int = 0
    _cooldown: int = 4
    _probing: bool = False

    def best_k(self) -> int:
        def rate(k):
            cost = 1 + (self.round_cost + k * (self.step_cost + self.verify_cost) if k else 0.0)
            return expected_tokens(self.alpha, k) / cost
        return max(range(self.k_max + 1), key=lambda k: (rate(k), -k))

    def next_k(self) -> int:
        if not self.enabled or self.k_max == 0:
            return self.k_max
        if self._pause > 0:
            self._pause -= 1
            if self._pause == 0:
                self._probing = True
                return 1
            return 0
        if self._rounds < self.warmup:
            return min(self.k_max, 4)
        k = self.best_k()
        if k == 0:
            self._pause = self._cooldown
            self._cooldown = min(self.max_cooldown, 2 * self._cooldown)
        return k

    def __post_init__(self):
        self._priors = (self.step_cost, self.round_cost)

    def timing(self, drafted: int, t_propose: float, t_verify: float, w: float = 0.2) -> None:
        """Wall-clock of one round (both phases end in a host sync, so they include device work). The
        drafter's cost priors keep their shape (round + k steps) but are rescaled by how fast the
        drafter actually runs relative to a verification forward on this machine."""
        if not (self.enabled and self.measure):
            return
        self._t_target = t_verify if not self._t_target else self._t_target + w * (t_verify - self._t_target)
        step0, round0 = self._priors
        predicted = round0 + drafted * step0
        if drafted and predicted > 0 and self._t_target > 0:
            obs = t_propose / self._t_target / predicted
            self._scale = obs if not self._scale else self._scale + w * (obs - self._scale)
            self.step_cost, self.round_cost = self._scale * step0, self._scale * round0

    def update(self, drafted: int, accepted: int) -> None:
        if not self.enabled or drafted == 0:
            return
        self._rounds += 1
        trials = [1.0] * accepted + ([0.0] if accepted < drafted else [])
        for x in trials:
            self.alpha += self.weight * (x - self.alpha)
        if self._probing and accepted:
            self._cooldown = 4
        self._probing = False


@dataclass
class SpecStats:
    rounds: int = 0               # target verification forwards after the first (<|im_start|>) one
    draft_rounds: int = 0         # rounds with k >= 1
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    seconds: float = 0.0
    k_max: int = 0
    k_hist: dict = field(default_factory=dict)

    def record(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        if drafted:
            self.draft_rounds += 1
            self.drafted += drafted
            self.accepted += accepted
            self.k_hist[drafted] = self.k_hist.get(drafted, 0) + 1

    def as_dict(self) -> dict:
        tau = (self.accepted + self.draft_rounds) / self.draft_rounds if self.draft_rounds else 1.0
        return {"k": self.k_max, "rounds": self.rounds, "draft_rounds": self.draft_rounds, "drafted": self.drafted,
                "accepted": self.accepted, "tokens": self.tokens, "new_tokens": self.tokens,
                "tau": tau,                                   # tokens per drafting round (incl. bonus)
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "tokens_per_target_forward": self.tokens / (self.rounds + 1),
                "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else 0.0,
                "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else 0.0,
                "seconds": self.seconds, "k_hist": dict(sorted(self.k_hist.items()))}


@dataclass
class SpecResult:
    ids: list[int]
    stats: dict


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _layers(out, n: int):
    return None if out.layer_hidden is None else torch.stack([h[:n] for h in out.layer_hidden], 1)


class _RoundClock:
    """Draft and verification time of a round for the adaptive draft length, without syncing the host: on
    CUDA three events are recorded and read after the round's one sync (the acceptance read-back), so they
    measure device time; elsewhere the calls are synchronous and wall time is read."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, a, b) -> float:
        return (b - a) if not self.cuda else a.elapsed_time(b) / 1e3


def _block(nxt: int, draft):
    """The verification block [nxt, d_1..d_k]; a drafted device tensor stays on the device."""
    if torch.is_tensor(draft):
        return F.pad(draft.reshape(-1), (1, 0), value=nxt)
    return torch.tensor([nxt] + list(draft))


@torch.no_grad()
def speculative_generate(model, ctx, drafter, *, bos_id: int, eos_id: int, max_new_tokens: int,
                         do_sample: bool = False, temperature: float = 1.0, generator=None,
                         callback=None, num_draft_tokens: int | None = None, adaptive: bool = True,
                         prompt_ids: list[int] | None = None) -> SpecResult:
    """Decode up to ``max_new_tokens`` tokens after ``<|im_start|>`` with draft-and-verify rounds.

    Args:
        model: a BagelModel (eager) or a ``StaticTextDecoder`` over one (fixed shapes, CUDA graphs).
        ctx: context to append to (fork it first if the caller needs it unchanged).
        drafter: a drafter (``drafters.py``/``prompt_lookup.py``) or None for plain decoding.
        num_draft_tokens: k, the longest chain (default 10); adaptive=True lets it shrink/grow/pause.
        callback: ``callback(tokens so far, max_new_tokens)`` after every round; it may raise to interrupt.
    Returns:
        SpecResult(ids=new token ids (no start token, no stop token), stats=SpecStats.as_dict()).
    """
    dev = getattr(model, "device", None) or next(model.parameters()).device  # a streamed weight may sit elsewhere
    k_max = 0 if drafter is None else (DEFAULT_DRAFT_TOKENS if num_draft_tokens is None else int(num_draft_tokens))
    if k_max < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    if do_sample and not 0 < temperature < float("inf"):   # also refuses NaN
        raise InputError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}; use "
                         "do_sample=False for greedy decoding")
    ctrl = AdaptiveDraftLength(k_max, enabled=adaptive, step_cost=getattr(drafter, "step_cost", 0.15),
                               round_cost=getattr(drafter, "round_cost", 0.05),
                               verify_cost=0.02 if dev.type == "cuda" else 0.1)
    hidden = bool(drafter is not None and drafter.needs_hidden)
    st = SpecStats(k_max=k_max)
    clock = _RoundClock(dev)
    _sync(dev)
    t0 = time.perf_counter()

    def choose(out):
        if do_sample:
            p = probs(out.logits[0], temperature)
            return int(torch.multinomial(p, 1, generator=generator).item())
        return int((out.argmax if out.argmax is not None else greedy_pick(out.logits))[0])

    ids: list[int] = []
    if max_new_tokens > 0:
        model.reserve_text(ctx, max_new_tokens)     # every verified block ends within it (k <= remaining - 1)
        if drafter is not None:
            drafter.reset(ctx.rope, prompt_ids)
        out = model.forward_text(ctx, torch.tensor([bos_id]), return_all_hidden=hidden)
        nxt = choose(out)
        if drafter is not None:
            drafter.observe([bos_id], _layers(out, 1), nxt)
        while nxt != eos_id:
            ids.append(nxt)
            if len(ids) >= max_new_tokens:
                break
            k = min(ctrl.next_k(), max_new_tokens - len(ids) - 1)
            t_a = clock.mark()
            draft, q = drafter.propose(k, do_sample, temperature, generator) if k > 0 else ([], None)
            t_b = clock.mark()
            draft = draft[:k]
            q = None if q is None else q[: len(draft)]
            kv0, rope0 = ctx.kv_len, ctx.rope
            out = model.forward_text(ctx, _block(nxt, draft), return_all_hidden=hidden)
            t_c = clock.mark()
            m, draft, bonus = _accept(out, draft, q, do_sample, temperature, generator)   # the round's one sync
            ctx.truncate(kv0 + 1 + m, rope0 + 1 + m)          # roll back the rejected drafts' K/V
            ctrl.timing(len(draft), clock.seconds(t_a, t_b), clock.seconds(t_b, t_c))
            ctrl.update(len(draft), m)
            st.record(len(draft), m)
            new = draft[:m] + [bonus]
            stop = _emit(ids, new, eos_id, max_new_tokens)
            if stop is not None:      # keep exactly the tokens plain decoding would have fed
                ctx.truncate(kv0 + stop, rope0 + stop)
            elif drafter is not None:
                drafter.observe([nxt] + draft[:m], _layers(out, 1 + m), bonus)
            if callback is not None:
                callback(len(ids) + (stop is None), max_new_tokens)  # tokens decided so far
            if stop is not None:
                break
            nxt = bonus
    _sync(dev)
    st.seconds = time.perf_counter() - t0
    st.tokens = len(ids)
    return SpecResult(ids, st.as_dict())


def _accept(out, draft, q, do_sample: bool, temperature: float, generator) -> tuple[int, list[int], int]:
    """(accepted count m, the draft as host ids, next token) from the verification step: the acceptance test
    runs on the device and one small tensor (m, the candidates, the draft) is read back."""
    k = len(draft)
    dev = out.logits.device
    d = draft.to(dev) if torch.is_tensor(draft) else torch.tensor(list(draft), dtype=torch.long, device=dev)
    if do_sample:
        vals = torch.cat([acceptance_on_device(probs(out.logits, temperature), q, d, generator), d]).tolist()
        return vals[0], vals[2:], vals[1]
    tgt = out.argmax if out.argmax is not None else greedy_pick(out.logits)
    vals = torch.cat([greedy_accept_on_device(d, tgt), tgt[:k + 1], d]).tolist()
    m = vals[0]
    return m, vals[k + 2:], vals[1 + m]


def _emit(ids: list[int], new: list[int], eos_id: int, max_new: int) -> int | None:
    """Append ``new`` (accepted drafts + bonus, except the last which becomes the next token) in order.

    ``new[:-1]`` were fed to the target this round; the last one is only predicted. Returns None to go
    on (the last token of ``new`` becomes the pending token, not yet in ``ids``), or the number of
    tokens of this round's block that stay in the cache when decoding stops inside the block.
    """
    for i, t in enumerate(new[:-1]):
        if t == eos_id:
            return 1 + i              # fed: the round's first token + drafts before the stop token
        ids.append(t)
        if len(ids) >= max_new:
            return 1 + i              # plain decoding never feeds the max_new-th token
    return None
