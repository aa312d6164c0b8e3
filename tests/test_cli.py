"""The command line: a progress bar with rate and ETA, and a distilled expert on a training-free grid."""
import torch

from hyperbagel_core import BagelPipeline
from hyperbagel_core.__main__ import main
from hyperbagel_core.distill.expert import DistilledExpert
from hyperbagel_core.testing import make_tiny_checkpoint


def test_generate_with_expert_on_a_solver_grid_shows_a_progress_bar(tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    pipe = BagelPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    DistilledExpert.from_model(pipe.model).save(tmp_path / "expert.safetensors")
    grad = torch.is_grad_enabled()
    try:
        rc = main(["generate", "a fox", "--model", str(ckpt), "--height", "32", "--width", "32", "--solver", "unipc",
                   "--steps", "4", "--distilled-expert", str(tmp_path / "expert.safetensors"), "--out", str(tmp_path)])
    finally:
        torch.set_grad_enabled(grad)  # main() turns autograd off for the process
    out = capsys.readouterr()
    assert rc == 0 and (tmp_path / "generate_0.png").is_file()
    assert "denoising: 100%" in out.err and "3/3" in out.err and "step/s" in out.err  # tqdm: count, rate
    assert "<" in out.err  # elapsed<remaining (ETA)
