"""Training-free few-step ODE solvers for stock BAGEL in flow form.

All solvers integrate ``dx/dt = v(x, t)`` from t = 1 (noise) to t = 0 over a time grid from
``sampling.schedules`` (``x_t = (1 - t) x0 + t eps``, ``v = eps - x0``). ``velocity_fn(x, t)`` is the full
guided velocity (the teacher's CFG already applied), so one call = one guided evaluation; with batched CFG
branches that is one network forward pass.

Methods (``SOLVERS``):
  * ``euler``    - the teacher's update, 1 evaluation per step.
  * ``heun``     - Heun's 2nd-order method (trapezoidal predictor-corrector), 2 evaluations per step; the
                   final step to t = 0 is a plain Euler step unless ``heun_final=True``.
  * ``unipc``    - diffusers' ``UniPCMultistepScheduler`` (bh2, order 2, predictor + corrector) in flow
                   form (``use_flow_sigmas``, ``prediction_type="flow_prediction"``) over our grid.
  * ``dpmpp_2m`` - diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M) in flow form over our grid.
The multistep methods reuse past evaluations, so they cost 1 evaluation per step like Euler.
``grid_for_budget`` turns an evaluation budget into a grid for a method.
"""
from __future__ import annotations

import inspect
import logging
import warnings
from typing import Callable

import torch

from .preview import tap
from .schedules import teacher_timesteps

logger = logging.getLogger(__name__)

__all__ = ["VelocityFn", "SOLVERS", "solve", "grid_for_budget", "evaluations_for", "count_evaluations"]

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[int, int], None]

# The multistep solvers take log(alpha/sigma); alpha = 1 - t is 0 at t = 1, so their first sigma is nudged
# below 1 (diffusers does the same for its own flow grids). The network itself is still evaluated at t = 1.
_SIGMA_ONE_NUDGE = 1e-6


def _check_grid(timesteps: torch.Tensor, to_zero: bool = True) -> torch.Tensor:
    t = torch.as_tensor(timesteps, dtype=torch.float32).flatten().cpu()
    if t.numel() < 2 or (to_zero and t[-1] != 0) or t[-1] < 0 or not (t[1:] < t[:-1]).all() or t[0] > 1:
        raise ValueError(f"solver grid must be strictly decreasing in [0, 1] and end at 0, got {t.tolist()}")
    return t


def _euler(velocity_fn: VelocityFn, x: torch.Tensor, t: torch.Tensor, callback: Callback | None, **_) -> torch.Tensor:
    n = t.numel() - 1
    for k in range(n):
        v = velocity_fn(x, float(t[k]))
        x = x - v * (t[k] - t[k + 1]).to(x.device)
        if callback is not None:
            callback(k + 1, n)
    return x


def _heun(velocity_fn: VelocityFn, x: torch.Tensor, t: torch.Tensor, callback: Callback | None,
          heun_final: bool = False, **_) -> torch.Tensor:
    n = t.numel() - 1
    for k in range(n):
        dt = float(t[k] - t[k + 1])
        v0 = velocity_fn(x, float(t[k])).float()
        x_pred = x - v0 * dt
        if k < n - 1 or heun_final:
            v1 = velocity_fn(x_pred, float(t[k + 1])).float()
            x = x - 0.5 * (v0 + v1) * dt
        else:
            x = x_pred
        if callback is not None:
            callback(k + 1, n)
    return x


def _make_unipc(n: int, order: int):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, solver_order=order,
        solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    )


def _make_dpmpp(n: int, order: int):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, solver_order=order,
        algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
    )


def _set_flow_grid(sched, t: torch.Tensor) -> None:
    """Install our grid as the scheduler's sigmas (the network sees the unnudged t)."""
    sigmas = t.clone()
    if sigmas[0] > 1 - _SIGMA_ONE_NUDGE:
        sigmas[0] = 1 - _SIGMA_ONE_NUDGE
    n = t.numel() - 1
    if "sigmas" in inspect.signature(sched.set_timesteps).parameters:  # UniPC: custom flow sigmas supported
        sched.set_timesteps(sigmas=sigmas[:-1].double().numpy())
    else:  # DPM-Solver++: no custom-sigma hook; build its state, then replace the grid
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy-2 notice inside diffusers
            sched.set_timesteps(num_inference_steps=n)
    sched.sigmas = sigmas
    sched.timesteps = sigmas[:-1] * sched.config.num_train_timesteps
    sched.num_inference_steps = n


def _diffusers_solver(make) -> Callable[..., torch.Tensor]:
    def run(velocity_fn: VelocityFn, x: torch.Tensor, t: torch.Tensor, callback: Callback | None,
            order: int = 2, **_) -> torch.Tensor:
        n = t.numel() - 1
        sched = make(n, order)
        _set_flow_grid(sched, t)
        x = x.float()
        for k in range(n):
            v = velocity_fn(x, float(t[k])).float()
            x = sched.step(v, sched.timesteps[k], x, return_dict=False)[0].float()
            if callback is not None:
                callback(k + 1, n)
        return x

    return run


SINGLE_STEP = ("euler", "heun")
SOLVERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": _euler,
    "heun": _heun,
    "unipc": _diffusers_solver(_make_unipc),
    "dpmpp_2m": _diffusers_solver(_make_dpmpp),
}


def solve(velocity_fn: VelocityFn, x: torch.Tensor, timesteps: torch.Tensor, method: str = "euler",
          callback: Callback | None = None, restart_at=None, **options) -> torch.Tensor:
    """Integrate the flow ODE from ``timesteps[0]`` to 0.

    Args:
        velocity_fn: ``(x [N, C] fp32, t float) -> v [N, C]``, the guided velocity.
        x: initial latent at ``timesteps[0]`` (fp32).
        timesteps: fp32 grid, strictly decreasing, ending at 0.
        method: a key of ``SOLVERS``.
        callback: ``callback(step, total)`` after every step (may raise to interrupt); one that wants the
            denoised estimate (``sampling.preview``) also gets ``denoised=`` x0 of the step's last evaluation.
        restart_at: grid indices where the velocity field jumps (e.g. the CFG interval edge); multistep
            solvers restart there (history never mixes the two sides), at no extra evaluations. Single-step
            methods (euler, heun) ignore it.
        options: ``heun_final`` (heun), ``order`` (unipc, dpmpp_2m; default 2).

    Returns:
        The latent at t = 0 (fp32).
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; valid solvers: {', '.join(SOLVERS)}")
    t = _check_grid(timesteps)
    velocity_fn, callback = tap(velocity_fn, callback)
    cuts = sorted({int(k) for k in (restart_at or ()) if 0 < int(k) < t.numel() - 1})
    if not cuts or method in SINGLE_STEP:
        return SOLVERS[method](velocity_fn, x.float(), t, callback, **options)
    x, n = x.float(), t.numel() - 1
    for a, b in zip([0] + cuts, cuts + [n]):
        def cb(k, _m, off=a):
            if callback is not None:
                callback(off + k, n)
        x = SOLVERS[method](velocity_fn, x, t[a:b + 1], cb, **options)
    return x


def evaluations_for(method: str, num_steps: int, heun_final: bool = False) -> int:
    """Guided evaluations a method spends on a grid of ``num_steps`` steps."""
    if method == "heun":
        return 2 * num_steps - (0 if heun_final else 1)
    return num_steps


def grid_for_budget(method: str, budget: int, shift: float = 3.0) -> tuple[torch.Tensor, dict]:
    """The shifted teacher-style grid that spends exactly ``budget`` guided evaluations with ``method``.

    Returns:
        ``(timesteps, options)``; pass both to ``solve``. Heun with an even budget corrects its final step too.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; valid solvers: {', '.join(SOLVERS)}")
    if int(budget) != budget or budget < 1 or (method == "heun" and budget < 2):
        raise ValueError(f"evaluation budget must be a positive integer (>= 2 for heun), got {budget!r}")
    if method == "heun":
        steps, opts = (budget + 1) // 2, {"heun_final": budget % 2 == 0}
    else:
        steps, opts = int(budget), {}
    return teacher_timesteps(steps + 1, shift), opts


def count_evaluations(velocity_fn: VelocityFn) -> tuple[VelocityFn, list[int]]:
    """Wrap ``velocity_fn`` so that calls are counted in the returned one-element list."""
    counter = [0]

    def wrapped(x: torch.Tensor, t: float) -> torch.Tensor:
        counter[0] += 1
        return velocity_fn(x, t)

    return wrapped, counter
