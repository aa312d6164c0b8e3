"""SigLIP NaViT vision encoder (spec 5.3) and the MLP connector into the LLM (spec 5.4).

The release keeps 26 of SigLIP's 27 layers plus the post-LayerNorm, uses the learned 70x70 position table
(no 2-D RoPE) and stores the patch embedding in Linear form with inputs ordered (p, q, c).
LayerNorms compute in fp32 (the reference's autocast does) and the residual stream stays in the model dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ViTConfig
from ..ops import resolve_ops
from .attention import attention
from .embeddings import gelu_tanh


def layer_norm32(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in fp32, result in the input dtype (autocast runs layer_norm in fp32)."""
    w = None if mod.weight is None else mod.weight.to(x.device, torch.float32)
    b = None if mod.bias is None else mod.bias.to(x.device, torch.float32)
    return F.layer_norm(x.float(), mod.normalized_shape, w, b, mod.eps).to(x.dtype)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig, ops):
        super().__init__()
        C = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj = ops.Linear(C, C), ops.Linear(C, C)
        self.v_proj, self.out_proj = ops.Linear(C, C), ops.Linear(C, C)

    def forward(self, x):  # x [n, C], one image: full attention
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q[None], k[None], v[None], causal=False).reshape(n, -1))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig, ops):
        super().__init__()
        self.fc1 = ops.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = ops.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig, ops):
        super().__init__()
        self.layer_norm1 = ops.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg, ops)
        self.layer_norm2 = ops.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg, ops)

    def forward(self, x):
        x = x + self.self_attn(layer_norm32(self.layer_norm1, x))
        return x + self.mlp(layer_norm32(self.layer_norm2, x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig, ops):
        super().__init__()
        per_side = cfg.image_size // cfg.patch_size
        self.patch_embedding = ops.Linear(cfg.num_channels * cfg.patch_size ** 2, cfg.hidden_size)
        self.position_embedding = ops.Embedding(per_side * per_side, cfg.hidden_size)

    def forward(self, tokens, position_ids):
        return self.patch_embedding(tokens) + self.position_embedding(position_ids)


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig, ops):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg, ops) for _ in range(cfg.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, ops):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg, ops)
        self.encoder = SiglipEncoder(cfg, ops)
        self.post_layernorm = ops.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, tokens, position_ids):
        x = self.embeddings(tokens, position_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return layer_norm32(self.post_layernorm, x)


class SiglipVisionModel(nn.Module):
    """``vit_model``: wraps ``vision_model`` so the state-dict keys match the release."""

    def __init__(self, cfg: ViTConfig, ops=None):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg, resolve_ops(ops))

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """tokens [n, 3*p*p] (p, q, c order), position_ids [n] -> features [n, C] after the post-LN."""
        return self.vision_model(tokens, position_ids)


class MLPConnector(nn.Module):
    """``connector``: fc1 (C -> D), GELU-tanh, fc2 (D -> D)."""

    def __init__(self, in_dim: int, dim: int, ops=None):
        super().__init__()
        ops = resolve_ops(ops)
        self.fc1 = ops.Linear(in_dim, dim)
        self.fc2 = ops.Linear(dim, dim)

    def forward(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))
