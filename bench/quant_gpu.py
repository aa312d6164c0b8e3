"""Per weight mode at BAGEL-7B-MoT's real shapes on a GPU (issues 10 and 22): decode tokens/s after a
1024-token context, seconds per 1024x1024 image, peak memory, the matmul kernel each quantized layer uses,
the greedy agreement of those kernels with the dequantizing path, and per-layer matmul times. Random
weights, no download.

Each mode builds its own model on the device, quantized module by module (bench/quant_real_shapes.py), so
the bf16 model of a quantized run never exists. The pipeline chooses its kernels as for a user
(``quant.select_kernels`` "auto" when the compute device is set). Every figure is taken after a warm-up call
(which compiles the fused kernel and captures the decode graphs; its time is reported as ``warmup_s``);
times are medians with CUDA synchronisation, peak memory is ``torch.cuda.max_memory_allocated`` over one
call, weights included. ``auto_order`` ranks the quantized modes by the measured 1024x1024 seconds per image
(the loader plans for that task), the evidence for ``memory.AUTO_ORDER`` (docs/quantization.md).

    python bench/quant_gpu.py --out quant_gpu.json                    # CUDA, real shapes
    python bench/quant_gpu.py --tiny --device cpu --out smoke.json      # smoke run: tiny shapes, CPU; the
        # kernels are the GPU's choice run eagerly (select_kernels(compiled=False)), so the same code runs
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_real_shapes import AnswerTokenizer, build_quantized, random_vae, real_config  # noqa: E402
from sampler import PROMPT, TINY, sync  # noqa: E402

from hyperbagel_core import quant as Q  # noqa: E402
from hyperbagel_core.config import BagelConfig, LLMConfig, ViTConfig  # noqa: E402
from hyperbagel_core.context import Context  # noqa: E402
from hyperbagel_core.memory import AUTO_ORDER  # noqa: E402
from hyperbagel_core.pipeline import BagelPipeline  # noqa: E402

MODES = ("default", "fp8_e4m3fn_fast", "int8", "nf4", "fp8_e4m3fn")
# targets of issue 22, against bf16 ("default") on the same device
TARGETS = {"tokens_per_second": {"fp8_e4m3fn_fast": 1.3, "fp8_e4m3fn": 1.3, "int8": 1.3, "nf4": 1.0},
           "t2i_s": 1.15, "t2i_peak_gb": {"fp8_e4m3fn_fast": 20, "fp8_e4m3fn": 20, "int8": 20, "nf4": 14}}
LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj")


def config(tiny: bool) -> BagelConfig:
    if not tiny:
        return real_config()
    cfg = BagelConfig(llm=LLMConfig(**TINY["llm"]), vit=ViTConfig(**TINY["vit"]))
    return BagelConfig(llm=cfg.llm, vit=cfg.vit, vae={**cfg.vae, **TINY["vae"]})


def timed(fn, device, repeats: int):
    """(peak bytes of one call, median seconds, last result) over ``repeats`` calls (no warm-up here)."""
    times, peak, res = [], 0, None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        res = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device))
    return peak, statistics.median(times), res


def fast_kernels(mode: str, device) -> tuple:
    """(kernels, compiled) for ``select_kernels``: a user's "auto" on CUDA; on a CPU smoke run the GPU's
    choice for this mode, run eagerly."""
    if device.type == "cuda":
        return "auto", True
    fmt = {"fp8_e4m3fn_fast": {"fp8": "scaled_mm"}, "fp8_e4m3fn": {"fp8": "fused"}, "int8": {"int8": "fused"},
           "nf4": {"nf4": "fused", "int8": "fused"}}[mode]
    return fmt, False


def context_question(tokens: int) -> str:
    """A question whose prompt block is ``tokens`` long with the bench tokenizer (one token per 4 chars)."""
    words = "the quick brown fox jumps over the lazy dog and keeps running through the snow "
    return (words * (4 * tokens // len(words) + 1))[: 4 * tokens]


def layer_times(model, device, rows_list, repeats: int) -> list[dict]:
    """Per LLM layer shape and row count: the layer's forward with its chosen kernel, with the dequantizing
    path, and a bf16 F.linear of the same shape (milliseconds, medians of ``repeats`` after a warm-up)."""
    out = []
    layer0 = model.language_model.model.layers[1]
    for name in LAYERS:
        m = layer0.get_submodule(name)
        for rows in rows_list:
            x = torch.randn(rows, m.in_features, device=device, dtype=torch.bfloat16)
            row = dict(layer=name, out_features=m.out_features, in_features=m.in_features, rows=rows)
            ms = {}
            if Q.is_quantized(m.weight):
                kernel = m.kernel
                ms[kernel] = _ms(lambda: m(x), device, repeats)
                if kernel != "dequant":
                    m.kernel = "dequant"
                    ms["dequant"] = _ms(lambda: m(x), device, repeats)
                    m.kernel = kernel
                w = torch.randn(m.out_features, m.in_features, device=device, dtype=torch.bfloat16)
                ms["bf16"] = _ms(lambda: F.linear(x, w), device, repeats)
                del w
            else:
                ms["bf16"] = _ms(lambda: m(x), device, repeats)
            row["ms"] = ms
            out.append(row)
    return out


def _ms(fn, device, repeats):
    fn()
    _, t, _ = timed(fn, device, repeats)
    return 1e3 * t


def run_mode(cfg, mode: str, device, args) -> dict:
    t0 = time.perf_counter()
    model = build_quantized(cfg, mode, device=device)
    pipe = BagelPipeline(model, random_vae(cfg, device=device, dtype=torch.bfloat16), AnswerTokenizer(), cfg)
    kernels, compiled = fast_kernels(mode, device) if mode != "default" else ("auto", True)
    Q.select_kernels(model, device, kernels, compiled)
    pipe.compute_device = device
    row = dict(mode=mode, build_s=time.perf_counter() - t0, weight_bytes=Q.storage_bytes(pipe.modules),
               kernels=pipe.weight_kernels or "bf16")
    question = context_question(args.context)
    size = dict(height=args.size, width=args.size, num_timesteps=args.steps, seed=0)

    def answer():
        return pipe.answer(None, question, max_new_tokens=args.tokens)

    def t2i():
        return pipe.generate(PROMPT, **size)

    t0 = time.perf_counter()
    answer(), t2i()
    sync(device)
    row["warmup_s"] = time.perf_counter() - t0       # compiles, graph captures, cuBLAS handles
    _, _, ans = timed(answer, device, args.repeats)
    row.update(tokens_per_second=ans.stats.get("tokens_per_second"), decoder=ans.stats.get("decoder"),
               context_tokens=len(AnswerTokenizer().text_block(question)))
    row["t2i_peak_bytes"], row["t2i_s"], _ = timed(t2i, device, args.repeats)
    row["t2i_s_per_step"] = row["t2i_s"] / args.steps
    if mode != "default":   # greedy agreement and logits of these kernels against the dequantizing path
        ids = torch.tensor(AnswerTokenizer().text_block(question))

        def last_logits():   # the context prefilled, then one decode step (one row: the fused kernels' case)
            ctx = Context(cfg.llm.num_hidden_layers)
            model.prefill_text(ctx, ids[:-1])
            return model.forward_text(ctx, ids[-1:]).logits[-1]
        logits = last_logits()
        row["layers"] = layer_times(model, device, args.rows, args.repeats)
        Q.select_kernels(model, device, "dequant")
        ref_logits = last_logits()
        ref = answer()
        a, b = ans.token_ids, ref.token_ids
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        row.update(agreement=dict(
            tokens=len(b), first_divergence=first,
            equal_positions=sum(x == y for x, y in zip(a, b)) / max(1, len(b)),
            last_logits_rel=((logits.float() - ref_logits.float()).norm() / ref_logits.float().norm()).item(),
            dequant_tokens_per_second=ref.stats.get("tokens_per_second")))
    else:
        row["layers"] = layer_times(model, device, args.rows, args.repeats)
    return row


def checks(rows: list[dict]) -> dict:
    """Issue 22's targets per quantized mode, against the default row (None where a figure is missing)."""
    base = next((r for r in rows if r["mode"] == "default"), None)
    out = {}
    for r in rows:
        if r["mode"] == "default" or base is None:
            continue
        tok = r["tokens_per_second"] / base["tokens_per_second"] if base.get("tokens_per_second") else None
        t2i = r["t2i_s"] / base["t2i_s"]
        peak = r["t2i_peak_bytes"] / 1e9
        out[r["mode"]] = dict(
            decode_speedup=tok, decode_target=TARGETS["tokens_per_second"][r["mode"]],
            decode_met=None if tok is None else tok >= TARGETS["tokens_per_second"][r["mode"]],
            t2i_ratio=t2i, t2i_met=t2i <= TARGETS["t2i_s"],
            t2i_peak_gb=peak, peak_target_gb=TARGETS["t2i_peak_gb"][r["mode"]],
            peak_met=None if not peak else peak <= TARGETS["t2i_peak_gb"][r["mode"]])
    return out


def auto_order(rows: list[dict]) -> list[str]:
    """``memory.AUTO_ORDER`` as measured: default first (exact, when it fits), then the quantized modes auto
    may take, fastest 1024x1024 image first (ties: faster decoding)."""
    quantized = [r for r in rows if r["mode"] in AUTO_ORDER and r["mode"] != "default"]
    ranked = sorted(quantized, key=lambda r: (r["t2i_s"], -(r["tokens_per_second"] or 0)))
    return ["default"] + [r["mode"] for r in ranked]


def summary(rows: list[dict], meta: dict, smoke: bool) -> list[dict]:
    """The GPU check's table rows (``gpu_check_merge.py``): per mode its figures, issue 22's targets met."""
    def verdict(ok):
        return "smoke" if smoke else ("" if ok is None else ("PASS" if ok else "FAIL"))
    met = checks(rows)
    out = []
    for r in rows:
        c = met.get(r["mode"], {})
        tok = r.get("tokens_per_second") or 0
        out.append(dict(figure=f"{r['mode']}: decode tokens/s ({r['kernels']})", value=round(tok, 1),
                        **(dict(target=f">= {c['decode_target']}x bf16", verdict=verdict(c["decode_met"]))
                           if c else {})))
        out.append(dict(figure=f"{r['mode']}: {meta['size']}² image s ({meta['steps']} steps)", value=round(r["t2i_s"], 3),
                        **(dict(target="<= 1.15x bf16", verdict=verdict(c["t2i_met"])) if c else {})))
        out.append(dict(figure=f"{r['mode']}: peak GB of that image", value=round(r["t2i_peak_bytes"] / 1e9, 2),
                        **(dict(target=f"<= {c['peak_target_gb']}", verdict=verdict(c["peak_met"])) if c else {})))
        if r.get("agreement"):
            g = r["agreement"]
            out.append(dict(figure=f"{r['mode']}: greedy agreement with the dequantizing path",
                            value=f"first divergence {g['first_divergence']}/{g['tokens']}, "
                                  f"logits rel {g['last_logits_rel']:.2e}"))
    if len(rows) > 1:
        out.append(dict(figure="auto order (measured, fastest image first)", value=" > ".join(auto_order(rows))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per image (the shipped workflows: 8)")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens before decoding")
    ap.add_argument("--tokens", type=int, default=128, help="tokens decoded for tokens/s")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 4096], help="rows of the per-layer timings")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    if args.tiny:
        args.size, args.steps, args.context, args.tokens, args.rows = 64, 2, 64, 8, [1, 16, 40]
    cfg = config(args.tiny)
    rows = []
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                torch=torch.__version__, size=args.size, steps=args.steps, context=args.context, tokens=args.tokens,
                tiny=args.tiny, date=time.strftime("%Y-%m-%d %H:%M"))
    for mode in args.modes:
        rows.append(run_mode(cfg, mode, device, args))   # the mode's model is freed on return
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "layers"}), flush=True)
        result = dict(meta, rows=rows, checks=checks(rows), auto_order=auto_order(rows),
                      summary=summary(rows, meta, smoke=args.tiny or device.type != "cuda"))
        if args.out:          # as it goes: a run cut by the GPU check's time limit keeps the modes it measured
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"| mode | kernels | weights GB | t2i peak GB | t2i s ({args.steps} steps) | tokens/s | "
          "agreement (first divergence / tokens) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        agree = r.get("agreement")
        print(f"| {r['mode']} | {r['kernels']} | {r['weight_bytes'] / 1e9:.2f} | {r['t2i_peak_bytes'] / 1e9:.2f} | "
              f"{r['t2i_s']:.2f} | {r['tokens_per_second'] or 0:.1f} | "
              + (f"{agree['first_divergence']}/{agree['tokens']}" if agree else "-") + " |")
    print("auto order (measured):", " > ".join(result["auto_order"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
