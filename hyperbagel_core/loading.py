"""Load BAGEL weights and the FLUX autoencoder (``formats.resolve`` says from which files).

Every file is checked before any tensor is read: safetensors headers are parsed by hand (so a truncated or
non-safetensors file gets one clear message naming it), the key set and every shape are compared with the
model built on the meta device, and only then are tensors read one by one with ``safetensors.safe_open``
and assigned, so a 29 GB checkpoint never sits twice in memory. No pickle / ``torch.load`` anywhere.
Every tensor read from a file goes through ``aligned`` (see there why).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import torch

from . import quant
from .config import BagelConfig
from .errors import CheckpointError
from .fingerprint import file_fingerprints
from .formats import check_folder, load_config   # noqa: F401  (also importable from here, as before)
from .model.bagel import BagelModel
from .model.vae import FluxVAE
from .tensor_io import aligned, check_against, check_dtypes, read_safetensors_header

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")


def _load_tensors(path: Path, names, device, dtype=None, quantize_as=None, keep=(),
                  store=None) -> dict[str, torch.Tensor]:
    """Read ``names`` one by one, cast floating tensors to ``dtype`` (except those in ``keep``: stored
    quantized), and quantize the weights of the modules in ``quantize_as`` ({module: format}) as they come,
    so at most one dense tensor exists beside what was already kept. ``store(name, tensor)``, when given,
    says what is kept of each final tensor (a placed model: moved to its device, or offloaded to disk)."""
    keep_tensor = (lambda name, t: t) if store is None else store
    from safetensors import safe_open
    quantize_as = quantize_as or {}
    out = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in names:
                t = f.get_tensor(name)
                module, _, leaf = name.rpartition(".")
                if leaf == "weight" and module in quantize_as:
                    q, s = quant.quantize(t, quantize_as[module])
                    out[name] = keep_tensor(name, aligned(q))
                    out[name + "_scale"] = keep_tensor(name + "_scale", aligned(s))
                    continue
                keep_it = dtype is None or not t.is_floating_point() or name in keep
                out[name] = keep_tensor(name, aligned(t if keep_it else t.to(dtype)))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: could not read tensors ({e}); re-download it") from e
    return out


def load_bagel_model(weights: Path, config: BagelConfig, *, device, dtype, ops=None, weight_dtype: str = "default",
                     placement=None, main_reserve: int = 0):
    """BagelModel with the weights of ``weights`` (a file, or a folder's ``ema.safetensors``), in ``dtype`` on
    ``device``.

    ``placement`` (``placement.Placement``): over several devices instead; its map is planned on the meta model
    (keeping ``main_reserve`` bytes free on the main device), each tensor goes to its device as it is read,
    and accelerate's hooks are attached at the end.

    ``weight_dtype`` (``quant.QUANT_MODES``): quantize the official bf16 weights tensor by tensor while
    reading them. A pre-quantized folder (``python -m hyperbagel_core quantize``) loads in its own mode;
    ``model.base_fingerprints`` then identifies the bf16 weights for draft heads and distilled experts.
    """
    path = Path(weights)
    path = path / "ema.safetensors" if path.is_dir() else path
    header = read_safetensors_header(path)
    with torch.device("meta"):
        model = BagelModel(config, ops=ops)
    stored = quant.read_quantized_metadata(path)
    keep, quantize_as = (), None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if stored is not None:
        quant.check_quantized_folder(path, stored, weight_dtype)
        plan = quant.prepare_meta(model, stored["mode"], dtype)
        keep = {f"{m}.{t}" for m in plan for t in ("weight", "weight_scale")}
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_against(path, header, expected)
        check_dtypes(path, {k: v for k, v in header.items() if k not in keep})  # stored codes are integers
        model.base_fingerprints = stored["fingerprints"]
    else:
        check_against(path, header, expected)
        check_dtypes(path, header)
        if weight_dtype in quant.QUANT_MODES:
            model.base_fingerprints = file_fingerprints(path, list(header))
            quantize_as = quant.prepare_meta(model, weight_dtype, dtype)
        elif weight_dtype != "default":
            raise ValueError(f"unknown weight_dtype {weight_dtype!r}; choose one of {', '.join(quant.WEIGHT_DTYPES)}")
    store = None
    if placement is not None:
        placement.plan(model, dtype, main_reserve)  # quantized layers already have their stored dtypes
        device, store = "cpu", placement.store
    sd = _load_tensors(path, expected, device, dtype, quantize_as=quantize_as, keep=keep, store=store)
    model.load_state_dict(sd, strict=True, assign=True)
    model.weight_dtype = stored["mode"] if stored is not None else weight_dtype
    if model.weight_dtype != "default":
        model.compute_dtype = dtype  # the LM head may be stored int8 (nf4 mode): it no longer tells
    model.requires_grad_(False).eval()
    return model if placement is None else placement.dispatch(model)


def load_vae(source, config: BagelConfig, *, device, dtype, ops=None):
    """The FLUX autoencoder described by ``config.vae``, from ``source``: a folder's ``ae.safetensors``, an
    ``ae.safetensors`` file, or a state dict under the official FLUX names (ComfyUI's core VAE), copied."""
    if isinstance(source, Mapping):
        path, header = "the VAE given", {k: (tuple(v.shape), "F32") for k, v in source.items()}
    else:
        path = Path(source)
        path = path / "ae.safetensors" if path.is_dir() else path
        header = read_safetensors_header(path)
        check_dtypes(path, header)
    with torch.device("meta"):
        vae = FluxVAE.from_config(config.vae, ops=ops)
    converted = FluxVAE.convert_official_state_dict({k: torch.empty(s, device="meta") for k, (s, _) in
                                                     header.items()}, vae.levels)
    try:
        vae.check_state_dict(converted)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}. Check ae_config.json or re-download ae.safetensors.") from e
    if isinstance(source, Mapping):
        # copies (never the caller's storage: core's VAE moves and patches its own), aligned like file tensors
        tensors = {k: aligned(v.detach().to(device=device, dtype=dtype, copy=True)) for k, v in source.items()}
    else:
        tensors = _load_tensors(path, header, device, dtype)
    vae.load_state_dict(FluxVAE.convert_official_state_dict(tensors, vae.levels), strict=True, assign=True)
    return vae.requires_grad_(False).eval()


def quantize_folder(src, dst, mode: str, progress=None) -> dict:
    """Write ``dst``: ``src``'s BAGEL folder with ``ema.safetensors`` stored in ``mode`` (docs/quantization.md).

    Tensors are read, quantized and kept one at a time (the bf16 model is never held); the companion files
    are hard-linked when possible, else copied. Returns the quantization record.
    """
    import os
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    quant.check_mode(mode)
    src, dst = check_folder(src), Path(dst)
    path = src / "ema.safetensors"
    if quant.read_quantized_metadata(path) is not None:
        raise CheckpointError(f"{src}: already quantized; quantize the official bf16 folder instead")
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the destination must be a new folder, not the source")
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst}: exists and is not empty; choose a new folder")
    config = load_config(src)
    header = read_safetensors_header(path)
    with torch.device("meta"):
        model = BagelModel(config)
    check_against(path, header, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    plan = quant.quantized_modules(model, mode)
    record = {"mode": mode, "nf4_block": quant.NF4_BLOCK, "int8_group": quant.INT8_GROUP,
              "fingerprints": file_fingerprints(path, list(header)),
              "base_name": src.name, "quantized_modules": len(plan),
              "companions": {p.name: quant.file_digest(p) for p in quant.companion_files(src)}}
    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for i, name in enumerate(header):
            t = f.get_tensor(name)
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in plan:
                out[name], out[name + "_scale"] = quant.quantize(t, plan[module])
            else:
                out[name] = t.contiguous()
            if progress is not None:
                progress(i + 1, len(header))
    dst.mkdir(parents=True, exist_ok=True)
    for p in quant.companion_files(src):
        try:
            os.link(p, dst / p.name)
        except OSError:
            shutil.copy2(p, dst / p.name)
    fmt = {"format": quant.FORMAT, "format_version": quant.FORMAT_VERSION}
    meta = {**fmt, "quantization": json.dumps(record, sort_keys=True)}
    save_file(out, str(dst / "ema.safetensors"), metadata=meta)
    (dst / "quantization.json").write_text(json.dumps({**fmt, **record}, indent=1, sort_keys=True) + "\n")
    return record
