"""TaylorSeer: the official training-free feature cache of BAGEL's denoising passes (spec 12), per call.

Each CFG branch (main, cfg_text, cfg_img) has its own cache and its own step counter, which advances each
time that branch is evaluated (a branch skipped outside the CFG interval does not advance). Steps
``0 .. first_enhance - 1`` run the decoder stack ("full"); afterwards every ``fresh_threshold``-th step is
full and the others are predicted by a Taylor expansion in the step index,
``sum_i F_i x^i / i!`` with ``x = step - last full step``, from finite differences ``F_{i+1} = (F_i^new -
F_i^old) / delta`` (``delta``: distance between the last two full steps) formed on full steps once
``step > first_enhance - 2``, up to ``max_order``.

The official code caches and extrapolates every decoder layer's output, all query tokens, and leaves its
flags on the model. On a predicted step each layer's output is replaced by its own prediction, so only the
LAST layer's prediction reaches the velocity, and of it only the latent rows (the markers never reach
``llm2vae``). This module keeps exactly that: the last decoder layer's output for the latent rows, before the
final norm (the embedding, the final norm and ``llm2vae`` still run), with the official arithmetic in the
model dtype. Everything lives in a ``TaylorSeerState`` made per sampling call: nothing is stored on modules,
so a later call (or an interrupted one) cannot see it.

A "step" is one evaluation of a branch, for every sampler: for the teacher and the multistep solvers one
grid step; for Heun its predictor and its corrector evaluation are two steps (a solver step costs two).

Beyond the official (``change_threshold`` > 0, ``cache="adaptive"``): after the warm-up a branch's step is full
when the model input has changed enough since that branch's last full step (the idea of TeaCache): the
relative L1 change of the denoising query's latent embedding from one evaluation to the next, summed per
branch, reaches ``change_threshold``; ``fresh_threshold`` is then unused. Every branch keeps its own sum and
its own factors, so CFG is never dropped: an uncond branch is predicted from its own outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BRANCHES = ("main", "cfg_text", "cfg_img")
CACHE_CHOICES = ("off", "taylorseer", "adaptive")
ADAPTIVE_THRESHOLD = 0.1   # cache="adaptive": measured on the flow-trained tiny teacher (docs/PERFORMANCE.md)


@dataclass(frozen=True)
class TaylorSeerSettings:
    """The official defaults (``cache_init`` of ``modeling/cache_utils/taylorseer.py``)."""
    first_enhance: int = 5     # warm-up: steps 0 .. first_enhance - 1 are computed in full
    fresh_threshold: int = 3   # afterwards one full step every fresh_threshold steps (1: every step is full)
    max_order: int = 6         # highest finite-difference order of the expansion (0: reuse the last output)
    change_threshold: float = 0.0  # > 0: full steps decided by the input's change, not every fresh_threshold

    def __post_init__(self):
        for name, lo in (("first_enhance", 1), ("fresh_threshold", 1), ("max_order", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or v > 1000:
                raise ValueError(f"TaylorSeer {name} must be an integer in [{lo}, 1000], got {v!r}")
        v = self.change_threshold
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
            raise ValueError(f"TaylorSeer change_threshold must be a number in [0, 100] (0: the official fixed "
                             f"schedule), got {v!r}")

    @property
    def label(self) -> str:
        if self == TaylorSeerSettings():
            return "taylorseer"
        if self == TaylorSeerSettings(change_threshold=ADAPTIVE_THRESHOLD):
            return "adaptive"
        rule = (f"change_threshold={self.change_threshold:g}" if self.change_threshold
                else f"fresh_threshold={self.fresh_threshold}")
        return f"taylorseer(first_enhance={self.first_enhance}, {rule}, max_order={self.max_order})"


def resolve_cache(cache) -> TaylorSeerSettings | None:
    """``cache`` argument of generate/edit -> settings or None (off).

    Accepts None / "off", "taylorseer" (the official settings), "adaptive" (the official warm-up and order,
    full steps decided by the input's change, ``ADAPTIVE_THRESHOLD``), a ``TaylorSeerSettings``, or a dict of
    its fields (missing ones take the official values)."""
    if cache is None or cache == "off":
        return None
    if cache == "taylorseer":
        return TaylorSeerSettings()
    if cache == "adaptive":
        return TaylorSeerSettings(change_threshold=ADAPTIVE_THRESHOLD)
    if isinstance(cache, TaylorSeerSettings):
        return cache
    if isinstance(cache, dict):
        fields = ("first_enhance", "fresh_threshold", "max_order", "change_threshold")
        unknown = set(cache) - set(fields)
        if unknown:
            raise ValueError(f"unknown TaylorSeer setting(s) {sorted(unknown)}; valid: {', '.join(fields)}")
        return TaylorSeerSettings(**cache)
    raise ValueError(f"cache must be 'off', 'taylorseer', 'adaptive', a TaylorSeerSettings or a dict of its "
                     f"fields, got {cache!r}")


class BranchCache:
    """One branch's TaylorSeer cache: its step counter, schedule and Taylor factors ``F_0 .. F_k``.

    Per step: ``begin()`` decides full or predicted (the official ``cal_type``); a full step passes the
    decoder output to ``store`` (``derivative_approximation``), a predicted one reads ``predict()``
    (``taylor_formula``); ``end()`` advances the counter."""

    def __init__(self, settings: TaylorSeerSettings):
        self.settings = settings
        self.step = 0
        self.counter = 0
        self.activated = [0]          # the official list starts with a 0 before step 0 is appended
        self.factors: list[torch.Tensor] = []
        self.full = True
        self.computed = self.predicted = 0
        self.change = 0.0             # adaptive: the input's relative change since this branch's last full step

    def begin(self) -> bool:
        s = self.settings
        due = self.change >= s.change_threshold if s.change_threshold else self.counter == s.fresh_threshold - 1
        if self.step < s.first_enhance or due:
            self.counter, self.full, self.change = 0, True, 0.0
            self.activated.append(self.step)
            self.computed += 1
        else:
            self.counter, self.full = self.counter + 1, False
            self.predicted += 1
        return self.full

    def store(self, feature: torch.Tensor) -> None:
        """New factors from this full step's output; built order by order so that each old factor is freed
        as soon as its successor exists (never two full sets alive)."""
        s = self.settings
        old, self.factors = self.factors, [feature]
        if self.step > s.first_enhance - 2:
            delta = self.activated[-1] - self.activated[-2]
            for i in range(min(len(old), s.max_order)):
                self.factors.append((self.factors[i] - old[i]) / delta)
                old[i] = None

    def predict(self) -> torch.Tensor:
        x = self.step - self.activated[-1]
        out = 0
        for i, f in enumerate(self.factors):
            out = out + (1 / math.factorial(i)) * f * (x ** i)
        return out

    def end(self) -> None:
        self.step += 1

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.factors)


class TaylorSeerState:
    """All TaylorSeer state of one sampling call: a ``BranchCache`` per CFG branch, made on first use."""

    def __init__(self, settings: TaylorSeerSettings):
        self.settings = settings
        self.branches: dict[str, BranchCache] = {}
        self.passes = 0               # forwards of the decoder stack run (a batch of branches = one)
        self.peak_bytes = 0           # largest size of all branches' factors together
        self._input = None            # adaptive: the last query embedding seen (latent rows)

    def observe(self, q: torch.Tensor) -> None:
        """Adaptive: add the input's relative L1 change since the previous evaluation to every branch's sum (a
        branch that sits out a step still sees the input move); the same input twice adds nothing."""
        if not self.settings.change_threshold:
            return
        if self._input is not None:
            change = float((q - self._input).abs().mean() / self._input.abs().mean().clamp_min(1e-12))
            for b in self.branches.values():
                b.change += change
        self._input = q.detach().clone()    # own storage: nothing the forward does can change it

    def branch(self, name: str) -> BranchCache:
        if name not in BRANCHES:
            raise ValueError(f"unknown CFG branch {name!r}; one of {BRANCHES}")
        if name not in self.branches:
            self.branches[name] = BranchCache(self.settings)
        return self.branches[name]

    def rows(self, names) -> "CachedRows":
        """The caches of one forward's batch rows (one CFG branch per row, in order)."""
        return CachedRows(self, [self.branch(n) for n in names])

    def nbytes(self) -> int:
        held = 0 if self._input is None else self._input.numel() * self._input.element_size()
        return held + sum(b.nbytes() for b in self.branches.values())

    def stats(self) -> dict:
        """For ``ImageResult.stats``: branch evaluations computed / predicted, forwards run, cache bytes."""
        return dict(cache=self.settings.label, passes=self.passes,
                    computed=sum(b.computed for b in self.branches.values()),
                    predicted=sum(b.predicted for b in self.branches.values()),
                    cache_peak_bytes=self.peak_bytes)


class CachedRows:
    """The model's hook (``BagelModel.velocity_batched(..., feature_cache=)``): one step of a batch of branches."""

    def __init__(self, state: TaylorSeerState, branches: list[BranchCache]):
        self.state, self.branches = state, branches

    def __len__(self) -> int:
        return len(self.branches)

    def hidden(self, run, q: torch.Tensor) -> torch.Tensor:
        """The last decoder layer's latent rows [B, h*w, D] for this step: ``run(rows)`` (the decoder stack on
        those batch rows, -> [len(rows), h*w, D]) for the rows that compute, the Taylor prediction for the rest;
        ``q``: this step's query embedding, latent rows (the adaptive decision reads it)."""
        self.state.observe(q)
        full = [b.begin() for b in self.branches]
        out: list = [None] * len(full)
        rows = [i for i, f in enumerate(full) if f]
        if rows:
            h = run(rows)
            self.state.passes += 1
            for j, i in enumerate(rows):
                out[i] = h[j].clone()     # own storage: the batched block is freed after the step
                self.branches[i].store(out[i])
        for i, b in enumerate(self.branches):
            if not full[i]:
                out[i] = b.predict()
            b.end()
        self.state.peak_bytes = max(self.state.peak_bytes, self.state.nbytes())
        return out[0][None] if len(out) == 1 else torch.stack(out)


def cache_bytes(settings: TaylorSeerSettings | None, tokens: int, hidden: int, branches: int, dtype_bytes: int,
                layers: int = 1) -> int:
    """Upper bound of a call's cache: ``max_order + 1`` factors of ``tokens x hidden`` per branch and layer,
    plus the one factor being formed and the prediction of one branch (and the adaptive mode's last input).
    ``layers=1``, ``tokens`` = latent tokens is this module; the official layout is ``layers`` = all decoder
    layers, ``tokens`` = query tokens (latents + 2 markers), without the transient terms."""
    if settings is None:
        return 0
    per = tokens * hidden * dtype_bytes
    extra = (2 + (1 if settings.change_threshold else 0)) if layers == 1 else 0
    return per * ((settings.max_order + 1) * branches * layers + extra)
