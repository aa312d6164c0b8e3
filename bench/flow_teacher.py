"""A teacher whose velocity field is a flow model's: the DMDO evidence needs one (docs/TRAINING.md, block C2).

DMD's real score is only meaningful when the teacher's velocity is the marginal velocity of some distribution;
a random checkpoint's field is not (it was never trained to be), so DMDO's distance cannot be expected to fall
on it. This script
  1. writes a tiny random checkpoint in the official format (``hyperbagel_core.testing``);
  2. trains its generation side (every generation-expert key: the ``_moe_gen`` layers, time embedder,
     vae2llm, llm2vae; the understanding side and the VAE stay random and frozen) with the rectified-flow loss
     ``|| v(x_t, t) - (x_T - x_0) ||^2``, ``x_t = (1 - t) x_0 + t x_T``, on synthetic packed latents: each
     prompt's colour words set the mean of every token, and a fair coin sets the sign of a left/right pattern
     along a fixed direction (a two-mode distribution per prompt). 10 % of the items see the text-dropped
     context (``cfg_text``), so the unconditional branch is the same flow over all prompts;
  3. stores the trained weights as the checkpoint's ema.safetensors (bf16, like an official folder) and prints
     how close the teacher's 50-step samples are to the data (Fréchet distance of the latent patch tokens, with
     the data-vs-data floor) and how far its 6-step Euler samples are from its 50-step ones.

    python3 bench/flow_teacher.py --work /tmp/flow_teacher --steps 3000
then pass ``--model /tmp/flow_teacher/teacher`` to the stage CLIs (bench/training_evidence.sh, block C2).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hyperbagel_core.distill.expert import gen_expert_keys  # noqa: E402
from hyperbagel_core.pipeline import BagelPipeline  # noqa: E402
from hyperbagel_core.sampling.schedules import get_schedule  # noqa: E402
from hyperbagel_core.testing import make_tiny_checkpoint  # noqa: E402
from hyperbagel_core.training.data import read_prompts  # noqa: E402
from hyperbagel_core.training.evaluation import frechet_distance  # noqa: E402
from hyperbagel_core.training.loop import lr_at  # noqa: E402
from hyperbagel_core.training.student import velocity_with_grad  # noqa: E402
from hyperbagel_core.training.teacher import HELD_OUT_DOMAIN, Teacher, domain_generator  # noqa: E402

PROMPTS = Path(__file__).parent / "training_prompts"
COLOURS = ("white", "blue", "pink", "red", "black", "purple", "orange", "brown", "yellow", "green", "golden", "gray")


class SyntheticLatents:
    """Packed latents [h*w, 64] of a prompt: ``mean(colour vectors) + s * pattern * direction + sigma * noise``,
    ``s`` = +-1 with equal odds, the pattern +1 on the left half of the columns and -1 on the right."""

    def __init__(self, h: int, w: int, dim: int = 64, seed: int = 0, colour_scale: float = 0.8,
                 mode_scale: float = 0.8, sigma: float = 0.25):
        g = torch.Generator().manual_seed(seed)
        self.colour = {c: colour_scale * torch.randn(dim, generator=g) for c in COLOURS}
        self.direction = mode_scale * torch.randn(dim, generator=g)
        cols = torch.arange(w).repeat(h)
        self.pattern = torch.where(cols < w // 2, 1.0, -1.0)[:, None]
        self.sigma, self.n, self.dim = sigma, h * w, dim

    def mean(self, prompt: str) -> torch.Tensor:
        vs = [self.colour[c] for c in COLOURS if c in prompt.split()]
        return torch.stack(vs).mean(0) if vs else torch.zeros(self.dim)

    def sample(self, prompt: str, gen: torch.Generator) -> torch.Tensor:
        s = 1.0 if torch.rand((), generator=gen) < 0.5 else -1.0
        return (self.mean(prompt) + s * self.pattern * self.direction
                + self.sigma * torch.randn(self.n, self.dim, generator=gen))


def train(pipe, data, prompts, steps, batch, lr, drop, seed, log_every):
    model = pipe.model
    keys = set(gen_expert_keys(model))
    params = [p for k, p in model.named_parameters() if k in keys]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ctxs = {p: pipe.build_contexts([p]) for p in prompts}
    h = w = int(math.isqrt(data.n))
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    t0, run = time.time(), 0.0
    for i in range(steps):
        total = 0.0
        for _ in range(batch):
            prompt = rng.choice(prompts)
            ctx = ctxs[prompt].cfg_text if rng.random() < drop else ctxs[prompt].gen
            x0, xT = data.sample(prompt, gen), torch.randn(data.n, data.dim, generator=gen)
            t = rng.random()
            v = velocity_with_grad(model, ctx, (1 - t) * x0 + t * xT, t, h, w)
            loss = F.mse_loss(v, xT - x0) / batch
            loss.backward()
            total += float(loss.detach())
        for g in opt.param_groups:
            g["lr"] = lr_at(lr, i, steps, steps // 50)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run = total if i == 0 else 0.98 * run + 0.02 * total
        if (i + 1) % log_every == 0 or i + 1 == steps:
            print(f"step {i + 1}/{steps} flow loss {run:.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.requires_grad_(False)


@torch.no_grad()
def check(pipe, data, prompts, noises, seed) -> dict:
    """Teacher 50-step samples vs data, and 6-step Euler vs 50-step (Fréchet distance of patch tokens)."""
    teacher = Teacher(pipe, (64, 64))
    gen = domain_generator(seed, HELD_OUT_DOMAIN)
    items = [teacher.item(p, gen, 1.0) for p in prompts for _ in range(noises)]
    ref = torch.cat([teacher.reference(it) for it in items])
    grid6 = get_schedule("hyper-6nfe").timesteps
    euler6 = torch.cat([teacher.trajectory(it, grid6)[-1] for it in items])
    d1 = torch.cat([data.sample(p, gen) for p in prompts for _ in range(noises)])
    d2 = torch.cat([data.sample(p, gen) for p in prompts for _ in range(noises)])
    return {"teacher50_vs_data": frechet_distance(ref, d1), "data_vs_data": frechet_distance(d1, d2),
            "euler6_vs_teacher50_paired": frechet_distance(euler6, ref),
            "euler6_vs_data": frechet_distance(euler6, d2), "items": len(items)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="folder: base/ (random) and teacher/ (trained) checkpoints")
    ap.add_argument("--prompts-file", default=str(PROMPTS / "train_1000.txt"))
    ap.add_argument("--eval-prompts-file", default=str(PROMPTS / "held.txt"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--colour-scale", type=float, default=0.8, help="size of the prompt-dependent mean")
    ap.add_argument("--drop", type=float, default=0.1, help="share of items trained with the text dropped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noises", type=int, default=32, help="check: noises per held-out prompt")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    base = make_tiny_checkpoint(work / "base", seed=a.seed)
    pipe = BagelPipeline.from_pretrained(str(base), device="cpu", dtype=torch.float32)
    data = SyntheticLatents(4, 4, pipe.config.patch_latent_dim, seed=a.seed,
                            colour_scale=a.colour_scale)   # 64² images: 4 x 4 tokens
    held = read_prompts([], a.eval_prompts_file)
    before = check(pipe, data, held, a.noises, a.seed)
    print("random teacher:", json.dumps(before), flush=True)
    train(pipe, data, read_prompts([], a.prompts_file), a.steps, a.batch, a.lr, a.drop, a.seed, max(1, a.steps // 20))
    after = check(pipe, data, held, a.noises, a.seed)
    print("flow teacher:", json.dumps(after), flush=True)
    out = work / "teacher"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out)
    from safetensors.torch import save_file
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in pipe.model.state_dict().items()},
              str(out / "ema.safetensors"), metadata={"format": "pt"})
    (work / "flow_teacher.json").write_text(json.dumps({"args": vars(a), "random": before, "trained": after},
                                                       indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
