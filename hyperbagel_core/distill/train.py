"""CFG distillation (Hyper-Bagel stage 1): make a distilled generation expert from the teacher.

The student is the model with distilled generation-expert tensors swapped in plus the guidance-scale
embedders; one pass with ``time_embed_extra = embed(s_txt) + embed(s_img)`` regresses the teacher's guided
velocity (dual CFG over the main / cfg_text / cfg_img contexts, original weights, no gradient):

    loss = || v_student(x_t, t; s_txt, s_img) - cfg(v_c, v_ut, v_ui; s_txt, s_img) ||^2

Sampling per step: s_txt ~ U(1, 5); s_img ~ U(1, 2.5) for edits, 1.0 for text-to-image; t = shift(sigmoid(n)),
n ~ N(0, 1), shift 3 (the paper needed >= 3); x_t = (1 - t) x0 + t eps, x0 ~ N(0, 1) latents (data-free: the
target is the teacher's velocity at x_t, any x_t covering the sampling region will do; pass real latents
through ``latents=`` for data-driven training). Contexts are built with the original weights.

This is the reference implementation (tested on tiny checkpoints on CPU). At 7B it needs the memory of the
gen-expert copy + Adam states (restrict with ``--train-keys``). The later stages (TSCD, DMDO, ADP, ReFL)
that make the 6/1-NFE models are not implemented here.

    python -m hyperbagel_core.distill.train --model DIR --out expert.safetensors --prompt "a red cube" ...
"""
from __future__ import annotations

import argparse
import logging
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..generation import CFGSettings, guided_velocity
from ..sampling.schedules import shift_timesteps
from .expert import DistilledExpert, gen_expert_keys

log = logging.getLogger(__name__)

TRAIN_KEY_SETS = ("all", "attn", "mlp", "norms", "embedders")


@dataclass
class Sample:
    task: str            # "t2i" | "edit"
    ctxs: object         # pipeline.Contexts built with the original weights
    h: int
    w: int
    t: float
    s_txt: float
    s_img: float
    x_t: torch.Tensor    # [h*w, 64] fp32


def select_keys(model, which: str = "all") -> list[str]:
    """Gen-expert keys to train: all, or the attention / MLP / norm subsets, or none (embedders only)."""
    keys = gen_expert_keys(model)
    pick = {"all": lambda k: True, "embedders": lambda k: False,
            "attn": lambda k: ".self_attn." in k, "mlp": lambda k: ".mlp_moe_gen." in k,
            "norms": lambda k: "norm" in k}
    if which not in pick:
        raise ValueError(f"unknown train-keys set {which!r}; valid: {', '.join(TRAIN_KEY_SETS)}")
    return [k for k in keys if pick[which](k)]


def _velocity_with_grad(model, ctx, x, t, h, w, extra):
    """``model.velocity`` without its no_grad wrapper (the student pass needs gradients)."""
    fn = getattr(type(model).velocity_batched, "__wrapped__", type(model).velocity_batched)
    return fn(model, [ctx], x, t, h, w, extra)[0]


class CFGDistiller:
    """Holds the teacher pipeline, the student expert and the optimiser; ``step`` does one update."""

    def __init__(self, pipe, expert: DistilledExpert, prompts: list[str], edit_pairs=(), *, size=(64, 64),
                 lr: float = 1e-4, shift: float = 3.0, seed: int = 0, latents=None):
        if not prompts and not edit_pairs:
            raise ValueError("CFG distillation needs at least one prompt or (image, instruction) pair")
        self.pipe, self.expert, self.shift = pipe, expert, float(shift)
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.latents = latents
        h, w = pipe._check_size(*size)
        self.items = [("t2i", pipe.build_contexts([p]), h, w) for p in prompts]
        for img, text in edit_pairs:
            ctxs = pipe.build_contexts([img, text], generator=torch.Generator().manual_seed(seed))
            eh, ew = pipe._check_size(*ctxs.image_shapes)
            self.items.append(("edit", ctxs, eh, ew))
        for k, p in expert.tensors.items():
            if not isinstance(p, torch.nn.Parameter):
                expert.tensors[k] = torch.nn.Parameter(p.detach(), requires_grad=True)
        self.params = expert.parameters()
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)

    def draw(self) -> Sample:
        task, ctxs, h, w = self.rng.choice(self.items)
        lo, hi = self.expert.config.text_scale_range
        s_txt = self.rng.uniform(lo, hi)
        if task == "edit":
            lo, hi = self.expert.config.img_scale_range
            s_img = self.rng.uniform(lo, hi)
        else:
            s_img = self.expert.config.t2i_img_scale
        n = torch.randn((), generator=self.gen).item()
        t = float(shift_timesteps(1 / (1 + math.exp(-n)), self.shift))
        shape = (h * w, self.pipe.config.patch_latent_dim)
        x0 = torch.randn(shape, generator=self.gen) if self.latents is None else self.latents(h, w, self.gen)
        eps = torch.randn(shape, generator=self.gen)
        return Sample(task, ctxs, h, w, t, s_txt, s_img, (1 - t) * x0 + t * eps)

    @torch.no_grad()
    def teacher(self, s: Sample) -> torch.Tensor:
        renorm = "text_channel" if s.task == "edit" else "global"
        cfg = CFGSettings(s.s_txt, s.s_img, (0.0, 1.0), renorm, 0.0)
        c = s.ctxs
        return guided_velocity(self.pipe.model, c.gen, c.cfg_text, c.cfg_img, s.x_t, s.t, s.h, s.w, cfg).float()

    def student(self, s: Sample, grad: bool = True) -> torch.Tensor:
        g = self.expert.guidance
        dt = g.text_scale_embedder.mlp[0].weight.dtype
        extra = g(torch.tensor([s.s_txt]), torch.tensor([s.s_img]), dt)[0]
        model = self.pipe.model
        with self.expert.swapped_into(model), torch.set_grad_enabled(grad):
            return _velocity_with_grad(model, s.ctxs.gen, s.x_t, s.t, s.h, s.w, extra).float()

    def loss(self, s: Sample, target: torch.Tensor | None = None) -> torch.Tensor:
        target = self.teacher(s) if target is None else target
        with torch.enable_grad():
            return F.mse_loss(self.student(s), target)

    def step(self) -> float:
        s = self.draw()
        model = self.pipe.model
        req = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)  # only the expert's own tensors learn
        try:
            self.opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = self.loss(s)
                loss.backward()
            self.opt.step()
        finally:
            for p, r in zip(model.parameters(), req):
                p.requires_grad_(r)
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, samples: list[Sample], targets: list[torch.Tensor]) -> float:
        return sum(float(F.mse_loss(self.student(s, grad=False), y)) for s, y in zip(samples, targets)) / len(samples)


def distill(pipe, prompts: list[str], *, steps: int = 100, lr: float = 1e-4, train_keys: str = "all",
            edit_pairs=(), size=(64, 64), shift: float = 3.0, seed: int = 0, eval_samples: int = 4,
            schedule: str = "teacher", num_timesteps: int = 50, log_every: int = 10,
            callback=None) -> tuple[DistilledExpert, dict]:
    """Run CFG distillation and return the expert plus ``{"losses", "eval_before", "eval_after"}``."""
    from ..sampling.schedules import get_schedule

    grid = get_schedule(schedule, num_timesteps=num_timesteps, shift=shift)
    expert = DistilledExpert.from_model(pipe.model, select_keys(pipe.model, train_keys), nfe=grid.nfe,
                                        schedule=schedule, timesteps=tuple(grid.timesteps.tolist()),
                                        shift=float(getattr(grid, "shift", shift)),
                                        base_name=str(pipe.path or ""))
    torch.manual_seed(seed)
    d = CFGDistiller(pipe, expert, prompts, edit_pairs, size=size, lr=lr, shift=shift, seed=seed)
    held = [d.draw() for _ in range(eval_samples)]
    targets = [d.teacher(s) for s in held]
    report = {"eval_before": d.evaluate(held, targets), "losses": []}
    for i in range(steps):
        report["losses"].append(d.step())
        if log_every and (i + 1) % log_every == 0:
            log.info("step %d/%d loss %.5f", i + 1, steps, sum(report["losses"][-log_every:]) / log_every)
        if callback is not None:
            callback(i + 1, steps)
    report["eval_after"] = d.evaluate(held, targets)
    for k, p in expert.tensors.items():
        expert.tensors[k] = p.detach()
    return expert, report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hyperbagel_core.distill.train", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="official BAGEL folder (the teacher and base)")
    ap.add_argument("--out", required=True, help="output .safetensors distilled expert")
    ap.add_argument("--prompt", action="append", default=[], help="training prompt (repeatable)")
    ap.add_argument("--prompts-file", help="text file, one prompt per line")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-keys", default="all", choices=TRAIN_KEY_SETS)
    ap.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    ap.add_argument("--shift", type=float, default=3.0, help="training timestep shift (paper: >= 3)")
    ap.add_argument("--schedule", default="teacher", help="grid the expert is meant for (stored in the file)")
    ap.add_argument("--num-timesteps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--save-dtype", default=None, help="dtype of the saved tensors (default: as trained)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..loading import resolve_dtype
    from ..pipeline import BagelPipeline

    prompts = list(a.prompt)
    if a.prompts_file:
        with open(a.prompts_file, encoding="utf-8") as f:
            prompts += [ln.strip() for ln in f if ln.strip()]
    pipe = BagelPipeline.from_pretrained(a.model, device=a.device, dtype=resolve_dtype(a.dtype))
    expert, rep = distill(pipe, prompts, steps=a.steps, lr=a.lr, train_keys=a.train_keys, size=tuple(a.size),
                          shift=a.shift, seed=a.seed, schedule=a.schedule, num_timesteps=a.num_timesteps)
    expert.save(a.out, dtype=resolve_dtype(a.save_dtype) if a.save_dtype else None)
    print(f"held-out loss {rep['eval_before']:.6f} -> {rep['eval_after']:.6f}; wrote {a.out}")


if __name__ == "__main__":
    main()
