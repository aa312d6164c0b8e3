"""Helpers for the ComfyUI server tests: the server process, its temporary base folder and tiny checkpoints.

Run by test_comfyui_server.py and test_frontend.py through the session fixtures in conftest.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "nodes"))
sys.path.insert(0, REPO)

import workflow_contract as wc  # noqa: E402,F401 - re-exported for the tests

OUR_NODES = {"HyperBagelModelLoader", "HyperBagelSpeculativeVQA", "HyperBagelFewStepSampler",
             "HyperBagelCFGFreeEditor"}
DISTILLED_FILE = "hyper-bagel-6nfe.safetensors"
DRAFT_FILE = "tiny-head.safetensors"
# small sizes and short loops so the whole module stays within a few minutes on 2 CPU cores
OVERRIDES = {
    "HyperBagelModelLoader": {"checkpoint": "tiny"},
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
    def __init__(self, base: str):
        import requests

        self.requests = requests
        self.base, self.port = base, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, "server.log")
        self.client_id = str(uuid.uuid4())
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        cmd = [python, os.path.join(COMFYUI_DIR, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
               str(self.port), "--base-directory", base, "--disable-auto-launch"]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=self.log, stderr=subprocess.STDOUT)
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
        """Yield websocket messages of ``prompt_id`` until it finishes (success, error or interrupt)."""
        import websocket

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if not isinstance(raw, str):
                continue  # binary previews
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


def _core_features():
    from hyperbagel_core import BagelPipeline
    return {"distilled": hasattr(BagelPipeline, "load_distilled_expert"),
            "draft": hasattr(BagelPipeline, "load_draft_head")}


def start(base: str) -> "Server":
    """Build the base folder (tiny checkpoints, optional distilled expert and draft head, input image) and start
    ComfyUI on it."""
    import numpy as np
    from PIL import Image

    from hyperbagel_core.testing import make_tiny_checkpoint

    for d in ("custom_nodes", "input", "output", "models/bagel/distilled", "models/bagel/draft_heads"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    os.symlink(REPO, os.path.join(base, "custom_nodes", "hyperbagel"))
    ckpt = make_tiny_checkpoint(os.path.join(base, "models", "bagel", "tiny"))
    # wider/deeper (~15 ms per decoded token on 2 cores) so that "stopped within one round" is measurable
    make_tiny_checkpoint(os.path.join(base, "models", "bagel", "tiny-slow"), hidden=768, layers=8, heads=12,
                         kv_heads=4, intermediate=3072)
    feats = _core_features()
    if feats["distilled"]:
        import torch

        from hyperbagel_core import BagelPipeline
        from hyperbagel_core.distill.expert import DistilledExpert

        pipe = BagelPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
        DistilledExpert.from_model(pipe.model).save(os.path.join(base, "models", "bagel", "distilled", DISTILLED_FILE))
    if feats["draft"]:
        import torch

        from hyperbagel_core import BagelPipeline
        from hyperbagel_core.speculative.draft_head import DraftHead
        from hyperbagel_core.speculative.draft_io import save_draft_head

        pipe = BagelPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
        save_draft_head(DraftHead.from_target(pipe.model), os.path.join(base, "models", "bagel", "draft_heads",
                                                                         DRAFT_FILE), pipe.model)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(os.path.join(base, "input", "example.png"))
    srv = Server(base)
    srv.features = feats
    return srv
__all__ = ["COMFYUI_DIR", "DRAFT_FILE", "OUR_NODES", "OVERRIDES", "Server", "start", "wc"]
