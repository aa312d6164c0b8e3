"""bench/spec_decode.py runs end to end at small shapes on CPU (keeps the GPU bench from rotting)."""
import importlib.util
import json
from pathlib import Path

import pytest

from tests.speculative_helpers import one_thread

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
BENCH = Path(__file__).resolve().parents[1] / "bench" / "spec_decode.py"


def test_bench_cpu_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("spec_decode_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert abs(mod.alpha_for(3.77, 10) - 0.7452) < 1e-3 and mod.alpha_for(1, 4) == 0.0
    out = tmp_path / "r.json"
    assert mod.main(["--tiny", "--device", "cpu", "--tokens", "12", "--prompt-len", "8", "--repeats", "1",
                     "--k", "2", "--taus", "1,2", "--paths", "eager,static", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert {(r["mode"], r["path"]) for r in rec["rows"] if "k" not in r} == {("plain", "eager"), ("plain", "static")}
    spec_rows = [r for r in rec["rows"] if "k" in r]
    assert [r["path"] for r in spec_rows] == ["eager"] + ["static"] * 4     # the compiled path: test_gpu_check
    assert all(r["resyncs"] == 0 for r in spec_rows) and rec["meta"]["pipeline_path"] == "eager"
    assert "| mode |" in capsys.readouterr().out
