"""Attention for BAGEL's LLM and ViT.

Default backend: ``torch.nn.functional.scaled_dot_product_attention``. flash-attn's varlen kernel aligns
causal masks bottom-right (a new block sees the whole cache); SDPA's ``is_causal`` is top-left aligned when
the query is shorter than the keys, so the bottom-right mask is built explicitly here (spec 4.6).
flash-attn is an optional fast path on CUDA, never a requirement.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

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


def bottom_right_causal_mask(n_q: int, n_k: int, device) -> torch.Tensor:
    """Boolean [n_q, n_k]: query i sees key j iff j <= i + (n_k - n_q)."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return j <= i + (n_k - n_q)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [n_q, Hq, d], k/v [n_k, Hkv, d] (GQA: query head h uses kv head h // (Hq/Hkv)) -> [n_q, Hq, d]."""
    n_q, n_k = q.shape[0], k.shape[0]
    if _backend == "flash_attn" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func
        return flash_attn_func(q[None], k[None], v[None], causal=causal)[0]
    mask = None
    is_causal = False
    if causal and n_q > 1:
        if n_q == n_k:
            is_causal = True
        else:
            mask = bottom_right_causal_mask(n_q, n_k, q.device)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Non-causal batched attention over padded keys: q [B, n, Hq, d], k/v [B, L, Hkv, d], valid [B, L] bool."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=valid[:, None, None, :], enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)
