"""The model built from ``comfy.ops.manual_cast`` (as the loader does) under a partially loaded ModelPatcher
gives the same outputs as the plain-torch model. Runs ComfyUI's own modules in a subprocess (its venv's
python); skipped without COMFYUI_DIR."""
import os
import subprocess
import sys
import textwrap

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")

SCRIPT = textwrap.dedent("""
    import sys
    comfy_dir, repo, folder = sys.argv[1:4]
    sys.path[:0] = [comfy_dir, repo]
    sys.argv = [sys.argv[0], "--cpu"]
    import torch
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_patcher
    import comfy.ops
    from hyperbagel_core import BagelPipeline
    from hyperbagel_core.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(folder)
    ref = BagelPipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
    pipe = BagelPipeline.from_pretrained(path, device="cpu", dtype=torch.float32, ops=comfy.ops.manual_cast)
    layers = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.Conv2d, torch.nn.GroupNorm)
    plain = [n for n, m in pipe.modules.named_modules()
             if isinstance(m, layers) and not hasattr(m, "comfy_cast_weights") and not n.startswith("vae.")]
    assert not plain, f"layers not built from the injected ops: {plain[:10]}"
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(pipe.modules, load_device=cpu, offload_device=cpu)
    patcher.patch_model(device_to=cpu, lowvram_model_memory=patcher.model_size() // 3)
    assert pipe.modules.model_lowvram, "expected a partial (low-VRAM) load"
    a = ref.generate("a red fox", height=64, width=64, num_timesteps=4, seed=3)
    b = pipe.generate("a red fox", height=64, width=64, num_timesteps=4, seed=3)
    assert torch.equal(a.image_u8, b.image_u8), (a.decoded - b.decoded).abs().max()
    qa = ref.answer(None, "hello there", max_new_tokens=12)
    qb = pipe.answer(None, "hello there", max_new_tokens=12)
    assert qa.token_ids == qb.token_ids
    patcher.detach()
    c = pipe.generate("a red fox", height=64, width=64, num_timesteps=4, seed=3)
    assert torch.equal(a.image_u8, c.image_u8)
    print("OK")
""")


def test_partial_loading_with_comfy_ops_matches_plain_torch(tmp_path):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run([python, "-c", SCRIPT, COMFYUI_DIR, REPO, str(tmp_path / "tiny")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout[-2000:] + out.stderr[-4000:]
