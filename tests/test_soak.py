"""The soak (bench/soak.py) in reduced form: mixed runs with injected bad arguments, interrupts, failed and
repeated expert loads in one process; RSS flat after warm-up and every successful output bitwise equal to a
fresh process's replay of the same inputs (the full 200-run soak's figures are in docs/RELIABILITY.md)."""
import importlib.util
import os
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reduced_soak_is_flat_and_reproducible(tiny_ckpt, tmp_path):
    soak = _soak_module()
    os.symlink(tiny_ckpt, tmp_path / "tiny")
    assets = soak.make_assets(tmp_path)
    rep = soak.soak(14, seed=1, assets=assets, warmup=5, edit_every=7, log=None)
    faults = {r["fault"] for r in rep["plan"]}
    assert {"error", "interrupt", "load_error"} <= faults and any(r["kind"] == "edit" for r in rep["plan"])
    assert any(o.startswith("error: ") for o in rep["outcomes"]) and "interrupted" in rep["outcomes"]
    assert "load_error: refused, expert kept" in rep["outcomes"]
    growth = rep["rss_final"] - rep["rss_warm"]
    assert growth <= 64 * 2 ** 20, f"RSS grew by {growth / 2 ** 20:.1f} MiB after warm-up"
    res = soak.compare(rep, replay_count=4, threads=torch.get_num_threads(), assets=assets)
    assert res["replayed"] == 4 and res["mismatches"] == 0, res
