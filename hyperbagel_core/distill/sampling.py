"""Few-step sampling through a distilled expert: one network pass per step, no CFG branches.

The context (prompt, source image VAE/ViT tokens) must have been prefilled with the ORIGINAL weights;
only the denoising passes run inside ``expert.swapped_into(model)`` (Hyper-Bagel 2.8).
"""
from __future__ import annotations

import torch

from ..sampling.solvers import solve
from .expert import DistilledExpert


def distilled_velocity_fn(model, expert: DistilledExpert, ctx, h: int, w: int, text_scale: float,
                          img_scale: float | None = None, cache=None):
    """``velocity_fn(x, t)`` for ``solve``: one pass on ``ctx`` with the guidance-scale embedding added.

    Call it only inside ``expert.swapped_into(model)``. Scales are clamped to the trained ranges (warning).
    ``cache``: a ``sampling.taylorseer.TaylorSeerState`` (the one branch is "main").
    """
    extra = expert.extra(text_scale, img_scale, dtype=model.dtype, device=model.device)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        rows = cache.rows(["main"]) if cache is not None else None
        return model.velocity(ctx, x, t, h, w, time_embed_extra=extra, feature_cache=rows)

    return velocity


@torch.no_grad()
def distilled_sample(model, expert: DistilledExpert, ctx, h: int, w: int, noise: torch.Tensor,
                     timesteps: torch.Tensor, text_scale: float, img_scale: float | None = None,
                     solver: str = "euler", callback=None, cache=None) -> torch.Tensor:
    """Integrate from ``noise`` [h*w, 64] at t = timesteps[0] to t = 0; returns fp32 latent tokens.

    The distilled weights are in place only for the duration of this call (restored in ``finally``).
    """
    x = noise.to(model.device, torch.float32)
    with expert.swapped_into(model):
        f = distilled_velocity_fn(model, expert, ctx, h, w, text_scale, img_scale, cache)
        return solve(f, x, timesteps, solver, callback=callback)
