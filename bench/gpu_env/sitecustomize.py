"""The lent GPU machine's Python packages, simulated on this one: with this folder on ``PYTHONPATH`` every
process (and every child that inherits the variable) refuses to import a top-level module that the GPU
machine would not have.

Refused: a module found in this interpreter's site-packages whose distribution is not named in
``packages.txt`` beside this file (the GPU image's list): it is absent, as on the GPU machine (an import raises
``ModuleNotFoundError``, ``importlib.util.find_spec`` returns None), and ``GPU_ENV_LOG=file`` gets a line naming
the module, its distribution and the process. Everything outside site-packages is allowed: the standard
library, the repository, and the folders on ``PYTHONPATH`` (where the GPU run installs the carried wheels, the
official code, and the stand-ins of the GPU image's versions that ``bench/gpu_prepare.sh --check`` puts
there where this machine's differ in what they import). Other versions are not simulated (this machine's
torch stands in for the GPU's).

    PYTHONPATH=bench/gpu_env:/tmp/site python3 -c "import hyperbagel_core.pipeline"
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import re
import site
import sys
import sysconfig
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class GpuMachineGuard:
    """The meta-path finder in front of the normal ones: it decides once per top-level name and answers a
    refused name as a missing one (``None``), so probes such as ``importlib.util.find_spec`` see it absent."""

    def __init__(self, allowed: set[str], site_dirs: list[str], finders: list):
        self.allowed, self.finders = allowed, finders
        self.site_dirs = sorted({os.path.realpath(d) + os.sep for d in site_dirs if d})
        self.decided: dict[str, str | None] = {}      # name -> None (allowed) or the refusal message
        self._dists = None

    def _distributions(self, name: str) -> list[str]:
        if self._dists is None:
            self._dists = importlib.metadata.packages_distributions()
        return self._dists.get(name, [])

    def _decide(self, name: str, path) -> str | None:
        if name in sys.builtin_module_names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None                                  # not installed here either: the normal error
        where = spec.origin if spec.origin not in (None, "namespace") else next(
            iter(spec.submodule_search_locations or []), "")
        where = os.path.realpath(where or "")
        if not any(where.startswith(d) for d in self.site_dirs):
            return None
        dists = self._distributions(name)
        if any(_norm(d) in self.allowed for d in dists):
            return None
        owner = ", ".join(sorted(set(dists))) or "an unknown distribution"
        return (f"No module named {name!r} on the GPU machine (simulated by bench/gpu_env: it comes from {owner}, "
                f"which is not in the GPU image's package list; carry a wheel in .gpu/ or avoid the import)")

    def find_spec(self, fullname, path=None, target=None):
        if "." not in fullname:
            if fullname not in self.decided:
                self.decided[fullname] = self._decide(fullname, path)
                log = os.environ.get("GPU_ENV_LOG")
                if self.decided[fullname] and log:
                    with open(log, "a") as f:
                        f.write(f"{os.getpid()} {' '.join(sys.argv)[:200]}: {self.decided[fullname]}\n")
            if self.decided[fullname]:
                return None
        for finder in self.finders:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None

    def find_distributions(self, *args, **kwargs):     # importlib.metadata asks the meta-path finders
        for finder in self.finders:
            if hasattr(finder, "find_distributions"):
                yield from finder.find_distributions(*args, **kwargs)

    def invalidate_caches(self):
        for finder in self.finders:
            if hasattr(finder, "invalidate_caches"):
                finder.invalidate_caches()


def install() -> GpuMachineGuard:
    lines = (Path(__file__).with_name("packages.txt")).read_text().splitlines()
    allowed = {_norm(s.split("==")[0]) for s in (ln.strip() for ln in lines) if s and not s.startswith("#")}
    site_dirs = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")] + site.getsitepackages()
    guard = GpuMachineGuard(allowed, site_dirs + [site.getusersitepackages()], list(sys.meta_path))
    sys.meta_path[:] = [guard]
    return guard


install()
