"""ComfyUI's partial loading (a budget far below the model's size) runs generate, edit and answer (plus the
distilled expert and the draft head) bitwise like a full load, and leaves no layer behind that it neither
loaded nor streams. Runs ComfyUI's own modules in a subprocess (its venv's python); skipped without
COMFYUI_DIR.

On CPU the load and offload devices are the same, so a layer left on the offload device cannot fail here by
device mismatch; the structural check catches that class instead: every module ComfyUI's ``_load_list``
places must be loaded or carry ``comfy_cast_weights`` (a plain torch layer that did not fit would stay on
the offload device while its input is on the GPU). The script checks that the check fails for a VAE of
plain diffusers layers (the layout before ``ops.adopt_ops``).
"""
import pytest

from comfy_server import COMFYUI_DIR, run_in_comfy

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")

SCRIPT = """
    def load():
        model = runtime.apply_draft_head(runtime.load_bagel(path, "fp32", "sdpa", "auto"), head)
        return runtime.apply_distilled_expert(model, folder + "/expert.safetensors")

    def left_behind(patcher):
        # what partial loading placed (ComfyUI's own list) that is neither loaded nor streamed per call, except
        # the small plain modules whose forward moves their tensor to the input (RMSNorm weights, pos tables)
        return [n for _, n, m, _ in patcher._load_list()
                if not getattr(m, "comfy_patched_weights", False) and not getattr(m, "comfy_cast_weights", False)
                and type(m).__name__ not in ("RMSNorm", "PositionEmbedding2D")]

    def runs(pipe):
        img = Image.new("RGB", (80, 48), (30, 140, 200))
        return dict(
            gen=pipe.generate("a red fox", height=64, width=48, num_timesteps=4, seed=3, distilled=False).image_u8,
            edit=pipe.edit(img, "make it green", num_timesteps=3, seed=4, distilled=False).image_u8,
            fast=pipe.generate("a red fox", height=64, width=64, schedule="hyper-6nfe", seed=5).image_u8,
            vqa=pipe.answer(img, "what colour?", max_new_tokens=12).token_ids,
            spec=pipe.answer(None, "hello there", max_new_tokens=12, drafter="draft_head").token_ids)

    full = load()
    full.prepare("generate", height=64, width=48)     # ComfyUI's load_models_gpu with the run's memory
    # 4 parts of the base (und, vit, gen, vae: loaded per task) + draft head + distilled expert
    assert len(full.patchers()) == 6 and not any(p.model.model_lowvram for p in full.patchers())
    want = runs(full.pipe)

    part = load()
    part.bind()                                       # what prepare does before loading
    cpu = torch.device("cpu")
    listed, streamed, unlisted = [], [], set()
    # the model's own names of every module, whichever patcher (part or attachment) holds it
    qualified = {id(m): n for n, m in part.pipe.modules.named_modules()}
    qualified.update({id(m): "draft_head." + n for n, m in part.draft.patcher.model.named_modules()})
    qualified.update({id(m): "distilled_expert." + n for n, m in part.distilled.patcher.model.named_modules()})
    # every part of the base model, the draft head, the distilled expert: each partially loaded with 1/8 of its size
    for patcher in part.patchers():
        patcher.patch_model(device_to=cpu, lowvram_model_memory=patcher.model_size() // 8)
        assert patcher.model.model_lowvram, "expected a partial (low-VRAM) load of every patcher"
        assert not left_behind(patcher), left_behind(patcher)
        mine = patcher._load_list()
        listed += mine
        streamed += [qualified[id(m)] for _, n, m, _ in mine if not getattr(m, "comfy_patched_weights", False)]
        # modules holding tensors outside ComfyUI's list stay put; their forwards move those tensors to the input
        names = {n for _, n, _, _ in mine}
        unlisted |= {type(m).__name__ for n, m in patcher.model.named_modules() if n not in names
                     and (list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)))}
    for prefix in ("bagel.", "vae.", "draft_head.", "distilled_expert."):
        assert any(n.startswith(prefix) for n in streamed), f"nothing under {prefix} streamed"
    assert unlisted <= {"DraftHead", "MetaQueryCA", "Module"}, unlisted
    assert part.pipe.compute_device == part.patcher.load_device
    got = runs(part.pipe)
    for k in want:
        a, b = want[k], got[k]
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), k
    for patcher in part.patchers():
        patcher.detach()
    assert torch.equal(runs(part.pipe)["gen"], want["gen"])

    # the check catches the old layout: a VAE of plain diffusers layers is left behind when it does not fit
    old = FluxVAE.from_config(plain.config.vae)
    patcher = comfy.model_patcher.ModelPatcher(old, load_device=cpu, offload_device=cpu)
    patcher.patch_model(device_to=cpu, lowvram_model_memory=patcher.model_size() // 8)
    assert any(".conv" in n for n in left_behind(patcher)), left_behind(patcher)
    print("OK", len(streamed), "of", len(listed), "modules streamed")
"""


def test_partial_loading_runs_every_task_like_a_full_load(tmp_path):
    run_in_comfy(SCRIPT, tmp_path)
