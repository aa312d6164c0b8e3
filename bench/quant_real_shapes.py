"""BAGEL-7B-MoT at its real shapes, quantized while it is built, answering and denoising on CPU (issue 10).

No download: random weights (fan-in scaled normals from a ``NormalBank``, norms 1, small biases, the sin-cos
position tables),
created module by module and quantized at once, so the bf16 model (29.2 GB) never exists; peak RSS stays
near the quantized model. Then, on CPU: ``answer`` a few greedy tokens about a 256x256 image (ViT prefill,
text prefill, decoding through the quantized und expert) and one 256x256 ``generate`` step (one denoising
pass, CFG off so one branch, then the VAE decode). Reports the stored bytes per part, the peak RSS and the
wall times.

    python bench/quant_real_shapes.py --mode int8                 # full size (needs ~18 GB free RAM)
    python bench/quant_real_shapes.py --mode fp8_e4m3fn --layers 2  # reduced scale: 2 of 28 decoder layers
    python bench/quant_real_shapes.py --bytes                      # stored bytes of every mode (meta tensors)
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampler import PROMPT, REAL, ByteTokenizer  # noqa: E402  (the benches' shared real shapes)

from hyperbagel_core import quant as Q  # noqa: E402
from hyperbagel_core.config import BagelConfig, LLMConfig, ViTConfig  # noqa: E402
from hyperbagel_core.memory import weight_bytes  # noqa: E402
from hyperbagel_core.model.bagel import BagelModel  # noqa: E402
from hyperbagel_core.model.embeddings import sincos_2d_table  # noqa: E402
from hyperbagel_core.model.vae import FluxVAE  # noqa: E402
from hyperbagel_core.pipeline import BagelPipeline  # noqa: E402


class AnswerTokenizer(ByteTokenizer):
    """The benches' byte tokenizer plus the decoding side ``answer`` needs (ids shown as numbers)."""

    def answer_text(self, ids) -> str:
        return " ".join(str(i) for i in ids)


def real_config(layers: int | None = None, vit_layers: int | None = None) -> BagelConfig:
    llm, vit = dict(REAL["llm"]), dict(REAL["vit"])
    if layers:
        llm["num_hidden_layers"] = layers
    if vit_layers:
        vit["num_hidden_layers"] = vit_layers
    return BagelConfig(llm=LLMConfig(**llm), vit=ViTConfig(**vit))


def rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class NormalBank:
    """Standard normals for random weights: one bank of 2^24 values drawn once, read at random offsets with
    random signs, in row chunks written straight into the target dtype. Drawing 14.6 B fresh normals would
    take most of the run on 2 cores and an fp32 copy of the 1.1 GB embedding would double the peak RSS;
    the weights' values only need to be plausible here (quality is measured by bench/quant_quality.py)."""

    def __init__(self, seed: int, size: int = 1 << 24, device="cpu"):
        self.gen = torch.Generator().manual_seed(seed)
        self.bank = torch.randn(2 * size, generator=self.gen).to(device)
        self.size, self.device = size, device

    def fill(self, out: torch.Tensor, std: float) -> torch.Tensor:
        flat = out.view(-1)
        for i in range(0, flat.numel(), self.size):
            n = min(self.size, flat.numel() - i)
            start = int(torch.randint(0, self.size, (1,), generator=self.gen))
            sign = -std if torch.rand(1, generator=self.gen).item() < 0.5 else std
            flat[i:i + n] = self.bank[start:start + n] * sign
        return out


def _random(name: str, shape, bank: NormalBank, dtype) -> torch.Tensor:
    if name.endswith("pos_embed"):
        return sincos_2d_table(int(round(shape[0] ** 0.5)), shape[1]).to(bank.device, dtype)
    if len(shape) == 1:
        if "norm" in name and name.endswith("weight"):
            return torch.ones(shape, dtype=dtype, device=bank.device)
        return bank.fill(torch.empty(shape, dtype=dtype, device=bank.device), 0.02)
    return bank.fill(torch.empty(shape, dtype=dtype, device=bank.device), shape[-1] ** -0.5)


def build_quantized(cfg: BagelConfig, mode: str, dtype=torch.bfloat16, seed: int = 0, device="cpu") -> BagelModel:
    """The model built on the meta device, then materialized one module at a time; each weight ``mode``
    quantizes is quantized as soon as it exists and its dense copy dropped."""
    with torch.device("meta"):
        model = BagelModel(cfg).to(dtype)
    plan = Q.quantized_modules(model, mode) if mode != "default" else {}
    bank = NormalBank(seed, device=device)
    for mname, m in model.named_modules():
        for pname, p in list(m.named_parameters(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            t = _random(full, tuple(p.shape), bank, dtype)
            if pname == "weight" and mname in plan:
                q, s = Q.quantize(t, plan[mname])
                del t
                Q.set_storage(m, q, s, dtype, fp8_matmul=mode == "fp8_e4m3fn_fast")
            else:
                m._parameters[pname] = nn.Parameter(t, requires_grad=False)
        for bname, b in list(m.named_buffers(recurse=False)):
            if b.is_meta:
                m._buffers[bname] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    model.compute_dtype, model.weight_dtype = dtype, mode
    return model.requires_grad_(False).eval()


def bytes_table(dtype=torch.bfloat16) -> list[dict]:
    cfg = real_config()
    rows = []
    for mode in ("default", "fp8_e4m3fn", "int8", "nf4"):
        parts = weight_bytes(cfg, mode, dtype, torch.float32)
        bagel = parts["und"] + parts["vit"] + parts["gen"]
        rows.append(dict(mode=mode, bagel_gb=bagel / 1e9, vae_fp32_gb=parts["vae"] / 1e9,
                         **{f"{k}_gb": v / 1e9 for k, v in parts.items() if k != "vae"},
                         answer_gb=(parts["und"] + parts["vit"]) / 1e9,
                         generate_gb=(parts["und"] + parts["gen"] + parts["vae"]) / 1e9))
    return rows


def random_vae(cfg: BagelConfig, device="cpu", dtype=torch.float32) -> FluxVAE:
    with torch.device("meta"):
        vae = FluxVAE.from_config(cfg.vae)
    vae = vae.to_empty(device=device).to(dtype)
    bank = NormalBank(1, device=device)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.copy_(_random(name, tuple(p.shape), bank, dtype))
    return vae.requires_grad_(False).eval()


def run(args) -> dict:
    torch.set_grad_enabled(False)
    cfg = real_config(args.layers, args.vit_layers)
    t0 = time.perf_counter()
    model = build_quantized(cfg, args.mode)
    built = time.perf_counter() - t0
    rss_built = rss_gb()
    vae = random_vae(cfg)
    pipe = BagelPipeline(model, vae, AnswerTokenizer(), cfg)
    out = dict(mode=args.mode, layers=cfg.llm.num_hidden_layers, vit_layers=cfg.vit.num_hidden_layers,
               bagel_bytes=Q.storage_bytes(model), vae_bytes=Q.storage_bytes(vae), build_s=built,
               peak_rss_after_build_gb=rss_built, threads=torch.get_num_threads(),
               cpu=platform.processor() or platform.machine())
    img = Image.new("RGB", (256, 256), (120, 90, 60))
    t0 = time.perf_counter()
    ans = pipe.answer(img, "What is in this picture?", max_new_tokens=args.tokens)
    out.update(answer_s=time.perf_counter() - t0, answer_tokens=ans.token_ids)
    t0 = time.perf_counter()
    res = pipe.generate(PROMPT, height=256, width=256, num_timesteps=2, cfg_text_scale=1.0, cfg_img_scale=1.0,
                        seed=0)
    out.update(denoise_256_s=time.perf_counter() - t0, latent_finite=bool(torch.isfinite(res.latent).all()),
               latent_std=float(res.latent.float().std()), peak_rss_gb=rss_gb())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="int8", choices=["default"] + list(Q.QUANT_MODES))
    ap.add_argument("--layers", type=int, default=None, help="LLM decoder layers (default: all 28)")
    ap.add_argument("--vit-layers", type=int, default=None, help="ViT encoder layers (default: all 26)")
    ap.add_argument("--tokens", type=int, default=4, help="greedy tokens to answer")
    ap.add_argument("--bytes", action="store_true", help="only the stored bytes of every mode (meta, full size)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = bytes_table() if args.bytes else run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
