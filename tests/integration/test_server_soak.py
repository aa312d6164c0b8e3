"""Soak through a real ComfyUI server: queued prompts of the shipped workflows with interrupts and bad inputs
mixed in; the server's resident memory must stay flat and every good prompt must succeed. Also: ComfyUI's own
ModelPatcher counts a loaded distilled expert's bytes.

The workflows are read from workflows/*.json at run time (converted with the live /object_info, as
test_comfyui_server.py does), so their node ids are never hard-coded here. The suite runs a reduced soak
(``HYPERBAGEL_SERVER_SOAK`` prompts, default 8); the full one is

    COMFYUI_DIR=/work/comfyui COMFYUI_PYTHON=/work/comfyui-venv/bin/python HYPERBAGEL_SERVER_SOAK=50 \\
        /work/comfyui-venv/bin/python -m pytest -q -s tests/integration/test_server_soak.py

Skipped without COMFYUI_DIR.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

from comfy_server import COMFYUI_DIR, OVERRIDES, REPO, wc

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
PROMPTS = int(os.environ.get("HYPERBAGEL_SERVER_SOAK", "8"))
RSS_BOUND_MIB = 150     # growth of the server's RSS from after the warm-up round to the end


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _api(name: str, object_info: dict, overrides: dict) -> dict:
    prompt = wc.ui_to_api(wc.load_workflows()[name], object_info)
    for node in prompt.values():
        for k, v in {**OVERRIDES.get(node["class_type"], {}), **overrides.get(node["class_type"], {})}.items():
            if k in node["inputs"] and not isinstance(node["inputs"][k], list):   # never override a link
                node["inputs"][k] = v
    return prompt


def _has(prompt: dict, class_type: str) -> bool:
    return any(n["class_type"] == class_type for n in prompt.values())


# bad inputs that pass ComfyUI's own validation and must come back as our readable errors
BAD = [
    ("HyperBagelFewStepSampler", {"schedule": "custom", "custom_timesteps": "0.2, 0.9"}, "strictly decreasing"),
    ("HyperBagelFewStepSampler", {"width": 40}, "not a multiple of 16"),
    ("HyperBagelFewStepSampler", {"prompt": "   "}, "prompt is empty"),
    ("HyperBagelSpeculativeVQA", {"question": ""}, "question is empty"),
    ("HyperBagelCFGFreeEditor", {"instruction": ""}, "instruction is empty"),
]


def _plan(n: int, names: list[str], seed: int = 0) -> list[dict]:
    """Round 1 runs every workflow once (warm-up); then one bad input and one interrupt for sure, then random
    workflows, seeds, bad inputs (20 %) and interrupts (15 %)."""
    rng = random.Random(seed)
    out = [dict(name=name, kind="ok", seed=0) for name in names]
    while len(out) < n:
        kind = {len(names): "bad", len(names) + 1: "interrupt"}.get(len(out))
        if kind is None:
            u = rng.random()
            kind = "bad" if u < 0.2 else "interrupt" if u < 0.35 else "ok"
        out.append(dict(name=rng.choice(names), kind=kind, seed=rng.randrange(2 ** 31), bad=rng.randrange(len(BAD))))
    return out[:max(n, len(names))]


def _prompt_for(run: dict, object_info: dict):
    ov = {"HyperBagelFewStepSampler": {"seed": run["seed"]}, "HyperBagelCFGFreeEditor": {"seed": run["seed"]},
          "HyperBagelSpeculativeVQA": {"seed": run["seed"], "max_new_tokens": 8}}
    expect = None
    if run["kind"] == "bad":
        prompt = _api(run["name"], object_info, ov)
        usable = [b for b in BAD if _has(prompt, b[0])]
        if usable:
            cls, bad, expect = usable[run["bad"] % len(usable)]
            ov = {**ov, cls: {**ov.get(cls, {}), **bad}}
    if run["kind"] == "interrupt":   # long loops, so that the interrupt lands mid-run
        ov["HyperBagelFewStepSampler"] = {**ov["HyperBagelFewStepSampler"], "schedule": "teacher-50"}
        ov["HyperBagelSpeculativeVQA"] = {**ov["HyperBagelSpeculativeVQA"], "max_new_tokens": 2000,
                                          "drafter": "none"}
    return _api(run["name"], object_info, ov), expect


def _run(server, prompt: dict, interrupt: bool, timeout: float = 300) -> tuple[str, list]:
    pid = server.queue(prompt)
    msgs, sent = [], False
    for msg in server.events(pid, timeout):
        msgs.append(msg)
        if interrupt and not sent and msg["type"] == "progress" and msg["data"].get("value", 0) >= 1:
            server.interrupt()
            sent = True
    status = server.history(pid)["status"]["status_str"]
    if msgs and msgs[-1]["type"] == "execution_interrupted":
        status = "interrupted"
    return status, msgs


def test_server_soak_rss_flat_and_runs_ok(server, object_info):
    names = sorted(wc.load_workflows())
    runs = _plan(PROMPTS, names)
    pid = server.proc.pid
    rss, outcomes = [], []
    t0 = time.perf_counter()
    for i, run in enumerate(runs):
        prompt, expect = _prompt_for(run, object_info)
        status, msgs = _run(server, prompt, run["kind"] == "interrupt")
        errors = [m["data"] for m in msgs if m["type"] == "execution_error"]
        if expect is not None:
            assert status == "error" and expect in errors[0]["exception_message"], (run, status, errors[:1])
        elif run["kind"] == "interrupt":
            assert status in ("interrupted", "success"), (run, status, errors[:1])
        else:
            assert status == "success", (run, errors[0]["exception_message"] if errors else status)
        outcomes.append(status)
        rss.append(_rss_mib(pid))
    warm = rss[len(names) - 1]
    summary = dict(prompts=len(runs), outcomes={s: outcomes.count(s) for s in set(outcomes)},
                   rss_warm_mib=round(warm, 1), rss_peak_mib=round(max(rss[len(names) - 1:]), 1),
                   rss_final_mib=round(rss[-1], 1), seconds=round(time.perf_counter() - t0, 1))
    print("server soak:", json.dumps(summary))
    assert rss[-1] - warm <= RSS_BOUND_MIB, summary
    # the loaded model is still good after all of it
    status, _ = _run(server, _api(names[0], object_info, {}), False)
    assert status == "success"


PATCHER_SCRIPT = textwrap.dedent("""
    import sys
    comfy_dir, repo, folder = sys.argv[1:4]
    sys.path.insert(0, comfy_dir)
    sys.path.insert(0, repo)
    sys.argv = [sys.argv[0], "--cpu"]
    import torch
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_patcher
    import comfy.ops
    from hyperbagel_core import BagelPipeline
    from hyperbagel_core.distill import DistilledExpert
    from hyperbagel_core.testing import make_tiny_checkpoint

    cpu = torch.device("cpu")
    path = make_tiny_checkpoint(folder + "/tiny")
    ops = comfy.ops.pick_operations(torch.float32, torch.float32, load_device=cpu)
    pipe = BagelPipeline.from_pretrained(path, dtype=torch.float32, ops=ops)
    DistilledExpert.from_model(pipe.model).save(folder + "/expert.safetensors")
    before = comfy.model_patcher.ModelPatcher(pipe.modules, load_device=cpu, offload_device=cpu).model_size()
    pipe.load_distilled_expert(folder + "/expert.safetensors")
    patcher = comfy.model_patcher.ModelPatcher(pipe.modules, load_device=cpu, offload_device=cpu)
    after = patcher.model_size()
    assert after - before == pipe.distilled_expert.nbytes(), (before, after, pipe.distilled_expert.nbytes())
    # partial loading walks the replacement weights like the layers they stand in for
    listed = {n for _, n, _, _ in patcher._load_list()}
    stand_ins = {n for n, m in pipe.modules.named_modules()
                 if n.startswith("distilled_expert.weights.") and list(m.parameters(recurse=False))}
    assert stand_ins and stand_ins <= listed, sorted(stand_ins - listed)[:5]
    print("OK", before, after)
""")


def test_comfyui_model_patcher_counts_the_distilled_expert(tmp_path):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run([python, "-c", PATCHER_SCRIPT, COMFYUI_DIR, REPO, str(tmp_path)], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
