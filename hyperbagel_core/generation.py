"""The teacher image sampler: rectified-flow Euler over the shifted grid with dual CFG (spec 9).

The CFG branches of a step (main, text-uncond, image-uncond) are evaluated in ONE batched forward by
default (``batch_cfg=True``): the same query against each branch's cache; ``batch_cfg=False`` runs them
one after another like the reference. ``trace`` (a dict) records every intermediate for conformance.
``cache`` (``sampling.taylorseer.TaylorSeerState``, made per call) turns on the TaylorSeer feature cache:
each branch keeps its own cache and counter, advanced only when that branch is evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .context import Context
from .sampling.guidance import branches_needed, cfg_active, cfg_combine
from .sampling.preview import report
from .sampling.schedules import teacher_timesteps


@dataclass
class CFGSettings:
    text_scale: float = 4.0
    img_scale: float = 1.0
    interval: tuple = (0.4, 1.0)
    renorm_type: str = "global"
    renorm_min: float = 0.0


def branch_velocities(model, ctxs: list, x: torch.Tensor, t, h: int, w: int, batch_cfg: bool,
                      time_embed_extra=None, cache=None, names=None) -> list[torch.Tensor]:
    """Velocities of the given contexts for the same query, batched or sequential; with a ``cache``,
    ``names`` are the contexts' CFG branches (``sampling.taylorseer.BRANCHES``)."""
    if batch_cfg and len(ctxs) > 1:
        rows = cache.rows(names) if cache is not None else None
        return list(model.velocity_batched(ctxs, x, t, h, w, time_embed_extra, rows).unbind(0))
    if cache is None:
        return [model.velocity(c, x, t, h, w, time_embed_extra) for c in ctxs]
    return [model.velocity(c, x, t, h, w, time_embed_extra, cache.rows([n])) for c, n in zip(ctxs, names)]


def guided_velocity(model, main: Context, text_ctx: Context | None, img_ctx: Context | None, x, t, h, w,
                    cfg: CFGSettings, batch_cfg: bool = True, record: dict | None = None,
                    cache=None) -> torch.Tensor:
    """One step's velocity with the teacher's dual CFG (uncond branches only when they matter)."""
    active = cfg_active(t, cfg.interval)
    s_t, s_i = (cfg.text_scale, cfg.img_scale) if active else (1.0, 1.0)
    need_t, need_i = branches_needed(cfg.text_scale, cfg.img_scale, active)
    ctxs = [main] + ([text_ctx] if need_t else []) + ([img_ctx] if need_i else [])
    names = ["main"] + (["cfg_text"] if need_t else []) + (["cfg_img"] if need_i else [])
    vs = branch_velocities(model, ctxs, x, t, h, w, batch_cfg, cache=cache, names=names)
    v_c = vs[0]
    v_t = vs[1] if need_t else None
    v_i = vs[-1] if need_i else None
    v = cfg_combine(v_c, v_t, v_i, s_t, s_i, cfg.renorm_type, cfg.renorm_min)
    if record is not None:
        record.update(active=active, v_cond=v_c, v_text_uncond=v_t, v_img_uncond=v_i, v=v)
    return v


@torch.no_grad()
def teacher_sample(model, main: Context, text_ctx: Context | None, img_ctx: Context | None, h: int, w: int,
                   noise: torch.Tensor, cfg: CFGSettings, num_timesteps: int = 50, timestep_shift: float = 3.0,
                   timesteps: torch.Tensor | None = None, batch_cfg: bool = True, callback=None,
                   trace: dict | None = None, cache=None) -> torch.Tensor:
    """Integrate from t=1 (``noise`` [h*w, 64]) to t=0 with Euler steps; returns the final latent tokens (fp32).

    ``x`` stays fp32 and the product ``v * dt`` keeps v's dtype (bf16 on the reference path), as in spec 9.3.
    """
    ts = teacher_timesteps(num_timesteps, timestep_shift) if timesteps is None else timesteps.float().cpu()
    x = noise.to(model.device, torch.float32)
    steps = ts.numel() - 1
    for k in range(steps):
        t, dt = ts[k], (ts[k] - ts[k + 1]).to(model.device)
        rec = {} if trace is not None else None
        v = guided_velocity(model, main, text_ctx, img_ctx, x, t, h, w, cfg, batch_cfg, rec, cache)
        if trace is not None:
            _record(trace, k, t, ts[k] - ts[k + 1], x, rec)
        x_k, x = x, x - v * dt
        if callback is not None:
            report(callback, k + 1, steps, x_k, t, v)
    return x


@torch.no_grad()
def solver_sample(model, main: Context, text_ctx: Context | None, img_ctx: Context | None, h: int, w: int,
                  noise: torch.Tensor, cfg: CFGSettings, timesteps: torch.Tensor, solver: str,
                  batch_cfg: bool = True, callback=None, cache=None, **options) -> torch.Tensor:
    """Training-free few-step sampling: a flow solver (``sampling.solvers``) over the teacher's guided velocity."""
    from .sampling.solvers import solve

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided_velocity(model, main, text_ctx, img_ctx, x, t, h, w, cfg, batch_cfg, cache=cache)

    ts = timesteps.float().cpu()
    act = [cfg_active(t, cfg.interval) for t in ts[:-1].tolist()]
    jumps = [k for k in range(1, len(act)) if act[k] != act[k - 1]]  # guidance switches: restart multistep
    return solve(velocity, noise.to(model.device, torch.float32), ts, solver, callback=callback, restart_at=jumps,
                 **options)


def _record(trace: dict, k: int, t, dt, x, rec: dict) -> None:
    for key, val in (("timesteps", t), ("dts", dt), ("cfg_active", int(rec["active"])), ("x_steps", x)):
        trace.setdefault(key, []).append(val.detach().cpu().float() if torch.is_tensor(val) else val)
    for name in ("v_cond", "v_text_uncond", "v_img_uncond", "v"):
        val = rec[name]
        trace.setdefault(name + "_steps", []).append(None if val is None else val.detach().float().cpu())
