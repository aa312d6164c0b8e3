"""Quantized weight storage: fp8 (e4m3) per output channel, int8 in groups of 128 inputs, NF4 in blocks of 64
(docs/quantization.md).

A quantized layer is the model's own layer (a ``ops.Linear`` / ``ops.Embedding``, so ComfyUI's ModelPatcher
lists, counts and streams it like any other) re-classed with a mixin whose ``forward`` dequantizes on the
fly to the input's dtype and device. Storage is plain tensors, no tensor subclass: the quantized weight
stays the module's ``weight`` parameter (float8_e4m3fn / int8 / uint8 holding two 4-bit codes) and its
scales are the persistent buffer ``weight_scale``. ``Module.to`` and ComfyUI's partial loading (which
moves whole modules, or leaves them on the offload device and calls them with inputs elsewhere) then work
unchanged, and ``state_dict`` bytes are the real stored bytes.

Which tensors (``storage_format``): the linears of every LLM decoder layer (both experts), of the ViT
encoder layers and of the ViT connector; fp8 leaves the understanding expert's first decoder layer out. The
token embedding, norms, LM head, latent connectors, timestep embedder and the VAE stay in the high-precision
dtype, except in ``nf4`` mode, where the embedding and the LM head are stored int8 too (4-bit weights plus
two 1.1 GB bf16 tables would not fit in 9 GB).

A layer whose ``weight`` is a floating tensor of 16 bits or more (a distilled expert swapped in for the
denoising passes) computes as the plain layer.
"""
from __future__ import annotations

import logging
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

QUANT_MODES = ("fp8_e4m3fn", "fp8_e4m3fn_fast", "int8", "nf4")
WEIGHT_DTYPES = ("default",) + QUANT_MODES + ("auto",)
NF4_BLOCK = 64
INT8_GROUP = 128  # inputs per int8 scale: the finest group whose bf16 scales keep BAGEL's int8 weights <= 16 GB
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_STORED = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "nf4": torch.uint8}

_LINEAR_KEYS = re.compile(r"^(language_model\.model\.layers\.\d+\.(self_attn|mlp|mlp_moe_gen)\."
                          r"|vit_model\.vision_model\.encoder\.layers\.\d+\.(self_attn|mlp)\.|connector\.)")
_NF4_INT8_KEYS = ("language_model.model.embed_tokens", "language_model.lm_head")
# fp8 leaves the understanding expert's first decoder layer in the load dtype: on the trained stdlib targets it
# carried a third of the fp8 error, and keeping it halved the KL to bf16 (docs/quantization.md); 0.23 GB at
# BAGEL's shapes, fp8 stays <= 16 GB
_FP8_KEPT = re.compile(r"^language_model\.model\.layers\.0\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    return mode


def storage_format(module_name: str, module: nn.Module, mode: str) -> str | None:
    """How ``mode`` stores this module's weight: "fp8", "int8", "nf4", or None (high precision)."""
    if module_name in _NF4_INT8_KEYS and mode == "nf4":
        return "int8"
    if not isinstance(module, nn.Linear) or not _LINEAR_KEYS.match(module_name):
        return None
    if mode.startswith("fp8") and _FP8_KEPT.match(module_name):
        return None
    return {"fp8_e4m3fn": "fp8", "fp8_e4m3fn_fast": "fp8", "int8": "int8", "nf4": "nf4"}[check_mode(mode)]


def nf4_codebook() -> torch.Tensor:
    """The 16 NormalFloat4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) with an exact zero,
    asymmetric (8 positive, 7 negative levels), scaled to [-1, 1]. Offset 0.9677 = the mean of the last two
    quantile points 1 - 1/(2*15) and 1 - 1/(2*16), as in the paper's construction."""
    offset = 0.5 * (1 - 1 / 30 + 1 - 1 / 32)
    ppf = torch.special.ndtri
    pos = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


NF4 = nf4_codebook()
_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2


# -- quantize / dequantize -------------------------------------------------------------------------------------
def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A [out, in] (or [rows, dim] embedding) weight -> (stored weight, fp32/bf16 scales); computed in fp32
    row block by row block, so quantizing a 1 GB tensor never holds a full fp32 copy."""
    out = []
    step = max(1, (1 << 24) // max(1, w.shape[1]))  # ~64 MB of fp32 per chunk
    for i in range(0, w.shape[0], step):
        out.append(_quantize_rows(w[i:i + step].float(), fmt))
    q, s = zip(*out)
    return torch.cat(q), torch.cat(s)


def _quantize_rows(w: torch.Tensor, fmt: str):
    if fmt == "nf4":
        rows, n = w.shape
        pad = -n % NF4_BLOCK
        blocks = F.pad(w, (0, pad)).view(rows, -1, NF4_BLOCK)
        absmax = blocks.abs().amax(-1).to(torch.bfloat16)       # stored as bf16: quantize against that value
        scale = absmax.float().clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.bucketize((blocks / scale[..., None]).clamp(-1, 1), _NF4_MIDPOINTS.to(w.device))
        codes = codes.to(torch.uint8).view(rows, -1)
        return codes[:, 0::2] | (codes[:, 1::2] << 4), absmax
    if fmt == "fp8":
        scale = w.abs().amax(1).clamp_min(1e-12) / FP8_MAX
        return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    if fmt == "int8":
        rows, n = w.shape
        groups = F.pad(w, (0, -n % INT8_GROUP)).view(rows, -1, INT8_GROUP)
        scale = (groups.abs().amax(-1) / 127.0).clamp_min(1e-12).to(torch.bfloat16)  # rounded to what is stored
        q = (groups / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
        return q.view(rows, -1)[:, :n].contiguous(), scale
    raise ValueError(f"unknown storage format {fmt!r}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype, columns: int) -> torch.Tensor:
    """The dense [rows, columns] weight in ``dtype`` (on ``q``'s device)."""
    if fmt == "nf4":
        codes = torch.stack([q & 0xF, q >> 4], dim=-1).view(q.shape[0], -1, NF4_BLOCK)
        w = NF4.to(q.device, dtype)[codes.long()] * scale.to(dtype)[..., None]
        return w.view(q.shape[0], -1)[:, :columns]
    if fmt == "int8":
        return scale_groups(q.to(dtype), scale.to(dtype))
    return q.to(dtype) * scale.to(dtype)[:, None]


def scale_groups(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w`` [..., columns] times its int8 group scales [..., ceil(columns / INT8_GROUP)]."""
    n = w.shape[-1]
    pad = -n % INT8_GROUP
    if pad:
        w = F.pad(w, (0, pad))
    w = (w.view(*w.shape[:-1], -1, INT8_GROUP) * scale[..., None]).flatten(-2)
    return w[..., :n] if pad else w


def is_quantized(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8)


def _fmt_of(q: torch.Tensor) -> str:
    return {torch.float8_e4m3fn: "fp8", torch.int8: "int8", torch.uint8: "nf4"}[q.dtype]


# -- layers -------------------------------------------------------------------------------------------------------
class QuantizedLinear:
    """Mixin put in front of the model's Linear class (see ``_quantized_class``)."""
    compute_dtype: torch.dtype = torch.bfloat16   # the dtype it dequantizes to when no input tells
    fp8_matmul: bool = False                      # fp8_e4m3fn_fast: torch._scaled_mm on GPUs that have it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not is_quantized(w):
            return super().forward(x)
        dev = x.device
        q, s = w.to(dev, non_blocking=True), self.weight_scale.to(dev, non_blocking=True)
        b = None if self.bias is None else self.bias.to(dev, x.dtype, non_blocking=True)
        if self.fp8_matmul and q.dtype == torch.float8_e4m3fn and dev.type == "cuda":
            y = _scaled_fp8_linear(self, x, q, s, b)
            if y is not None:
                return y
        return F.linear(x, dequantize(q, s, _fmt_of(q), x.dtype, self.in_features), b)


def _scaled_fp8_linear(layer, x, q, s, b):
    """fp8 x fp8 matmul (sm89+): the activations quantized per row on the fly, the weight's per-channel
    scales applied in the epilogue. Any failure turns the layer back to the dequantizing path for good."""
    try:
        if torch.cuda.get_device_capability(x.device) < (8, 9) or x.dtype not in (torch.bfloat16, torch.float16):
            raise RuntimeError("needs an sm89+ GPU and bf16/fp16 activations")
        x2 = x.reshape(-1, x.shape[-1])
        xs = (x2.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
        xq = (x2 / xs).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.float()[None, :], bias=b, out_dtype=x.dtype)
        return y.view(*x.shape[:-1], -1)
    except (RuntimeError, TypeError) as e:
        layer.fp8_matmul = False
        log.warning("fp8 scaled matmul unavailable (%s); dequantizing fp8 weights instead", e)
        return None


class QuantizedEmbedding:
    """Mixin for an Embedding stored int8 (groups of a row): looks up codes, then scales only the rows used."""
    compute_dtype: torch.dtype = torch.bfloat16

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not is_quantized(w):
            return super().forward(ids)
        ids = ids.to(w.device)
        rows = F.embedding(ids, w).to(self.compute_dtype)
        return scale_groups(rows, self.weight_scale[ids].to(self.compute_dtype))


_CLASSES: dict[type, type] = {}


def _quantized_class(base: type) -> type:
    if issubclass(base, (QuantizedLinear, QuantizedEmbedding)):
        return base
    if base not in _CLASSES:
        mixin = QuantizedEmbedding if issubclass(base, nn.Embedding) else QuantizedLinear
        _CLASSES[base] = type(f"Quantized{base.__name__}", (mixin, base), {"__module__": __name__})
    return _CLASSES[base]


def quantized_modules(model: nn.Module, mode: str) -> dict[str, str]:
    """{module name: storage format} of every module that ``mode`` quantizes."""
    out = {}
    for name, m in model.named_modules():
        fmt = storage_format(name, m, mode) if isinstance(m, (nn.Linear, nn.Embedding)) else None
        if fmt:
            out[name] = fmt
    return out


def set_storage(module: nn.Module, q: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype,
                fp8_matmul: bool = False) -> None:
    """Make ``module`` a quantized layer holding ``q`` (its ``weight``) and ``scale`` (``weight_scale``)."""
    module.__class__ = _quantized_class(type(module))
    module._parameters["weight"] = nn.Parameter(q, requires_grad=False)
    module._buffers.pop("weight_scale", None)
    module.register_buffer("weight_scale", scale)
    module.compute_dtype = compute_dtype
    if isinstance(module, nn.Linear):
        module.fp8_matmul = fp8_matmul and q.dtype == torch.float8_e4m3fn


def stored_shapes(module: nn.Module, fmt: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{"weight": (shape, dtype), "weight_scale": ...} of ``module`` stored as ``fmt``."""
    rows, cols = module.weight.shape
    if fmt == "nf4":
        blocks = math.ceil(cols / NF4_BLOCK)
        return {"weight": ((rows, blocks * NF4_BLOCK // 2), torch.uint8),
                "weight_scale": ((rows, blocks), torch.bfloat16)}
    if fmt == "int8":
        return {"weight": ((rows, cols), torch.int8),
                "weight_scale": ((rows, math.ceil(cols / INT8_GROUP)), torch.bfloat16)}
    return {"weight": ((rows, cols), _STORED[fmt]), "weight_scale": ((rows,), torch.float32)}


def prepare_meta(model: nn.Module, mode: str, compute_dtype: torch.dtype, plan: dict[str, str] | None = None):
    """On a meta-device model: give every module ``mode`` quantizes its stored shapes (meta tensors), so the
    model's ``state_dict`` describes what a quantized file holds and ``load_state_dict(assign=True)`` fits."""
    plan = quantized_modules(model, mode) if plan is None else plan
    for name, fmt in plan.items():
        m = model.get_submodule(name)
        shapes = stored_shapes(m, fmt)
        set_storage(m, torch.empty(*shapes["weight"][0], dtype=shapes["weight"][1], device="meta"),
                    torch.empty(*shapes["weight_scale"][0], dtype=shapes["weight_scale"][1], device="meta"),
                    compute_dtype, fp8_matmul=mode == "fp8_e4m3fn_fast")
    return plan


def quantize_model_(model: nn.Module, mode: str, compute_dtype: torch.dtype | None = None) -> dict[str, str]:
    """Quantize a loaded model in place, module by module (each dense weight is freed as soon as its
    quantized copy exists). Returns the plan ({module: format})."""
    plan = quantized_modules(model, mode)
    for name, fmt in plan.items():
        m = model.get_submodule(name)
        dense = m.weight.detach()
        q, s = quantize(dense, fmt)
        set_storage(m, q, s, compute_dtype or dense.dtype, fp8_matmul=mode == "fp8_e4m3fn_fast")
        del dense
    return plan


def dequantized_copy_(model: nn.Module) -> nn.Module:
    """Replace every quantized weight of ``model`` by its dense dequantization (a test reference)."""
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) and is_quantized(m.weight):
            q, s = m.weight, m.weight_scale
            m._parameters["weight"] = nn.Parameter(
                dequantize(q, s, _fmt_of(q), m.compute_dtype, _columns(m)), requires_grad=False)
            del m._buffers["weight_scale"]
            m.__class__ = m.__class__.__mro__[2]
    return model


def _columns(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.embedding_dim


def dense_shape(model: nn.Module, key: str) -> tuple[int, ...]:
    """The logical (dequantized) shape of parameter ``key``: differs from its stored shape only for NF4."""
    mod_name, _, name = key.rpartition(".")
    m = model.get_submodule(mod_name)
    t = getattr(m, name)
    if name == "weight" and is_quantized(t):
        return (t.shape[0], _columns(m))
    return tuple(t.shape)


def dense_dtype(module: nn.Module) -> torch.dtype:
    """The high-precision dtype of a layer's weight: its own, or the one a quantized layer computes in."""
    w = module.weight
    return module.compute_dtype if is_quantized(w) else w.dtype


def storage_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (what ComfyUI's ``module_size`` counts)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


# -- pre-quantized folders (docs/quantization.md) ------------------------------------------------------------------
FORMAT, FORMAT_VERSION = "hyperbagel.quantized", "2"
# version 1: int8 with one fp32 scale per output channel (nf4 folders too, for the embedding and LM head), and
# fp8 also for the understanding expert's first decoder layer
_OLDER = {"1": "int8 with one scale per output channel, fp8 in every decoder layer"}
_HASHED_LIMIT = 64 << 20  # companion files hashed whole below this size; larger ones by size + header


def file_digest(path) -> str:
    import hashlib
    import struct
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _HASHED_LIMIT:
            h.update(f.read())
        else:  # a large safetensors file: its size and header (names, dtypes, shapes, offsets)
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            h.update(f"{size};".encode() + f.read(min(n, _HASHED_LIMIT)))
    return h.hexdigest()[:24]


def companion_files(folder) -> list:
    """Every file of a BAGEL folder except the weights that get quantized (configs, tokenizer, VAE, ...)."""
    from pathlib import Path
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != "ema.safetensors"
                  and not p.name.startswith("."))


def read_quantized_metadata(path) -> dict | None:
    """The quantization record of a pre-quantized ``ema.safetensors``, or None for a plain checkpoint."""
    import json

    from safetensors import safe_open

    from .errors import CheckpointError
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: could not read the safetensors metadata ({e}); re-download it") from e
    if meta.get("format") != FORMAT:
        return None
    version = meta.get("format_version")
    if version in _OLDER:
        try:
            mode = json.loads(meta["quantization"])["mode"]
        except (KeyError, TypeError, ValueError):
            mode = "MODE"
        raise CheckpointError(f"{path}: quantized format_version {version!r} was written by an older hyperbagel "
                              f"({_OLDER[version]}); version {FORMAT_VERSION!r} stores int8 with one scale per "
                              f"{INT8_GROUP} inputs and keeps the first decoder layer out of fp8. Quantize the bf16 "
                              f"folder again: python -m hyperbagel_core quantize SRC DST --mode {mode}")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: quantized format_version {version!r} is not supported "
                              f"(this hyperbagel reads {FORMAT_VERSION!r}); update hyperbagel or quantize again")
    try:
        record = json.loads(meta["quantization"])
        check_mode(record["mode"])
        record["fingerprints"]["draft_head"], record["fingerprints"]["distilled_expert"]
        record["companions"].items()
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: the 'quantization' metadata is missing or malformed ({e}); the file is "
                              "corrupt: quantize the bf16 folder again") from e
    return record


def check_quantized_folder(path, record: dict, weight_dtype: str = "default") -> None:
    """Refuse a pre-quantized ``ema.safetensors`` next to files of another base model, or asked for in
    another mode."""
    from .errors import CheckpointError
    folder = path.parent
    if weight_dtype not in ("default", "auto", record["mode"]):
        raise CheckpointError(f"{folder}: this folder is pre-quantized to {record['mode']}; load it with weight_dtype "
                              f"'default' (or '{record['mode']}'), or point to the bf16 folder to use {weight_dtype}")
    wrong = []
    for name, digest in record["companions"].items():
        p = folder / name
        if not p.is_file():
            wrong.append(f"{name} is missing")
        elif file_digest(p) != digest:
            wrong.append(f"{name} differs")
    if wrong:
        raise CheckpointError(
            f"{path}: quantized from base model {record.get('base_name', '?')} (fingerprint "
            f"{record['fingerprints']['distilled_expert']}), but the files beside it belong to another model ("
            + "; ".join(wrong[:6]) + "). Keep the folder written by 'python -m hyperbagel_core quantize' together, "
            "or quantize this model's bf16 folder again")
