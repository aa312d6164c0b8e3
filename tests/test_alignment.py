"""Every tensor loaded from a file sits in 64-byte aligned, contiguous storage (issue 8).

safetensors returns tensors at their offset in the file; CPU kernels take another path for misaligned
operands, so a file-loaded expert gave fp32 results differing in the last bits from the in-memory one.
One test per loader: checkpoint (from_pretrained and load_bagel_model), VAE (also FluxVAE's own\nload_official_state_dict), distilled expert, draft head.
"""
import pytest
import torch
from safetensors.torch import load_file

from hyperbagel_core.distill import DistilledExpert, load_distilled_expert
from hyperbagel_core.loading import load_bagel_model, load_config, load_vae
from hyperbagel_core.model.vae import FluxVAE
from hyperbagel_core.pipeline import BagelPipeline
from hyperbagel_core.speculative import DraftHead, save_draft_head
from hyperbagel_core.tensor_io import ALIGNMENT, aligned


def misaligned(module_or_tensors) -> list[str]:
    """Names of the tensors that are not contiguous or not ``ALIGNMENT``-aligned (empty tensors own no data)."""
    items = (module_or_tensors.items() if isinstance(module_or_tensors, dict)
             else module_or_tensors.state_dict(keep_vars=True).items())
    return [k for k, t in items if t.numel() and (not t.is_contiguous() or t.data_ptr() % ALIGNMENT)]


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)


def test_aligned_copies_only_when_needed():
    base = torch.arange(40, dtype=torch.float32)
    assert aligned(base) is base                       # fresh CPU storage is aligned: no copy
    off = base[3:19]                                   # contiguous, 12 bytes past an aligned address
    assert off.data_ptr() % ALIGNMENT and torch.equal(aligned(off), off)
    assert aligned(off).data_ptr() % ALIGNMENT == 0
    strided = base.view(8, 5).t()
    out = aligned(strided)
    assert out.is_contiguous() and out.data_ptr() % ALIGNMENT == 0 and torch.equal(out, strided)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])   # bf16: the file's dtype, no conversion
def test_checkpoint_and_vae_from_pretrained(tiny_ckpt, dtype):
    p = BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=dtype)
    assert misaligned(p.model) == []
    assert misaligned(p.vae) == []


def test_load_bagel_model_and_load_vae(tiny_ckpt):
    cfg = load_config(tiny_ckpt)
    model = load_bagel_model(tiny_ckpt, cfg, device="cpu", dtype=torch.bfloat16)
    vae = load_vae(tiny_ckpt, cfg, device="cpu", dtype=torch.float32)   # ae.safetensors is fp32: no conversion
    assert misaligned(model) == [] and misaligned(vae) == []


def test_vae_load_official_state_dict_with_assign(tiny_ckpt):
    sd = load_file(str(tiny_ckpt / "ae.safetensors"))
    with torch.device("meta"):
        vae = FluxVAE.from_config(load_config(tiny_ckpt).vae)
    vae.load_official_state_dict(sd, assign=True)
    assert misaligned(vae) == []


def test_distilled_expert(pipe, tmp_path):
    path = tmp_path / "expert.safetensors"
    DistilledExpert.from_model(pipe.model).save(path)
    e = load_distilled_expert(path, pipe.model)
    assert e.tensors and misaligned(e.tensors) == []
    assert misaligned(e.guidance) == []
    pipe.load_distilled_expert(path)
    try:
        assert misaligned(pipe.modules.distilled_expert) == []
    finally:
        pipe.unload_distilled_expert()


def test_draft_head(pipe, tmp_path):
    path = save_draft_head(DraftHead.from_target(pipe.model, zero_init=False, seed=1), tmp_path / "h", pipe.model)
    pipe.load_draft_head(path)
    try:
        assert misaligned(pipe.draft_head) == []
    finally:
        pipe.unload_draft_head()
