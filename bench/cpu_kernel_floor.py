"""How fast can the CPU perf set go at all? The time our runs spend inside PyTorch's compute kernels.

The side-by-side kit (``../shared/perf``) compares the official code and ours at equal network passes, so both
sides do the same arithmetic. This script runs each case of the set through the conformance runner (what the
kit times) and reports, per case:

* the FLOPs by kind (``torch.utils.flop_counter`` for matrix products and convolutions; attention counted from
  the SDPA call shapes, 4 * n_q * n_k * d per head, masked-out pairs excluded);
* the seconds spent inside the compute kernels (matrix products, the SDPA flash kernel, convolutions; self time
  from ``torch.profiler``) and their throughput, next to a large fp32 GEMM's throughput on the same threads;
* the kernel floor: the run's time if everything but those kernels took no time at all, and, with
  ``--official``, the best ratio the kit could report: official seconds / kernel floor.

    python3 bench/cpu_kernel_floor.py --set <kit run>/set --official <kit run>/official.json --out floor.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperbagel_core import conformance  # noqa: E402
from hyperbagel_core.model import attention as attention_module  # noqa: E402
from hyperbagel_core.pipeline import BagelPipeline  # noqa: E402

KINDS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
         "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
         "convolution": ("aten::mkldnn_convolution", "aten::convolution_overrideable")}


class AttentionFlops:
    """Counts SDPA FLOPs while active (the flop counter has no rule for the CPU flash kernel)."""

    def __init__(self):
        self.flops = 0.0
        self._sdpa = F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, is_causal=False, **kw):
        nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
        frac = 1.0
        if is_causal:
            frac = (nq + 1) / (2 * nq)
        elif attn_mask is not None:
            frac = float(attn_mask.float().mean()) if attn_mask.dtype == torch.bool else 1.0
        self.flops += 4.0 * nq * nk * d * (q.numel() // (nq * d)) * frac
        return self._sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    def __enter__(self):
        F.scaled_dot_product_attention = self
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._sdpa


def dense_lower_right(n_q: int, n_k: int) -> torch.Tensor:
    """The flop counter cannot run with ``CausalBias`` (a tensor subclass); a dense mask has the same FLOPs."""
    return torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)


def count_flops(pipe, case, root: Path) -> dict:
    from torch.utils.flop_counter import FlopCounterMode
    lower_right = attention_module.causal_lower_right
    attention_module.causal_lower_right = dense_lower_right
    try:
        with AttentionFlops() as att, FlopCounterMode(display=False) as fc:
            conformance.run_case(pipe, case, root)
    finally:
        attention_module.causal_lower_right = lower_right
    per_op = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    conv = sum(v for k, v in per_op.items() if "convolution" in k)
    return {"matmul": fc.get_total_flops() - conv, "convolution": conv, "attention": att.flops}


def kernel_seconds(pipe, case, root: Path) -> tuple[float, dict]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        conformance.run_case(pipe, case, root)
        wall = time.perf_counter() - t0
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    return wall, {kind: sum(self_us.get(n, 0.0) for n in names) / 1e6 for kind, names in KINDS.items()}


def gemm_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", required=True, type=Path, help="the perf set (a folder with manifest.json)")
    ap.add_argument("--official", type=Path, help="the kit's official.json of the same run, for the bound")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", action="append", help="only this case (repeatable)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    manifest = json.loads((args.set / "manifest.json").read_text())
    official = json.loads(args.official.read_text())["cases"] if args.official else {}
    pipe = BagelPipeline.from_pretrained(args.set / manifest["model"]["path"], device="cpu", dtype=torch.float32)
    report = {"threads": args.threads, "torch": torch.__version__, "gemm_2048_gflops": gemm_peak(), "cases": {}}
    print(f"fp32 GEMM 2048^3 on {args.threads} threads: {report['gemm_2048_gflops']:.0f} GFLOP/s")
    for case in manifest["cases"]:
        if args.case and case["name"] not in args.case:
            continue
        conformance.run_case(pipe, case, args.set)  # warm-up
        t0 = time.perf_counter()
        conformance.run_case(pipe, case, args.set)
        wall = time.perf_counter() - t0
        _, kern = kernel_seconds(pipe, case, args.set)
        flops = count_flops(pipe, case, args.set)
        floor = sum(kern.values())
        row = {"wall_s": wall, "kernel_s": kern, "kernel_floor_s": floor, "gflop": {k: v / 1e9 for k, v in flops.items()},
               "gflops_per_s": {k: flops[k] / 1e9 / kern[k] for k in kern if kern[k] > 0}}
        off = official.get(case["name"], {}).get("seconds_median")
        if off:
            row.update(official_s=off, ratio_now=off / wall, ratio_bound=off / floor)
        report["cases"][case["name"]] = row
        rates = ", ".join(f"{k} {row['gflop'][k]:.0f} GFLOP in {kern[k]:.2f} s ({row['gflops_per_s'].get(k, 0):.0f}/s)"
                          for k in kern)
        print(f"{case['name']}: wall {wall:.2f} s; kernels {floor:.2f} s ({rates})"
              + (f"; official {off:.2f} s: now {off / wall:.2f}x, bound {off / floor:.2f}x" if off else ""))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
