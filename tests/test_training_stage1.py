"""CFG distillation on a tiny checkpoint (CPU): the student's held-out loss goes down, the base is untouched."""
import pytest
import torch
from PIL import Image

from hyperbagel_core.distill import base_fingerprint, load_distilled_expert
from hyperbagel_core.training.stage1_cfg import distill, main, select_keys
from hyperbagel_core.pipeline import BagelPipeline


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)


def test_cfg_distillation_reduces_held_out_loss(pipe, tmp_path):
    before = {k: p.detach().clone() for k, p in pipe.model.named_parameters()}
    fp = base_fingerprint(pipe.model)
    edit = (Image.new("RGB", (1024, 16), (10, 200, 30)), "make it red")
    expert, rep = distill(pipe, ["a red circle", "a blue square on a table"], edit_pairs=[edit], steps=40, lr=1e-3,
                          size=(64, 64), eval_samples=6, seed=0)
    assert rep["eval_after"] < 0.8 * rep["eval_before"], rep
    assert len(rep["losses"]) == 40
    # the teacher/base model is untouched and frozen as loaded
    for k, p in pipe.model.named_parameters():
        assert torch.equal(p, before[k]) and not p.requires_grad, k
    assert base_fingerprint(pipe.model) == fp
    # embedders learned something (they start at zero)
    assert expert.guidance.text_scale_embedder.mlp[2].weight.abs().sum() > 0
    assert expert.guidance.img_scale_embedder.mlp[2].weight.abs().sum() > 0
    path = tmp_path / "distilled.safetensors"
    expert.save(path)
    loaded = load_distilled_expert(path, pipe.model)
    assert loaded.config.stages == ("cfg_distillation",) and loaded.config.schedule == "teacher"
    pipe.distilled_expert = loaded
    try:
        a = pipe.generate("a red circle", height=64, width=64, num_timesteps=5, cfg_text_scale=4.0)
        b = pipe.generate("a red circle", height=64, width=64, num_timesteps=5, cfg_text_scale=1.5)
    finally:
        pipe.unload_distilled_expert()
    assert not torch.equal(a.latent, b.latent)  # the text scale is a live input


def test_train_key_subsets(pipe):
    assert all("_moe_gen" in k for k in select_keys(pipe.model, "attn"))
    assert select_keys(pipe.model, "embedders") == []
    assert all(".mlp_moe_gen." in k for k in select_keys(pipe.model, "mlp"))
    with pytest.raises(ValueError, match="valid"):
        select_keys(pipe.model, "everything")
    expert, rep = distill(pipe, ["a red circle"], steps=3, lr=1e-3, train_keys="embedders", size=(32, 32),
                          eval_samples=1)
    assert expert.tensors == {} and len(rep["losses"]) == 3


def test_cli(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    main(["--model", str(tiny_ckpt), "--out", str(out), "--prompt", "a red circle", "--steps", "2",
          "--size", "32", "32", "--device", "cpu", "--train-keys", "norms", "--lr", "1e-3"])
    assert out.exists() and "held-out loss" in capsys.readouterr().out
    p = BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    p.load_distilled_expert(out)
    assert all("norm" in k for k in p.distilled_expert.tensors)
