"""Per weight mode at BAGEL-7B-MoT's real shapes on a GPU: peak memory of 1024x1024 text-to-image and editing,
decoding tokens/s and seconds per image, against bf16 (issue 10). Random weights, no download.

Each mode builds its own model on the device, quantized module by module (bench/quant_real_shapes.py), so the
bf16 model of a quantized run never exists. Peak memory is ``torch.cuda.max_memory_allocated`` over one call
(weights included), after a warm-up call; times are medians with CUDA synchronisation.

    python bench/quant_gpu.py --out quant_gpu.json                   # CUDA: default, fp8, fp8_fast, int8, nf4
    python bench/quant_gpu.py --tiny --device cpu --size 64 --steps 3  # smoke run at tiny shapes on CPU
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_real_shapes import AnswerTokenizer, build_quantized, random_vae, real_config  # noqa: E402
from sampler import EDIT, PROMPT, TINY  # noqa: E402

from hyperbagel_core import quant as Q  # noqa: E402
from hyperbagel_core.config import BagelConfig, LLMConfig, ViTConfig  # noqa: E402
from hyperbagel_core.pipeline import BagelPipeline  # noqa: E402

MODES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "int8", "nf4")


def config(tiny: bool) -> BagelConfig:
    if not tiny:
        return real_config()
    cfg = BagelConfig(llm=LLMConfig(**TINY["llm"]), vit=ViTConfig(**TINY["vit"]))
    return BagelConfig(llm=cfg.llm, vit=cfg.vit, vae={**cfg.vae, **TINY["vae"]})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_and_time(fn, device, repeats: int):
    """(peak bytes of one call, median seconds, last result), after one warm-up call."""
    res = fn()
    times, peak = [], 0
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


def run_mode(cfg, mode: str, device, args) -> dict:
    t0 = time.perf_counter()
    model = build_quantized(cfg, mode, device=device)
    pipe = BagelPipeline(model, random_vae(cfg, device=device, dtype=torch.bfloat16), AnswerTokenizer(), cfg)
    pipe.compute_device = device
    row = dict(mode=mode, build_s=time.perf_counter() - t0, weight_bytes=Q.storage_bytes(pipe.modules))
    img = Image.new("RGB", (args.size, args.size), (120, 90, 60))
    size = dict(height=args.size, width=args.size, num_timesteps=args.steps, seed=0)
    row["t2i_peak_bytes"], row["t2i_s"], _ = peak_and_time(lambda: pipe.generate(PROMPT, **size), device,
                                                           args.repeats)
    row["edit_peak_bytes"], row["edit_s"], _ = peak_and_time(
        lambda: pipe.edit(img, EDIT, num_timesteps=args.steps, seed=0), device, args.repeats)
    _, _, ans = peak_and_time(lambda: pipe.answer(img, "Describe this image in detail.",
                                                  max_new_tokens=args.tokens), device, args.repeats)
    row["tokens_per_second"] = ans.stats.get("tokens_per_second")
    row["decoder"] = ans.stats.get("decoder")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50, help="num_timesteps of the teacher grid")
    ap.add_argument("--tokens", type=int, default=128, help="tokens decoded for tokens/s")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    cfg = config(args.tiny)
    rows = []
    for mode in args.modes:
        rows.append(run_mode(cfg, mode, device, args))   # the mode's model is freed on return
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                torch=torch.__version__, size=args.size, steps=args.steps, tiny=args.tiny)
    if args.out:
        args.out.write_text(json.dumps(dict(meta, rows=rows), indent=1) + "\n")
    print("| mode | weights GB | t2i peak GB | edit peak GB | t2i s | edit s | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['weight_bytes'] / 1e9:.2f} | {r['t2i_peak_bytes'] / 1e9:.2f} | "
              f"{r['edit_peak_bytes'] / 1e9:.2f} | {r['t2i_s']:.2f} | {r['edit_s']:.2f} | "
              f"{r['tokens_per_second'] or 0:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
