"""Why a quantized stdlib target's greedy tokens differ from bf16's (issue 10): near-ties or a few tensors?

On a trained stdlib target of ``bench/quant_quality.py`` (same cache, same held-out prompts, same bf16
reference: ``--tokens / --prompts`` incremental greedy tokens after each held-out first line), every
variant below is applied to the bf16 model as *fake quantization*: a weight is replaced by the bf16 tensor
its quantized layer would dequantize to (``quant.dequantize(..., bfloat16)``), which is what that layer
feeds ``F.linear``; the variant then reads the reference teacher-forced, as ``quant_quality`` does.

Reported per variant:
  * ``agree_incremental``: argmax == the reference's next token (the issue's greedy agreement);
    ``agree_block``: argmax == bf16's own argmax read teacher-forced in one block (same arithmetic path);
  * ``mean_kl`` (reference || variant) and ``mean_kl_block`` (bf16 block read || variant), nats;
  * ``noise``: RMS over positions of the change of the reference's top-1 minus top-2 logit gap (the noise
    that flips a near-tie);
  * ``flips``: position, bf16 margin (the reference's top-1 minus top-2 logit) and that margin's percentile
    among all positions; ``flips_by_margin``: their count per margin bin (``positions_by_margin``: all
    positions per bin; a bf16 logit near 10 is a multiple of 0.0625, so margin 0 is an exact tie);
  * ``weight_rel_err``: ||W_q - W|| / ||W|| over all weights the variant touches (Frobenius).
The ``floor`` row is bf16 itself read in one block. Variants: each stored mode (``fp8``, ``int8``, ``nf4``
as ``quant.py`` stores them) and, with ``--candidates``, int8 per output channel (the stored format before
version 2), int8 in groups of 256 and 64, an MSE-optimal clip per channel for int8 and fp8, and fp8 in
every decoder layer (``quant.py`` leaves the first one in bf16); then, for
each format in ``--groups``, one linear group at a time (decoder layer x q/k/v/o/gate/up/down of the
understanding expert, the only one text reads; every layer, whatever the mode leaves out).

    python bench/quant_diagnose.py --lm-seconds 900 --seed 1 --tokens 1024 --candidates --out diag_s1.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hyperbagel_core import quant as Q  # noqa: E402
from hyperbagel_core.pipeline import BagelPipeline  # noqa: E402
from quant_quality import reference, stdlib_target, teacher_forced  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_UND = re.compile(r"^language_model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)$")


def fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The bf16 weight a layer stored as ``fmt`` computes with."""
    q, s = Q.quantize(w, fmt)
    return Q.dequantize(q, s, fmt, torch.bfloat16, w.shape[1])


def int8_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """Candidate: int8 with one bf16 scale (amax / 127) per ``group`` inputs of a row (``quant.py`` stores
    ``group = quant.INT8_GROUP``)."""
    rows, n = w.shape
    blocks = F.pad(w.float(), (0, -n % group)).view(rows, -1, group)
    scale = (blocks.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12).to(torch.bfloat16).float()
    q = (blocks / scale).round().clamp(-127, 127)
    return (q.bfloat16() * scale.bfloat16()).view(rows, -1)[:, :n]


def int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    """Candidate: int8 with one fp32 scale (amax / 127) per output channel (quantized format version 1)."""
    scale = w.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return ((w.float() / scale).round().clamp(-127, 127).bfloat16() * scale.bfloat16())


def mse_clip(w: torch.Tensor, fmt: str, steps: int = 41) -> torch.Tensor:
    """Candidate: per output channel, the clip c = a * amax (a in [0.6, 1]) whose int8 / fp8 rounding has
    the least squared error (data-free, fp32 scale)."""
    w = w.float()
    amax = w.abs().amax(1, keepdim=True).clamp_min(1e-12)
    top = 127.0 if fmt == "int8" else Q.FP8_MAX
    best, err = None, None
    for a in torch.linspace(0.6, 1.0, steps):
        s = a * amax / top
        x = (w / s).clamp(-top, top)
        d = (x.round() if fmt == "int8" else x.to(torch.float8_e4m3fn).float()) * s
        e = (d - w).pow(2).sum(1, keepdim=True)
        best = d if best is None else torch.where(e < err, d, best)
        err = e if err is None else torch.minimum(e, err)
    return best.bfloat16()


class Variant:
    """Swaps fake-quantized weights into a model and back."""

    def __init__(self, model, weights: dict[str, torch.Tensor]):
        self.model, self.weights, self.saved = model, weights, {}

    def __enter__(self):
        for name, w in self.weights.items():
            m = self.model.get_submodule(name)
            self.saved[name] = m.weight.data
            m.weight.data = w
        return self

    def __exit__(self, *exc):
        for name, w in self.saved.items():
            self.model.get_submodule(name).weight.data = w


def plan_weights(model, plan: dict[str, str], fq=fake_quant) -> tuple[dict[str, torch.Tensor], float]:
    """({module: fake-quantized weight}, relative Frobenius error over them) for ``plan`` ({module: fmt})."""
    out, err, ref = {}, 0.0, 0.0
    for name, fmt in plan.items():
        w = model.get_submodule(name).weight.data
        out[name] = fq(w, fmt)
        err += float((out[name].float() - w.float()).pow(2).sum())
        ref += float(w.float().pow(2).sum())
    return out, (err / ref) ** 0.5


def text_plan(model, mode: str) -> dict[str, str]:
    """What ``mode`` quantizes among the modules text decoding reads (the generation expert is not read)."""
    return {k: v for k, v in Q.quantized_modules(model, mode).items() if "moe_gen" not in k and "vit" not in k
            and not k.startswith("connector")}


BINS = (0.0, 0.0625, 0.25, float("inf"))


def margin_bin(m: float) -> str:
    return next(f"<={b:g}" for b in BINS if m <= b)


def score(pipe, ref: dict, block: torch.Tensor, margins: torch.Tensor) -> dict:
    lq = torch.cat([teacher_forced(pipe, ids, q) for q, ids in zip(ref["questions"], ref["ids"])])
    target = torch.tensor(sum(ref["ids"], []))

    def kl(p):
        return F.kl_div(F.log_softmax(lq, -1), F.log_softmax(p, -1), log_target=True, reduction="none").sum(-1)
    top2 = ref["logits"].topk(2, -1).indices
    gap = (lq.gather(1, top2[:, :1]) - lq.gather(1, top2[:, 1:])).flatten()
    wrong = (lq.argmax(-1) != target).nonzero().flatten().tolist()
    bins = {}
    for i in wrong:
        bins[margin_bin(float(margins[i]))] = bins.get(margin_bin(float(margins[i])), 0) + 1
    return dict(agree_incremental=float((lq.argmax(-1) == target).float().mean()),
                agree_block=float((lq.argmax(-1) == block.argmax(-1)).float().mean()),
                mean_kl=float(kl(ref["logits"]).mean()), mean_kl_block=float(kl(block).mean()),
                noise=float((gap - margins).pow(2).mean().sqrt()), flips_by_margin=bins,
                flips=[dict(pos=i, margin=round(float(margins[i]), 4),
                            percentile=round(float((margins < margins[i]).float().mean()) * 100, 1)) for i in wrong])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lm-seconds", type=float, default=600)
    ap.add_argument("--lm-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/hb-quant-stdlib"))
    ap.add_argument("--groups", nargs="*", default=["fp8", "int8"], help="formats for the per-group sweep")
    ap.add_argument("--candidates", action="store_true", help="also the int8 group-wise / MSE-clip candidates")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    folder, info = stdlib_target(args.cache, args.lm_seconds, args.seed, args.prompts, args.lm_lr)
    pipe = BagelPipeline.from_pretrained(folder, dtype=torch.bfloat16, vae_dtype=torch.float32)
    model = pipe.model
    ref = reference(pipe, 0, args.tokens, info["held_out"], latents=False)
    block = ref["block"]
    top2 = ref["logits"].topk(2, -1)
    margins = top2.values[:, 0] - top2.values[:, 1]
    result = dict(target=f"seed{args.seed}-{args.lm_seconds:g}s", tokens=len(margins),
                  margin_percentiles={p: round(float(margins.quantile(p / 100)), 4) for p in (1, 5, 10, 25, 50)},
                  positions_by_margin={k: sum(margin_bin(float(m)) == k for m in margins)
                                       for k in map(margin_bin, BINS)},
                  floor=score(pipe, ref, block, margins), rows=[], groups=[])
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "groups")}), flush=True)

    def run(name, plan, fq=fake_quant, table="rows", **extra):
        weights, err = plan_weights(model, plan, fq)
        with Variant(model, weights):
            row = dict(variant=name, weight_rel_err=round(err, 5), **extra, **score(pipe, ref, block, margins))
        result[table].append(row)
        print(json.dumps(row), flush=True)
        return row

    full = {}
    for mode, fmt in (("fp8_e4m3fn", "fp8"), ("int8", "int8"), ("nf4", "nf4")):
        full[fmt] = text_plan(model, mode)
        run(fmt, full[fmt])
    every = {fmt: {k: fmt for k, v in full["int8"].items()} for fmt in full}  # int8's plan: every decoder linear
    if args.candidates:
        run("int8 per channel (format 1)", full["int8"], lambda w, f: int8_per_channel(w))
        for g in (256, 64):
            run(f"int8 g{g} bf16 scales", full["int8"], lambda w, f, g=g: int8_groups(w, g))
        run("int8 mse clip", full["int8"], mse_clip)
        run("fp8 mse clip", full["fp8"], mse_clip)
        run("fp8 in every decoder layer (format 1)", every["fp8"])
    for fmt in args.groups:
        for layer in range(pipe.config.llm.num_hidden_layers):
            for kind in KINDS:
                plan = {k: v for k, v in every[fmt].items() if _UND.match(k) and _UND.match(k).group(1) == str(layer)
                        and _UND.match(k).group(3) == kind}
                run(f"{fmt}:{layer}.{kind}", plan, table="groups")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
