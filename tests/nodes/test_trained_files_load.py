"""Files made by the trainers (hyperbagel_core.training) load through the ComfyUI loader and apply nodes (stubbed ComfyUI,
REAL core) and the sampler then runs the distilled path."""
import importlib
import sys

import torch

import comfy_stub


def test_trained_expert_and_head_load_through_the_loader_and_apply_nodes(tiny_ckpt, tmp_path):
    from hyperbagel_core.training import draft_head, tscd
    six = tmp_path / "six.safetensors"
    tscd.main(["--model", str(tiny_ckpt), "--out", str(six), "--size", "64", "64", "--steps", "2", "--pool", "2",
               "--segments", "6", "--eval-every", "0", "--prompt", "a red circle", "--eval-prompt", "a cat",
               "--eval-noises", "1"])
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "name three animals"}\n{"question": "what is red?"}\n')
    head = tmp_path / "head.safetensors"
    draft_head.main(["--model", str(tiny_ckpt), "--data", str(data), "--out", str(head), "--steps", "2",
                     "--max-new-tokens", "4", "--dtype", "fp32", "--holdout", "0"])
    comfy_stub.install(str(tmp_path / "models"))
    try:
        for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
            sys.modules.pop(name)
        runtime = importlib.import_module("nodes.runtime")
        base = runtime.load_bagel(str(tiny_ckpt), "fp32", "sdpa", "auto")
        bagel = runtime.apply_distilled_expert(runtime.apply_draft_head(base, str(head)), str(six))
        pipe = bagel.prepare("generate", height=64, width=64)
        assert pipe.distilled_expert is not None and "tscd" in pipe.distilled_expert.config.stages
        res = pipe.generate("a red circle", height=64, width=64, schedule="hyper-6nfe")
        assert res.stats["distilled"] and torch.isfinite(res.latent).all()
        ans = pipe.answer(None, "name three animals", max_new_tokens=4, drafter="draft_head")
        assert ans.token_ids == pipe.answer(None, "name three animals", max_new_tokens=4).token_ids
    finally:
        comfy_stub.uninstall()
