"""Do the wheels carried to the GPU machine install and import there? Their requirements checked against the GPU
image's package list (``bench/gpu_env/packages.txt``, versions where known) and the other wheels of the same
Python path, for Python 3.12 on Linux x86-64 (markers evaluated there).

Groups are the Python paths of ``bench/gpu_check.sh``: ``ours`` (our steps; also seen by the ComfyUI server),
``official`` (the official harness: its wheels shadow the image's transformers / huggingface_hub / tokenizers),
``comfy`` (the budget runs' server: ours + comfy). A requirement is met by a wheel of the group (or of ``ours``
for ``comfy``), else by the image when it lists the package and its known version (if any) satisfies the
specifier. ``NOT_IMPORTED`` lists requirements a package declares but never imports on Python 3.12 (read in its
source); they are reported, not required.

    python3 bench/gpu_wheels.py .gpu/whl        # prints one line per requirement; exit 1 if one is unmet
"""
from __future__ import annotations

import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

PACKAGES = Path(__file__).resolve().parent / "gpu_env" / "packages.txt"
MARKER_ENV = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux", platform_system="Linux",
                  platform_machine="x86_64", os_name="posix", implementation_name="cpython",
                  platform_python_implementation="CPython", extra="")
# diffusers 0.42.1 imports importlib_metadata only on Python < 3.8 (diffusers/utils/import_utils.py); on 3.12 it
# uses the standard library's importlib.metadata
NOT_IMPORTED = {("diffusers", "importlib-metadata")}
SEES = {"ours": ["ours"], "official": ["official"], "comfy": ["comfy", "ours"]}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = PACKAGES) -> dict[str, str | None]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            out[norm(name)] = ver or None
    return out


def wheel_meta(whl: Path) -> tuple[str, str, list[str]]:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    return norm(msg["Name"]), msg["Version"], msg.get_all("Requires-Dist") or []


def check(whl_root: Path) -> list[tuple[str, str, str, bool]]:
    """(group, wheel, requirement, met) for every requirement that applies on the GPU machine; plus one row per
    duplicate package in a group (two versions stop pip)."""
    image = image_packages()
    groups = {g.name: [wheel_meta(w) for w in sorted(g.glob("*.whl"))] for g in sorted(whl_root.iterdir())
              if g.is_dir()}
    rows = []
    for group, wheels in groups.items():
        names = [n for n, _, _ in wheels]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            rows.append((group, dup, "one version per group", False))
        carried = {n: v for g in SEES.get(group, [group]) for n, v, _ in groups.get(g, [])}
        for name, _version, reqs in wheels:
            for text in reqs:
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate(MARKER_ENV):
                    continue
                dep = norm(req.name)
                if (name, dep) in NOT_IMPORTED:
                    rows.append((group, name, f"{text} (declared, not imported on 3.12)", True))
                    continue
                if dep in carried:
                    ok, where = Version(carried[dep]) in req.specifier or not req.specifier, f"carried {carried[dep]}"
                elif dep in image:
                    ver = image[dep]
                    ok = ver is None or not req.specifier or Version(ver) in req.specifier
                    where = f"image {ver or '(version not known)'}"
                else:
                    ok, where = False, "missing on the GPU machine"
                rows.append((group, name, f"{text}: {where}", ok))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rows = check(Path(argv[0] if argv else ".gpu/whl"))
    for group, wheel, what, ok in rows:
        print(f"{'ok ' if ok else 'BAD'} {group:8s} {wheel:18s} {what}")
    bad = [r for r in rows if not r[3]]
    print(f"{len(rows) - len(bad)} requirements met, {len(bad)} not")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
