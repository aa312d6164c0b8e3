"""BAGEL's dual classifier-free guidance with renormalisation (spec 9.5), as pure functions.

Arithmetic stays in the velocities' dtype (bf16 on the reference path: Python-float scales do not
promote); norms are taken in fp32. The result's dtype follows the reference: ``global`` keeps the
input dtype (a 0-dim fp32 factor does not promote), ``channel`` and ``text_channel`` give fp32.
"""
from __future__ import annotations

import torch

RENORM_TYPES = ("global", "channel", "text_channel")


def cfg_active(t: float, interval) -> bool:
    """Guidance applies iff interval[0] < t <= interval[1] (t is the shifted time)."""
    return float(interval[0]) < float(t) <= float(interval[1])


def branches_needed(text_scale: float, img_scale: float, active: bool) -> tuple[bool, bool]:
    """Which uncond branches a step evaluates: (text_uncond, img_uncond)."""
    return active and text_scale > 1.0, active and img_scale > 1.0


def _norm(v: torch.Tensor, per_token: bool) -> torch.Tensor:
    v = v.float()
    return v.norm(dim=-1, keepdim=True) if per_token else v.norm()


def cfg_combine(v_cond: torch.Tensor, v_text_uncond: torch.Tensor | None, v_img_uncond: torch.Tensor | None,
                text_scale: float, img_scale: float, renorm_type: str = "global",
                renorm_min: float = 0.0) -> torch.Tensor:
    """Combine the branch velocities of one step (the scales already set to 1 outside the CFG interval)."""
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"unknown cfg_renorm_type {renorm_type!r}; choose one of {RENORM_TYPES}")
    if text_scale <= 1.0:
        return v_cond
    use_img = img_scale > 1.0
    if use_img and v_img_uncond is None:
        raise ValueError("image guidance needs the img_uncond branch velocity")
    g = v_text_uncond + text_scale * (v_cond - v_text_uncond)
    if renorm_type == "text_channel":
        g = g * (_norm(v_cond, True) / (_norm(g, True) + 1e-8)).clamp(min=renorm_min, max=1.0)
        return v_img_uncond + img_scale * (g - v_img_uncond) if use_img else g
    if use_img:
        g = v_img_uncond + img_scale * (g - v_img_uncond)
    per_token = renorm_type == "channel"
    return g * (_norm(v_cond, per_token) / (_norm(g, per_token) + 1e-8)).clamp(min=renorm_min, max=1.0)
