"""Load an official BAGEL checkpoint folder.

Every file is checked before any tensor is read: safetensors headers are parsed by hand (so a truncated or
non-safetensors file gets one clear message naming it), the key set and every shape are compared with the
model built on the meta device, and only then are tensors read one by one with ``safetensors.safe_open``
and assigned, so a 29 GB checkpoint never sits twice in memory. No pickle / ``torch.load`` anywhere.
Every tensor read from a file goes through ``aligned`` (see there why).
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch

from .config import BagelConfig
from .errors import CheckpointError

log = logging.getLogger(__name__)

REQUIRED_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
_ST_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch.save zip / pickle


ALIGNMENT = 64  # bytes; what PyTorch's CPU allocator gives every fresh tensor


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous and ``ALIGNMENT``-aligned, else a fresh contiguous (aligned) copy.

    safetensors returns tensors at their offset in the file's data (e.g. ``data_ptr() % 64 == 24``). CPU
    kernels take a different code path for misaligned operands, so a weight read from a file and the same
    weight held in memory gave fp32 results differing in the last bits. Called tensor by tensor, so loading
    holds at most one extra tensor at a time.
    """
    if t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")


def read_safetensors_header(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Validate a .safetensors file's framing and return {name: (shape, dtype)}; never reads tensor data."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file is missing")
    size = path.stat().st_size
    what = f"{path}: not a valid safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(_PICKLE_MAGIC):
            raise CheckpointError(f"{what}: it is a PyTorch pickle (torch.save / .bin / .pt); "
                                  "hyperbagel never unpickles (loading a pickle can run code): use the "
                                  ".safetensors file of the release, or convert it with safetensors.torch.save_file")
        if len(head) < 8:
            raise CheckpointError(f"{what} (only {size} bytes); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{what} (header length {n} does not fit in {size} bytes; is it a pickle/.bin "
                                  "file renamed, or truncated?); re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{what} (header is not JSON: {e}); re-download it") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} (header is not a JSON object)")
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, dt, (_, b) = tuple(info["shape"]), info["dtype"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{what} (entry {name!r} is malformed)") from e
        if dt not in _ST_DTYPES:
            raise CheckpointError(f"{what} (entry {name!r} has unknown dtype {dt})")
        out[name] = (shape, dt)
        end = max(end, b)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: file is truncated ({size} bytes, the header needs {8 + n + end}); "
                              "the download did not finish: re-download it")
    return out


def check_against(path: Path, header: dict, expected: dict[str, tuple[int, ...]]) -> None:
    """One message listing missing/unexpected keys and wrong shapes (strict key checking)."""
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    shapes = [f"{k}: file {list(header[k][0])} vs model {list(expected[k])}"
              for k in sorted(set(header) & set(expected)) if tuple(header[k][0]) != tuple(expected[k])]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("wrong shapes", shapes)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            parts.append(f"{label} ({len(items)}): " + "; ".join(items[:8]) + more)
    raise CheckpointError(f"{path}: does not match the configs in {path.parent} — " + " | ".join(parts) +
                          ". The folder mixes files of different models or a file is corrupt; re-download it.")


def check_dtypes(path: Path, header: dict) -> None:
    """Every BAGEL / VAE tensor is floating point; an integer tensor would load and then fail at first use."""
    bad = [f"{k}: {dt}" for k, (_, dt) in sorted(header.items()) if dt not in _FLOAT_DTYPES]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors are not floating point ({'; '.join(bad[:4])}"
                              f"{' ...' if len(bad) > 4 else ''}); this is not a BAGEL bf16/fp32 checkpoint file: "
                              "re-download it")


def check_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; point to the BAGEL-7B-MoT checkpoint folder "
                              "(with llm_config.json, vit_config.json, ema.safetensors, ae.safetensors)")
    missing = [f for f in REQUIRED_FILES if not (folder / f).exists()]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if missing and pickles:
        raise CheckpointError(f"{folder}: missing {', '.join(missing)}; found {', '.join(pickles)}, PyTorch pickle "
                              "files that hyperbagel never loads (unpickling can run code): download the "
                              "release's .safetensors files")
    if missing:
        raise CheckpointError(f"{folder}: missing {', '.join(missing)}; an official BAGEL folder has "
                              + ", ".join(REQUIRED_FILES) + " and the tokenizer files")
    return folder


def load_config(folder: Path) -> BagelConfig:
    try:
        return BagelConfig.from_folder(folder)
    except KeyError as e:
        raise CheckpointError(f"{folder}: a config JSON lacks the field {e}; re-download llm_config.json / "
                              "vit_config.json") from e
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _load_tensors(path: Path, names, device, dtype=None, quantize_as=None, keep=()) -> dict[str, torch.Tensor]:
    """Read ``names`` one by one, cast floating tensors to ``dtype`` (except those in ``keep``: stored
    quantized), and quantize the weights of the modules in ``quantize_as`` ({module: format}) as they come,
    so at most one dense tensor exists beside what was already kept."""
    from safetensors import safe_open
    from .quant import quantize
    quantize_as = quantize_as or {}
    out = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in names:
                t = f.get_tensor(name)
                module, _, leaf = name.rpartition(".")
                if leaf == "weight" and module in quantize_as:
                    q, s = quantize(t, quantize_as[module])
                    out[name], out[name + "_scale"] = aligned(q), aligned(s)
                    continue
                keep_it = dtype is None or not t.is_floating_point() or name in keep
                out[name] = aligned(t if keep_it else t.to(dtype))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: could not read tensors ({e}); re-download it") from e
    return out


def load_bagel_model(folder: Path, config: BagelConfig, *, device, dtype, ops=None, weight_dtype: str = "default"):
    """BagelModel with the weights of ``ema.safetensors``, in ``dtype`` on ``device``.

    ``weight_dtype`` (``quant.QUANT_MODES``): quantize the official bf16 weights tensor by tensor while
    reading them. A pre-quantized folder (``python -m hyperbagel_core quantize``) loads in its own mode;
    ``model.base_fingerprints`` then identifies the bf16 weights for draft heads and distilled experts.
    """
    from . import quant
    from .model.bagel import BagelModel
    path = folder / "ema.safetensors"
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
            model.base_fingerprints = quant.file_fingerprints(path, list(header))
            quantize_as = quant.prepare_meta(model, weight_dtype, dtype)
        elif weight_dtype != "default":
            raise ValueError(f"unknown weight_dtype {weight_dtype!r}; choose one of {', '.join(quant.WEIGHT_DTYPES)}")
    sd = _load_tensors(path, expected, device, dtype, quantize_as=quantize_as, keep=keep)
    model.load_state_dict(sd, strict=True, assign=True)
    model.weight_dtype = stored["mode"] if stored is not None else weight_dtype
    if model.weight_dtype != "default":
        model.compute_dtype = dtype  # the LM head may be stored int8 (nf4 mode): it no longer tells
    return model.requires_grad_(False).eval()


def load_vae(folder: Path, config: BagelConfig, *, device, dtype, ops=None):
    from .model.vae import FluxVAE
    path = folder / "ae.safetensors"
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
    sd = FluxVAE.convert_official_state_dict(_load_tensors(path, header, device, dtype), vae.levels)
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.requires_grad_(False).eval()
