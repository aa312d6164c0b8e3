"""Time grids for BAGEL's rectified-flow sampler and small scheduler objects over them.

Convention (bagel-inference-spec section 9): ``x_t = (1 - t) x0 + t eps``, t = 1 is noise, the network
predicts ``v = eps - x0`` and a step from ``t_k`` to ``t_{k+1}`` is ``x <- x - v * (t_k - t_{k+1})``.

A grid is a 1-D fp32 tensor of ``nfe + 1`` points, strictly decreasing, ending at 0; the sampler evaluates
the network at every point except the last. Named grids live in ``SCHEDULES``; ``get_schedule`` builds one.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = [
    "shift_timesteps",
    "teacher_timesteps",
    "uniform_timesteps",
    "FlowSchedule",
    "TeacherSchedule",
    "Hyper6NFESchedule",
    "Hyper6NFEShift3Schedule",
    "FIXED_GRIDS",
    "OneStepSchedule",
    "CustomSchedule",
    "SCHEDULES",
    "get_schedule",
    "schedule_names",
]


def shift_timesteps(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """BAGEL's timestep shift ``t' = s t / (1 + (s - 1) t)`` (identity for s = 1; keeps 0 and 1 fixed)."""
    return shift * t / (1 + (shift - 1) * t)


def teacher_timesteps(num_timesteps: int, shift: float) -> torch.Tensor:
    """The teacher grid: ``linspace(1, 0, num_timesteps)`` in fp32, then shifted. All n points returned.

    ``num_timesteps`` points give ``num_timesteps - 1`` network evaluations (50 -> 49).
    """
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2 (one Euler step), got {num_timesteps!r}")
    if not shift > 0:
        raise ValueError(f"timestep shift must be > 0, got {shift!r}")
    t = torch.linspace(1, 0, int(num_timesteps), dtype=torch.float32)
    return shift_timesteps(t, float(shift))


def uniform_timesteps(nfe: int) -> torch.Tensor:
    """``t_k = 1 - k / nfe`` for k = 0..nfe (the literal reading of Hyper-Bagel's x_{kT/6} trajectory)."""
    return teacher_timesteps(int(nfe) + 1, 1.0)


def _validate_grid(t: torch.Tensor) -> torch.Tensor:
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"a time grid needs at least 2 points (one step), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("time grid contains NaN or inf")
    if t.max() > 1 or t.min() < 0:
        raise ValueError(f"timesteps must lie in [0, 1] (1 = noise), got {t.tolist()}")
    if not (t[1:] < t[:-1]).all():
        raise ValueError(f"timesteps must be strictly decreasing, got {t.tolist()}")
    if t[-1] != 0:
        raise ValueError(f"time grid must end at 0, got {t.tolist()}")
    return t


class FlowSchedule:
    """Base scheduler over a fixed grid, in the spirit of diffusers' ``FlowMatchEulerDiscreteScheduler``.

    Attributes:
        timesteps: fp32 ``[nfe + 1]`` grid ending at 0.
        step_index: index of the next step (reset by ``set_timesteps``).
    """

    name = "base"

    def __init__(self) -> None:
        self.timesteps = torch.zeros(0)
        self.step_index = 0

    def _set_grid(self, t: torch.Tensor) -> None:
        self.timesteps = _validate_grid(t.to(torch.float32))
        self.step_index = 0

    def set_timesteps(self, *args, **kwargs) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def nfe(self) -> int:
        """Number of network evaluations (steps) per branch."""
        return int(self.timesteps.numel()) - 1

    @property
    def step_timesteps(self) -> torch.Tensor:
        """The ``nfe`` times at which the network is evaluated (the grid without its final 0)."""
        return self.timesteps[:-1]

    @property
    def step_sizes(self) -> torch.Tensor:
        """``dt_k = t_k - t_{k+1}`` for k = 0..nfe-1 (fp32, positive)."""
        return self.timesteps[:-1] - self.timesteps[1:]

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, step_index: int | None = None) -> torch.Tensor:
        """One Euler step ``x - v * dt_k``.

        Args:
            model_output: velocity ``v`` (any float dtype; the product ``v * dt`` keeps v's dtype, as in the
                reference path, and the subtraction happens in ``sample``'s dtype, fp32).
            sample: current latent ``x`` (fp32).
            step_index: which step; defaults to the internal counter, which is then advanced.

        Returns:
            The latent at ``t_{k+1}``.
        """
        k = self.step_index if step_index is None else int(step_index)
        if not 0 <= k < self.nfe:
            raise IndexError(f"step {k} out of range for a {self.nfe}-step schedule '{self.name}'")
        dt = self.timesteps[k] - self.timesteps[k + 1]  # 0-dim fp32
        out = sample - model_output * dt.to(model_output.device)
        if step_index is None:
            self.step_index += 1
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, nfe={self.nfe}, timesteps={self.timesteps.tolist()})"


class TeacherSchedule(FlowSchedule):
    """BAGEL's grid: ``linspace(1, 0, num_timesteps)`` shifted by ``shift`` (defaults 50 and 3.0)."""

    name = "teacher"

    def __init__(self, num_timesteps: int = 50, shift: float = 3.0) -> None:
        super().__init__()
        self.set_timesteps(num_timesteps, shift)

    def set_timesteps(self, num_timesteps: int | None = None, shift: float | None = None) -> None:
        self.num_timesteps = int(num_timesteps if num_timesteps is not None else getattr(self, "num_timesteps", 50))
        self.shift = float(shift if shift is not None else getattr(self, "shift", 3.0))
        self._set_grid(teacher_timesteps(self.num_timesteps, self.shift))


class Hyper6NFESchedule(TeacherSchedule):
    """Hyper-Bagel 6-NFE grid: 7 points. ``shift=1.0`` is the uniform k/6 reading, ``shift=3.0`` the shifted one.

    ``num_timesteps`` is fixed at 7; passing another value raises ``ValueError``.
    """

    name = "hyper-6nfe"

    def __init__(self, shift: float = 1.0, num_timesteps: int = 7) -> None:
        super().__init__(num_timesteps, shift)

    def set_timesteps(self, num_timesteps: int | None = None, shift: float | None = None) -> None:
        if num_timesteps is not None and int(num_timesteps) != 7:
            raise ValueError(f"the 6-NFE schedule has 7 timesteps (6 steps), got num_timesteps={num_timesteps}")
        super().set_timesteps(7, shift)


class OneStepSchedule(FlowSchedule):
    """Hyper-Bagel 1-NFE: one Euler step from t = 1 with dt = 1 (``x0 = x1 - v(x1, 1)``); shift has no effect."""

    name = "hyper-1nfe"

    def __init__(self, shift: float = 1.0, num_timesteps: int = 2) -> None:
        super().__init__()
        self.set_timesteps(num_timesteps, shift)

    def set_timesteps(self, num_timesteps: int | None = None, shift: float | None = None) -> None:
        if num_timesteps is not None and int(num_timesteps) != 2:
            raise ValueError(f"the 1-NFE schedule has 2 timesteps (1 step), got num_timesteps={num_timesteps}")
        self.shift = float(shift if shift is not None else 1.0)
        self._set_grid(torch.tensor([1.0, 0.0], dtype=torch.float32))


class CustomSchedule(FlowSchedule):
    """User-given timesteps (e.g. ``[1.0, 0.75, 0.5, 0.25]``); a final 0 is appended when missing.

    Values must lie in [0, 1] and be strictly decreasing; ``shift`` (default 1.0) is applied on top.
    """

    name = "custom"

    def __init__(self, timesteps: Sequence[float] | torch.Tensor | None = None, shift: float = 1.0,
                 num_timesteps: int | None = None) -> None:
        super().__init__()
        if timesteps is None:
            raise ValueError("schedule 'custom' needs timesteps=[t_0, t_1, ...] (decreasing, in [0, 1])")
        self.set_timesteps(timesteps, shift)

    def set_timesteps(self, timesteps: Sequence[float] | torch.Tensor, shift: float | None = None) -> None:
        t = torch.as_tensor(timesteps, dtype=torch.float32).flatten().clone()
        if t.numel() == 0:
            raise ValueError("custom timesteps are empty")
        if t[-1] != 0:
            t = torch.cat([t, torch.zeros(1)])
        self.shift = float(shift if shift is not None else 1.0)
        if not self.shift > 0:
            raise ValueError(f"timestep shift must be > 0, got {shift!r}")
        self._set_grid(shift_timesteps(_validate_grid(t), self.shift) if self.shift != 1.0 else t)


class Hyper6NFEShift3Schedule(Hyper6NFESchedule):
    name = "hyper-6nfe-shift3"

    def __init__(self, shift: float = 3.0, num_timesteps: int = 7) -> None:
        super().__init__(shift, num_timesteps)


SCHEDULES: dict[str, Callable[..., FlowSchedule]] = {
    "teacher": TeacherSchedule,
    "hyper-6nfe": Hyper6NFESchedule,
    "hyper-6nfe-shift3": Hyper6NFEShift3Schedule,
    "hyper-1nfe": OneStepSchedule,
    "custom": CustomSchedule,
}


def schedule_names() -> list[str]:
    return list(SCHEDULES)


FIXED_GRIDS = ("hyper-6nfe", "hyper-6nfe-shift3", "hyper-1nfe")


def get_schedule(name: str, num_timesteps: int | None = None, shift: float | None = None,
                 timesteps: Sequence[float] | torch.Tensor | None = None) -> FlowSchedule:
    """Build a named schedule from the sampler's options.

    ``teacher`` uses ``num_timesteps`` and ``shift``; ``custom`` uses ``timesteps`` (and ``shift``, default 1);
    the fixed Hyper-Bagel grids (``FIXED_GRIDS``) ignore both, their name says which reading they are.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or invalid arguments.
    """
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    if name == "teacher":
        return TeacherSchedule(50 if num_timesteps is None else num_timesteps, 3.0 if shift is None else shift)
    if name == "custom":
        return CustomSchedule(timesteps, 1.0 if shift is None else shift)
    if timesteps is not None:
        raise ValueError(f"schedule {name!r} has a fixed grid; pass timesteps only with schedule='custom'")
    return SCHEDULES[name]()
