"""Attention for BAGEL's LLM and ViT, issued so that PyTorch's fused kernels run.

Every call is 4-D: callers pass [B, n, H, d] and SDPA gets the transposed views [B, H, n, d] (last dim
contiguous, no copy); 3-D inputs would send SDPA to its math kernel, which materialises the fp32 scores.
Masks are never dense on CUDA: none for non-causal or one-token queries, ``is_causal`` when the query
covers all keys, otherwise a lower-right ``CausalBias`` (a new block sees the whole cache, spec 4.6), which
SDPA runs as the flash kernel's causal flag (bottom-right aligned) on CUDA; on CPU it becomes a small
[n_q, n_k] boolean mask that the CPU flash kernel accepts. GQA goes through ``enable_gqa`` (flash handles
it natively). flash-attn is an optional fast path on CUDA, never a requirement; it too gets one call per CFG
branch (``flash_attn_func`` on that branch's cache): its varlen kernel would need the branches' caches
packed into one tensor, which is the per-step cache copy this layout avoids.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

log = logging.getLogger(__name__)
BACKENDS = ("sdpa", "flash_attn")
_backend = "sdpa"


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def set_backend(name: str) -> None:
    """Select the attention backend for the whole process ("sdpa" or "flash_attn")."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "flash_attn" and not flash_attn_available():
        raise ValueError("attention backend 'flash_attn' needs the flash-attn package and a CUDA GPU; "
                         "install flash-attn or choose 'sdpa'")
    _backend = name
    log.info("hyperbagel attention backend: %s", name)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [B, n_q, Hq, d], k/v [B, n_k, Hkv, d] -> [B, n_q, Hq, d]; query head h uses kv head h // (Hq/Hkv).

    ``causal`` is bottom-right aligned: query i sees key j iff j <= i + (n_k - n_q).
    """
    if _backend == "flash_attn" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func
        return flash_attn_func(q, k, v, causal=causal)
    n_q, n_k = q.shape[1], k.shape[1]
    bias, is_causal = None, False
    if causal and n_q > 1:
        if n_q == n_k:
            is_causal = True
        else:
            bias = causal_lower_right(n_q, n_k)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias, is_causal=is_causal, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def gqa_folded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """Masked attention without repeating K/V: q [n, Hq, d], k/v [m, Hkv, d], ``mask`` [g*n, m] (bool or
    additive, g = Hq/Hkv, rows in folded order) or None -> [n, Hq, d].

    The g query heads that share a kv head are folded into the query axis (query head j uses kv head
    j // g), so SDPA sees 4-D [1, Hkv, g*n, d] queries; with a mask this reaches the memory-efficient
    kernel on CUDA (the static decode step and the draft head, whose masks are over a fixed capacity).
    """
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.view(n, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * n, d)
    out = F.scaled_dot_product_attention(qf, k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask)
    return out[0].view(hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
