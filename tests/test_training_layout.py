"""Layering: training sits above the pipeline. No inference package imports ``hyperbagel_core.training``,
and ``speculative`` / ``distill`` do not import the pipeline (checked on the source's import statements)."""
from pathlib import Path

from tests.import_scan import import_statements

CORE = Path(__file__).resolve().parents[1] / "hyperbagel_core"


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    pkg = ".".join(path.relative_to(CORE.parent).with_suffix("").parts[:-1])
    out = set()
    for mod, names in import_statements(path, pkg):
        out.add(mod)
        out.update(f"{mod}.{n}" for n in names)
    return out


def _files(sub=None):
    root = CORE / sub if sub else CORE
    return [p for p in root.rglob("*.py") if "training" not in p.relative_to(CORE).parts]


def test_inference_packages_never_import_training():
    bad = [str(p.relative_to(CORE)) for p in _files()
           if any(m == "hyperbagel_core.training" or m.startswith("hyperbagel_core.training.") for m in _imports(p))]
    assert not bad, f"inference modules importing the training package: {bad}"


def test_speculative_and_distill_do_not_import_the_pipeline():
    bad = [str(p.relative_to(CORE)) for sub in ("speculative", "distill") for p in _files(sub)
           if any(m == "hyperbagel_core.pipeline" or m.startswith("hyperbagel_core.pipeline.") for m in _imports(p))]
    assert not bad, f"packages the pipeline imports must not import it back: {bad}"
    assert not (CORE / "speculative" / "train.py").exists() and not (CORE / "distill" / "train.py").exists()


def test_the_check_sees_relative_imports(tmp_path):
    assert "hyperbagel_core.training.loop" in _imports(CORE / "training" / "tscd.py")
    assert "hyperbagel_core.pipeline.BagelPipeline" in _imports(CORE / "training" / "cli.py") or \
        "hyperbagel_core.pipeline" in _imports(CORE / "training" / "cli.py")
