"""Shared fixtures: the golden set beside the repo and tiny random checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("HYPERBAGEL_GOLDEN", ROOT.parent / "shared" / "golden"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "manifest.json").exists():
        pytest.skip(f"golden set not found at {GOLDEN} (set HYPERBAGEL_GOLDEN)")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from hyperbagel_core.testing import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-bagel", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_ckpt):
    from hyperbagel_core.pipeline import BagelPipeline
    return BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
