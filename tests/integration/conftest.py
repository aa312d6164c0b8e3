"""Session fixtures for the ComfyUI server tests (one server for every module; skipped without COMFYUI_DIR)."""
import os
import shutil

import pytest

import comfy_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    if not comfy_server.COMFYUI_DIR:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to run")
    pytest.importorskip("websocket", reason="pip install websocket-client")
    pytest.importorskip("requests")
    srv = comfy_server.start(str(tmp_path_factory.mktemp("comfy")), str(tmp_path_factory.mktemp("comfy_previews")))
    yield srv
    srv.previews.stop()
    srv.stop()
    if os.environ.get("HYPERBAGEL_KEEP_LOG"):
        shutil.copy(srv.log_path, os.environ["HYPERBAGEL_KEEP_LOG"])


@pytest.fixture(scope="session")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="session")
def preview_server(server):
    """The second server, with previews on (``--preview-method taesd``); it started beside the first one."""
    return server.previews.wait_ready()
