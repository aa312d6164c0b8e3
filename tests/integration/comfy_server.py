"""Helpers for the ComfyUI server tests: the server process, its temporary base folder and tiny checkpoints.

Run by test_comfyui_server.py and test_frontend.py through the session fixtures in conftest.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "nodes"))
sys.path.insert(0, REPO)

import workflow_contract as wc  # noqa: E402,F401 - re-exported for the tests

OUR_NODES = {"HyperBagelModelLoader", "HyperBagelApplyDraftHead", "HyperBagelApplyDistilledExpert",
             "HyperBagelVAELoader", "HyperBagelSpeculativeVQA", "HyperBagelFewStepSampler", "HyperBagelCFGFreeEditor"}
DISTILLED_FILE = "tiny-expert.safetensors"
DRAFT_FILE = "tiny-head.safetensors"
# the FLUX autoencoder's real architecture (core's VAE class assumes it), tiny everything else
FLUX_AE = dict(resolution=256, in_channels=3, downsample=8, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=2,
               z_channels=16, scale_factor=0.3611, shift_factor=0.1159)
# small sizes and short loops so the whole module stays within a few minutes on 2 CPU cores
OVERRIDES = {
    "HyperBagelModelLoader": {"checkpoint": "tiny"},
    "HyperBagelVAELoader": {"checkpoint": "tiny"},
    "HyperBagelFewStepSampler": {"width": 64, "height": 64, "steps": 3, "batch_size": 1},
    "HyperBagelSpeculativeVQA": {"max_new_tokens": 16},
    "HyperBagelCFGFreeEditor": {"steps": 3},
    "ImageScale": {"width": 96, "height": 96},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """ComfyUI ``main.py --cpu`` on a free port; ``wait=False`` returns once the process is started (call
    ``wait_ready`` before use), so that a second server can start while the first one runs tests."""

    def __init__(self, base: str, extra_paths: str | None = None, preview_method: str | None = None,
                 wait: bool = True):
        import requests

        self.requests = requests
        self.base, self.port = base, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, "server.log")
        self.client_id = str(uuid.uuid4())
        self.ws = None
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        cmd = [python, os.path.join(COMFYUI_DIR, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
               str(self.port), "--base-directory", base, "--disable-auto-launch"]
        if extra_paths:
            cmd += ["--extra-model-paths-config", extra_paths]
        if preview_method:  # ComfyUI's default is none: no previews
            cmd += ["--preview-method", preview_method]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "Server":
        if self.ws is not None:
            return self
        requests = self.requests
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.read_log()[-4000:]}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError(f"ComfyUI did not come up:\n{self.read_log()[-4000:]}")
        import websocket

        self.ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=5)
        return self

    def read_log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def get(self, path):
        r = self.requests.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def queue(self, prompt: dict) -> str:
        r = self.requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": self.client_id}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["prompt_id"]

    def events(self, prompt_id: str, timeout: float = 120):
        """Yield websocket messages of ``prompt_id`` until it finishes (success, error or interrupt).

        Binary frames (they carry no prompt id) come as ``{"type": "binary", "event": n, "payload": bytes}`` in
        the order received; event 1 is a preview image (4-byte image type, 1 = JPEG, then the image).
        """
        import struct

        import websocket

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if not isinstance(raw, str):
                yield {"type": "binary", "event": struct.unpack(">I", raw[:4])[0], "payload": raw[4:], "data": {}}
                continue
            msg = json.loads(raw)
            data = msg.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            yield msg
            if msg["type"] in ("execution_error", "execution_interrupted", "execution_success"):
                return
            if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.read_log()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 120) -> tuple[list, dict]:
        pid = self.queue(prompt)
        msgs = list(self.events(pid, timeout))
        return msgs, self.history(pid)

    def history(self, pid: str, timeout: float = 15) -> dict:
        """The history entry of a finished prompt (written just after its last websocket message)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{pid}").get(pid)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"no history for {pid}")

    def interrupt(self):
        self.requests.post(self.url + "/interrupt", json={}, timeout=10)

    def stop(self):
        try:
            if self.ws is not None:
                self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _flux_sized_ae(folder: str) -> None:
    """Replace a tiny checkpoint's autoencoder by a random one of the real FLUX ae's architecture, so that
    core's VAE class (which assumes it) can load ``ae.safetensors`` from the folder as it does for BAGEL."""
    import torch
    from safetensors.torch import save_file

    from hyperbagel_core.model.vae import FluxVAE

    torch.manual_seed(0)
    vae = FluxVAE.from_config(FLUX_AE)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name == "model.encoder.conv_out.bias":
                p[FLUX_AE["z_channels"]:] = -8.0   # a low log-variance, as a trained VAE's
    save_file({k: v.float().contiguous() for k, v in vae.official_state_dict().items()},
              os.path.join(folder, "ae.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "ae_config.json"), "w") as f:
        json.dump(FLUX_AE, f, indent=1)


def start(base: str, previews_base: str | None = None) -> "Server":
    """Build the base folder (tiny checkpoints and an input image, no other model file) and start ComfyUI on it.

    A second ``bagel`` folder comes from an extra_model_paths.yaml, as a user's would; the draft head and the
    distilled expert are written into its sub-folders only when a test asks for them (``attachments``), so that
    the shipped workflows first run with nothing but checkpoint folders present. With ``previews_base`` a second
    server with previews on starts beside it (``start_previews``; ``srv.previews``, not waited for).
    """
    import numpy as np
    from PIL import Image

    from hyperbagel_core.testing import make_tiny_checkpoint

    for d in ("custom_nodes", "input", "output", "models/bagel", "extra/bagel/draft_heads", "extra/bagel/distilled"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    os.symlink(REPO, os.path.join(base, "custom_nodes", "hyperbagel"))
    ckpt = make_tiny_checkpoint(os.path.join(base, "models", "bagel", "tiny"))
    _flux_sized_ae(str(ckpt))
    # wider/deeper (~15 ms per decoded token on 2 cores) so that "stopped within one round" is measurable
    make_tiny_checkpoint(os.path.join(base, "models", "bagel", "tiny-slow"), hidden=768, layers=8, heads=12,
                         kv_heads=4, intermediate=3072)
    extra = os.path.join(base, "extra_model_paths.yaml")
    with open(extra, "w") as f:
        f.write(f"hyperbagel_test:\n    base_path: {os.path.join(base, 'extra')}\n    bagel: bagel\n")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(os.path.join(base, "input", "example.png"))
    srv = Server(base, extra, wait=False)
    srv.checkpoint = str(ckpt)
    srv.previews = start_previews(previews_base, srv) if previews_base else None
    try:
        return srv.wait_ready()
    except Exception:
        if srv.previews is not None:
            srv.previews.stop()
        raise


def start_previews(base: str, models_from: "Server") -> "Server":
    """A second ComfyUI started with ``--preview-method taesd`` (previews on), reading the first server's
    checkpoints through an extra_model_paths.yaml; ``models/vae_approx`` starts empty, so ComfyUI falls back to
    the latent-to-RGB factors until a test writes a TAEF1 decoder there. Not waited for (``wait_ready``)."""
    for d in ("custom_nodes", "input", "output", "models/vae_approx"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    os.symlink(REPO, os.path.join(base, "custom_nodes", "hyperbagel"))
    extra = os.path.join(base, "extra_model_paths.yaml")
    with open(extra, "w") as f:
        f.write(f"hyperbagel_first_server:\n    base_path: {models_from.base}\n    bagel: models/bagel\n")
    srv = Server(base, extra, preview_method="taesd", wait=False)
    srv.checkpoint = models_from.checkpoint
    return srv


def model_files(base: str) -> list[str]:
    """Every file under the server's model folders (models/ and the extra bagel path), relative to base."""
    out = []
    for top in ("models", "extra"):
        for d, _, files in os.walk(os.path.join(base, top)):
            out += [os.path.relpath(os.path.join(d, f), base).replace(os.sep, "/") for f in files]
    return sorted(out)


def attachments(server: "Server") -> dict:
    """Write a draft head and a distilled expert for the tiny checkpoint into the extra bagel path (once)."""
    import torch

    from hyperbagel_core import BagelPipeline
    from hyperbagel_core.distill.expert import DistilledExpert
    from hyperbagel_core.speculative.draft_head import DraftHead
    from hyperbagel_core.speculative.draft_io import save_draft_head

    root = os.path.join(server.base, "extra", "bagel")
    head, expert = os.path.join(root, "draft_heads", DRAFT_FILE), os.path.join(root, "distilled", DISTILLED_FILE)
    if not (os.path.isfile(head) and os.path.isfile(expert)):
        pipe = BagelPipeline.from_pretrained(server.checkpoint, device="cpu", dtype=torch.float32)
        DistilledExpert.from_model(pipe.model).save(expert)
        save_draft_head(DraftHead.from_target(pipe.model), head, pipe.model)
    return {"draft_head": DRAFT_FILE, "distilled_expert": DISTILLED_FILE}


SINGLE_FILE = "tiny-single.safetensors"


def single_file(server: "Server") -> str:
    """The tiny checkpoint as one BAGEL file with comfyui_bagel metadata in the extra bagel path (no tokenizer
    beside it: the 'tiny' folder lends its own) and its FLUX-architecture ae.safetensors in models/vae, where
    core 'Load VAE' lists it (once); returns the file's name in the loader's list."""
    import shutil

    from hyperbagel_core.testing import make_single_file

    dst = os.path.join(server.base, "extra", "bagel", SINGLE_FILE)
    ae = os.path.join(server.base, "models", "vae", "ae.safetensors")
    if not (os.path.isfile(dst) and os.path.isfile(ae)):
        make_single_file(server.checkpoint, dst)
        os.makedirs(os.path.dirname(ae), exist_ok=True)
        shutil.copyfile(os.path.join(server.checkpoint, "ae.safetensors"), ae)
    return SINGLE_FILE


__all__ = ["COMFYUI_DIR", "DISTILLED_FILE", "DRAFT_FILE", "OUR_NODES", "OVERRIDES", "SINGLE_FILE", "Server",
           "attachments", "model_files", "single_file", "start", "start_previews", "wc"]


REPO = os.path.dirname(os.path.dirname(HERE))

# The start of a script run by ComfyUI's own python (``run_in_comfy``): ComfyUI on the CPU, the pack imported
# as ComfyUI imports it (a package, so the runtime finds its core next to it), a tiny checkpoint in the
# official format with a draft head and a distilled expert made for it (not the base weights, not a zero
# embedder). Defines ``torch``, ``comfy``, ``mm``, ``Image``, ``runtime``, ``core``, ``path``, ``plain``,
# ``head``, ``folder``, ``args`` (extra arguments) and the pack's modules used by the tests.
PRELUDE = textwrap.dedent("""
    import importlib.util
    import sys
    comfy_dir, repo, folder, *args = sys.argv[1:]
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import torch
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.model_patcher
    from PIL import Image

    spec = importlib.util.spec_from_file_location("hyperbagel_pack", repo + "/__init__.py",
                                                  submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["hyperbagel_pack"] = pack
    spec.loader.exec_module(pack)
    from hyperbagel_pack.nodes import runtime
    core = runtime.import_core()
    from hyperbagel_pack.hyperbagel_core import quant
    from hyperbagel_pack.hyperbagel_core.distill import DistilledExpert
    from hyperbagel_pack.hyperbagel_core.model.vae import FluxVAE
    from hyperbagel_pack.hyperbagel_core.speculative import DraftHead, save_draft_head
    from hyperbagel_pack.hyperbagel_core.testing import make_tiny_checkpoint

    torch.manual_seed(0)
    path = str(make_tiny_checkpoint(folder))
    plain = core.BagelPipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
    head = str(save_draft_head(DraftHead.from_target(plain.model, zero_init=False, seed=1), folder + "/head",
                               plain.model))
    expert = DistilledExpert.from_model(plain.model, schedule="hyper-6nfe", nfe=6)
    with torch.no_grad():
        for t in list(expert.tensors.values()) + list(expert.guidance.parameters()):
            t.add_(0.01 * torch.randn_like(t))
    expert.save(folder + "/expert.safetensors")
""")


def run_in_comfy(script: str, tmp_path, *args: str) -> str:
    """``PRELUDE + script`` in ComfyUI's python (``COMFYUI_PYTHON``); its stdout, after asserting it printed OK."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run([python, "-c", PRELUDE + textwrap.dedent(script), COMFYUI_DIR, REPO,
                          str(tmp_path / "tiny"), *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout
