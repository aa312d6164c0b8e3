"""The teacher's guided ODE on prompt / noise items (text-to-image prompts and, for the CFG-free editor, edit
pairs): dual-CFG velocity, the 50-step reference, training-free solvers, and the evaluation noise domains."""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..distill.embedders import T2I_IMG_SCALE
from ..generation import CFGSettings, guided_velocity
from ..sampling.guidance import branches_needed, cfg_active
from ..sampling.schedules import teacher_timesteps
from ..sampling.solvers import grid_for_budget, solve
from .data import EditPair, open_rgb


@dataclass
class Item:
    """One sample: a condition's contexts (original weights), its noise, its guidance scales. ``prompt`` is the
    text (an edit's instruction); ``image`` the edit's source (None for text-to-image)."""
    prompt: str
    ctxs: object
    noise: torch.Tensor      # [h*w, 64] fp32
    s_txt: float
    h: int
    w: int
    s_img: float = T2I_IMG_SCALE
    image: Path | None = None

    @property
    def scales(self) -> tuple[float, float]:
        return self.s_txt, self.s_img

    @property
    def task(self) -> str:
        return "t2i" if self.image is None else "edit"


class Teacher:
    """The stock model with dual CFG: guided velocity, 50-step reference, training-free solvers.

    Text-to-image uses ``cfg_interval`` and global renorm (``BagelPipeline.generate``'s defaults); edits the
    image scale too, ``edit_cfg_interval`` and text-channel renorm (``BagelPipeline.edit``'s defaults)."""

    def __init__(self, pipe, size=(64, 64), cfg_interval=(0.4, 1.0), num_timesteps: int = 50, shift: float = 3.0,
                 edit_cfg_interval=(0.0, 1.0)):
        self.pipe, self.model = pipe, pipe.model
        self.h, self.w = pipe._check_size(*size)
        self.interval, self.edit_interval = tuple(cfg_interval), tuple(edit_cfg_interval)
        self.num_timesteps, self.shift = num_timesteps, shift
        self._ctx_cache: dict = {}

    EDIT_CONTEXTS = 8   # an edit's contexts hold its image's KV: ~2 350 tokens x 56 KB = 135 MB on BAGEL at 512²

    def contexts(self, cond: str | EditPair):
        """Contexts of a prompt (all kept: text only) or an edit (the last ``EDIT_CONTEXTS`` kept)."""
        if cond in self._ctx_cache:
            self._ctx_cache[cond] = self._ctx_cache.pop(cond)   # most recently used last
            return self._ctx_cache[cond]
        if isinstance(cond, EditPair):
            edits = [k for k in self._ctx_cache if isinstance(k, EditPair)]
            for k in edits[:max(0, len(edits) - self.EDIT_CONTEXTS + 1)]:
                del self._ctx_cache[k]
            ctxs = self.pipe.build_contexts([open_rgb(cond.image), cond.instruction],
                                            generator=torch.Generator().manual_seed(0))
        else:
            ctxs = self.pipe.build_contexts([cond])
        self._ctx_cache[cond] = ctxs
        return ctxs

    def item(self, cond: str | EditPair, gen: torch.Generator, s_txt: float, s_img: float = T2I_IMG_SCALE) -> Item:
        ctxs = self.contexts(cond)
        h, w = (self.pipe._check_size(*ctxs.image_shapes) if isinstance(cond, EditPair) else (self.h, self.w))
        noise = torch.randn((h * w, self.pipe.config.patch_latent_dim), generator=gen).to(self.model.device)
        if isinstance(cond, EditPair):
            return Item(cond.instruction, ctxs, noise, float(s_txt), h, w, float(s_img), cond.image)
        return Item(cond, ctxs, noise, float(s_txt), h, w)

    def draw(self, conds: list, rng: random.Random, gen: torch.Generator, scale_range, img_scale_range) -> Item:
        """A training item: a condition, a noise, a text scale and (edits only) an image scale."""
        cond = rng.choice(conds)
        s_txt = rng.uniform(*scale_range)
        if isinstance(cond, EditPair):
            return self.item(cond, gen, s_txt, rng.uniform(*img_scale_range))
        return self.item(cond, gen, s_txt)

    def interval_of(self, it: Item) -> tuple:
        return self.edit_interval if it.task == "edit" else self.interval

    def cfg(self, it: Item) -> CFGSettings:
        if it.task == "edit":
            return CFGSettings(it.s_txt, it.s_img, self.edit_interval, "text_channel", 0.0)
        return CFGSettings(it.s_txt, 1.0, self.interval, "global", 0.0)

    def velocity(self, it: Item, x, t) -> torch.Tensor:
        c = it.ctxs
        return guided_velocity(self.model, c.gen, c.cfg_text, c.cfg_img, x, float(t), it.h, it.w,
                               self.cfg(it)).float()

    def restarts(self, grid: torch.Tensor, it: Item) -> list[int]:
        lo, hi = self.interval_of(it)
        act = [lo <= float(t) <= hi for t in grid[:-1]]
        return [k for k in range(1, len(act)) if act[k] != act[k - 1]]

    @torch.no_grad()
    def trajectory(self, it: Item, grid: torch.Tensor, x=None) -> torch.Tensor:
        """Euler over ``grid`` from ``x`` (default the item's noise at grid[0]): [len(grid), h*w, 64]."""
        x = (it.noise if x is None else x).float()
        out = [x]
        for k in range(grid.numel() - 1):
            x = x - self.velocity(it, x, grid[k]) * float(grid[k] - grid[k + 1])
            out.append(x)
        return torch.stack(out)

    def reference_grid(self) -> torch.Tensor:
        return teacher_timesteps(self.num_timesteps, self.shift)

    @torch.no_grad()
    def reference(self, it: Item) -> torch.Tensor:
        """The 50-step teacher's final latent from the item's noise (the evaluation reference)."""
        return self.trajectory(it, self.reference_grid())[-1]

    def passes_at(self, it: Item, t) -> int:
        """Network passes of one guided evaluation at ``t``: the main branch plus the uncond branches CFG runs."""
        cfg = self.cfg(it)
        return 1 + sum(branches_needed(cfg.text_scale, cfg.img_scale, cfg_active(float(t), cfg.interval)))

    def solver_grid(self, it: Item, method: str, budget: int, shift: float, unit: str = "evaluations"):
        """The grid of ``method`` that spends at most ``budget`` guided evaluations, or, with ``unit="passes"``,
        network passes (the paper's NFE: a guided evaluation inside the CFG interval costs one pass per branch).
        Returns ``(grid, options, evaluations, passes)``."""
        if unit not in ("evaluations", "passes"):
            raise ValueError(f"unit must be 'evaluations' or 'passes', not {unit!r}")
        for n in range(budget, 0, -1):
            if method == "heun" and n < 2:
                break
            grid, opts = grid_for_budget(method, n, shift)
            times = []
            solve(lambda x, t: times.append(float(t)) or torch.zeros_like(x), torch.zeros_like(it.noise), grid, method,
                  restart_at=self.restarts(grid, it), **opts)  # a dry run: where this solver evaluates
            passes = sum(self.passes_at(it, t) for t in times)
            if (passes if unit == "passes" else len(times)) <= budget:
                return grid, opts, len(times), passes
        raise ValueError(f"{method} cannot run within {budget} {unit}")

    @torch.no_grad()
    def solver(self, it: Item, method: str, budget: int, shift: float, unit: str = "evaluations") -> torch.Tensor:
        grid, opts, _, _ = self.solver_grid(it, method, budget, shift, unit)
        return solve(lambda x, t: self.velocity(it, x, t), it.noise.float(), grid, method,
                     restart_at=self.restarts(grid, it), **opts)


def merged_grid(*grids) -> torch.Tensor:
    """Sorted union (descending) of time grids, near-duplicates (1e-6) merged."""
    ts = sorted({round(float(t), 6) for g in grids for t in torch.as_tensor(g).flatten().tolist()}, reverse=True)
    return torch.tensor(ts, dtype=torch.float32)


def path_at(traj: torch.Tensor, grid: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """An Euler trajectory over ``grid`` read at ``times``: within a step Euler moves on a straight line, so
    linear interpolation between the two grid points is exactly the path the teacher took."""
    out = []
    for tau in torch.as_tensor(times).tolist():
        i = int(min(max((grid >= tau).sum().item() - 1, 0), grid.numel() - 2))
        w = float((grid[i] - tau) / (grid[i] - grid[i + 1]))
        out.append((1 - w) * traj[i] + w * traj[i + 1])
    return torch.stack(out)


def index_of(grid: torch.Tensor, t: float) -> int:
    return int((grid - float(t)).abs().argmin())


# torch's CPU generator keeps 32 bits of its seed: the evaluation noise domains are offsets within them
# (the held-out one is the run's seed itself; no training step's seed, ``step_rng``, takes either value in
# the first million steps of seeds 0-3: a test)
HELD_OUT_DOMAIN, REFERENCE_DOMAIN = 0, 0x5EED_0001


def domain_generator(seed: int, domain: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) + domain) % 2 ** 32)


def with_fresh_noises(items: list[Item], seed: int) -> list[Item]:
    """The same conditions and scales with noises of the reference domain (an unpaired reference set)."""
    gen = domain_generator(seed, REFERENCE_DOMAIN)
    return [replace(it, noise=torch.randn(it.noise.shape, generator=gen).to(it.noise)) for it in items]


def heldout_items(teacher: Teacher, prompts: list[str], noises: int, scale: float, seed: int,
                  edits: list[EditPair] = (), img_scale: float = 1.5) -> list[Item]:
    """Held-out items: their noises come from the held-out domain."""
    gen = domain_generator(seed, HELD_OUT_DOMAIN)
    return ([teacher.item(p, gen, scale) for p in prompts for _ in range(noises)]
            + [teacher.item(e, gen, scale, img_scale) for e in edits for _ in range(noises)])
