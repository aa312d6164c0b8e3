"""Quantized weights under the real ComfyUI (issue 10): ComfyUI counts the stored bytes, loads the model per
part (one ModelPatcher each), partial loading on top of int8 and nf4 runs every task bitwise like a full load,
and a shipped workflow runs through the real server with weight_dtype int8. Skipped without COMFYUI_DIR."""
import pytest

from comfy_server import COMFYUI_DIR, run_in_comfy

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")

SCRIPT = """
    import json
    mode, kernels = args[0], json.loads(args[1])

    def load(weight_dtype):
        model = runtime.apply_draft_head(runtime.load_bagel(path, "fp32", "sdpa", "auto", weight_dtype), head)
        if weight_dtype != "default":   # kept through every later prepare() (the compute device's choice)
            quant.select_kernels(model.pipe.model, "cpu", kernels, compiled=False)
        return runtime.apply_distilled_expert(model, folder + "/expert.safetensors")

    def runs(m, prepare):
        img = Image.new("RGB", (80, 48), (30, 140, 200))
        out = {}
        for key, task, fn in (
                ("gen", "generate", lambda p: p.generate("a red fox", height=64, width=48, num_timesteps=4, seed=3,
                                                         distilled=False).image_u8),
                ("edit", "edit", lambda p: p.edit(img, "make it green", num_timesteps=3, seed=4,
                                                  distilled=False).image_u8),
                ("fast", "generate", lambda p: p.generate("a red fox", height=64, width=64, schedule="hyper-6nfe",
                                                          seed=5).image_u8),
                ("vqa", "answer", lambda p: p.answer(img, "what colour?", max_new_tokens=12).token_ids),
                ("spec", "answer", lambda p: p.answer(None, "hello there", max_new_tokens=12,
                                                      drafter="draft_head").token_ids)):
            out[key] = fn(m.prepare(task, height=64, width=64) if prepare else m.pipe)
        return out

    default = load("default")
    full = load(mode)
    assert full.weight_dtype == mode and f"weights {mode}" in full.describe()
    stored = quant.storage_bytes(full.pipe.modules)
    # ComfyUI's own accounting (module_size over the state dict) counts the stored bytes, part by part
    assert sum(p.model_size() for p in full.parts.values()) == stored < default.patcher.model_size()
    want = runs(full, prepare=True)
    loaded = [lm.model for lm in mm.current_loaded_models]
    assert full.parts["gen"] in loaded and full.parts["vit"] in loaded   # the last task (answer) kept both

    part = load(mode)
    cpu = torch.device("cpu")
    streamed_q = 0
    for name, patcher in part.parts.items():
        patcher.patch_model(device_to=cpu, lowvram_model_memory=max(1, patcher.model_size() // 8))
        assert patcher.model.model_lowvram, f"expected a partial (low-VRAM) load of {name}"
        for _, n, m, _ in patcher._load_list():
            if getattr(m, "comfy_patched_weights", False):
                continue
            assert getattr(m, "comfy_cast_weights", False) or type(m).__name__ in ("RMSNorm", "PositionEmbedding2D"), n
            if isinstance(m, quant.QuantizedLinear) and quant.is_quantized(m.weight):
                streamed_q += 1
                assert m.kernel == ("fused" if kernels != "dequant" else "dequant"), (n, m.kernel)
    assert streamed_q > 0, "no quantized layer was streamed"
    part.bind()                                       # what prepare does before loading
    got = runs(part, prepare=False)
    for k in want:
        a, b = want[k], got[k]
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), k
    print("OK", mode, stored, default.patcher.model_size(), streamed_q)
"""


@pytest.mark.parametrize("mode, kernels", [("int8", '{"int8": "fused"}'), ("nf4", '"dequant"')])
def test_partial_loading_per_part_on_quantized_weights(tmp_path, mode, kernels):
    run_in_comfy(SCRIPT, tmp_path, mode, kernels)


def test_shipped_workflow_runs_with_int8_weights(server, object_info):
    from test_comfyui_server import _api, _errors
    assert "int8" in object_info["HyperBagelModelLoader"]["input"]["required"]["weight_dtype"][1]["options"]
    prompt = _api("hyperbagel_speculative_vqa.json", object_info,
                  HyperBagelModelLoader={"weight_dtype": "int8"})
    msgs, hist = server.run(prompt, timeout=150)
    errors = _errors(msgs)
    assert not errors, errors[0].get("exception_message") + "".join(errors[0].get("traceback", []))
    assert hist.get("status", {}).get("status_str") == "success", hist.get("status")
