"""Train a draft head from a target (Hyper-Bagel Sec. 3.1.3 loss, EAGLE-3 style training-time test).

Data: the target regenerates the answer to every prompt (greedy), then one extra forward over
``<|im_start|> answer <|im_end|>`` gives all layers' hidden states and the target's next-token
distributions. Loss per draft position: KL(p_target || p_draft) + 0.1 * CE(p_draft, argmax p_target),
averaged over ``unroll`` training-time-test steps: step j feeds the draft its own step-(j-1) output as
the feature (as in chain drafting) with the attention pattern chain drafting sees (real entries up to
the root, then the chain's own entries). Only the head's own weights train; the target (and the shared
embedding / LM head) stays frozen.

CLI:
    python -m hyperbagel_core.speculative.train --model DIR --data prompts.jsonl --out head.safetensors
    python -m hyperbagel_core.speculative.train --tiny --out /tmp/head.safetensors      # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quant import dense_dtype
from .decode import speculative_generate
from .draft_head import DraftHead
from .layers import attend, rope_cos_sin

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
        seq = [bos_id] + res.ids + ([eos_id] if len(res.ids) < max_new_tokens else [])
        if len(seq) < 2:
            continue
        c2 = ctx.fork()
        rope0 = c2.rope
        out = model.forward_text(c2, torch.tensor(seq), return_all_hidden=True)
        feats = torch.stack(out.layer_hidden, 1)[:-1]                  # [n, L, D] at positions 0..n-1
        samples.append(dict(feats=feats, tokens=torch.tensor(seq[1:], device=feats.device),
                            target_logits=out.logits[1:].float(), rope0=rope0))
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


def draft_loss(logits: torch.Tensor, target_logits: torch.Tensor, ce_weight: float) -> torch.Tensor:
    """Forward KL(p_target || p_draft) + ce_weight * CE(p_draft, argmax p_target), mean over rows."""
    logq = F.log_softmax(logits.float(), -1)
    logp = F.log_softmax(target_logits.float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    ce = F.nll_loss(logq, target_logits.argmax(-1), reduction="none")
    return (kl + ce_weight * ce).mean()


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
            outs = unrolled_logits(head, s["feats"], s["tokens"], s["rope0"], cfg.unroll)
            losses = [draft_loss(o[j:], s["target_logits"][j:], cfg.ce_weight)
                      for j, o in enumerate(outs) if o.shape[0] > j]
            loss = torch.stack(losses).mean()
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


# -- CLI ------------------------------------------------------------------------------------------------------
def _tiny_setup(args):
    from ..config import LLMConfig
    from ..testing import random_model
    model = random_model(LLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97),
                         seed=args.seed, std=0.2)
    rng = random.Random(args.seed)
    contexts = []
    for _ in range(args.tiny_prompts):
        ctx = model.new_context()
        model.prefill_text(ctx, torch.tensor([rng.randrange(3, 97) for _ in range(rng.randrange(2, 12))]))
        contexts.append(ctx)
    return model, contexts, 1, 2


def _pipeline_setup(args):
    from PIL import Image
    from ..pipeline import BagelPipeline
    pipe = BagelPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    contexts = []
    with open(args.data) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            item = json.loads(line) if args.data.endswith(".jsonl") else {"question": line}
            inputs = ([Image.open(item["image"])] if item.get("image") else []) + [item["question"]]
            contexts.append(pipe.build_contexts(inputs, understanding_output=True).gen)
    return pipe.model, contexts, pipe.tokenizer.bos_id, pipe.tokenizer.eos_id


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyperbagel_core.speculative.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="official BAGEL checkpoint folder")
    src.add_argument("--tiny", action="store_true", help="random tiny target on CPU (smoke test)")
    ap.add_argument("--data", help=".txt (one question per line) or .jsonl ({question, image?} per line)")
    ap.add_argument("--out", required=True, help="output .safetensors (a .json twin is written beside it)")
    ap.add_argument("--kind", default="hyper-bagel", choices=["hyper-bagel", "eagle3"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--unroll", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16", help="target dtype (the head itself trains in fp32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny-prompts", type=int, default=8)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model and not args.data:
        ap.error("--model needs --data")
    model, contexts, bos, eos = _tiny_setup(args) if args.tiny else _pipeline_setup(args)
    cfg = TrainConfig(steps=args.steps or (60 if args.tiny else 1000), lr=args.lr or (3e-3 if args.tiny else 3e-4),
                      unroll=args.unroll, max_new_tokens=args.max_new_tokens or (24 if args.tiny else 256),
                      seed=args.seed)
    samples = regenerate(model, contexts, bos, eos, cfg.max_new_tokens)
    if not samples:
        raise SystemExit("no usable training samples (every regenerated answer was empty)")
    head = DraftHead.from_target(model, args.kind, seed=args.seed).float()
    hist = train_draft_head(head, samples, cfg, log_every=max(1, cfg.steps // 10))
    from .draft_io import save_draft_head
    path = save_draft_head(head.to(dense_dtype(model.language_model.lm_head)), args.out, model)
    k = max(1, len(hist) // 10)
    print(json.dumps({"out": str(path), "samples": len(samples), "steps": len(hist),
                      "loss_first": sum(hist[:k]) / k, "loss_last": sum(hist[-k:]) / k}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
