"""The V3 nodes executed under a ComfyUI stub with a fake pipeline: schemas, batching, seeds, progress,
interrupts, memory management and error messages."""
import importlib
import os
import sys

import pytest
import torch

import comfy_stub
from fake_core import FakePipe, make_core

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def env(tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "bagel" / "tiny").mkdir(parents=True)
    (models / "bagel" / "tiny" / "llm_config.json").write_text("{}")
    (models / "bagel" / "draft_heads").mkdir()
    (models / "bagel" / "draft_heads" / "head.safetensors").write_bytes(b"x")
    (models / "bagel" / "distilled").mkdir()
    (models / "bagel" / "distilled" / "six.safetensors").write_bytes(b"x")
    state = comfy_stub.install(str(models))
    for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
        sys.modules.pop(name)
    ext = importlib.import_module("nodes.extension")
    runtime = importlib.import_module("nodes.runtime")
    core = make_core()
    monkeypatch.setattr(runtime, "import_core", lambda: core)
    import asyncio
    asyncio.run(ext.comfy_entrypoint())
    yield state, ext, core
    comfy_stub.uninstall()


def load(ext, **kw):
    args = dict(checkpoint="tiny", dtype="auto", attention="sdpa", draft_head="none", distilled_expert="none",
                memory="auto")
    args.update(kw)
    return ext.BagelModelLoader.execute(**args).args[0]


def test_schemas_ids_categories_tooltips(env):
    _, ext, _ = env
    ids = set()
    for cls in ext.NODES:
        s = cls.define_schema()
        assert s.node_id.startswith("HyperBagel") and s.node_id not in ids
        ids.add(s.node_id)
        assert s.category.startswith("BAGEL/") and s.display_name and s.description
        names = [i.id for i in s.inputs]
        assert len(names) == len(set(names))
        assert all(i.tooltip for i in s.inputs), s.node_id
    seeds = [i for c in ext.NODES for i in c.define_schema().inputs if i.id == "seed"]
    assert seeds and all(i.extra.get("control_after_generate") for i in seeds)
    sizes = [i for i in ext.BagelFewStepSampler.define_schema().inputs if i.id in ("width", "height")]
    assert all(i.extra["step"] == 16 for i in sizes)


def test_folders_are_merged_not_overwritten(env):
    import folder_paths
    from nodes import paths
    user = ["/user/bagel"]
    folder_paths.folder_names_and_paths["bagel"] = (user, set())
    folder_paths.folder_names_and_paths["bagel_distilled"] = (["/u/d"], {".bin"})
    paths.register_folders()
    paths.register_folders()
    got, exts = folder_paths.folder_names_and_paths["bagel"]
    assert got[0] == "/user/bagel" and got.count(os.path.join(folder_paths.models_dir, "bagel")) == 1
    assert exts == set()
    assert folder_paths.folder_names_and_paths["bagel_distilled"][1] == {".bin", ".safetensors"}


def test_loader_lists_and_loads_through_model_patcher(env):
    state, ext, core = env
    opts = {i.id: i.options for i in ext.BagelModelLoader.define_schema().inputs if i.options}
    assert opts["checkpoint"] == ["tiny"]
    assert opts["draft_head"] == ["none", "head.safetensors"] and opts["distilled_expert"] == ["none", "six.safetensors"]
    assert opts["attention"][0] == "sdpa"
    m = load(ext, draft_head="head.safetensors", distilled_expert="six.safetensors")
    assert core.loads[0]["dtype"] == core.loads[0]["compute_dtype"] == torch.bfloat16  # auto on a CPU
    assert core.loads[0]["ops"] is sys.modules["comfy.ops"].disable_weight_init  # no cast for resident weights
    assert state.ops_picked == [(torch.bfloat16, torch.bfloat16, torch.device("cpu"))]
    assert m.patcher.model is core.pipe.modules
    assert core.pipe.draft.endswith("head.safetensors") and core.pipe.distilled.endswith("six.safetensors")


def test_loader_errors_say_what_to_do(env):
    _, ext, core = env
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load(ext, checkpoint="missing")
    with pytest.raises(ValueError, match="not available"):
        load(ext, attention="flash_attn_9")
    del FakePipe.load_draft_head
    try:
        with pytest.raises(ValueError, match="load_draft_head"):
            load(ext, draft_head="head.safetensors")
    finally:
        FakePipe.load_draft_head = lambda self, path: setattr(self, "draft", path)


def test_vqa_one_answer_per_image_with_seeds_and_ui(env):
    state, ext, core = env
    m = load(ext)
    out = ext.BagelSpeculativeVQA.execute(model=m, question="what?", drafter="prompt_lookup", k=4, max_new_tokens=8,
                                          temperature=0.7, seed=10, think=False, image=torch.rand(3, 16, 16, 3))
    answer, stats = out.args
    assert answer.count("[image ") == 3 and "1 image(s): what?" in answer
    calls = [c[1] for c in core.pipe.calls]
    assert [c["seed"] for c in calls] == [10, 11, 12] and all(c["do_sample"] and c["k"] == 4 for c in calls)
    assert out.ui["text"] == [answer] and out.ui["bagel_stats"][0]["kind"] == "vqa"
    assert out.ui["bagel_stats"][0]["new_tokens"] == 9 and "tau" in stats
    assert state.loaded and state.loaded[0][0] == [m.patcher]
    assert state.progress[-1] == (9, 9)  # 3 images x 3 rounds


def test_vqa_multi_image_question_and_text_only(env):
    _, ext, core = env
    m = load(ext)
    out = ext.BagelSpeculativeVQA.execute(model=m, question="compare", drafter="none", k=0, max_new_tokens=8,
                                          temperature=0.0, seed=0, think=False, image=torch.rand(2, 16, 16, 3),
                                          batch_mode="all images in one question")
    assert out.args[0] == "2 image(s): compare" and core.pipe.calls[-1][1]["k"] is None
    out = ext.BagelSpeculativeVQA.execute(model=m, question="hi", drafter="none", k=0, max_new_tokens=8,
                                          temperature=0.0, seed=0, think=False)
    assert out.args[0] == "0 image(s): hi"


def test_vqa_validation(env):
    _, ext, _ = env
    m = load(ext)
    kw = dict(model=m, question="q", drafter="draft_head", k=0, max_new_tokens=8, temperature=0.0, seed=0, think=False)
    with pytest.raises(ValueError, match="draft head"):
        ext.BagelSpeculativeVQA.execute(**kw)
    with pytest.raises(ValueError, match="question is empty"):
        ext.BagelSpeculativeVQA.execute(**dict(kw, drafter="none", question=" "))
    with pytest.raises(ValueError, match="Loader"):
        ext.BagelSpeculativeVQA.execute(**dict(kw, drafter="none", model="not a model"))


def sampler_kw(m, **kw):
    d = dict(model=m, prompt="a fox", width=32, height=48, schedule="training-free", steps=4, solver="unipc",
             custom_timesteps="1, 0.5", shift=3.0, text_guidance=4.0, cfg_interval_start=0.4, seed=7, batch_size=2,
             think=False)
    d.update(kw)
    return d


def test_sampler_batch_layout_latent_and_badge(env):
    state, ext, core = env
    m = load(ext)
    out = ext.BagelFewStepSampler.execute(**sampler_kw(m, think=True))
    image, latent, thinking = out.args
    assert image.shape == (2, 48, 32, 3) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert latent["samples"].shape == (2, 16, 6, 4)
    assert torch.allclose(latent["samples"][0], torch.full((16, 6, 4), 0.0 / 0.5 + 0.25))  # seed 7 -> 0
    calls = [c[1] for c in core.pipe.calls]
    assert [c["seed"] for c in calls] == [7, 8]
    assert calls[0]["solver"] == "unipc" and calls[0]["num_timesteps"] == 5 and calls[0]["cfg_interval"] == (0.4, 1.0)
    assert thinking == "plan\n\nplan"
    badge = out.ui["bagel_stats"][0]
    assert badge["kind"] == "sampler" and badge["nfe"] == 8 and "training-free unipc" in badge["schedule"]


def test_sampler_distilled_schedule_without_expert_warns(env):
    _, ext, core = env
    m = load(ext)
    out = ext.BagelFewStepSampler.execute(**sampler_kw(m, schedule="hyper-6nfe", batch_size=1))
    assert core.pipe.calls[-1][1]["schedule"] == "hyper-6nfe" and "num_timesteps" not in core.pipe.calls[-1][1]
    assert "no distilled expert" in out.ui["text"][0]


def test_sampler_size_validation_uses_checkpoint_limit(env):
    _, ext, _ = env
    m = load(ext)
    with pytest.raises(ValueError, match="exceeds 64"):
        ext.BagelFewStepSampler.execute(**sampler_kw(m, width=80))
    with pytest.raises(ValueError, match="multiple of 16"):
        ext.BagelFewStepSampler.execute(**sampler_kw(m, width=40))


def test_interrupt_propagates_and_model_stays_usable(env):
    state, ext, core = env
    m = load(ext, memory="offload_after_run")
    state.interrupt_after = 2
    with pytest.raises(comfy_stub.InterruptProcessingException):
        ext.BagelFewStepSampler.execute(**sampler_kw(m))
    assert len(core.pipe.calls) == 1  # stopped inside the first image, second never started
    state.interrupt_after = None
    out = ext.BagelFewStepSampler.execute(**sampler_kw(m, batch_size=1))
    assert out.args[0].shape == (1, 48, 32, 3)


def test_editor_batch_original_size(env):
    _, ext, core = env
    m = load(ext)
    kw = dict(model=m, image=torch.rand(2, 40, 50, 3), instruction="make it red", schedule="hyper-1nfe", steps=1,
              solver="euler", custom_timesteps="", shift=3.0, text_guidance=4.0, image_guidance=1.5, seed=3,
              original_size=True, think=False)
    image, latent = ext.BagelCFGFreeEditor.execute(**kw).args
    assert image.shape == (2, 40, 50, 3) and latent["samples"].shape[0] == 2
    calls = [c[1] for c in core.pipe.calls]
    assert [c["seed"] for c in calls] == [3, 4] and calls[0]["cfg_img_scale"] == 1.5
    assert calls[0]["image"].size == (50, 40)
    image, _ = ext.BagelCFGFreeEditor.execute(**dict(kw, original_size=False)).args
    assert image.shape == (2, 32, 48, 3)


def test_unsupported_core_option_is_a_clear_error(env):
    _, ext, core = env
    m = load(ext)

    def generate(prompt, *, height, width, seed, callback=None, think=False, cfg_text_scale=4.0, cfg_interval=None,
                 schedule="teacher"):
        raise AssertionError("not reached")
    core.pipe.generate = generate
    with pytest.raises(ValueError, match="does not support solver"):
        ext.BagelFewStepSampler.execute(**sampler_kw(m))


def test_root_package_imports_without_comfyui(tmp_path):
    """Outside ComfyUI the pack's entry point imports nothing heavy and defines no entry point."""
    comfy_stub.uninstall()
    import subprocess
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('hyperbagel', "
            f"{os.path.join(REPO, '__init__.py')!r}, submodule_search_locations=[{REPO!r}]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['hyperbagel'] = m; spec.loader.exec_module(m); "
            "assert m.WEB_DIRECTORY == './web' and not hasattr(m, 'comfy_entrypoint'); "
            "assert 'torch' not in sys.modules and 'hyperbagel_core' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_root_package_entry_point_under_stub_imports_no_core(tmp_path):
    """Inside ComfyUI (stubbed) the entry point exists, and neither the core nor flash-attn is imported."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import comfy_stub; comfy_stub.install(); "
            "import importlib.util; spec = importlib.util.spec_from_file_location('hyperbagel', "
            f"{os.path.join(REPO, '__init__.py')!r}, submodule_search_locations=[{REPO!r}]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['hyperbagel'] = m; spec.loader.exec_module(m); "
            "import asyncio; ext = asyncio.run(m.comfy_entrypoint()); nodes = asyncio.run(ext.get_node_list()); "
            "assert len(nodes) == 4; bad = [n for n in sys.modules if 'hyperbagel_core' in n or 'flash_attn' in n "
            "or n.startswith(('transformers', 'diffusers'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_distilled_flag_follows_the_schedule(env):
    _, ext, core = env
    plain = load(ext)
    with_expert = load(ext, distilled_expert="six.safetensors")
    ext.BagelFewStepSampler.execute(**sampler_kw(with_expert, schedule="hyper-1nfe", batch_size=1))
    assert core.pipe.calls[-1][1]["distilled"] is True
    ext.BagelFewStepSampler.execute(**sampler_kw(with_expert, schedule="teacher-50", batch_size=1))
    assert core.pipe.calls[-1][1]["distilled"] is False and core.pipe.calls[-1][1]["num_timesteps"] == 50
    ext.BagelFewStepSampler.execute(**sampler_kw(plain, schedule="hyper-6nfe", batch_size=1))
    assert core.pipe.calls[-1][1]["distilled"] is False
    ext.BagelFewStepSampler.execute(**sampler_kw(with_expert, schedule="custom", batch_size=1))
    assert "distilled" not in core.pipe.calls[-1][1]


def test_core_warnings_reach_the_node_ui(env):
    import warnings as w
    _, ext, core = env
    m = load(ext, distilled_expert="six.safetensors")
    real = core.pipe.generate

    def generate(*a, **kw):
        w.warn("text scale 9 outside the trained range [1, 5]; clamped to 5")
        return real(*a, **kw)
    core.pipe.generate = generate
    out = ext.BagelFewStepSampler.execute(**sampler_kw(m, schedule="hyper-6nfe", batch_size=2))
    assert "clamped to 5" in out.ui["text"][0] and out.ui["bagel_stats"][0]["warning"].count("clamped") == 1


def test_pre_ampere_device_gets_bf16_weights_fp32_compute_and_casting_ops(env, monkeypatch):
    state, ext, core = env
    mm = sys.modules["comfy.model_management"]
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("meta"))  # no native bf16 (stub says so)
    m = load(ext)
    assert (core.loads[0]["dtype"], core.loads[0]["compute_dtype"]) == (torch.bfloat16, torch.float32)
    assert core.loads[0]["ops"] is sys.modules["comfy.ops"].manual_cast
    assert core.pipe.compute_device == torch.device("meta") and "computed in fp32" in m.describe()


def test_fp16_choice_warns_about_overflow(env, caplog):
    _, ext, core = env
    with caplog.at_level("WARNING", logger="hyperbagel"):
        load(ext, dtype="fp16")
    assert core.loads[0]["compute_dtype"] == torch.float16 and "inf/NaN" in caplog.text


def test_prepare_reserves_the_runs_memory_and_computes_on_the_load_device(env):
    state, ext, core = env
    m = load(ext)
    m.patcher.load_device = torch.device("meta")       # what ComfyUI says, whatever the weights' device
    ext.BagelFewStepSampler.execute(model=m, prompt="a cat", width=64, height=48, schedule="teacher-50", steps=4,
                                    solver="euler", custom_timesteps="", shift=3.0, text_guidance=4.0,
                                    cfg_interval_start=0.4, seed=1, batch_size=1, think=False)
    assert core.pipe.memory_asks[-1] == ("generate", dict(height=48, width=64, think=False, distilled=False))
    assert state.loaded[-1][1]["memory_required"] == 1000 + 48 * 64
    assert core.pipe.compute_device == torch.device("meta")
    ext.BagelSpeculativeVQA.execute(model=m, question="what?", drafter="none", k=4, max_new_tokens=8,
                                    temperature=0.0, seed=1, think=False, image=torch.rand(2, 32, 16, 3))
    assert core.pipe.memory_asks[-1] == ("answer", dict(height=32, width=16, num_images=1, max_new_tokens=8,
                                                        think=False))
    assert state.loaded[-1][1]["memory_required"] == 1000 + 32 * 16
