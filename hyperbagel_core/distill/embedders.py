"""Guidance-scale embedders of the CFG-distilled generation expert (Hyper-Bagel stage 1).

Two timestep-style embedders (the DiT architecture of ``time_embedder``: 256 sinusoidal features of the
raw scalar, Linear -> SiLU -> Linear) embed the text guidance scale and the image guidance scale. Their sum
is the ``time_embed_extra`` of ``BagelModel.velocity``, i.e. it is added to the timestep embedding where it
enters the noisy-latent tokens. The last Linear is zero-initialised, so a fresh pair adds exactly 0.

Scale encoding (the paper does not say): the raw scale value is fed as is (text 1-5, image 1-2.5).
Text-to-image uses image scale 1.0. Scales outside the trained ranges are clamped with a warning.
"""
from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn

from ..errors import InputError
from ..model.embeddings import TimestepEmbedder

logger = logging.getLogger(__name__)

TEXT_SCALE_RANGE = (1.0, 5.0)
IMG_SCALE_RANGE = (1.0, 2.5)
T2I_IMG_SCALE = 1.0


class ScaleOutOfRangeWarning(UserWarning):
    """A guidance scale outside the distilled expert's trained range was clamped."""


def clamp_scale(value: float, lo: float, hi: float, what: str) -> float:
    """Clamp ``value`` into [lo, hi]; warn (``ScaleOutOfRangeWarning``) when it had to move."""
    v = float(value)
    if not math.isfinite(v):
        raise InputError(f"{what} must be a finite number, got {v}; the distilled expert was trained on "
                         f"[{lo:g}, {hi:g}]")
    c = min(max(v, lo), hi)
    if c != v:
        warnings.warn(f"{what} {v:g} is outside the distilled expert's trained range [{lo:g}, {hi:g}]; "
                      f"using {c:g}", ScaleOutOfRangeWarning, stacklevel=3)
    return c


class GuidanceEmbedding(nn.Module):
    """``text_scale_embedder`` + ``img_scale_embedder``; ``forward`` returns the [D] extra embedding."""

    def __init__(self, dim: int, text_range=TEXT_SCALE_RANGE, img_range=IMG_SCALE_RANGE, ops=None,
                 zero_init: bool = True):
        super().__init__()
        self.text_range, self.img_range = tuple(map(float, text_range)), tuple(map(float, img_range))
        self.text_scale_embedder = TimestepEmbedder(dim, ops=ops)
        self.img_scale_embedder = TimestepEmbedder(dim, ops=ops)
        if zero_init:
            self.zero_init_()

    @torch.no_grad()
    def zero_init_(self) -> None:
        """Zero the last Linear of both embedders (weight and bias): the extra embedding is then exactly 0."""
        for emb in (self.text_scale_embedder, self.img_scale_embedder):
            emb.mlp[2].weight.zero_()
            emb.mlp[2].bias.zero_()

    def clamp(self, text_scale: float, img_scale: float) -> tuple[float, float]:
        return (clamp_scale(text_scale, *self.text_range, what="text guidance scale"),
                clamp_scale(img_scale, *self.img_range, what="image guidance scale"))

    def forward(self, text_scale, img_scale, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Scales: floats (clamped to the trained ranges) or [B] tensors (used as given, for training).

        ``device``: where to compute (default: the embedders' weights; a streamed weight may sit elsewhere).

        Returns:
            [D] for float scales, [B, D] for tensor scales, in ``dtype`` (default: the embedders' dtype).
        """
        dev = device or self.text_scale_embedder.mlp[0].weight.device
        dt = dtype or self.text_scale_embedder.mlp[0].weight.dtype
        single = not torch.is_tensor(text_scale)
        if single:
            text_scale, img_scale = self.clamp(text_scale, img_scale)
        st = torch.as_tensor(text_scale, dtype=torch.float32, device=dev).reshape(-1)
        si = torch.as_tensor(img_scale, dtype=torch.float32, device=dev).reshape(-1)
        e = self.text_scale_embedder(st, dt) + self.img_scale_embedder(si, dt)
        return e[0] if single else e
