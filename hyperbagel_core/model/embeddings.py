"""Frozen 2-D sin-cos position tables (spec 7) and the DiT timestep embedder (spec 8)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ops import resolve_ops


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] fp32: row r*grid+c = concat(S(c), S(r)) (the column comes first)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos table needs dim divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float()


class PositionEmbedding2D(nn.Module):
    """Lookup into a frozen table stored in the checkpoint (``pos_embed``)."""

    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed.to(ids.device)[ids]


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT features [cos | sin] of t as given (t in [0,1], not x1000), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Linear(256->D) -> SiLU -> Linear(D->D) over the sinusoidal features (``time_embedder.mlp.{0,2}``)."""

    def __init__(self, dim: int, freq_dim: int = 256, ops=None):
        super().__init__()
        ops = resolve_ops(ops)
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(ops.Linear(freq_dim, dim, bias=True), nn.SiLU(), ops.Linear(dim, dim, bias=True))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(dtype))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")
