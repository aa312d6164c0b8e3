"""``torch.compile`` of the model's repeated regions: the text decode step and the denoising pass (issue 21).

Eager decoding launches ~60 kernels per decoder layer (norms, q/k norms, RoPE, the SwiGLU gate and the
residual adds each as several small kernels); a compiled region fuses each run of elementwise work into one
kernel around the matrix products. We compile *regions*, not the whole model: one region spans the end of
decoder layer i and the start of layer i + 1 (attention output -> o_proj -> residual -> norm -> MLP ->
residual -> the next layer's input norm, q/k/v, q/k norms, RoPE), so the residual add fuses with the next
norm; every layer runs the same code on its own weights (PyTorch inlines ``nn.Module`` calls and treats
parameters as inputs), so a region is compiled once and reused by all layers. The first and the last layer
have their own regions (embedding / final norm and LM head). Attention stays between the regions where it
reads per-branch caches (denoising) and inside them where its shapes are fixed (the static decode step).

Shapes: the rows of a decode step (the k+1 of a verification) and the cache capacity are marked dynamic;
on CUDA a step has at least 2 rows, so one compiled graph per region serves every block size and every
capacity (on CPU a 1-row step keeps its own graph: ``StaticTextDecoder.smallest_block``); a denoising pass
is dynamic in its batch of CFG branches (2-3; 1 is its own graph) and its token count (every resolution).

Caching (what is compiled when): in this process each region is compiled on its first call per shape class
and kept by ``torch._dynamo`` for every later call, every pipeline and every model of the same structure;
across restarts inductor's on-disk caches (FX graph cache and the generated kernels, in
``torch._inductor``'s cache dir, default ``/tmp/torchinductor_<user>``, set by ``TORCHINDUCTOR_CACHE_DIR``)
turn the next compile of the same graph into a cache load; tracing still runs (seconds).

A region that fails to compile (no C++ compiler / Triton, an op the compiler refuses, a layer type it cannot
trace) is run eagerly from then on with one warning: compiling is an optimisation, never a requirement.
"""
from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "decode", "all")   # decode: text decode steps (answer, thinking, drafting); all: + denoising


def resolve_compile(value) -> str:
    """``compile=`` of the API: False/None/"none", "decode", True/"all"."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "all"
    if value in COMPILE_MODES:
        return value
    from ..errors import InputError
    raise InputError(f"unknown compile mode {value!r}; choose one of {', '.join(COMPILE_MODES)} (or True/False)")


def mark_dynamic(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Ask the compiler for a kernel generic in ``dims`` (sizes 0/1 always get their own graph)."""
    for d in dims:
        if t.shape[d] > 1:
            torch._dynamo.maybe_mark_dynamic(t, d)
    return t


def _graph_count() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def inductor_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        return cache_dir()
    except Exception:  # noqa: BLE001 - an older/newer torch without this helper
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR")


class Region:
    """One compiled region: ``fn`` through ``torch.compile`` (``backend`` None: ``fn`` itself), its compile
    time recorded in the owner's stats, eager from the first failure on."""

    def __init__(self, owner: "RegionCompiler", name: str, fn):
        self.owner, self.name, self.fn = owner, name, fn
        self.compiled = None if owner.backend is None else torch.compile(fn, backend=owner.backend)

    def __call__(self, *args):
        if self.compiled is None or self.name in self.owner.failed:
            return self.fn(*args)
        before, t0 = _graph_count(), time.perf_counter()
        try:
            out = self.compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure: warn once, run eagerly from now on
            self.owner.failed[self.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log.warning("hyperbagel: torch.compile of %s failed (%s); running it eagerly", self.name,
                        self.owner.failed[self.name])
            return self.fn(*args)
        new = _graph_count() - before
        if new:
            self.owner.record(self.name, new, time.perf_counter() - t0)
        return out


class RegionCompiler:
    """The compiled regions of one process-wide backend, and what compiling them cost.

    ``backend``: "inductor" (fused Triton kernels on CUDA, C++ on CPU), any other ``torch.compile`` backend
    (tests and smoke runs may use "aot_eager"), or None for the plain functions (the eager reference).
    """

    def __init__(self, backend: str | None = "inductor"):
        self.backend = backend
        self.regions: dict = {}
        self.failed: dict[str, str] = {}
        self.compile_s: dict[str, float] = {}
        self.graphs: dict[str, int] = {}

    def region(self, name: str, fn) -> Region:
        if name not in self.regions:
            self.regions[name] = Region(self, name, fn)
        return self.regions[name]

    def record(self, name: str, graphs: int, seconds: float) -> None:
        self.graphs[name] = self.graphs.get(name, 0) + graphs
        self.compile_s[name] = self.compile_s.get(name, 0.0) + seconds
        log.info("hyperbagel: compiled %s (%d graph%s) in %.1f s", name, graphs, "s" * (graphs > 1), seconds)

    def stats(self) -> dict:
        """Compile seconds and graphs per region so far (first calls per shape class), failures, cache dir."""
        return dict(backend=self.backend, compile_s=round(sum(self.compile_s.values()), 3),
                    graphs=sum(self.graphs.values()),
                    regions={k: dict(graphs=self.graphs[k], seconds=round(self.compile_s[k], 3)) for k in self.graphs},
                    failed=dict(self.failed), cache_dir=inductor_cache_dir() if self.backend == "inductor" else None)


_shared: dict = {}


def shared_compiler(backend: str | None = "inductor") -> RegionCompiler:
    """One compiler per backend for the process: regions compiled for one pipeline serve every other one."""
    if backend not in _shared:
        _shared[backend] = RegionCompiler(backend)
    return _shared[backend]
