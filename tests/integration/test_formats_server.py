"""The single-file BAGEL format through a real ComfyUI (docs/loading.md): the loader lists the file, takes
FLUX's ae from core 'Load VAE' on its optional vae input (or finds it in models/vae alone), and the image is
the one the checkpoint folder gives: same weights, same VAE weights (core's VAE is fp32 on the CPU), same
kernels in one process, so bitwise."""
from __future__ import annotations

import pytest

import comfy_server
from comfy_server import COMFYUI_DIR
from test_comfyui_server import _api, _errors, _saved

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")


def _image(server, prompt):
    msgs, hist = server.run(prompt, timeout=150)
    errors = _errors(msgs)
    assert not errors, errors[0].get("exception_message")
    save = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    return _saved(server, hist, save)[0]


def test_single_file_with_core_load_vae_gives_the_folders_image(server, object_info):
    name = comfy_server.single_file(server)
    info = server.get("/object_info/HyperBagelModelLoader")["HyperBagelModelLoader"]
    assert name in info["input"]["required"]["checkpoint"][1]["options"]
    assert info["input"]["optional"]["vae"][0] == "VAE"
    assert "ae.safetensors" in server.get("/object_info/VAELoader")["VAELoader"]["input"]["required"]["vae_name"][0]

    folder = _image(server, _api("hyperbagel_text_to_image.json", object_info))
    prompt = _api("hyperbagel_text_to_image.json", object_info, HyperBagelModelLoader={"checkpoint": name})
    loader = next(k for k, v in prompt.items() if v["class_type"] == "HyperBagelModelLoader")
    prompt["901"] = {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}
    prompt[loader]["inputs"]["vae"] = ["901", 0]
    with_core_vae = _image(server, prompt)
    assert (with_core_vae == folder).all()
    log = server.read_log()
    assert f"{name} (single file)" in log and "the VAE given" in log and "the BAGEL folder" in log

    del prompt[loader]["inputs"]["vae"], prompt["901"]   # unconnected: FLUX's ae.safetensors found in models/vae
    assert (_image(server, prompt) == folder).all()
    assert "models/vae/ae.safetensors" in server.read_log()
