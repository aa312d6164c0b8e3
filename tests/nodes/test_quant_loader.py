"""The loader's weight_dtype widget (issue 10) under the ComfyUI stub: it offers the core's modes, passes the
choice to from_pretrained, names it in the description, and prepare() loads only the parts a task runs."""

import pytest
import torch

import comfy_stub
from fake_core import start_extension


@pytest.fixture()
def env(tmp_path, monkeypatch):
    (tmp_path / "models" / "bagel" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "bagel" / "tiny" / "llm_config.json").write_text("{}")
    state, ext, core, runtime = start_extension(tmp_path / "models", monkeypatch)
    yield state, ext, core, runtime
    comfy_stub.uninstall()


def _load(ext, **kw):
    args = dict(checkpoint="tiny", dtype="auto", attention="sdpa", memory="auto")
    return ext.BagelModelLoader.execute(**args, **kw).args[0]


def test_loader_offers_the_modes_and_passes_the_choice(env):
    _, ext, core, _ = env
    from hyperbagel_core.quant import WEIGHT_DTYPES
    spec = {i.id: i for i in ext.BagelModelLoader.define_schema().inputs}
    assert spec["weight_dtype"].options == list(WEIGHT_DTYPES) and spec["weight_dtype"].default == "default"
    assert {"fp8_e4m3fn", "fp8_e4m3fn_fast", "int8", "nf4", "auto"} <= set(WEIGHT_DTYPES)
    # appended: saved workflows keep their widget order ("vae" is a socket, not a widget value)
    assert list(spec)[-4:] == ["weight_dtype", "compile", "max_memory", "vae"]
    m = _load(ext, weight_dtype="int8")
    assert core.loads[-1]["weight_dtype"] == "int8" and core.loads[-1]["free_memory"] is None
    assert "weights int8" in m.describe()
    assert _load(ext).weight_dtype == "default"  # a workflow saved before the widget existed


def test_prepare_loads_only_the_task_parts(env, tiny_pipe_int8):
    state, ext, core, runtime = env
    from hyperbagel_core import memory
    core.memory = memory
    core.pipe.modules = tiny_pipe_int8.modules
    m = _load(ext, weight_dtype="int8")
    assert set(m.parts) == set(memory.PARTS)
    sizes = {k: sum(t.numel() * t.element_size() for t in p.model.state_dict().values()) for k, p in m.parts.items()}
    assert sum(sizes.values()) == sum(t.numel() * t.element_size() for t in tiny_pipe_int8.modules.state_dict().values())
    for task, want in (("answer", ["und", "vit"]), ("generate", ["und", "gen", "vae"]),
                       ("edit", ["und", "vit", "gen", "vae"])):
        state.loaded.clear()
        m.prepare(task, height=64, width=64)
        assert state.loaded[0][0] == [m.parts[k] for k in want], task


@pytest.fixture(scope="module")
def tiny_pipe_int8(tmp_path_factory):
    from hyperbagel_core.pipeline import BagelPipeline
    from hyperbagel_core.testing import make_tiny_checkpoint
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("q") / "tiny", seed=0)
    return BagelPipeline.from_pretrained(folder, dtype=torch.float32, weight_dtype="int8")




def test_loader_compile_option(env):
    """compile (issue 21): the core's modes, default none (a workflow saved before it loads unchanged); a mode
    is set on the pipeline and named in the description."""
    _, ext, core, _ = env
    spec = {i.id: i for i in ext.BagelModelLoader.define_schema().inputs}
    assert spec["compile"].options == ["none", "decode", "all"] and spec["compile"].default == "none"
    assert _load(ext).compile_mode == "none" and core.pipe.compiled_as is None
    m = _load(ext, weight_dtype="default", compile="decode")
    assert core.pipe.compiled_as == "decode" and "compiled (decode)" in m.describe()
