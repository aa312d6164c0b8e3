"""One denoising pass (the LLM forward of a 1024² edit step) with 1, 2 and 3 CFG branches, eager vs compiled:
seconds, FLOPs and % of the card's dense bf16 peak (issue 21).

The model is ``BagelModel`` at BAGEL-7B-MoT's shapes with random weights made on the device (no download);
the three branch contexts have the lengths of a 1024² edit (main: VAE block + ViT block + prompt; text-uncond:
the two image blocks; image-uncond: the prompt), prefilled as text (the pass's cost depends on the lengths, not
on what the keys hold). A pass is ``model.velocity_batched`` over the first B contexts: what
``generation.guided_velocity`` runs per step (``batch_cfg``). "compiled" sets the LLM's pass compiler
(``BagelPipeline(compile="all")``); its first call per branch class compiles (reported separately).
FLOPs: the matrix products counted by ``torch.utils.flop_counter`` on the eager pass, plus attention counted
from its shapes (4·n_q·n_k·heads·head_dim per layer and branch: QKᵀ and PV).

    python3 bench/denoise_pass.py --out pass.json                        # CUDA, bf16, 1024²
    python3 bench/denoise_pass.py --shape medium --device cpu --size 512 --out p.json   # CPU medium anchor
    python3 bench/denoise_pass.py --tiny --device cpu --out /tmp/p.json  # smoke
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_specs import card  # noqa: E402
from spec_decode import build_model, config_for, sync  # noqa: E402

from hyperbagel_core.model.compiled import RegionCompiler  # noqa: E402


def edit_context_lengths(size: int, prompt: int = 30) -> list[int]:
    """KV lengths of the three branches of a size² edit: [main, text-uncond, image-uncond]."""
    vae = (size // 16) ** 2 + 2
    vit = (min(size, 980) // 14) ** 2 + 2
    return [vae + vit + prompt, vae + vit, prompt]


def flops(model, ctxs, x, h, w) -> dict:
    """Matrix-product FLOPs (counted) and attention FLOPs (from the shapes) of one pass over ``ctxs``."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        model.velocity_batched(ctxs, x, 0.5, h, w)
    mm = sum(v for op, v in fc.get_flop_counts().get("Global", {}).items() if "mm" in str(op))
    c = model.config.llm
    n_q = h * w + 2
    attn = sum(4 * n_q * (ctx.kv_len + n_q) * c.num_attention_heads * c.head_dim for ctx in ctxs) \
        * c.num_hidden_layers
    return dict(matmul=mm, attention=attn, total=mm + attn)


def timed(fn, dev) -> float:
    """Seconds of one synchronised call."""
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def kernels(fn, dev) -> int | None:
    if dev.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(dev)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="= --shape tiny --size 64 (smoke)")
    ap.add_argument("--shape", default="real", choices=["real", "medium", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024, help="image side (pixels)")
    ap.add_argument("--branches", default="1,2,3")
    ap.add_argument("--compile", default="inductor", help="torch.compile backend of the compiled path, or none")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results (JSON) here")
    a = ap.parse_args(argv)
    if a.tiny:
        a.shape, a.size = "tiny", 64
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_model(config_for(a.shape), dev, dtype, a.seed)
    g = torch.Generator().manual_seed(a.seed)
    V = model.config.llm.vocab_size
    lengths = edit_context_lengths(a.size)
    ctxs = []
    with torch.no_grad():
        for n in lengths:
            ctx = model.new_context()
            model.prefill_text(ctx, torch.randint(4, V, (n,), generator=g))
            ctxs.append(ctx)
    sync(dev)
    build_s = time.perf_counter() - t0
    h = w = a.size // 16
    x = torch.randn(h * w, model.config.patch_latent_dim, generator=g).to(dev)
    spec = card(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    paths = ["eager"] + ([] if a.compile == "none" else ["compiled"])
    comp = None if a.compile == "none" else RegionCompiler(a.compile)
    rows = []
    with torch.no_grad():
        for b in (int(v) for v in a.branches.split(",")):
            fl = flops(model, ctxs[:b], x, h, w)
            row = dict(branches=b, query_tokens=h * w + 2, context=lengths[:b], gflop=round(fl["total"] / 1e9, 3),
                       gflop_matmul=round(fl["matmul"] / 1e9, 3), gflop_attention=round(fl["attention"] / 1e9, 3))
            fn = lambda: model.velocity_batched(ctxs[:b], x, 0.5, h, w)  # noqa: E731
            runs = {p: [] for p in paths}
            for r in range(a.repeats + 1):     # the paths in alternation (load drifts into both); 0: warm-up
                for path in paths:
                    model.language_model.pass_compiler = comp if path == "compiled" else None
                    try:
                        runs[path].append(timed(fn, dev))
                    finally:
                        model.language_model.pass_compiler = None
            for path in paths:
                model.language_model.pass_compiler = comp if path == "compiled" else None
                try:
                    med = statistics.median(runs[path][1:])
                    row[path] = dict(median_s=round(med, 5), runs=[round(t, 5) for t in runs[path][1:]],
                                     first_call_s=round(runs[path][0], 3), tflops=round(fl["total"] / med / 1e12, 4),
                                     kernels=kernels(fn, dev))
                    if spec:
                        row[path]["pct_of_peak"] = round(100 * fl["total"] / med / 1e12 / spec["bf16_tflops"], 1)
                finally:
                    model.language_model.pass_compiler = None
            if "compiled" in row:
                row["compiled_speedup"] = round(row["eager"]["median_s"] / row["compiled"]["median_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.out:                     # as it goes: a step cut by the GPU check's timeout keeps its rows
                Path(a.out).write_text(json.dumps(dict(rows=rows, final=False, summary=summary(
                    rows, spec is None or a.shape != "real")), indent=1))
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
                card=spec, torch=torch.__version__, dtype=str(dtype), args=vars(a), build_s=round(build_s, 2),
                threads=torch.get_num_threads(), compile=comp.stats() if comp else None)
    print(f"# denoising pass {meta['date']} {meta['device']} {a.shape} {a.size}² dtype={dtype}")
    print("| branches | GFLOP | eager s | compiled s | speedup | eager TFLOP/s | compiled TFLOP/s | % of peak (compiled) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        e, c = r["eager"], r.get("compiled", {})
        print(f"| {r['branches']} | {r['gflop']} | {e['median_s']} | {c.get('median_s', '')} | "
              f"{r.get('compiled_speedup', '')} | {e['tflops']} | {c.get('tflops', '')} | {c.get('pct_of_peak', '')} |")
    checks = []
    if spec and all("compiled" in r for r in rows):
        worst = min(r["compiled"]["pct_of_peak"] for r in rows)
        checks.append(f"pass at >= 60 % of dense bf16 peak for every branch count: worst {worst} % "
                      f"({'PASS' if worst >= 60 else 'FAIL'})")
    for line in checks:
        print(line)
    if a.out:
        Path(a.out).write_text(json.dumps(dict(meta=meta, rows=rows, checks=checks,
                                               summary=summary(rows, spec is None or a.shape != "real")), indent=1))
    return 0


def summary(rows, smoke: bool) -> list[dict]:
    """The GPU check's table rows (``gpu_check_merge.py``) with issue 21's target (>= 60 % of peak)."""
    out = []
    for r in rows:
        e, c = r["eager"], r.get("compiled")
        out.append(dict(figure=f"denoising pass {r['branches']} branch(es), eager s ({r['gflop']} GFLOP)",
                        value=e["median_s"]))
        if c:
            pct = c.get("pct_of_peak")
            out.append(dict(figure=f"denoising pass {r['branches']} branch(es), compiled s (% of dense bf16 peak)",
                            value=f"{c['median_s']} ({pct} %)", target=">= 60 %",
                            verdict="smoke" if smoke or pct is None else ("PASS" if pct >= 60 else "FAIL")))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
