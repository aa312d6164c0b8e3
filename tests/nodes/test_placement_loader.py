"""The loader's multi_gpu memory mode under the ComfyUI stub: it asks the core for an accelerate placement,
leaves the placed weights out of ComfyUI's model management (prepare frees working memory on each GPU the
model computes on instead of loading it), reports where the weights are, and the default path is unchanged."""
import types

import pytest
import torch

import comfy_stub
from fake_core import start_extension


@pytest.fixture()
def env(tmp_path, monkeypatch):
    (tmp_path / "models" / "bagel" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "bagel" / "tiny" / "llm_config.json").write_text("{}")
    (tmp_path / "models" / "bagel" / "distilled").mkdir()
    (tmp_path / "models" / "bagel" / "distilled" / "six.safetensors").write_bytes(b"x")
    state, ext, core, runtime = start_extension(tmp_path / "models", monkeypatch)
    yield state, ext, core
    comfy_stub.uninstall()


def _load(ext, **kw):
    args = dict(checkpoint="tiny", dtype="auto", attention="sdpa", memory="auto")
    return ext.BagelModelLoader.execute(**{**args, **kw}).args[0]


def _placed_model(pipe):
    """What a placed core model exposes: per-layer execution devices and the placement's summary."""
    cuda = [torch.device("cuda", i) for i in (0, 0, 1)]
    pipe.model = types.SimpleNamespace(language_model=types.SimpleNamespace(kv_devices=tuple(cuda)),
                                       placement=types.SimpleNamespace(summary=lambda m: "weights cuda:0 9 GiB, "
                                                                       "cuda:1 5 GiB; decoder layers 0-1: 0, 2: 1"))
    pipe.compute_device = torch.device("cuda", 0)
    pipe.device = torch.device("cuda", 0)


def test_multi_gpu_places_once_and_comfyui_does_not_manage_it(env, monkeypatch):
    state, ext, core = env
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _placed_model(core.pipe)
    m = _load(ext, memory="multi_gpu", max_memory=" 0=20GiB, 1=24GiB ")
    call = core.loads[-1]
    assert call["device_map"] == "auto" and call["max_memory"] == "0=20GiB, 1=24GiB" and call["device"] is None
    assert m.parts is None and m.patcher.load_device == torch.device("cuda", 0)
    assert "placed: weights cuda:0 9 GiB, cuda:1 5 GiB" in m.describe()
    pipe = m.prepare("generate", height=64, width=64)
    assert state.loaded == []                               # the placed weights are never loaded/streamed
    need = pipe.memory_required("generate", height=64, width=64)
    assert state.freed == [(need, torch.device("cuda", 0)), (need, torch.device("cuda", 1))]
    assert pipe.compute_device == torch.device("cuda", 0)
    # an attachment still goes through ComfyUI's model management, on the main GPU
    m2 = ext.BagelApplyDistilledExpert.execute(model=m, distilled_expert="six.safetensors").args[0]
    m2.prepare("generate", height=64, width=64)
    assert [p.model for p in state.loaded[-1][0]] == [m2.distilled.obj.module]
    assert m2.distilled.patcher.load_device == torch.device("cuda", 0)


def test_multi_gpu_errors_and_default_unchanged(env, monkeypatch):
    state, ext, core = env
    with pytest.raises(ValueError, match="multi_gpu.*CUDA device"):
        _load(ext, memory="multi_gpu")
    with pytest.raises(ValueError, match="max_memory is the per-device budget"):
        _load(ext, max_memory="0=20GiB")
    m = _load(ext)   # the single-device default: as before, no placement arguments at all
    assert set(core.loads[-1]) == {"path", "device", "dtype", "ops", "attn_backend", "compute_dtype",
                                   "weight_dtype", "free_memory"}
    assert m.placement is None
    m.prepare("answer", height=64, width=64)
    assert state.loaded and not state.freed
