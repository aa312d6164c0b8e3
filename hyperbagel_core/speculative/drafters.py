"""Drafters: objects that propose the next k tokens; the target verifies them (``decode.py``).

Protocol (duck-typed):
    needs_hidden: bool                         # wants all target layers' hidden states of committed tokens
    reset(rope, prompt_ids)                    # before the first target forward (rope of <|im_start|>)
    observe(tokens, layer_hidden, next_token)  # tokens now committed in the target cache (with their
                                               # [n, L, D] layer features if needs_hidden), and the next
                                               # token (known, not yet fed)
    propose(k, do_sample, temperature, generator) -> (draft ids <= k, q [len, V] probs or None)
q None means a deterministic proposal (one-hot q); it is only allowed to be None in that sense. The ids
are a list or a 1-D LongTensor on the target's device (verification then reads them there: no host sync).
"""
from __future__ import annotations

import random
import time

import torch

from .accept import greedy_pick, probs
from .draft_head import DraftHead
from ..model.compiled import mark_dynamic
from ..model.static_decode import capture_cuda_graph
from .layers import cached_layer, rope_cos_sin


def draft_costs(head: DraftHead) -> tuple[float, float]:
    """(one chain step, once-per-round work) in units of one target forward, from the weights each
    reads at batch 1 (decoding is memory-bound): step = fc2 + draft layers + LM head (over the draft
    vocabulary); round = CA + fc1 + Dec; target = L decoder layers + LM head."""
    n = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters())
    c = head.config
    per_layer = n(head.layers[0])
    target = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    lm = (c.draft_vocab_size or c.vocab_size) * c.hidden_size
    return (n(head.fc2) + n(head.layers) + lm) / target, (n(head.ca) + n(head.fc1) + n(head.dec)) / target


def draft_chain_step(head: DraftHead, lay_k, lay_v, g, tok, slot, pos):
    """Fixed-shape greedy chain step (a compiled region, and what the CUDA graph replays): g [1, D] the
    previous entry's output, tok/slot/pos [1] device tensors, the draft layers' caches [N, capacity, Hkv, d]
    -> (g', next draft token as a target id [1])."""
    z = head.draft_input(g, tok)
    cos, sin = rope_cos_sin(pos, head.inv_freq, z.dtype)
    for i, layer in enumerate(head.layers):
        z = cached_layer(layer, z, cos, sin, lay_k[i], lay_v[i], slot, lay_k.shape[1])
    return z, head.to_target(greedy_pick(head.logits(z)[0]).view(1))


def draft_catch_up(head: DraftHead, dec_k, dec_v, lay_k, lay_v, feats, tok, index):
    """The catch-up over n new real target positions at fixed cache shapes (a compiled region): CA + fc1 +
    Dec, then the draft layers. ``index`` [4, n]: Dec slots, Dec RoPE positions, draft-layer slots, their
    RoPE positions. Returns the last entry's output g [1, D]."""
    dec_slots, dec_pos, slots, pos = index
    x, skip = head.aggregate(feats.to(head.fc1.weight.dtype))
    if head.dec is not None:
        cos, sin = rope_cos_sin(dec_pos, head.inv_freq, x.dtype)
        x = cached_layer(head.dec, x, cos, sin, dec_k[0], dec_v[0], dec_slots, dec_k.shape[1]) + skip.to(x.dtype)
    z = head.draft_input(x, tok)
    cos, sin = rope_cos_sin(pos, head.inv_freq, z.dtype)
    for i, layer in enumerate(head.layers):
        z = cached_layer(layer, z, cos, sin, lay_k[i], lay_v[i], slots, lay_k.shape[1])
    return z[-1:]


class DraftHeadDrafter:
    """Chain drafting with a DraftHead; the draft's KV cache keeps real-feature entries across rounds
    and overwrites the speculative ones (rollback by slot index). Proposals stay on the device."""

    needs_hidden = True

    def __init__(self, head: DraftHead, capacity: int = 256, flush_at: int = 64, static: bool = False,
                 compiler=None):
        """``static``: a fixed-capacity cache reused across answers, a fixed-shape catch-up and greedy chain
        step, the step captured as a CUDA graph on CUDA (on CPU the same step runs eagerly); ``capacity`` must
        then cover the longest answer. ``compiler`` (static only): a ``model.compiled.RegionCompiler`` that
        the catch-up and the chain step run through."""
        self.head, self.capacity, self.flush_at, self.static = head, capacity, flush_at, static
        self.compiler = compiler if static else None
        self.step_cost, self.round_cost = draft_costs(head)
        self.cache, self._graph = None, None
        self.reset(0)

    def reset(self, rope: int, prompt_ids: list[int] | None = None) -> None:
        if self.cache is None or not self.static:
            self.cache = self.head.new_cache(self.capacity, growable=not self.static)
        self.cache.dec_len = self.cache.real_len = 0   # stale slots beyond are masked out
        self.rope = rope                     # RoPE of the first pending (or next) target position
        self.feats: list[torch.Tensor] = []
        self.after: list[int] = []           # token following each pending position
        self.last_g: torch.Tensor | None = None

    def _region(self, fn):
        return fn if self.compiler is None else self.compiler.region(fn.__name__, fn)

    @torch.no_grad()
    def observe(self, tokens: list[int], layer_hidden, next_token: int) -> None:
        if layer_hidden is None:
            raise ValueError("DraftHeadDrafter needs the target's per-layer hidden states")
        h = layer_hidden if torch.is_tensor(layer_hidden) else torch.stack(tuple(layer_hidden), 1)
        self.feats.append(h[: len(tokens)].clone())   # clone: graph replays reuse output buffers
        self.after += list(tokens[1:]) + [next_token]
        if sum(f.shape[0] for f in self.feats) >= self.flush_at:
            self._catch_up()

    def _catch_up(self) -> None:
        """Run Dec + draft layers over the pending real positions in one batched forward."""
        if not self.feats:
            return
        head, c = self.head, self.cache
        feats = torch.cat(self.feats)
        p, dev = feats.shape[0], feats.device
        tok = torch.tensor(self.after, device=dev)
        if self.static:
            for buf, end in ((c.dec, c.dec_len + p), (c.layers, c.real_len + p)):
                if buf is not None:
                    buf.ensure(end)      # a fixed cache: raises when full
            rows = torch.arange(p)
            index = torch.stack([c.dec_len + rows, self.rope + rows, c.real_len + rows, self.rope + 1 + rows])
            dec = c.dec if c.dec is not None else c.layers        # (unused without Dec)
            self.last_g = self._region(draft_catch_up)(
                head, *(mark_dynamic(t, 1) for t in (dec.k, dec.v, c.layers.k, c.layers.v)),
                mark_dynamic(feats, 0), mark_dynamic(tok, 0), mark_dynamic(index.to(dev), 1))
            c.dec_len += p if c.dec is not None else 0
        else:
            F = head.features(feats, c, self.rope)
            self.last_g = head.run_layers(head.draft_input(F, tok), c, c.real_len, self.rope + 1)[-1:]
        c.real_len += p
        self.rope += p
        self.feats, self.after = [], []

    @torch.no_grad()
    def propose(self, k: int, do_sample: bool = False, temperature: float = 1.0, generator=None):
        """k draft tokens as a device LongTensor (target ids) and, when sampling, their probabilities over
        the target vocabulary [k, V]; nothing here waits for the device."""
        self._catch_up()
        head, c, g = self.head, self.cache, self.last_g
        toks, qs = [], []
        for j in range(k):
            if j and self.static and not do_sample:
                g, t = self._static_step(g, toks[-1], c.real_len + j - 1, self.rope + j)
                toks.append(t)
                continue
            if j:
                g = head.run_layers(head.draft_input(g, toks[-1]), c, c.real_len + j - 1, self.rope + j)
            logits = head.logits(g)[0]
            if do_sample:
                q = probs(logits, temperature)
                dist = q if generator is None or generator.device == q.device else q.to(generator.device)
                qs.append(head.target_probs(q[None])[0])
                toks.append(head.to_target(torch.multinomial(dist, 1, generator=generator).to(q.device)))
            else:
                toks.append(head.to_target(greedy_pick(logits).view(1)))
        out = torch.cat(toks) if toks else torch.zeros(0, dtype=torch.long, device=g.device)
        return out, (torch.stack(qs) if do_sample and qs else None)

    def _step_fn(self, g, tok, slot, pos):
        c = self.cache.layers
        return self._region(draft_chain_step)(self.head, mark_dynamic(c.k, 1), mark_dynamic(c.v, 1), g, tok, slot,
                                              pos)

    def _static_step(self, g, tok, slot: int, pos: int):
        if slot + 1 > self.cache.layers.capacity:
            raise ValueError(f"draft cache of {self.cache.layers.capacity} slots is full; create the "
                             "DraftHeadDrafter with a larger capacity")
        dev = g.device
        if dev.type != "cuda":
            return self._step_fn(g, tok, torch.tensor([slot]), torch.tensor([pos]))
        if self._graph is None:                 # static inputs, written in place: no host syncs per step
            self._graph_in = (g.clone(), tok.clone(), torch.tensor([slot], device=dev),
                              torch.tensor([pos], device=dev))
            self._graph = capture_cuda_graph(self._step_fn, self._graph_in, copy_inputs=False)
        g_s, tok_s, slot_s, pos_s = self._graph_in
        g_s.copy_(g)
        tok_s.copy_(tok)
        slot_s.fill_(slot)
        pos_s.fill_(pos)
        return tuple(t.clone() for t in self._graph())


class OracleDrafter:
    """Bench/test drafter: proposes the target's own future greedy tokens (``reference``), each one
    replaced by a wrong token with probability 1 - accept_rate, so the per-token acceptance is exactly
    ``accept_rate``. ``shadow`` (e.g. a DraftHeadDrafter) is run on every call and its proposals
    discarded, so its cost is counted. If the committed text leaves ``reference`` (low-precision
    batched-vs-single-token numerics can flip a near-tie), ``resync(seq)`` is asked for the target's
    greedy continuation of the committed text (asked again when a round's proposals would run past it);
    its time is accumulated in ``excluded_s`` so a bench can leave the measuring device's own cost out. The
    check after a divergence runs when a round's tokens are observed, outside the draft phase that the
    adaptive draft length times."""
    lookahead = 16            # reference tokens kept ahead of the committed text (>= k + 1 of a round)

    def __init__(self, reference: list[int], accept_rate: float, vocab_size: int, seed: int = 0,
                 shadow=None, resync=None):
        self.reference0, self.accept_rate, self.vocab = list(reference), accept_rate, vocab_size
        self.seed, self.shadow, self.resync = seed, shadow, resync
        self.needs_hidden = bool(shadow is not None and shadow.needs_hidden)
        self.step_cost = getattr(shadow, "step_cost", 0.0)
        self.round_cost = getattr(shadow, "round_cost", 0.0)
        self.reset(0)

    def reset(self, rope: int, prompt_ids: list[int] | None = None) -> None:
        self.rng = random.Random(self.seed)
        self.reference = list(self.reference0)
        self.seq: list[int] = []                 # generated tokens known (incl. the pending next one)
        self.resyncs, self.excluded_s = 0, 0.0
        if self.shadow is not None:
            self.shadow.reset(rope, prompt_ids)

    def observe(self, tokens, layer_hidden, next_token: int) -> None:
        self.seq += list(tokens[1:]) + [next_token]
        if self.shadow is not None:
            self.shadow.observe(tokens, layer_hidden, next_token)
        if self.reference[:len(self.seq)] != self.seq:     # left the reference: resync now, not while drafting
            self._check(self.lookahead)

    def _check(self, k: int) -> None:
        n = len(self.seq)
        if self.resync is None or (self.reference[:n] == self.seq and len(self.reference) >= n + k):
            return
        t0 = time.perf_counter()
        self.reference = self.seq + list(self.resync(list(self.seq)))
        self.excluded_s += time.perf_counter() - t0
        self.resyncs += 1

    def propose(self, k: int, do_sample: bool = False, temperature: float = 1.0, generator=None):
        if self.shadow is not None:
            self.shadow.propose(k, do_sample, temperature, generator)
        self._check(k)
        out = []
        for j in range(k):
            i = len(self.seq) + j
            true = self.reference[i] if i < len(self.reference) else self.rng.randrange(self.vocab)
            if self.rng.random() >= self.accept_rate:
                true = (true + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
            out.append(true)
        return out, None
