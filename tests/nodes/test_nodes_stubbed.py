"""The V3 nodes executed under a ComfyUI stub with a fake pipeline: schemas, batching, seeds, progress,
interrupts, memory management and error messages."""
import os
import sys

import pytest
import torch

import comfy_stub
from fake_core import start_extension

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
    (models / "bagel" / "distilled" / "wrong-base.safetensors").write_bytes(b"bad")
    state, ext, core, runtime = start_extension(models, monkeypatch)
    yield state, ext, core
    comfy_stub.uninstall()


def load(ext, draft_head=None, distilled_expert=None, **kw):
    """The loader, then the apply nodes for ``draft_head`` / ``distilled_expert`` when given."""
    args = dict(checkpoint="tiny", dtype="auto", attention="sdpa", memory="auto")
    args.update(kw)
    m = ext.BagelModelLoader.execute(**args).args[0]
    if draft_head:
        m = ext.BagelApplyDraftHead.execute(model=m, draft_head=draft_head).args[0]
    if distilled_expert:
        m = ext.BagelApplyDistilledExpert.execute(model=m, distilled_expert=distilled_expert).args[0]
    return m


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
    seeds = {c.define_schema().node_id: i for c in ext.NODES for i in c.define_schema().inputs if i.id == "seed"}
    assert [n for n, i in seeds.items() if i.extra.get("control_after_generate")] == [
        "HyperBagelFewStepSampler", "HyperBagelCFGFreeEditor"]
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
    assert opts["checkpoint"] == ["tiny"] and opts["attention"][0] == "sdpa"
    assert set(opts) == {"checkpoint", "dtype", "attention", "memory", "weight_dtype", "compile"}  # attachments: apply nodes
    assert [i.options for i in ext.BagelApplyDraftHead.define_schema().inputs if i.options] == [["head.safetensors"]]
    assert [i.options for i in ext.BagelApplyDistilledExpert.define_schema().inputs
            if i.options] == [["six.safetensors", "wrong-base.safetensors"]]
    m = load(ext, draft_head="head.safetensors", distilled_expert="six.safetensors")
    assert core.loads[0]["dtype"] == core.loads[0]["compute_dtype"] == torch.bfloat16  # auto on a CPU
    assert core.loads[0]["ops"] is sys.modules["comfy.ops"].disable_weight_init  # no cast for resident weights
    assert state.ops_picked == [(torch.bfloat16, torch.bfloat16, torch.device("cpu"))]
    assert m.patcher.model is core.pipe.modules
    assert m.draft_head.endswith("head.safetensors") and m.distilled_expert.endswith("six.safetensors")
    assert [p.model for p in m.patchers()] == [core.pipe.modules, m.draft.obj, m.distilled.obj.module]


def test_loader_lists_single_files_and_hands_a_core_vae_to_the_core(env, tmp_path):
    """A single-file checkpoint is listed beside the folders; a VAE from core 'Load VAE' goes to the core as the
    weights its model holds (the core copies and checks them)."""
    import folder_paths
    from nodes import adapters
    _, ext, core = env
    one = tmp_path / "models" / "bagel" / "one.safetensors"
    one.write_bytes(b"x")
    opts = {i.id: i.options for i in ext.BagelModelLoader.define_schema().inputs if i.options}
    assert opts["checkpoint"] == ["one.safetensors", "tiny"]
    vae_input = [i for i in ext.BagelModelLoader.define_schema().inputs if i.id == "vae"]
    assert len(vae_input) == 1 and vae_input[0].optional
    load(ext, checkpoint="one.safetensors")
    assert core.loads[-1]["path"] == str(one) and "vae" not in core.loads[-1]
    conv = torch.nn.Conv2d(16, 4, 1)
    load(ext, checkpoint="one.safetensors", vae=type("CoreVAE", (), {"first_stage_model": conv})())
    assert core.loads[-1]["vae"].keys() == {"weight", "bias"} and torch.equal(core.loads[-1]["vae"]["weight"], conv.weight)
    with pytest.raises(adapters.NodeInputError, match="core 'Load VAE'"):
        load(ext, checkpoint="one.safetensors", vae=object())
    assert folder_paths.get_full_path("bagel", "one.safetensors") == str(one)


def test_loader_errors_say_what_to_do(env):
    _, ext, core = env
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load(ext, checkpoint="missing")
    with pytest.raises(ValueError, match="not available"):
        load(ext, attention="flash_attn_9")
    with pytest.raises(FileNotFoundError, match="bypass this node"):
        load(ext, draft_head="(put a draft head in models/bagel/draft_heads)")
    with pytest.raises(FileNotFoundError, match="not found in the bagel_distilled folders"):
        load(ext, distilled_expert="gone.safetensors")


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
             custom_timesteps="1, 0.5", shift=3.0, text_guidance=4.0, cfg_interval_start=0.4, cfg_interval_end=1.0,
             cfg_renorm_type="global", cfg_renorm_min=0.0, seed=7, batch_size=2, think=False)
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
    assert "no distilled expert applied" in out.ui["text"][0] and out.ui["bagel_stats"][0]["warning"]


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
              solver="euler", custom_timesteps="", shift=3.0, text_guidance=4.0, image_guidance=1.5,
              cfg_interval_start=0.0, cfg_interval_end=1.0, cfg_renorm_type="text_channel", cfg_renorm_min=0.0,
              seed=3, original_size=True, think=True)
    image, latent, thinking = ext.BagelCFGFreeEditor.execute(**kw).args
    assert thinking == "plan\n\nplan"
    assert image.shape == (2, 40, 50, 3) and latent["samples"].shape[0] == 2
    calls = [c[1] for c in core.pipe.calls]
    assert [c["seed"] for c in calls] == [3, 4] and calls[0]["cfg_img_scale"] == 1.5
    assert calls[0]["image"].size == (50, 40)
    assert calls[0]["cfg_renorm_type"] == "text_channel" and calls[0]["cfg_interval"] == (0.0, 1.0)
    image, _, _ = ext.BagelCFGFreeEditor.execute(**dict(kw, original_size=False)).args
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
            "assert len(nodes) == 7; bad = [n for n in sys.modules if 'hyperbagel_core' in n or 'flash_attn' in n "
            "or n.startswith(('transformers', 'diffusers'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_an_applied_expert_is_used_on_every_schedule(env):
    _, ext, core = env
    plain = load(ext)
    with_expert = load(ext, distilled_expert="six.safetensors")
    for schedule in ("hyper-1nfe", "teacher-50", "training-free", "custom", "auto"):
        ext.BagelFewStepSampler.execute(**sampler_kw(with_expert, schedule=schedule, batch_size=1))
        call = core.pipe.calls[-1][1]
        assert call["distilled"] is True and call["expert"].endswith("six.safetensors"), schedule
        ext.BagelFewStepSampler.execute(**sampler_kw(plain, schedule=schedule, batch_size=1))
        call = core.pipe.calls[-1][1]
        assert call["distilled"] is False and call["expert"] is None, schedule


def test_auto_schedule_is_the_experts_grid_or_training_free(env):
    _, ext, core = env
    out = ext.BagelFewStepSampler.execute(**sampler_kw(load(ext), schedule="auto", batch_size=1))
    call = core.pipe.calls[-1][1]
    assert call["schedule"] == "teacher" and call["solver"] == "unipc" and call["num_timesteps"] == 5
    assert "warning" not in out.ui["bagel_stats"][0]
    m = load(ext, distilled_expert="six.safetensors")
    out = ext.BagelFewStepSampler.execute(**sampler_kw(m, schedule="auto", batch_size=1))
    call = core.pipe.calls[-1][1]
    assert call["schedule"] == "hyper-6nfe" and "num_timesteps" not in call and call["distilled"] is True
    assert "expert's grid" in out.ui["bagel_stats"][0]["schedule"]
    m.distilled.obj.config.schedule, m.distilled.obj.config.timesteps = "custom", (1.0, 0.6, 0.0)
    ext.BagelFewStepSampler.execute(**sampler_kw(m, schedule="auto", batch_size=1))
    call = core.pipe.calls[-1][1]
    assert call["schedule"] == "custom" and call["timesteps"] == [1.0, 0.6, 0.0] and call["timestep_shift"] == 1.0


def test_socket_type_is_our_own(env):
    _, ext, _ = env
    for cls in ext.NODES:
        s = cls.define_schema()
        types_ = {i.io_type for i in s.inputs} | {o.io_type for o in s.outputs}
        assert "BAGEL_MODEL" not in types_, s.node_id
    model_nodes = [c for c in ext.NODES if any(i.id == "model" for i in c.define_schema().inputs)]
    assert len(model_nodes) == 5
    for cls in model_nodes:
        assert next(i for i in cls.define_schema().inputs if i.id == "model").io_type == "HYPERBAGEL_MODEL"
    assert ext.BagelModelLoader.define_schema().outputs[0].io_type == "HYPERBAGEL_MODEL"
    assert ext.BagelVAELoader.define_schema().outputs[0].io_type == "VAE"


def test_apply_nodes_share_the_loaded_model_and_leave_the_input_alone(env):
    state, ext, core = env
    base = load(ext)
    assert len(core.loads) == 1
    head = ext.BagelApplyDraftHead.execute(model=base, draft_head="head.safetensors").args[0]
    both = ext.BagelApplyDistilledExpert.execute(model=head, distilled_expert="six.safetensors").args[0]
    assert len(core.loads) == 1  # from_pretrained never ran again
    assert both.pipe is base.pipe and both.patcher is base.patcher
    assert base.draft is None and base.distilled is None and head.distilled is None  # inputs unchanged
    assert both.draft is head.draft and both.distilled_expert.endswith("six.safetensors")
    # the branches run on one pipeline, each with its own attachments bound for its run only
    ext.BagelSpeculativeVQA.execute(model=both, question="q", drafter="draft_head", k=0, max_new_tokens=8,
                                    temperature=0.0, seed=0, think=False)
    assert core.pipe.calls[-1][1]["head"].endswith("head.safetensors")
    assert len(both.patchers()) == 3  # an answer loads the base and the draft head, not the expert it never runs
    assert state.loaded[-1][0] == [both.patcher, both.draft.patcher]
    ext.BagelSpeculativeVQA.execute(model=base, question="q", drafter="prompt_lookup", k=0, max_new_tokens=8,
                                    temperature=0.0, seed=0, think=False)
    assert core.pipe.calls[-1][1]["head"] is None and state.loaded[-1][0] == [base.patcher]
    with pytest.raises(ValueError, match="draft head"):
        ext.BagelSpeculativeVQA.execute(model=base, question="q", drafter="draft_head", k=0, max_new_tokens=8,
                                        temperature=0.0, seed=0, think=False)
    assert len(core.loads) == 1


def test_a_failed_apply_leaves_the_input_model_usable(env):
    _, ext, core = env
    base = load(ext)
    with pytest.raises(ValueError, match="fingerprint"):
        ext.BagelApplyDistilledExpert.execute(model=base, distilled_expert="wrong-base.safetensors")
    assert base.distilled is None and core.pipe.distilled_expert is None
    out = ext.BagelFewStepSampler.execute(**sampler_kw(base, batch_size=1))
    assert out.args[0].shape == (1, 48, 32, 3) and core.pipe.calls[-1][1]["distilled"] is False
    assert len(core.loads) == 1


def test_subfolders_follow_the_users_bagel_paths(env, tmp_path):
    import folder_paths
    from nodes import paths
    user = tmp_path / "elsewhere" / "bagel"
    (user / "big").mkdir(parents=True)
    (user / "big" / "llm_config.json").write_text("{}")
    (user / "draft_heads").mkdir()
    (user / "draft_heads" / "user-head.safetensors").write_bytes(b"x")
    (user / "distilled").mkdir()
    (user / "distilled" / "user-six.safetensors").write_bytes(b"x")
    table = folder_paths.folder_names_and_paths
    for key in ("bagel", "bagel_draft_heads", "bagel_distilled"):
        table.pop(key, None)
    table["bagel"] = ([str(user)], set())  # what extra_model_paths.yaml's "bagel:" line makes, before the pack loads
    paths.register_folders()
    assert table["bagel_draft_heads"][0][0] == os.path.join(str(user), "draft_heads")
    assert table["bagel_distilled"][0][0] == os.path.join(str(user), "distilled")
    assert os.path.join(folder_paths.models_dir, "bagel", "distilled") in table["bagel_distilled"][0]
    assert paths.checkpoint_choices() == ["big", "tiny"]
    assert paths.draft_head_choices() == ["head.safetensors", "user-head.safetensors"]
    assert "user-six.safetensors" in paths.distilled_choices()
    assert paths.resolve_file("bagel_distilled", "user-six.safetensors") == str(user / "distilled" / "user-six.safetensors")


def test_widget_rules(env):
    _, ext, _ = env
    by_node = {c.define_schema().node_id: {i.id: i for i in c.define_schema().inputs} for c in ext.NODES}
    for node in ("HyperBagelFewStepSampler",):
        for side in ("width", "height"):
            assert by_node[node][side].extra["max"] == 1024  # what BAGEL-7B-MoT's position table covers
    vqa = by_node["HyperBagelSpeculativeVQA"]
    assert vqa["seed"].extra["control_after_generate"] is False  # greedy answers stay cached
    assert "0 = " in vqa["k"].tooltip and vqa["k"].extra["default"] == 0
    for node in ("HyperBagelFewStepSampler", "HyperBagelCFGFreeEditor"):
        ins = by_node[node]
        assert ins["schedule"].extra["default"] == "auto"  # works on stock BAGEL
        assert {"cfg_interval_start", "cfg_interval_end", "cfg_renorm_type", "cfg_renorm_min"} <= set(ins)
        assert ins["seed"].extra["control_after_generate"] is True
        assert "thinking" in ins["think"].tooltip and "shown" in ins["think"].tooltip
    for cls in (ext.BagelFewStepSampler, ext.BagelCFGFreeEditor):
        assert [o.display_name for o in cls.define_schema().outputs][-1] == "thinking"
    with pytest.raises(ValueError, match="cfg_interval_start"):
        m = load(ext)
        ext.BagelFewStepSampler.execute(**sampler_kw(m, cfg_interval_start=0.9, cfg_interval_end=0.5))


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
    ext.BagelFewStepSampler.execute(**sampler_kw(m, prompt="a cat", width=64, height=48, schedule="teacher-50",
                                                 seed=1, batch_size=1))
    assert core.pipe.memory_asks[-1] == ("generate", dict(height=48, width=64, think=False, distilled=False))
    assert state.loaded[-1][1]["memory_required"] == 1000 + 48 * 64
    assert core.pipe.compute_device == torch.device("meta")
    ext.BagelSpeculativeVQA.execute(model=m, question="what?", drafter="none", k=4, max_new_tokens=8,
                                    temperature=0.0, seed=1, think=False, image=torch.rand(2, 32, 16, 3))
    assert core.pipe.memory_asks[-1] == ("answer", dict(height=32, width=16, num_images=1, max_new_tokens=8,
                                                        think=False))
    assert state.loaded[-1][1]["memory_required"] == 1000 + 32 * 16


def test_previews_off_ask_the_core_for_nothing(env):
    state, ext, core = env
    m = load(ext)
    ext.BagelFewStepSampler.execute(**sampler_kw(m))
    assert state.previewers and state.previewers[-1][0] == m.patcher.load_device  # the user's setting was read
    assert state.previewers[-1][1].taesd_decoder_name == "taef1_decoder"  # FLUX's format: TAEF1 when installed
    assert core.pipe.denoised_steps == 0 and not state.previewed
    assert state.progress and all(len(p) == 2 for p in state.progress)  # progress without preview images


def test_sampler_and_editor_send_a_preview_every_step(env):
    state, ext, core = env
    state.preview_method = "latent2rgb"
    m = load(ext)
    ext.BagelFewStepSampler.execute(**sampler_kw(m, batch_size=2))
    steps = core.pipe.steps
    assert [p[:2] for p in state.progress] == [(v, 2 * steps) for v in range(1, 2 * steps + 1)]
    assert [p[2] for p in state.progress] == [("JPEG", f"preview {i}", 512) for i in range(1, 2 * steps + 1)]
    # the fake's BAGEL-normalised latent (its VAE: scale 0.5, shift 0.25) reaches the previewer in FLUX's space
    first = state.previewed[0]
    assert first.shape == (1, 16, 6, 4)
    torch.testing.assert_close(first, torch.full_like(first, (1.0 / 0.5 + 0.25 - 0.1159) * 0.3611))
    n = len(state.progress)
    ext.BagelCFGFreeEditor.execute(model=m, image=torch.rand(1, 40, 50, 3), instruction="red", schedule="auto",
                                   steps=2, solver="euler", custom_timesteps="", shift=3.0, text_guidance=4.0,
                                   image_guidance=1.5, cfg_interval_start=0.0, cfg_interval_end=1.0,
                                   cfg_renorm_type="text_channel", cfg_renorm_min=0.0, seed=0, original_size=True,
                                   think=False)
    assert len(state.progress) == n + steps and all(len(p) == 3 for p in state.progress[n:])
    assert state.previewed[-1].shape == (1, 16, 4, 6)


def test_the_interrupt_is_checked_before_a_preview_is_made(env):
    state, ext, core = env
    state.preview_method = "auto"
    m = load(ext)
    state.interrupt_after = 2
    with pytest.raises(comfy_stub.InterruptProcessingException):
        ext.BagelFewStepSampler.execute(**sampler_kw(m))
    assert len(state.previewed) == 1 and len(state.progress) == 1
    state.interrupt_after = None
    state.preview_method = "none"  # the setting is read per run (ComfyUI's per-prompt override)
    asked = core.pipe.denoised_steps
    ext.BagelFewStepSampler.execute(**sampler_kw(m, batch_size=1))
    assert len(state.previewed) == 1 and core.pipe.denoised_steps == asked


def test_cache_option_reaches_the_core_memory_ask_and_badge(env):
    _, ext, core = env
    m = load(ext)
    real = core.pipe.generate

    def generate(*a, **kw):
        res = real(*a, **kw)
        if "cache" in kw:
            res.stats.update(passes=3, computed=5, predicted=3, cache="taylorseer")
        return res
    core.pipe.generate = generate
    out = ext.BagelFewStepSampler.execute(**sampler_kw(m, batch_size=1, cache="taylorseer"))
    assert core.pipe.calls[-1][1]["cache"] == "taylorseer"
    assert core.pipe.memory_asks[-1][1]["cache"] == "taylorseer"      # the estimate includes the cache's bytes
    badge = out.ui["bagel_stats"][0]
    assert (badge["computed"], badge["predicted"], badge["passes"]) == (5, 3, 3) and "predicted: 3" in badge["summary"]
    ext.BagelFewStepSampler.execute(**sampler_kw(m, batch_size=1, cache="custom", cache_warmup=2, cache_interval=2,
                                                 cache_order=1))
    assert core.pipe.calls[-1][1]["cache"] == {"first_enhance": 2, "fresh_threshold": 2, "max_order": 1}
    ext.BagelFewStepSampler.execute(**sampler_kw(m, batch_size=1))
    assert "cache" not in core.pipe.calls[-1][1] and "cache" not in core.pipe.memory_asks[-1][1]
    img = torch.rand(1, 40, 50, 3)
    ext.BagelCFGFreeEditor.execute(model=m, image=img, instruction="make it red", schedule="teacher-50", steps=1,
                                   solver="euler", custom_timesteps="", shift=3.0, text_guidance=4.0,
                                   image_guidance=1.5, cfg_interval_start=0.0, cfg_interval_end=1.0,
                                   cfg_renorm_type="text_channel", cfg_renorm_min=0.0, seed=3, original_size=True,
                                   think=False, cache="taylorseer")
    assert core.pipe.calls[-1][0] == "edit" and core.pipe.calls[-1][1]["cache"] == "taylorseer"
