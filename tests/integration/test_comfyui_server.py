"""End to end against a real ComfyUI server (``main.py --cpu`` as a subprocess), with a tiny checkpoint.

Runs when ``COMFYUI_DIR`` points at a ComfyUI checkout (``COMFYUI_PYTHON`` = the interpreter of its venv,
default: this one); skipped otherwise. Needs ``websocket-client`` and ``requests`` in this interpreter.

    COMFYUI_DIR=/path/ComfyUI COMFYUI_PYTHON=/path/venv/bin/python \
        /path/venv/bin/python -m pytest tests/integration -v

What it checks: the pack imports (no "IMPORT FAILED"), ``/object_info`` lists our nodes with the schemas the
workflow contract expects, every shipped workflow (UI format converted to API format with the live
``/object_info``) runs through ``POST /prompt`` and produces its outputs, and ``POST /interrupt`` stops a
denoising loop and a decoding loop within one step/round, after which the next run reuses the loaded model.
The server and its fixtures live in ``comfy_server.py`` / ``conftest.py``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

import comfy_server
from comfy_server import COMFYUI_DIR, OUR_NODES, OVERRIDES, wc

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")


def test_pack_imports_cleanly(server):
    log = server.read_log()
    failed = [ln for ln in log.splitlines() if "IMPORT FAILED" in ln and "hyperbagel" in ln]
    assert not failed, log[-3000:]
    assert "hyperbagel" in log  # listed in the import-time table


def test_object_info_lists_our_nodes_as_the_contract_expects(object_info):
    import importlib

    assert OUR_NODES <= set(object_info)
    for n in OUR_NODES:
        info = object_info[n]
        assert info["category"].startswith("BAGEL/") and info["display_name"]
        assert info["python_module"] == "custom_nodes.hyperbagel"  # the frontend finds web/docs/<id>.md by it
    assert object_info["HyperBagelModelLoader"]["input"]["required"]["checkpoint"][1]["options"] == ["tiny", "tiny-slow"]
    # the stub-built specs (used by the offline contract test) agree with the live server
    import comfy_stub
    comfy_stub.install()
    try:
        for name in [m for m in sys.modules if m == "nodes" or m.startswith("nodes.")]:
            sys.modules.pop(name)
        ext = importlib.import_module("nodes.extension")
        stub = wc.stub_object_info(ext.NODES)
    finally:
        comfy_stub.uninstall()
    for n in OUR_NODES:
        live = [(i.name, i.type, i.widget, i.optional, i.extras) for i in wc.node_inputs(object_info[n])]
        offline = [(i.name, i.type, i.widget, i.optional, i.extras) for i in wc.node_inputs(stub[n])]
        assert live == offline, n
        assert object_info[n]["output"] == stub[n]["output"]
    for n, spec in wc.core_object_info().items():
        live = [(i.name, i.type, i.widget, i.extras) for i in wc.node_inputs(object_info[n])]
        assert live == [(i.name, i.type, i.widget, i.extras) for i in wc.node_inputs(spec)], n
        assert object_info[n]["output"] == spec["output"]


def test_workflow_templates_are_discovered(server):
    templates = server.get("/workflow_templates")
    shipped = {os.path.splitext(f)[0] for f in wc.load_workflows()}
    assert shipped <= set(templates.get("hyperbagel", []))


def test_web_extension_and_help_pages_are_served(server):
    assert any("hyperbagel/js/hyperbagel.js" in e for e in server.get("/extensions"))
    r = server.requests.get(server.url + "/extensions/hyperbagel/docs/HyperBagelSpeculativeVQA.md", timeout=10)
    assert r.ok and r.text.startswith("# BAGEL Speculative VQA")


def _api(name: str, object_info: dict, apply: dict | None = None, **extra) -> dict:
    """A shipped workflow in API format with the test overrides; ``apply`` = {apply node type: file} un-bypasses
    those apply nodes with that file (the documented switch)."""
    wf = wc.load_workflows()[name]
    assert wc.check_workflow(wf, object_info) == []
    for n in wf["nodes"]:
        if n["type"] in (apply or {}):
            n["mode"], n["widgets_values"][0] = 0, apply[n["type"]]
    prompt = wc.ui_to_api(wf, object_info)
    for node in prompt.values():
        for k, v in {**OVERRIDES.get(node["class_type"], {}), **extra.get(node["class_type"], {})}.items():
            if not isinstance(node["inputs"].get(k), list):  # never override a link
                node["inputs"][k] = v
    return prompt


def _errors(msgs):
    return [m["data"] for m in msgs if m["type"] == "execution_error"]


def _saved(server, hist, nid):
    import numpy as np
    from PIL import Image

    images = hist["outputs"][nid]["images"]
    assert images, hist["outputs"]
    paths = [os.path.join(server.base, "output", im["subfolder"], im["filename"]) for im in images]
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in paths]


@pytest.mark.parametrize("name", sorted(wc.load_workflows()))
def test_every_shipped_workflow_runs(name, server, object_info):
    """As shipped (apply nodes bypassed, default schedules), with nothing but checkpoint folders present."""
    files = comfy_server.model_files(server.base)
    others = [f for f in files if not f.startswith(("models/bagel/tiny/", "models/bagel/tiny-slow/"))]
    assert not others, f"model files other than the checkpoint folders exist already (test order?): {others}"
    prompt = _api(name, object_info)
    msgs, hist = server.run(prompt, timeout=150)
    errors = _errors(msgs)
    assert not errors, errors[0].get("exception_message") + "".join(errors[0].get("traceback", []))
    assert hist.get("status", {}).get("status_str") == "success", hist.get("status")
    outputs = hist["outputs"]
    for nid, node in prompt.items():
        if node["class_type"] == "SaveImage":
            for im in outputs[nid]["images"]:
                path = os.path.join(server.base, "output", im["subfolder"], im["filename"])
                assert os.path.getsize(path) > 0
        if node["class_type"] == "HyperBagelSpeculativeVQA":
            ui = outputs[nid]
            assert isinstance(ui["text"][0], str) and ui["bagel_stats"][0]["kind"] == "vqa"
        if node["class_type"] in ("HyperBagelFewStepSampler", "HyperBagelCFGFreeEditor"):
            stats = outputs[nid]["bagel_stats"][0]
            assert stats["summary"] and "warning" not in stats, stats  # a default that suits stock BAGEL
    if name == "hyperbagel_decode_latent_core_vae.json":
        # core VAE Decode of our LATENT with the checkpoint's ae == our own decode, up to kernel rounding
        save = {v["inputs"]["filename_prefix"]: k for k, v in prompt.items() if v["class_type"] == "SaveImage"}
        core = _saved(server, hist, save["hyperbagel/core_vae_decode"])[0]
        ours = _saved(server, hist, save["hyperbagel/bagel_decode"])[0]
        assert core.shape == ours.shape
        print(f"core VAEDecode vs BAGEL decode: max |diff| {np.abs(core - ours).max():.0f}, "
              f"mean {np.abs(core - ours).mean():.3f} (uint8 levels)")
        assert np.abs(core - ours).mean() < 1.0 and np.abs(core - ours).max() <= 4


def test_apply_nodes_add_weights_without_reloading(server, object_info):
    """One loader feeds a stock branch and an expert branch; the expert is applied without running the loader
    again (the loader's output is cached from the previous run), and each branch gets its own model."""
    files = comfy_server.attachments(server)
    base = _api("hyperbagel_text_to_image.json", object_info)
    msgs, _ = server.run(base)
    assert not _errors(msgs)
    loads = server.read_log().count("hyperbagel: loaded ")
    prompt = _api("hyperbagel_text_to_image.json", object_info,
                  apply={"HyperBagelApplyDistilledExpert": files["distilled_expert"]})
    loader = next(k for k, v in prompt.items() if v["class_type"] == "HyperBagelModelLoader")
    expert_branch = next(k for k, v in prompt.items() if v["class_type"] == "HyperBagelFewStepSampler")
    stock_branch = "900"
    prompt[stock_branch] = json.loads(json.dumps(prompt[expert_branch]))
    prompt[stock_branch]["inputs"]["model"] = [loader, 0]
    msgs, hist = server.run(prompt)
    assert not _errors(msgs), _errors(msgs)[0]["exception_message"]
    assert server.read_log().count("hyperbagel: loaded ") == loads  # from_pretrained did not run again
    cached, executed = _loader_reused(msgs)
    assert loader in cached and loader not in executed
    with_expert = hist["outputs"][expert_branch]["bagel_stats"][0]
    stock = hist["outputs"][stock_branch]["bagel_stats"][0]
    assert with_expert["cfg"] == "folded (distilled)" and "expert's grid" in with_expert["schedule"]
    assert stock["cfg"] == "2 branches batched" and "training-free" in stock["schedule"]


def test_subfolders_of_an_extra_bagel_path_are_listed(server):
    comfy_server.attachments(server)
    info = server.get("/object_info/HyperBagelApplyDistilledExpert")["HyperBagelApplyDistilledExpert"]
    assert comfy_server.DISTILLED_FILE in info["input"]["required"]["distilled_expert"][1]["options"]
    info = server.get("/object_info/HyperBagelApplyDraftHead")["HyperBagelApplyDraftHead"]
    assert comfy_server.DRAFT_FILE in info["input"]["required"]["draft_head"][1]["options"]


class Interrupted:
    """What a run interrupted mid-loop looked like from the client."""

    def __init__(self):
        self.values, self.times, self.msgs = [], [], []
        self.at = self.t_at = self.t_flag = None

    def allowed_last(self) -> int:
        """The largest progress value compatible with 'stopped within one step/round of the flag'.

        The server checks the interrupt flag before every progress report, so nothing is reported after the
        flag is set; reports already produced before it can still arrive after POST /interrupt returned. Those
        are bounded by the loop's own rate over the time between receiving ``at`` and the flag being set.
        """
        before = [(t, v) for t, v in zip(self.times, self.values) if t <= self.t_at]
        rate = 0.0
        if len(before) >= 2 and before[-1][0] > before[0][0]:
            rate = (before[-1][1] - before[0][1]) / (before[-1][0] - before[0][0])
        in_flight = int(rate * (self.t_flag - self.t_at)) + 1
        return self.at + in_flight + 1

    @property
    def last(self) -> int:
        return max(self.values)


def _interrupt_when(server, prompt, node_type, after_value, timeout=150) -> Interrupted:
    """Queue ``prompt`` and POST /interrupt once ``node_type`` reports progress >= after_value."""
    node_id = next(k for k, v in prompt.items() if v["class_type"] == node_type)
    pid = server.queue(prompt)
    run = Interrupted()
    for msg in server.events(pid, timeout):
        run.msgs.append(msg)
        d = msg.get("data", {})
        if msg["type"] == "progress" and d.get("node") == node_id:
            run.values.append(d["value"])
            run.times.append(time.perf_counter())
            if run.at is None and d["value"] >= after_value:
                run.at, run.t_at = d["value"], run.times[-1]
                server.interrupt()
                run.t_flag = time.perf_counter()
    assert run.at is not None, f"no progress seen from {node_type}: {[m['type'] for m in run.msgs]}"
    assert run.msgs[-1]["type"] == "execution_interrupted", run.msgs[-1]
    return run


def _loader_reused(msgs):
    cached = [n for m in msgs if m["type"] == "execution_cached" for n in m["data"].get("nodes", [])]
    executed = [m["data"].get("node") for m in msgs if m["type"] == "executing"]
    return cached, executed


def test_interrupt_mid_denoise_then_next_run_reuses_model(server, object_info):
    name = "hyperbagel_chain_vqa_to_image.json"
    slow = _api(name, object_info, HyperBagelFewStepSampler={"schedule": "teacher-50", "width": 128, "height": 128},
                HyperBagelSpeculativeVQA={"max_new_tokens": 4, "drafter": "none"})
    run = _interrupt_when(server, slow, "HyperBagelFewStepSampler", 3)
    print(f"denoise interrupt: progress {run.at} when POST /interrupt was sent, last progress {run.last} of 49 "
          f"(bound {run.allowed_last()})")
    assert run.last <= run.allowed_last() and run.last < 49, (run.values, run.at)
    fast = _api(name, object_info, HyperBagelFewStepSampler={"schedule": "teacher-50", "seed": 1},
                HyperBagelSpeculativeVQA={"max_new_tokens": 4, "drafter": "none"})
    msgs, hist = server.run(fast)
    assert not _errors(msgs) and hist["status"]["status_str"] == "success"
    cached, executed = _loader_reused(msgs)
    loader = next(k for k, v in fast.items() if v["class_type"] == "HyperBagelModelLoader")
    assert loader in cached and loader not in executed


def test_interrupt_mid_decode_then_next_run_reuses_model(server, object_info):
    name = "hyperbagel_speculative_vqa.json"
    slow = _api(name, object_info, HyperBagelModelLoader={"checkpoint": "tiny-slow"},
                HyperBagelSpeculativeVQA={"max_new_tokens": 4000, "drafter": "none",
                                          "question": "Tell me a very long story."})
    run = _interrupt_when(server, slow, "HyperBagelSpeculativeVQA", 5)
    print(f"decode interrupt: progress {run.at} when POST /interrupt was sent, last progress {run.last} of 4000 "
          f"(bound {run.allowed_last()})")
    assert run.last <= run.allowed_last() and run.last < 4000, (run.values, run.at)
    fast = _api(name, object_info, HyperBagelModelLoader={"checkpoint": "tiny-slow"},
                HyperBagelSpeculativeVQA={"max_new_tokens": 8, "drafter": "none"})
    msgs, hist = server.run(fast)
    assert not _errors(msgs) and hist["status"]["status_str"] == "success"
    cached, executed = _loader_reused(msgs)
    loader = next(k for k, v in fast.items() if v["class_type"] == "HyperBagelModelLoader")
    assert loader in cached and loader not in executed


def test_bad_input_is_a_readable_error_not_a_black_image(server, object_info):
    prompt = _api("hyperbagel_chain_vqa_to_image.json", object_info,
                  HyperBagelFewStepSampler={"schedule": "custom", "custom_timesteps": "0.2, 0.9"},
                  HyperBagelSpeculativeVQA={"max_new_tokens": 4, "drafter": "none"})
    msgs, hist = server.run(prompt)
    errors = _errors(msgs)
    assert errors and "strictly decreasing" in errors[0]["exception_message"]
    assert hist["status"]["status_str"] == "error"


def test_speculative_answers_equal_plain_greedy_through_comfyui(server, object_info):
    """Greedy speculative decoding is lossless end to end: same answer text for every drafter.

    In fp32, not the loader's ``auto``: on a CPU ``auto`` computes in bf16, whose logits (spacing 1/64 at
    |logit| ~2.5) put this tiny checkpoint's plain answer at margins of one bf16 ulp (steps 15, 16, 33) and an
    exact tie (step 39), while a verification row differs from a single step by up to one ulp: prompt_lookup
    flips step 33 (357 -> 185) there, a near-tie as the README allows, not a lossless bug. bf16 verification
    is checked up to rounding in tests/test_speculative_bf16.py.
    """
    head = comfy_server.attachments(server)["draft_head"]
    answers, stats = {}, {}
    for d in ["none", "prompt_lookup", "draft_head"]:
        prompt = _api("hyperbagel_speculative_vqa.json", object_info,
                      apply={"HyperBagelApplyDraftHead": head} if d == "draft_head" else None,
                      HyperBagelModelLoader={"memory": "offload_after_run", "dtype": "fp32"},
                      HyperBagelSpeculativeVQA={"drafter": d, "max_new_tokens": 40, "k": 4})
        msgs, hist = server.run(prompt)
        assert not _errors(msgs), _errors(msgs)[0]["exception_message"]
        vqa = next(k for k, v in prompt.items() if v["class_type"] == "HyperBagelSpeculativeVQA")
        answers[d] = hist["outputs"][vqa]["text"][0]
        stats[d] = hist["outputs"][vqa]["bagel_stats"][0]
    print("speculative stats through ComfyUI:", json.dumps(stats))
    # exact text although fp32 verification batches round differently from single-token steps: the smallest
    # top-1/top-2 margin of this greedy answer (tiny checkpoint, 40 tokens) is 2.6e-3, a verification row's
    # logits differ from the single step's by at most 4.1e-6 (measured outside the server, same ops)
    assert len(set(answers.values())) == 1, answers
    assert stats["prompt_lookup"]["accepted"] > 0    # multi-token verification rows decided part of the answer


def test_comfyui_can_unload_the_model_and_reload_it(server, object_info):
    """POST /free unloads every model (ComfyUI's model manager owns ours); the next run loads it again."""
    def vqa(tokens):
        return _api("hyperbagel_speculative_vqa.json", object_info,
                    HyperBagelSpeculativeVQA={"drafter": "none", "max_new_tokens": tokens})
    msgs, hist = server.run(vqa(6))
    assert hist["status"]["status_str"] == "success"
    loads = server.read_log().count("Requested to load BagelPart")
    r = server.requests.post(server.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=10)
    assert r.ok
    time.sleep(2.5)  # the prompt worker applies /free between prompts (it polls its queue every second)
    msgs, hist = server.run(vqa(7))
    assert not _errors(msgs) and hist["status"]["status_str"] == "success"
    # loaded again: the two parts an answer runs (understanding expert, ViT), one log line each
    assert server.read_log().count("Requested to load BagelPart") == loads + 2


def _flux_latent2rgb(latent_path: str):
    """What ComfyUI's latent-to-RGB previewer draws for the LATENT saved at ``latent_path`` (raw FLUX-AE values, as
    our node outputs it): its FLUX format's ``process_in``, the format's RGB factors, ComfyUI's 0..255 mapping."""
    import importlib.util

    import torch
    from PIL import Image
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("comfyui_latent_formats",
                                                  os.path.join(COMFYUI_DIR, "comfy", "latent_formats.py"))
    formats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(formats)
    flux = formats.Flux()
    x0 = flux.process_in(load_file(latent_path)["latent_tensor"].float())[0]
    rgb = torch.nn.functional.linear(x0.movedim(0, -1), torch.tensor(flux.latent_rgb_factors).T,
                                     torch.tensor(flux.latent_rgb_factors_bias))
    return Image.fromarray(((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy())


def _preview_run(srv, prompt, sampler):
    """Run ``prompt``; the sampler's progress values and the preview frames, in the order they arrived."""
    from io import BytesIO

    from PIL import Image

    msgs, hist = srv.run(prompt)
    assert not _errors(msgs), _errors(msgs)[0]["exception_message"]
    seq = []
    for m in msgs:
        if m["type"] == "progress" and m["data"].get("node") == sampler:
            seq.append(m["data"]["value"])
        elif m["type"] == "binary":
            assert m["event"] == 1 and m["payload"][:4] == b"\x00\x00\x00\x01", m["event"]  # PREVIEW_IMAGE, JPEG
            seq.append(Image.open(BytesIO(m["payload"][4:])).convert("RGB"))
    assert msgs[-1]["type"] == "execution_success" or hist["status"]["status_str"] == "success"
    return seq, hist


def test_sampler_sends_a_preview_every_step_and_none_when_previews_are_off(server, preview_server, object_info):
    """Previews off (ComfyUI's default, the first server): progress only. On (``--preview-method taesd``, the
    second server): one JPEG preview after each step's progress, during the run. With no TAEF1 decoder ComfyUI
    falls back to FLUX's latent-to-RGB factors: with Euler the last step's x0 estimate is the result, so the last
    preview is the factors applied to the saved LATENT (raw FLUX values) in FLUX's model space, which checks that
    BAGEL's normalisation is FLUX's. With a TAEF1 decoder in models/vae_approx, TAEF1 draws the previews."""
    prompt = _api("hyperbagel_text_to_image.json", object_info, HyperBagelFewStepSampler={
        "schedule": "training-free", "solver": "euler", "steps": 3, "width": 64, "height": 48})
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "HyperBagelFewStepSampler")
    prompt["901"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 1], "filename_prefix": "preview"}}
    seq, _ = _preview_run(server, prompt, sampler)
    assert seq == [1, 2, 3]  # no frames
    seq, hist = _preview_run(preview_server, prompt, sampler)
    assert _shape(seq) == [1, "frame", 2, "frame", 3, "frame"]
    last, first = _mean_diff(seq[-1], preview_server, hist), _mean_diff(seq[1], preview_server, hist)
    print(f"latent-to-RGB previews vs the saved LATENT's: last {last:.2f}, first {first:.2f} levels (mean |diff|); "
          f"size {seq[-1].size}")
    assert seq[-1].size == (512, 384) and last < 2.0 and last < first / 2
    # a TAEF1 decoder (random weights, ComfyUI's own TAESD decoder layout) in models/vae_approx: TAEF1 draws them
    taef1 = os.path.join(preview_server.base, "models", "vae_approx", "taef1_decoder.safetensors")
    _write_random_taesd_decoder(taef1)
    try:
        missing = preview_server.read_log().count("could not find models/vae_approx/taef1_decoder")
        prompt[sampler]["inputs"]["seed"] += 1  # a new run, not ComfyUI's cached outputs
        seq, hist = _preview_run(preview_server, prompt, sampler)
        assert _shape(seq) == [1, "frame", 2, "frame", 3, "frame"]
        assert preview_server.read_log().count("could not find models/vae_approx/taef1_decoder") == missing
        taef1 = _mean_diff(seq[-1], preview_server, hist)
        print(f"TAEF1 (random) last preview vs the latent-to-RGB one: {taef1:.2f} levels")
        assert taef1 > 10 * last
    finally:
        os.remove(os.path.join(preview_server.base, "models", "vae_approx", "taef1_decoder.safetensors"))


def _shape(seq):
    return [x if isinstance(x, int) else "frame" for x in seq]


def _mean_diff(frame, srv, hist) -> float:
    """Mean |difference| in levels between a preview frame and the latent-to-RGB preview of the saved LATENT."""
    import numpy as np
    from PIL import Image, ImageOps

    saved = hist["outputs"]["901"]["latents"][0]
    path = os.path.join(srv.base, "output", saved["subfolder"], saved["filename"])
    # the server sizes previews to fit --preview-size (512) with PIL's bilinear filter
    expected = ImageOps.contain(_flux_latent2rgb(path), frame.size, Image.Resampling.BILINEAR)
    return float(np.abs(np.asarray(frame, np.float32) - np.asarray(expected, np.float32)).mean())


def _write_random_taesd_decoder(path: str) -> None:
    """A TAESD decoder for 16 latent channels built by ComfyUI's own class (random weights), saved at ``path``."""
    import subprocess

    code = ("import sys, torch; comfy_dir, path = sys.argv[1:]; sys.path.insert(0, comfy_dir); "
            "sys.argv[1:] = ['--cpu']; import comfy.options; comfy.options.enable_args_parsing(); "
            "from comfy.taesd.taesd import Decoder; from safetensors.torch import save_file; torch.manual_seed(0); "
            "save_file({k: v.contiguous() for k, v in Decoder(16).state_dict().items()}, path)")
    out = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", code, COMFYUI_DIR, path],
                         capture_output=True, text=True, timeout=120, cwd=COMFYUI_DIR)
    assert out.returncode == 0, out.stderr[-2000:]
