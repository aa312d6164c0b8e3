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

How a layer multiplies (``select_kernels``, chosen once per model and compute device, logged once): on a
GPU, kernels that read the stored codes and never write a dense weight (a compiled fused dequant-matmul for
a few rows, ``torch._scaled_mm`` for fp8_e4m3fn_fast, bitsandbytes' 4-bit matmul for NF4); on the CPU, and
wherever those are missing, the dequantizing path (dequantize to the input's dtype, then ``F.linear``).

A layer whose ``weight`` is a floating tensor of 16 bits or more (a distilled expert swapped in for the
denoising passes) computes as the plain layer.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter

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


_LEVELS: dict = {}


def nf4_levels(device, dtype) -> torch.Tensor:
    """``NF4`` on ``device`` in ``dtype``, copied there once: a copy per call would be a host-to-device
    transfer inside every forward, which a CUDA graph cannot capture."""
    key = (torch.device(device), dtype)
    if key not in _LEVELS:
        _LEVELS[key] = NF4.to(*key)
    return _LEVELS[key]


def dequantize(q: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype, columns: int,
               levels: torch.Tensor | None = None) -> torch.Tensor:
    """The dense [rows, columns] weight in ``dtype`` (on ``q``'s device). ``levels``: the NF4 table in
    ``dtype`` on that device (default ``nf4_levels``)."""
    if fmt == "nf4":
        levels = nf4_levels(q.device, dtype) if levels is None else levels
        codes = torch.stack([q & 0xF, q >> 4], dim=-1).view(q.shape[0], -1, NF4_BLOCK)
        w = levels[codes.long()] * scale.to(dtype)[..., None]
        return w.view(q.shape[0], -1)[:, :columns]
    if fmt == "int8":  # int8 x scale promotes to ``dtype`` in the multiply: no dense copy of the codes first
        return scale_groups(q, scale.to(dtype))
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
    fp8_matmul: bool = False                      # fp8_e4m3fn_fast: fp8 x fp8 matmul where the GPU has it
    kernel: str = "dequant"                       # how it multiplies on ``kernel_device`` (``select_kernels``)
    kernel_device: str | None = None              # the device type the kernel was chosen for
    fused_compiled: bool = True                   # "fused": torch.compile'd (False: the same function, eager)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not is_quantized(w):
            return super().forward(x)
        dev = x.device
        q, s = w.to(dev, non_blocking=True), self.weight_scale.to(dev, non_blocking=True)
        b = None if self.bias is None else self.bias.to(dev, x.dtype, non_blocking=True)
        if self.kernel != "dequant" and dev.type == self.kernel_device:
            y = _KERNELS[self.kernel](self, x, q, s, b)
            if y is not None:
                return y
        return F.linear(x, dequantize(q, s, _fmt_of(q), x.dtype, self.in_features), b)


# -- matmul kernels that read the stored codes (docs/quantization.md, "Kernels") -------------------------------------
# A kernel takes (layer, x, codes, scales, bias) on x's device and returns y, or None where it does not apply to
# this call (the layer then dequantizes). Which one a layer uses is chosen once per device (``select_kernels``);
# within a call only shapes and dtypes decide, never values, so a forward stays capturable in a CUDA graph and
# traceable by torch.compile.
FUSED_MAX_ROWS = 16  # rows (tokens) up to which "fused" runs: a decode step, a speculative block (the static
#                      decoder's buckets); above, the matmul is compute-bound and dequantize + F.linear is used
KERNEL_NAMES = {"dequant": "dequantize + matmul", "fused": "fused dequant-matmul (torch.compile)",
                "scaled_mm": "torch._scaled_mm (fp8 x fp8)", "bnb": "bitsandbytes 4-bit matmul"}
KERNELS_FOR = {"fp8": ("scaled_mm", "fused", "dequant"), "int8": ("fused", "dequant"),
               "nf4": ("bnb", "fused", "dequant")}   # preference order on a GPU


def fused_rows(x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
    """x2 [M, K] times the dequantized weight [N, K], written as one multiply-and-reduce over K (products of
    bf16 values are exact in fp32, summed in fp32 as a matmul does). Compiled by inductor this is a single
    reduction kernel that loads the stored codes and scales and never writes a dense weight; N is the outer
    and M the inner output index, so the M rows of one output channel read its codes together."""
    w = dequantize(q, s, _fmt_of(q), x2.dtype, x2.shape[-1], levels=levels)
    return (w.unsqueeze(1).float() * x2.unsqueeze(0).float()).sum(-1).t().to(x2.dtype)


class _Compiled:
    """``fused_rows`` compiled once per process (dynamic shapes: one graph serves every layer shape), at its
    first call. If compiling fails (no Triton on a GPU, no C++ compiler on a CPU), every layer falls back to
    the dequantizing path, logged once."""

    def __init__(self):
        self.fn, self.failed = None, False

    def __call__(self, x2, q, s, levels):
        if self.failed:
            return None
        if self.fn is None:
            options = {"coordinate_descent_tuning": True} if x2.device.type == "cuda" else None
            self.fn = torch.compile(fused_rows, dynamic=True, options=options)
        try:
            return self.fn(x2, q, s, levels)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # inductor/Triton raise many error types
            self.failed = True
            log.warning("hyperbagel: the compiled fused dequant-matmul failed (%s: %s); quantized layers "
                        "dequantize their weights instead", type(e).__name__, str(e).splitlines()[0][:300])
            return None


_FUSED = _Compiled()


def _fused(layer, x, q, s, b):
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > FUSED_MAX_ROWS:
        return None
    levels = nf4_levels(x.device, x.dtype) if q.dtype == torch.uint8 else None
    y = _FUSED(x2, q, s, levels) if layer.fused_compiled else fused_rows(x2, q, s, levels)
    if y is None:
        return None
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if b is None else y + b


def _scaled_mm(layer, x, q, s, b):
    """fp8 x fp8 (fp8_e4m3fn_fast): the activations quantized per row on the fly (amax / 448), the weight's
    per-channel scales applied in the matmul's epilogue; bf16 activations only (row-wise scaling's output)."""
    if x.dtype != torch.bfloat16:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    xs = (x2.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
    xq = (x2 / xs).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.float().view(1, -1), bias=b, out_dtype=x.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


_BNB = None  # the bitsandbytes module, imported when a layer first chooses it (the import takes seconds)


def _bnb(layer, x, q, s, b):
    """bitsandbytes' 4-bit matmul (its GEMV at one row, its own kernels for a few rows, dequantize + matmul
    above) on the stored NF4 bytes, in place: bitsandbytes reads the rows' blocks of 64 as ours (when the
    inputs are a multiple of 64) but takes the high nibble as the even column, so the activations' column
    pairs are swapped instead of the weight's nibbles (a copy of the activations per call), and the bf16
    block absmax is widened to the fp32 it takes (1/16 byte per weight per call)."""
    k = x.shape[-1]
    xs = x.unflatten(-1, (k // 2, 2)).flip(-1).flatten(-2)
    state = _BNB.functional.QuantState(absmax=s.float().view(-1), shape=torch.Size([q.shape[0], k]),
                                       code=nf4_levels(x.device, torch.float32), blocksize=NF4_BLOCK,
                                       quant_type="nf4", dtype=x.dtype)
    return _BNB.matmul_4bit(xs, q.view(-1, 1).t(), quant_state=state, bias=b)


_KERNELS = {"fused": _fused, "scaled_mm": _scaled_mm, "bnb": _bnb}


def _probe(kernel: str, fmt: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``kernel`` runs ``fmt`` on ``device`` and matches the dequantizing path on a small layer, else
    why not (the reason is logged)."""
    global _BNB
    if kernel == "scaled_mm":
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            return "fp8 matmuls need an sm89+ GPU (RTX 40xx, L40, H100, ...)"
        if dtype != torch.bfloat16:
            return f"row-wise scaled fp8 matmuls output bf16, the model computes in {dtype}"
    if kernel == "bnb" and _BNB is None:
        import importlib.util
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed (pip install bitsandbytes)"
        try:
            import bitsandbytes
        except Exception as e:  # a broken install raises anything
            return f"bitsandbytes does not import ({type(e).__name__}: {e})"
        _BNB = bitsandbytes
    if kernel == "fused":
        if device.type == "cuda":
            from torch.utils._triton import has_triton
            if not has_triton():
                return "torch.compile needs Triton on this GPU (pip install triton, or triton-windows)"
        return None  # compiling is tried at the first call (slow to probe), with a fallback
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 128, generator=g), torch.randn(3, 128, generator=g)
    qs = quantize(w, fmt)
    q, s, x = qs[0].to(device), qs[1].to(device), x.to(device, dtype)
    try:
        y = _KERNELS[kernel](None, x, q, s, None)
        ref = F.linear(x, dequantize(q, s, fmt, dtype, 128))
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None if err < 0.1 else f"differs from the dequantizing path by {err:.1%}"


def select_kernels(model: nn.Module, device, kernels: str | dict | None = None, compiled: bool | None = None) -> str:
    """Choose, once for computing on ``device``, how each quantized linear layer of ``model`` multiplies,
    log the choice (once per model and choice) and return its summary (also ``model.weight_kernels``).

    ``kernels``: "auto" (on CUDA each format's first available kernel in ``KERNELS_FOR``; elsewhere the
    dequantizing path), "dequant", or {format: kernel} (tests, benchmarks; an unavailable kernel is an
    error). The environment variable HYPERBAGEL_QUANT_KERNELS=dequant forces the dequantizing path.
    ``compiled=False`` runs "fused" eagerly (tests: the same function without a compile; it holds an
    [N, rows, K] fp32 product, so only for small layers). None: what was last asked for this model (at
    first "auto", compiled), so a model manager's later calls keep an explicit choice.
    """
    device = torch.device(device)
    if kernels is None and compiled is None:
        kernels, compiled = getattr(model, "_kernel_request", ("auto", True))
    else:
        kernels, compiled = kernels or "auto", True if compiled is None else compiled
        model._kernel_request = (kernels, compiled)
    if os.environ.get("HYPERBAGEL_QUANT_KERNELS", "auto") == "dequant":
        kernels = "dequant"
    key = (device.type, repr(kernels), compiled)
    if getattr(model, "_kernel_choice", None) == key:  # checked before walking the modules: a node sets it per call
        return getattr(model, "weight_kernels", "")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and is_quantized(m.weight)]
    if not layers:
        return getattr(model, "weight_kernels", "")
    dtype = getattr(model, "compute_dtype", None) or layers[0][1].compute_dtype
    wanted = dict(kernels) if isinstance(kernels, dict) else {}
    unavailable: dict[tuple[str, str], str | None] = {}

    def available(kernel, fmt):
        if kernel == "dequant":
            return None
        if (kernel, fmt) not in unavailable:
            unavailable[kernel, fmt] = _probe(kernel, fmt, device, dtype)
        return unavailable[kernel, fmt]

    for fmt, kernel in wanted.items():
        if kernel not in KERNELS_FOR.get(fmt, ()):
            raise ValueError(f"no kernel {kernel!r} for {fmt} weights; choose one of {KERNELS_FOR.get(fmt)}")
        if available(kernel, fmt):
            raise ValueError(f"kernel {kernel!r} cannot run {fmt} weights on {device}: {available(kernel, fmt)}")
    counts = Counter()
    for _, m in layers:
        fmt = _fmt_of(m.weight)
        if kernels == "auto" and device.type == "cuda":
            options = [k for k in KERNELS_FOR[fmt] if k != "scaled_mm" or m.fp8_matmul]
        else:
            options = [wanted.get(fmt, "dequant")]
        choice = next(k for k in options + ["dequant"] if _fits(k, m) and not available(k, fmt))
        m.kernel, m.kernel_device, m.fused_compiled = choice, device.type, compiled
        counts[fmt, choice] += 1
    names = dict(KERNEL_NAMES, fused=KERNEL_NAMES["fused"] if compiled else "fused dequant-matmul (eager)")
    summary = "; ".join(f"{fmt} {names[k]}: {n} layers" for (fmt, k), n in sorted(counts.items()))
    missing = sorted({f"{k} ({why})" for (k, _), why in unavailable.items() if why})
    log.info("hyperbagel: quantized matmuls on %s: %s%s", device, summary,
             f"; not available: {', '.join(missing)}" if missing else "")
    model.weight_kernels, model._kernel_choice = summary, key
    return summary


def _fits(kernel: str, layer: nn.Module) -> bool:
    """Shapes a kernel takes: fp8 matmuls want multiples of 16; bitsandbytes' blocks are ours only when the
    inputs are a multiple of 64 (else our last block is padded and its flat blocks straddle rows)."""
    if kernel == "scaled_mm":
        return layer.in_features % 16 == 0 and layer.out_features % 16 == 0
    if kernel == "bnb":
        return layer.in_features % NF4_BLOCK == 0
    return True


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
