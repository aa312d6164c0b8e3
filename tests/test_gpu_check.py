"""bench/gpu_check.sh end to end at tiny shapes on CPU (TINY=1): issue 21's two steps run through the same
scripts and code paths as on the GPU (the compiled path with dynamo's "eager" backend; the smoke arguments
keep it to the fewest graphs), the merge writes one JSON and one markdown table; a missing step script is
reported, not fatal."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_gpu_check_tiny_smoke(tmp_path):
    env = dict(os.environ, TINY="1", OUT=str(tmp_path), ONLY="decode,denoise_pass", OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rec["meta"]["statuses"] == {"decode": "ok", "denoise_pass": "ok"}, r.stdout[-3000:]
    decode = rec["steps"]["decode"]["result"]
    assert {r["path"] for r in decode["rows"] if r["mode"] == "plain"} == {"compiled"}
    assert decode["meta"]["compile"]["graphs"] >= 3 and not decode["meta"]["compile"]["failed"]
    assert any(r["path"] == "compiled" and r["tau_target"] == 3.77 for r in decode["rows"] if "k" in r)
    passes = rec["steps"]["denoise_pass"]["result"]["rows"]
    assert [p["branches"] for p in passes] == [2, 3] and all("compiled" in p for p in passes)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| decode | speculative, oracle at tau 3.77" in md and "| denoise_pass | denoising pass 3" in md


def test_missing_step_is_reported(tmp_path):
    cmd = (f"GPU_CHECK_LIB=1 source {SCRIPT}; OUT={tmp_path}; "
           "step ghost 30 bench/no_such_step.py '' ''; python3 bench/gpu_check_merge.py " + str(tmp_path))
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rec["steps"]["ghost"]["status"] == "missing"
    assert "| ghost | missing |" in (tmp_path / "gpu_check.md").read_text()
