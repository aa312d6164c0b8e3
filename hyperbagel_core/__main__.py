"""Command line: python -m hyperbagel_core generate|edit|answer --model DIR ... (or --demo).

``--demo`` builds a tiny random checkpoint (no download) when no real weights are given, and runs the
whole path on it: the outputs are noise pictures and random text, proving the installation works.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from .errors import HyperbagelError
from .progress import ProgressBar
from .sampling.taylorseer import ADAPTIVE_THRESHOLD, CACHE_CHOICES


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="BAGEL checkpoint: a folder (e.g. ComfyUI/models/bagel/BAGEL-7B-MoT, a "
                                              "fine-tune, a DFloat11 folder) or a single-file .safetensors")
    p.add_argument("--tokenizer", type=Path, help="folder of tokenizer files for a single file (default: found beside it "
                                                  "or in a BAGEL folder next to it, docs/loading.md)")
    p.add_argument("--vae", type=Path, help="FLUX ae.safetensors (default: the checkpoint's, else beside a single file "
                                            "or in models/vae)")
    p.add_argument("--demo", action="store_true", help="use a built-in tiny random checkpoint if --model is absent")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode text eagerly (no CUDA-graphed steps)")
    p.add_argument("--device-map", help="place the model over several devices (accelerate): auto, a JSON object "
                                        "{module: device} or a JSON file; replaces --device")
    p.add_argument("--max-memory", help="per-device budget for --device-map auto, e.g. '0=20GiB,1=24GiB,cpu=64GiB'")
    p.add_argument("--offload-dir", type=Path, help="folder for modules placed on 'disk'")
    p.add_argument("--compile", default="none", choices=["none", "decode", "all"],
                   help="torch.compile the text decode step (decode) and the denoising passes (all)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder")


def _add_image_args(p: argparse.ArgumentParser, text_scale: float, img_scale: float, interval, renorm: str) -> None:
    p.add_argument("--steps", type=int, default=50, help="num_timesteps of the teacher grid (50 = 49 passes)")
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--schedule", default="teacher",
                   help="teacher | hyper-6nfe | hyper-6nfe-shift3 | hyper-1nfe (grid; see sampling/schedules.py)")
    p.add_argument("--solver", default="euler", help="euler | heun | unipc | dpmpp_2m (e.g. --solver unipc --steps 9)")
    p.add_argument("--distilled-expert", type=Path,
                   help="a distilled-expert file: one pass per step, on any schedule (docs/distilled_expert.md)")
    p.add_argument("--cfg-text", type=float, default=text_scale)
    p.add_argument("--cfg-img", type=float, default=img_scale)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=interval)
    p.add_argument("--renorm", default=renorm, choices=["global", "channel", "text_channel"])
    p.add_argument("--think", action="store_true")
    p.add_argument("--cache", default="off", choices=CACHE_CHOICES,
                   help="taylorseer: the official training-free feature cache (predicts some passes per CFG branch); "
                        "adaptive: the same, full steps decided by the input's change")
    p.add_argument("--cache-warmup", type=int, help="TaylorSeer warm-up steps computed in full (official 5)")
    p.add_argument("--cache-interval", type=int, help="TaylorSeer: one full step every N after warm-up (official 3)")
    p.add_argument("--cache-order", type=int, help="TaylorSeer: highest finite-difference order (official 6)")
    p.add_argument("--cache-threshold", type=float, help="adaptive: relative input change that triggers a full step")


def _cache_arg(args):
    """--cache plus any custom setting -> generate/edit's ``cache`` (a custom setting implies the cache)."""
    custom = {k: v for k, v in (("first_enhance", args.cache_warmup), ("fresh_threshold", args.cache_interval),
                                ("max_order", args.cache_order), ("change_threshold", args.cache_threshold))
              if v is not None}
    if custom and args.cache == "adaptive":
        custom.setdefault("change_threshold", ADAPTIVE_THRESHOLD)
    if custom:
        return custom
    return None if args.cache == "off" else args.cache


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hyperbagel_core", description="BAGEL with Hyper-Bagel accelerations")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="text to image")
    _add_common(g)
    g.add_argument("prompt")
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--width", type=int, default=1024)
    _add_image_args(g, 4.0, 1.0, [0.4, 1.0], "global")
    e = sub.add_parser("edit", help="edit an image")
    _add_common(e)
    e.add_argument("image", type=Path)
    e.add_argument("prompt")
    _add_image_args(e, 4.0, 2.0, [0.0, 1.0], "text_channel")
    a = sub.add_parser("answer", help="answer a question about images (VQA)")
    _add_common(a)
    a.add_argument("question")
    a.add_argument("--image", type=Path, action="append", default=[])
    a.add_argument("--max-new-tokens", type=int, default=512)
    a.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    a.add_argument("--temperature", type=float, default=0.3)
    a.add_argument("--think", action="store_true")
    a.add_argument("--drafter", default="none", help="none | prompt_lookup | draft_head (speculative decoding)")
    a.add_argument("--draft-head", type=Path, help="draft-head file for --drafter draft_head")
    q = sub.add_parser("quantize", help="write a pre-quantized copy of a bf16 BAGEL folder (docs/quantization.md)")
    q.add_argument("src", type=Path, help="official bf16 BAGEL folder")
    q.add_argument("dst", type=Path, help="new folder to write")
    q.add_argument("--mode", required=True, choices=["fp8_e4m3fn", "int8", "nf4"])
    d = sub.add_parser("demo", help="generate, edit and answer once (tiny built-in checkpoint without --model)")
    _add_common(d)
    d.set_defaults(demo=True)
    return ap


def run_demo(pipe, args) -> None:
    """The whole path once: text to image, an edit of it, a question about it."""
    real = args.model is not None
    size = 512 if real else 64
    steps = 50 if real else 8
    with ProgressBar("generate") as bar:
        gen = pipe.generate("A red circle and a blue square on a white background.", height=size, width=size,
                            seed=args.seed, num_timesteps=steps, callback=bar)
    gen.image.save(args.out / "demo_generate.png")
    with ProgressBar("edit") as bar:
        ed = pipe.edit(gen.image, "Change the color of the circle to purple.", seed=args.seed, num_timesteps=steps,
                       callback=bar)
    ed.image.save(args.out / "demo_edit.png")
    with ProgressBar("answer", unit="tok") as bar:
        ans = pipe.answer(gen.image, "What is in this picture?", max_new_tokens=64 if real else 16, callback=bar)
    (args.out / "demo_answer.txt").write_text(ans.text, encoding="utf-8")
    print(f"wrote {args.out}/demo_generate.png {gen.image.size}, {args.out}/demo_edit.png {ed.image.size}")
    print(f"answer: {ans.text!r}  ({ans.stats.get('tokens_per_second', 0):.1f} tokens/s)")
    if not real:
        print("(tiny random checkpoint: pictures are noise and the answer is random text; "
              "pass --model DIR for the real BAGEL-7B-MoT)")


def _pipeline(args):
    from .pipeline import BagelPipeline
    folder = args.model
    if folder is None:
        if not args.demo:
            raise HyperbagelError("give --model PATH (a BAGEL checkpoint folder or single file) or --demo for the "
                                  "tiny built-in one")
        from .testing import make_tiny_checkpoint
        folder = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="hyperbagel-demo-")) / "tiny-bagel")
        print(f"demo: no weights given, built a tiny random checkpoint at {folder}")
    from .placement import parse_device_map
    placed = args.device_map is not None or args.max_memory is not None
    gpu = torch.cuda.is_available() if placed else str(args.device).startswith("cuda")
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    pipe = BagelPipeline.from_pretrained(folder, device=args.device, dtype=dtype, cuda_graphs=not args.no_cuda_graphs,
                                         device_map=parse_device_map(args.device_map), max_memory=args.max_memory,
                                         offload_dir=args.offload_dir, tokenizer=args.tokenizer, vae=args.vae,
                                         compile=args.compile)
    if placed:
        print(f"placed: main device {pipe.device}; {pipe.model.placement.summary(pipe.model)}")
    return pipe


def _quantize(args) -> int:
    from .loading import quantize_folder
    t0 = time.perf_counter()
    with ProgressBar("quantizing", unit="tensor") as bar:
        record = quantize_folder(args.src, args.dst, args.mode, progress=bar)
    src, dst = (args.src / "ema.safetensors").stat().st_size, (args.dst / "ema.safetensors").stat().st_size
    print(f"wrote {args.dst} ({args.mode}, {record['quantized_modules']} quantized layers): ema.safetensors "
          f"{src / 1e9:.2f} GB -> {dst / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        if args.cmd == "quantize":
            return _quantize(args)
        pipe = _pipeline(args)
        args.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if args.cmd == "demo":
            run_demo(pipe, args)
            return 0
        if args.cmd == "answer":
            from PIL import Image
            images = [Image.open(p) for p in args.image]
            if args.drafter == "draft_head":
                if args.draft_head is None:
                    raise HyperbagelError("--drafter draft_head needs --draft-head FILE")
                pipe.load_draft_head(args.draft_head)
            with ProgressBar("decoding", unit="tok") as bar:
                res = pipe.answer(images or None, args.question, max_new_tokens=args.max_new_tokens,
                                  do_sample=args.sample, temperature=args.temperature, seed=args.seed,
                                  think=args.think, drafter=args.drafter, callback=bar)
            (args.out / "answer.txt").write_text(res.text, encoding="utf-8")
            print(res.text)
            print(json.dumps(res.stats, default=float))
            return 0
        if args.distilled_expert is not None:
            pipe.load_distilled_expert(args.distilled_expert)
        kw = dict(seed=args.seed, num_timesteps=args.steps, timestep_shift=args.shift, schedule=args.schedule,
                  solver=args.solver, cfg_text_scale=args.cfg_text, cfg_img_scale=args.cfg_img,
                  cfg_interval=tuple(args.cfg_interval), cfg_renorm_type=args.renorm, think=args.think,
                  cache=_cache_arg(args))
        with ProgressBar("denoising") as bar:
            if args.cmd == "generate":
                res = pipe.generate(args.prompt, height=args.height, width=args.width, callback=bar, **kw)
            else:
                from PIL import Image
                res = pipe.edit(Image.open(args.image), args.prompt, callback=bar, **kw)
        path = args.out / f"{args.cmd}_{args.seed}.png"
        res.image.save(path)
        if res.thinking:
            print("thinking:", res.thinking)
        print(f"wrote {path} ({res.image.size[0]}x{res.image.size[1]}) in {time.perf_counter() - t0:.2f}s")
        if "predicted" in res.stats:
            print(f"{res.stats['cache']}: {res.stats['computed']} branch passes computed, {res.stats['predicted']} "
                  f"predicted ({res.stats['passes']} forwards)")
        return 0
    except HyperbagelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
