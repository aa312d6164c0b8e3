"""One model placed over a GPU and CPU RAM (accelerate offload) against the same model resident on the GPU.

The real ``BagelModel`` at BAGEL-7B-MoT's shapes with random weights made on the GPU (meta build, init in
place, no download). The placed copy shares the GPU-resident tensors and holds the last ``--cpu-layers``
decoder layers in CPU RAM, placed by ``placement.Placement`` (plan, store, accelerate's ``dispatch_model``):
what ``BagelPipeline.from_pretrained(device_map=...)`` builds, minus reading the file. Both run the sampler's
teacher loop (``generation.teacher_sample``, 3 CFG branches, batched) at ``--size`` for ``--steps`` steps on a
``--prompt-len`` token context, and greedy text decoding (``decoding.generate_text``; the single-device model
also through its CUDA-graphed static decoder, what ``answer`` uses there). Reported: seconds per denoising step
and tokens per second of each, the placed/single ratio, the largest difference of the final latents and whether
the greedy ids agree, and where the KV cache of each layer lives (the offloaded layers compute on the GPU, so
their caches are there too).

    python bench/placement.py --out placement.json                               # CUDA, bf16 (~1.5 min, H100)
    python bench/placement.py --tiny --device cpu --out /tmp/p.json              # CPU smoke: CPU + disk split
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperbagel_core.decoding import generate_text  # noqa: E402
from hyperbagel_core.generation import CFGSettings, teacher_sample  # noqa: E402
from hyperbagel_core.model.bagel import BagelModel  # noqa: E402
from hyperbagel_core.model.static_decode import StaticTextDecoder  # noqa: E402
from hyperbagel_core.placement import Placement  # noqa: E402
from hyperbagel_core.sampling.schedules import get_schedule  # noqa: E402
from hyperbagel_core.testing import tiny_config  # noqa: E402
from spec_decode import BAGEL_7B, build_model, sync  # noqa: E402  (the same random real-shape model)


@torch.no_grad()
def place(ref: BagelModel, device_map: dict, offload_dir) -> BagelModel:
    """The same weights placed by ``Placement``: GPU-mapped tensors shared with ``ref``, the rest stored by the
    placement (copied to CPU RAM, or written to the offload folder)."""
    with torch.device("meta"):
        model = BagelModel(ref.config)
    pl = Placement(device_map, offload_dir=offload_dir)
    pl.plan(model, ref.dtype)
    sd = {k: pl.store(k, v) for k, v in ref.state_dict().items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.set_special_tokens(2, 3)
    model.requires_grad_(False).eval()
    return pl.dispatch(model)


@torch.no_grad()
def run(model, args, size: int, static: bool = False) -> dict:
    dev = model.device
    g = torch.Generator().manual_seed(args.seed)
    V = model.config.llm.vocab_size
    ids = torch.randint(4, V, (args.prompt_len,), generator=g)
    sync(dev)
    t0 = time.perf_counter()
    main = model.new_context()
    model.prefill_text(main, ids)
    sync(dev)
    prefill_s = time.perf_counter() - t0
    h = w = size // model.config.latent_downsample
    noise = torch.randn(h * w, model.config.patch_latent_dim, generator=g)
    grid = get_schedule("teacher", args.steps + 1, 3.0).timesteps
    cfg = CFGSettings(4.0, 1.0, (0.0, 1.0), "global", 0.0)   # CFG on every step: 3 branches each
    sync(dev)
    t0 = time.perf_counter()
    x = teacher_sample(model, main, model.new_context(), main.fork(), h, w, noise, cfg, timesteps=grid)
    sync(dev)
    denoise_s = (time.perf_counter() - t0) / args.steps
    out = dict(prefill_s=prefill_s, denoise_s_per_step=denoise_s, latent=x.float().cpu())
    decoders = [("eager", model)] + ([("static", StaticTextDecoder(model))] if static else [])
    for name, dec in decoders:
        ctx = main.fork()
        generate_text(dec, ctx, bos_id=1, eos_id=-1, max_new_tokens=2)   # warm-up (graph capture)
        ctx = main.fork()
        sync(dev)
        t0 = time.perf_counter()
        toks = generate_text(dec, ctx, bos_id=1, eos_id=-1, max_new_tokens=args.tokens)
        sync(dev)
        out[f"decode_{name}_tok_s"] = len(toks) / (time.perf_counter() - t0)
        out[f"ids_{name}"] = toks
        if hasattr(dec, "release"):
            dec.release()
    out["kv_devices"] = sorted({str(d) for d in (main._store.devices or ())})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--cpu-layers", type=int, default=None,
                    help="last decoder layers placed in CPU RAM (disk when --device cpu); default 8 (tiny: 1)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024; tiny 64)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    cfg = tiny_config(layers=4, vocab_size=1024) if args.tiny else BAGEL_7B
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    n_cpu = args.cpu_layers if args.cpu_layers is not None else (1 if args.tiny else 8)
    size = args.size or (64 if args.tiny else 1024)
    L = cfg.llm.num_hidden_layers
    offloaded = "cpu" if dev.type == "cuda" else "disk"
    device_map = {"": str(dev), **{f"language_model.model.layers.{i}": offloaded for i in range(L - n_cpu, L)}}

    t0 = time.perf_counter()
    ref = build_model(cfg, dev, dtype, args.seed)
    sync(dev)
    build_s = time.perf_counter() - t0
    single = run(ref, args, size, static=dev.type == "cuda")
    with tempfile.TemporaryDirectory(prefix="hb-offload-") as tmp:
        t0 = time.perf_counter()
        placed_model = place(ref, device_map, tmp)
        place_s = time.perf_counter() - t0
        placed = run(placed_model, args, size)
        summary = placed_model.placement.summary(placed_model)
        exec_kv = sorted({str(d) for d in placed_model.language_model.kv_devices})
        del placed_model

    diff = (placed["latent"] - single["latent"]).abs().max().item()
    scale = single["latent"].abs().max().item()
    result = dict(
        bench="placement", date=datetime.date.today().isoformat(), device=args.device,
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, shapes="tiny" if args.tiny else "BAGEL-7B-MoT", dtype=args.dtype,
        size=size, steps=args.steps, prompt_len=args.prompt_len, tokens=args.tokens,
        device_map={k: v for k, v in device_map.items()}, placement=summary, build_s=build_s, place_s=place_s,
        single={k: v for k, v in single.items() if k not in ("latent",)},
        placed={k: v for k, v in placed.items() if k not in ("latent",)},
        layer_exec_devices=exec_kv,
        latent_max_abs_diff=diff, latent_max_abs=scale, latent_bitwise_equal=diff == 0.0,
        greedy_ids_equal=single["ids_eager"] == placed["ids_eager"],
        denoise_ratio=placed["denoise_s_per_step"] / single["denoise_s_per_step"],
        decode_ratio_vs_eager=single["decode_eager_tok_s"] / placed["decode_eager_tok_s"],
    )
    if "decode_static_tok_s" in single:
        result["decode_ratio_vs_static"] = single["decode_static_tok_s"] / placed["decode_eager_tok_s"]
    # the greedy ids are reported, not required: random-weight logits nearly tie, so a last-bit difference
    # could flip one (none is expected: same weight bits, same kernels)
    ok = diff <= 1e-2 * max(scale, 1.0) and result["placed"]["kv_devices"] == exec_kv
    result["summary"] = [   # the GPU check's table rows (gpu_check_merge.py)
        dict(figure=f"placed ({n_cpu} layers in {offloaded}) vs single: largest latent difference",
             value=f"{diff:.3g} (of {scale:.3g}); greedy ids equal: {result['greedy_ids_equal']}",
             target="<= 1e-2 x scale", verdict="PASS" if ok else "FAIL"),
        dict(figure=f"denoise s/step, single / placed ({size}², 3 branches)",
             value=f"{single['denoise_s_per_step']:.3f} / {placed['denoise_s_per_step']:.3f} "
                   f"({result['denoise_ratio']:.2f}x)"),
        dict(figure="decode tokens/s, single eager / placed eager" + (" (single graphed)" if "decode_static_tok_s"
                                                                       in single else ""),
             value=f"{single['decode_eager_tok_s']:.1f} / {placed['decode_eager_tok_s']:.1f}"
                   + (f" ({single['decode_static_tok_s']:.1f})" if "decode_static_tok_s" in single else ""))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("single", "placed", "device_map")}, indent=1))
    print("placement check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
