"""Train a draft head from a target (Hyper-Bagel Sec. 3.1.3 loss, EAGLE-3 style training-time test).

Data: the target regenerates the answer to every prompt (greedy), then one extra forward over
``<|im_start|> answer <|im_end|>`` gives all layers' hidden states and the target's next-token
distributions. Loss per draft position: KL(p_target || p_draft) + 0.1 * CE(p_draft, argmax p_target),
averaged over ``unroll`` training-time-test steps: step j feeds the draft its own step-(j-1) output as
the feature (as in chain drafting) with the attention pattern chain drafting sees (real entries up to
the root, then the chain's own entries). Only the head's own weights train; the target (and the shared
embedding / LM head) stays frozen.

Recipe (the CLI): a JSONL of ``{"question": ..., "image": path?}`` lines; the target's answers are
regenerated once and cached on disk (``--cache``, keyed by target fingerprint, image bytes, question and
length); a deterministic held-out split (``--holdout``) by that key; the mean acceptance length (tokens per
drafting round, bonus included) on the held-out split is the progress bar's metric, next to the untrained
head's and prompt lookup's, measured once at the start. Resume, DDP and the progress bar: ``loop``, ``distributed``.

Draft vocabulary (EAGLE-3): ``--draft-vocab N`` (default 32768) keeps the N most frequent target tokens of the
regenerated answers (the stop token always) as the head's vocabulary: its own LM head over them starts as the
target's rows, the loss compares it with the target's distribution renormalised over them, and a draft id maps
back to the target id (``d2t``, saved with the head). ``--draft-vocab 0``: the full vocabulary, shared LM head.

CLI:
    python -m hyperbagel_core.training.draft_head --model DIR --data pairs.jsonl --out head.safetensors
    python -m hyperbagel_core.training.draft_head --tiny --out /tmp/head.safetensors      # CPU smoke run
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..quant import dense_dtype
from ..speculative.decode import speculative_generate
from ..speculative.draft_head import DraftHead, select_draft_vocab
from ..speculative.layers import attend, rope_cos_sin

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.0
    ce_weight: float = 0.1          # lambda of the paper
    unroll: int = 3                 # training-time-test depth (the paper does not state it)
    max_new_tokens: int = 256
    grad_clip: float = 1.0
    seed: int = 0


@torch.no_grad()
def regenerate(model, contexts, bos_id: int, eos_id: int, max_new_tokens: int) -> list[dict]:
    """Target-regenerated answers + the features the head trains on, one dict per usable prompt."""
    samples = []
    for ctx in contexts:
        res = speculative_generate(model, ctx.fork(), None, bos_id=bos_id, eos_id=eos_id,
                                   max_new_tokens=max_new_tokens)
        s = features(model, ctx, res.ids, bos_id, eos_id, max_new_tokens)
        if s is not None:
            samples.append(s)
    return samples


def _features(head: DraftHead, feats: torch.Tensor, rope0: int) -> torch.Tensor:
    """CA + fc1 + Dec over a whole sequence (causal, no cache)."""
    x, skip = head.aggregate(feats.to(head.fc1.weight.dtype))
    if head.dec is None:
        return x
    n = x.shape[0]
    cos, sin = rope_cos_sin(torch.arange(rope0, rope0 + n, device=x.device), head.inv_freq, x.dtype)
    q, k, v = head.dec.qkv(x, cos, sin)
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    return head.dec.finish(x, attend(q, k, v, causal)) + skip.to(x.dtype)


def unrolled_logits(head: DraftHead, feats, tokens, rope0: int, unroll: int) -> list[torch.Tensor]:
    """Draft logits [n, V] for unroll steps 0..unroll-1; rows t < j of step j are padding."""
    Fin = _features(head, feats, rope0)
    n, D = Fin.shape
    dev = Fin.device
    cos, sin = rope_cos_sin(torch.arange(rope0 + 1, rope0 + 1 + n, device=dev), head.inv_freq, Fin.dtype)
    t = torch.arange(n, device=dev)
    ks = [[] for _ in head.layers]
    vs = [[] for _ in head.layers]
    feat, outs, g = Fin, [], Fin
    for j in range(unroll):
        if j:
            feat = torch.cat([feat.new_zeros(1, D), g[:-1]])            # own output of the previous entry
        # step-j query t (chain root t-j) sees real entries s <= t-j and chain entries t-j+i, i = 1..j
        mask = torch.cat([t[None, :] <= t[:, None] - j]
                         + [t[None, :] == t[:, None] - j + i for i in range(1, j + 1)], dim=1)
        x = head.draft_input(feat, tokens)
        for li, layer in enumerate(head.layers):
            q, k, v = layer.qkv(x, cos, sin)
            ks[li].append(k)
            vs[li].append(v)
            x = layer.finish(x, attend(q, torch.cat(ks[li]), torch.cat(vs[li]), mask))
        g = x
        outs.append(head.logits(g))
    return outs


def draft_loss(logits: torch.Tensor, target_logits: torch.Tensor, ce_weight: float,
               d2t: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL(p_target || p_draft) + ce_weight * CE(p_draft, argmax p_target), mean over rows.

    With a draft vocabulary ``d2t`` (draft id -> target id) the draft's logits cover those tokens only: the
    target's distribution is renormalised over them (EAGLE-3), and rows whose target argmax lies outside add
    no CE term."""
    label = target_logits.argmax(-1)
    valid = torch.ones_like(label, dtype=torch.bool)
    if d2t is not None:
        t2d = torch.full((target_logits.shape[-1],), -1, dtype=torch.long, device=label.device)
        t2d[d2t] = torch.arange(d2t.numel(), device=label.device)
        label, target_logits = t2d[label], target_logits[:, d2t]
        valid = label >= 0
    logq = F.log_softmax(logits.float(), -1)
    logp = F.log_softmax(target_logits.float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    ce = F.nll_loss(logq, label.clamp(min=0), reduction="none") * valid
    return (kl + ce_weight * ce).mean()


def draft_vocabulary(samples: list[dict], size: int, vocab_size: int, always=()) -> torch.Tensor | None:
    """The ``size`` most frequent target tokens of the training answers (``select_draft_vocab``), or None
    for the full vocabulary (``size`` 0 or >= ``vocab_size``)."""
    if not 0 < size < vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in samples:
        counts += torch.bincount(s["tokens"].cpu(), minlength=vocab_size)
    return select_draft_vocab(counts, size, always)


def train_draft_head(head: DraftHead, samples: list[dict], cfg: TrainConfig, log_every: int = 0) -> list[float]:
    """Optimise ``head`` in place on regenerated samples; returns the loss of every step."""
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    shared = [p for m in head._shared.values() for p in m.parameters()]
    flags = [p.requires_grad for p in shared]
    for p in shared:
        p.requires_grad_(False)
    history = []
    head.train()
    try:
        for step in range(cfg.steps):
            s = samples[rng.randrange(len(samples))]
            loss = head_step_loss(head, s, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            history.append(float(loss.detach()))
            if log_every and step % log_every == 0:
                log.info("step %d loss %.4f", step, history[-1])
    finally:
        head.eval()
        for p, f in zip(shared, flags):
            p.requires_grad_(f)
    return history


# -- the recipe ---------------------------------------------------------------------------------------------
def sample_key(target_fp: str, question: str, image_sha: str, max_new_tokens: int) -> str:
    return hashlib.sha256(f"{target_fp}|{image_sha}|{max_new_tokens}|{question}".encode()).hexdigest()


def is_heldout(key: str, fraction: float) -> bool:
    return int(key[:8], 16) % 10_000 < fraction * 10_000


class AnswerCache:
    """``answers.jsonl`` in a folder: one ``{"key", "ids"}`` line per regenerated answer (append-only)."""

    def __init__(self, folder):
        self.path = Path(folder) / "answers.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.data[rec["key"]] = rec["ids"]

    def get(self, key):
        return self.data.get(key)

    def put(self, key, ids: list[int]) -> None:
        self.data[key] = list(ids)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "ids": list(ids)}) + "\n")


@torch.no_grad()
def features(model, ctx, ids: list[int], bos_id: int, eos_id: int, max_new_tokens: int) -> dict | None:
    """The training sample of one answer (see ``regenerate``)."""
    seq = [bos_id] + list(ids) + ([eos_id] if len(ids) < max_new_tokens else [])
    if len(seq) < 2:
        return None
    c2 = ctx.fork()
    rope0 = c2.rope
    out = model.forward_text(c2, torch.tensor(seq), return_all_hidden=True)
    feats = torch.stack(out.layer_hidden, 1)[:-1]
    return dict(feats=feats, tokens=torch.tensor(seq[1:], device=feats.device),
                target_logits=out.logits[1:].float(), rope0=rope0)


@torch.no_grad()
def cached_samples(model, items: list[tuple[str, object]], cache: AnswerCache, bos_id: int, eos_id: int,
                   max_new_tokens: int) -> list[dict]:
    """``items``: (key, prefilled context). Answers come from the cache or are regenerated and cached."""
    out = []
    for key, ctx in items:
        ids = cache.get(key)
        if ids is None:
            ids = speculative_generate(model, ctx.fork(), None, bos_id=bos_id, eos_id=eos_id,
                                       max_new_tokens=max_new_tokens).ids
            cache.put(key, ids)
        s = features(model, ctx, ids, bos_id, eos_id, max_new_tokens)
        if s is not None:
            out.append(s)
    return out


@torch.no_grad()
def acceptance_length(model, contexts: list, drafter_factory, bos_id: int, eos_id: int, max_new_tokens: int,
                      k: int) -> float:
    """Mean accepted tokens per drafting round, bonus token included (tau), pooled over ``contexts``."""
    from ..speculative.api import context_text_ids
    acc = rounds = 0
    for ctx in contexts:
        prompt = context_text_ids(ctx)
        res = speculative_generate(model, ctx.fork(), drafter_factory(prompt), bos_id=bos_id, eos_id=eos_id,
                                   max_new_tokens=max_new_tokens, num_draft_tokens=k, adaptive=False,
                                   prompt_ids=prompt)
        acc += res.stats["accepted"] + res.stats["draft_rounds"]
        rounds += res.stats["draft_rounds"]
    return acc / rounds if rounds else 1.0


def head_step_loss(head: DraftHead, s: dict, cfg: TrainConfig) -> torch.Tensor:
    outs = unrolled_logits(head, s["feats"], s["tokens"], s["rope0"], cfg.unroll)
    d2t = head.d2t if head.config.draft_vocab_size else None
    return torch.stack([draft_loss(o[j:], s["target_logits"][j:], cfg.ce_weight, d2t)
                        for j, o in enumerate(outs) if o.shape[0] > j]).mean()


def _tiny_setup(args):
    from ..config import LLMConfig
    from ..testing import random_model
    model = random_model(LLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97),
                         seed=args.seed, std=0.2)
    rng = random.Random(args.seed)
    items = []
    for i in range(args.tiny_prompts):
        ctx = model.new_context()
        ids = [rng.randrange(3, 97) for _ in range(rng.randrange(2, 12))]
        model.prefill_text(ctx, torch.tensor(ids))
        items.append((hashlib.sha256(f"tiny|{ids}".encode()).hexdigest(), ctx))
    return model, items, 1, 2


def _pipeline_setup(args):
    from PIL import Image

    from ..pipeline import BagelPipeline
    from ..speculative.draft_io import target_fingerprint
    pipe = BagelPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    fp = target_fingerprint(pipe.model)
    items = []
    with open(args.data, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            item = json.loads(line) if args.data.endswith(".jsonl") else {"question": line}
            if "question" not in item:
                raise SystemExit(f"{args.data}:{n}: each line needs a 'question' (and optionally an 'image' path)")
            img_sha, inputs = "", []
            if item.get("image"):
                raw = Path(item["image"]).read_bytes()
                img_sha = hashlib.sha256(raw).hexdigest()
                inputs.append(Image.open(item["image"]))
            inputs.append(item["question"])
            key = sample_key(fp, item["question"], img_sha, args.max_new_tokens)
            items.append((key, pipe.build_contexts(inputs, understanding_output=True).gen))
    return pipe.model, items, pipe.tokenizer.bos_id, pipe.tokenizer.eos_id


def main(argv=None) -> dict:
    from .cli import write_report
    from .distributed import init_distributed
    from .loop import Loop, finite, step_rng
    ap = argparse.ArgumentParser(prog="python -m hyperbagel_core.training.draft_head", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="official BAGEL checkpoint folder")
    src.add_argument("--tiny", action="store_true", help="random tiny target on CPU (smoke test)")
    ap.add_argument("--data", help=".jsonl ({question, image?} per line) or .txt (one question per line)")
    ap.add_argument("--out", required=True, help="output .safetensors (a .json twin is written beside it)")
    ap.add_argument("--cache", default=None, help="answer cache folder (default <out>.cache)")
    ap.add_argument("--holdout", type=float, default=0.1, help="held-out fraction (by sample key)")
    ap.add_argument("--kind", default="hyper-bagel", choices=["hyper-bagel", "eagle3"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=1, help="samples per step over all ranks")
    ap.add_argument("--unroll", type=int, default=3)
    ap.add_argument("--draft-vocab", type=int, default=32768,
                    help="draft vocabulary: the N most frequent target tokens of the answers (0 = full vocabulary)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--k", type=int, default=4, help="draft length of the held-out acceptance measurement")
    ap.add_argument("--eval-every", type=int, default=0, help="held-out acceptance every N steps (0: ends only)")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--distributed", action="store_true", help="average gradients over the torchrun ranks")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16", help="target dtype (the head itself trains in fp32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny-prompts", type=int, default=8)
    ap.add_argument("--report", default=None, help="write history + baselines as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model and not args.data:
        ap.error("--model needs --data")
    args.max_new_tokens = args.max_new_tokens or (24 if args.tiny else 256)
    dist_ = init_distributed(args.distributed)
    model, items, bos, eos = _tiny_setup(args) if args.tiny else _pipeline_setup(args)
    cfg = TrainConfig(steps=args.steps or (60 if args.tiny else 1000), lr=args.lr or (3e-3 if args.tiny else 3e-4),
                      unroll=args.unroll, max_new_tokens=args.max_new_tokens, seed=args.seed)
    train_items = [it for it in items if not is_heldout(it[0], args.holdout)] or items
    held_ctx = [ctx for key, ctx in items if is_heldout(key, args.holdout)]
    cache = AnswerCache(args.cache or str(args.out) + ".cache")
    samples = cached_samples(model, train_items, cache, bos, eos, cfg.max_new_tokens)
    if not samples:
        raise SystemExit("no usable training samples (every regenerated answer was empty)")
    vocab = draft_vocabulary(samples, args.draft_vocab, model.config.llm.vocab_size, always=[eos])
    head = DraftHead.from_target(model, args.kind, seed=args.seed, draft_vocab=vocab).float()
    from ..speculative import DraftHeadDrafter, PromptLookupDrafter

    def accept(h):
        return acceptance_length(model, held_ctx, lambda prompt: DraftHeadDrafter(h), bos, eos, cfg.max_new_tokens,
                                 args.k) if held_ctx else float("nan")
    baselines = {}
    if held_ctx:
        baselines["untrained_head"] = accept(DraftHead.from_target(model, args.kind, seed=args.seed,
                                                                   draft_vocab=vocab).float())
        baselines["prompt_lookup"] = acceptance_length(model, held_ctx, lambda prompt: PromptLookupDrafter(prompt),
                                                       bos, eos, cfg.max_new_tokens, args.k)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    shared = [p for m in head._shared.values() for p in m.parameters()]
    for p in shared:
        p.requires_grad_(False)
    loop = Loop(args.out, cfg.steps, {"head": head}, {"opt": opt}, dist_, "accept_len", args.eval_every,
                args.save_every, not args.no_resume, args.stop_after)

    def step(i):
        rng, _ = step_rng(cfg.seed, i)
        picks = dist_.share([rng.randrange(len(samples)) for _ in range(args.batch)])
        head.train()
        total = 0.0
        for n in picks:
            loss = head_step_loss(head, samples[n], cfg)
            (loss * dist_.loss_scale(args.batch)).backward()
            total += finite(float(loss.detach()))
        dist_.average_grads(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        head.eval()
        return total / max(1, len(picks))

    hist = loop.run(step, (lambda: accept(head)) if held_ctx and args.eval_every else None)
    report = {"samples": len(samples), "heldout": len(held_ctx), "steps": len(hist["loss"]),
              "draft_vocab": 0 if vocab is None else vocab.numel(),
              "baselines": baselines, "history": hist}
    if held_ctx:
        report["trained_head"] = accept(head)
    k = max(1, len(hist["loss"]) // 10)
    report.update(loss_first=sum(hist["loss"][:k]) / k, loss_last=sum(hist["loss"][-k:]) / k)
    if dist_.main and loop.stop_after is None:
        from ..speculative.draft_io import save_draft_head
        report["out"] = str(save_draft_head(head.to(dense_dtype(model.language_model.lm_head)), args.out, model))
        print(json.dumps({k: v for k, v in report.items() if k != "history"}))
    write_report(args.report, report, dist_)
    return report


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
