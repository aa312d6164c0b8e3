"""The denoised estimate for step callbacks that ask for it (latent previews).

A step callback is ``callback(step, total)`` (it may raise to interrupt). A callback whose attribute
``wants_denoised`` is True is called on denoising steps as ``callback(step, total, denoised=x0)``, where x0 is
the estimate of the clean latent from the step's last velocity evaluation: with ``x_t = (1 - t) x0 + t eps``
and ``v = eps - x0``, ``x0 = x_t - t v``. Samplers hand over packed latent tokens ``[h*w, 64]`` (fp32, on the
compute device); ``BagelPipeline`` hands its caller the unpacked latent ``[1, 16, H/8, W/8]`` (BAGEL-normalised,
like ``ImageResult.latent``). Text decoding rounds call every callback as ``callback(step, total)``.

Nothing is computed, kept or unpacked for a callback that does not ask: previews off cost nothing.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["wants_denoised", "denoised", "report", "tap", "unpacking"]


def wants_denoised(callback) -> bool:
    """True when ``callback`` asked for the denoised estimate (``callback.wants_denoised is True``)."""
    return callback is not None and getattr(callback, "wants_denoised", False) is True


def denoised(x: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - t v (fp32): the flow's estimate of the clean latent at the point the velocity was taken."""
    return x.float() - float(t) * v.float()


def report(callback, step: int, total: int, x: torch.Tensor, t, v: torch.Tensor) -> None:
    """Call ``callback`` after a step whose velocity ``v`` was evaluated at ``(x, t)``."""
    if wants_denoised(callback):
        callback(step, total, denoised=denoised(x, t, v))
    else:
        callback(step, total)


def tap(velocity_fn: Callable, callback) -> tuple[Callable, Callable | None]:
    """``(velocity_fn, callback)`` for a solver that calls ``callback(step, total)`` only.

    For a callback that wants the denoised estimate, the velocity function remembers its last evaluation
    (references only, no copy) and the returned step callback hands over x0 of that evaluation (for Heun: the
    corrector's point). Otherwise both are returned unchanged.
    """
    if not wants_denoised(callback):
        return velocity_fn, callback
    last = []

    def velocity(x: torch.Tensor, t) -> torch.Tensor:
        v = velocity_fn(x, t)
        last[:] = [x, t, v]
        return v

    def step_callback(step: int, total: int) -> None:
        report(callback, step, total, *last)

    return velocity, step_callback


def unpacking(callback, unpack: Callable[[torch.Tensor], torch.Tensor]):
    """A callback that wants denoised tokens and gives ``callback`` ``unpack(tokens)``; ``callback`` itself
    when it does not want the denoised estimate."""
    if not wants_denoised(callback):
        return callback

    def step_callback(step: int, total: int, denoised: torch.Tensor | None = None) -> None:
        if denoised is None:
            callback(step, total)
        else:
            callback(step, total, denoised=unpack(denoised))

    step_callback.wants_denoised = True
    return step_callback
