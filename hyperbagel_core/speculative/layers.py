"""Small building blocks of the speculative package: Qwen2-style decoder layer, RoPE, KV buffers.

They follow the semantics of ``bagel-inference-spec.md`` section 4 (und expert) so that a draft layer can
be initialised by copying a target decoder layer's weights (same submodule names). Attention helpers
take explicit slot indices so that every call has a static shape (CUDA-graph friendly) when asked to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import gqa_folded_attention
from ..model.llm import RMSNorm  # noqa: F401  (re-exported for the draft head)


def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Spec 4.5: 1 / theta^(2i/d), fp32."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)


def rope_cos_sin(pos: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype):
    """pos [n] (int) -> cos, sin [n, head_dim] in ``dtype`` (angles in fp32); ``freqs`` follows ``pos``."""
    ang = pos.float()[:, None] * freqs.to(pos.device)[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, H, d]; rotate-half RoPE."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [n, Hq, d], k/v [m, Hkv, d], mask [n, m] bool (True = visible) -> [n, Hq, d] (GQA folded, no K/V
    repeat: ``model.attention.gqa_folded_attention``)."""
    g = q.shape[1] // k.shape[1]
    return gqa_folded_attention(q, k, v, None if mask is None else mask.repeat(g, 1))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=True)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)


class MLP(nn.Module):
    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm Qwen2 layer with qk-norm (spec 4.2), split so that callers own the attention step."""

    def __init__(self, dim: int, inter: int, heads: int, kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, kv_heads, head_dim, eps)
        self.mlp = MLP(dim, inter)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [n, D] -> q [n, Hq, d], k/v [n, Hkv, d] (k, q after qk-norm and RoPE)."""
        a, at, n = self.input_layernorm(x), self.self_attn, x.shape[0]
        q = at.q_norm(at.q_proj(a).view(n, at.heads, at.head_dim))
        k = at.k_norm(at.k_proj(a).view(n, at.kv_heads, at.head_dim))
        v = at.v_proj(a).view(n, at.kv_heads, at.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.o_proj(attn.reshape(x.shape[0], -1))
        return x + self.mlp(self.post_attention_layernorm(x))


def copy_layer_weights(dst: nn.Module, src: nn.Module) -> None:
    """Copy the parameters of ``dst`` from the same-named ones of ``src`` (extra MoT keys are ignored)."""
    src_sd = src.state_dict()
    missing = [k for k in dst.state_dict() if k not in src_sd]
    if missing:
        raise ValueError(f"target layer lacks {missing[:4]}; cannot initialise a draft layer from it")
    with torch.no_grad():
        for k, p in dst.state_dict().items():
            p.copy_(src_sd[k].to(p.dtype))


class KVBuffer:
    """Preallocated per-layer K/V slots ``[num_layers, capacity, Hkv, d]``; grows (eagerly) on demand."""

    def __init__(self, num_layers: int, capacity: int, kv_heads: int, head_dim: int, dtype, device,
                 growable: bool = True):
        shape = (num_layers, capacity, kv_heads, head_dim)
        # zeros, not empty: masked-out garbage (NaN) would still poison SDPA's weighted sum
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.growable = growable

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def ensure(self, end: int) -> None:
        if end <= self.capacity:
            return
        if not self.growable:
            raise ValueError(f"KV buffer of {self.capacity} slots is full (need {end}); "
                             "allocate a larger max_len")
        cap = max(end, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], cap) + tuple(old.shape[2:]))
            new[:, : old.shape[1]] = old
            setattr(self, name, new)


def cached_layer(layer: DecoderLayer, x: torch.Tensor, cos, sin, kc: torch.Tensor, vc: torch.Tensor,
                 slots: torch.Tensor, end: int) -> torch.Tensor:
    """Run ``layer`` on x [n, D] whose tokens go to slots [n] of its cache kc/vc [capacity, Hkv, d]; attend to
    slots < ``end`` that are <= the query's own slot (bottom-right causal over the cache)."""
    q, k, v = layer.qkv(x, cos, sin)
    kc.index_copy_(0, slots, k)
    vc.index_copy_(0, slots, v)
    mask = torch.arange(end, device=x.device)[None, :] <= slots[:, None]
    return layer.finish(x, attend(q, kc[:end], vc[:end], mask))
