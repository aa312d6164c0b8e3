"""CFG distillation (Hyper-Bagel stage 1): make a distilled generation expert from the teacher.

The student is the model with distilled generation-expert tensors swapped in plus the guidance-scale
embedders; one pass with ``time_embed_extra = embed(s_txt) + embed(s_img)`` regresses the teacher's guided
velocity (dual CFG over the main / cfg_text / cfg_img contexts, original weights, no gradient):

    loss = || v_student(x_t, t; s_txt, s_img) - cfg(v_c, v_ut, v_ui; s_txt, s_img) ||^2

Sampling per step: s_txt ~ U(1, 5); s_img ~ U(1, 2.5) for edits, 1.0 for text-to-image; t = shift(sigmoid(n)),
n ~ N(0, 1), shift 3 (the paper needed >= 3); x_t = (1 - t) x0 + t eps, x0 ~ N(0, 1) latents (data-free: the
target is the teacher's velocity at x_t, any x_t covering the sampling region will do; pass real latents
through ``latents=`` for data-driven training). Contexts are built with the original weights.

The trained tensors are fp32 masters (student.Student) whatever the base dtype; the loop resumes from
``<out>.state/``, runs under DDP with ``--distributed`` and shows loss + held-out loss (docs/TRAINING.md).

    python -m hyperbagel_core.training.stage1_cfg --model DIR --out expert.safetensors --prompt "a red cube" \
        [--edit-pairs edits.jsonl]   # {"image": path, "instruction": text} per line: the CFG-free editor
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..generation import CFGSettings, guided_velocity
from ..sampling.schedules import get_schedule, shift_timesteps
from .cli import add_common_args, load_pipe, write_report
from .data import open_rgb, read_edit_pairs, read_prompts
from .distributed import Dist, init_distributed, make_optimizer
from .loop import Loop, accumulate, optimizer_step, step_rng
from .student import Student, frozen, installed, velocity_with_grad
from .student import train_keys as select_keys


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


class CFGDistiller:
    """Teacher contexts, the student (fp32 masters) and the per-step draw / target / loss."""

    def __init__(self, pipe, student: Student, prompts: list[str], edit_pairs=(), *, size=(64, 64),
                 shift: float = 3.0, seed: int = 0, latents=None):
        if not prompts and not edit_pairs:
            raise ValueError("CFG distillation needs at least one prompt or (image, instruction) pair")
        self.pipe, self.model, self.student, self.shift, self.seed = pipe, pipe.model, student, float(shift), seed
        self.latents = latents
        h, w = pipe._check_size(*size)
        self.items = [("t2i", pipe.build_contexts([p]), h, w) for p in prompts]
        for img, text in edit_pairs:
            ctxs = pipe.build_contexts([img, text], generator=torch.Generator().manual_seed(seed))
            eh, ew = pipe._check_size(*ctxs.image_shapes)
            self.items.append(("edit", ctxs, eh, ew))

    def draw(self, rng, gen) -> Sample:
        task, ctxs, h, w = rng.choice(self.items)
        cfg = self.student.config
        s_txt = rng.uniform(*cfg.text_scale_range)
        s_img = rng.uniform(*cfg.img_scale_range) if task == "edit" else cfg.t2i_img_scale
        n = torch.randn((), generator=gen).item()
        t = float(shift_timesteps(1 / (1 + math.exp(-n)), self.shift))
        shape = (h * w, self.pipe.config.patch_latent_dim)
        x0 = torch.randn(shape, generator=gen) if self.latents is None else self.latents(h, w, gen)
        eps = torch.randn(shape, generator=gen)
        return Sample(task, ctxs, h, w, t, s_txt, s_img, ((1 - t) * x0 + t * eps).to(self.model.device))

    @torch.no_grad()
    def teacher(self, s: Sample) -> torch.Tensor:
        renorm = "text_channel" if s.task == "edit" else "global"
        cfg = CFGSettings(s.s_txt, s.s_img, (0.0, 1.0), renorm, 0.0)
        c = s.ctxs
        return guided_velocity(self.model, c.gen, c.cfg_text, c.cfg_img, s.x_t, s.t, s.h, s.w, cfg).float()

    def work(self, s: Sample):
        target = self.teacher(s)

        def fn(extra):
            return F.mse_loss(velocity_with_grad(self.model, s.ctxs.gen, s.x_t, s.t, s.h, s.w, extra), target)
        return (s.s_txt, s.s_img), fn

    @torch.no_grad()
    def evaluate(self, samples: list[Sample], targets: list[torch.Tensor]) -> float:
        total = 0.0
        for s, y in zip(samples, targets):
            reps, extra = self.student((s.s_txt,), (s.s_img,))
            with installed(self.model, reps):
                total += float(F.mse_loss(velocity_with_grad(self.model, s.ctxs.gen, s.x_t, s.t, s.h, s.w,
                                                             extra), y))
        return total / len(samples)


def distill(pipe, prompts: list[str], *, steps: int = 100, lr: float = 1e-4, train_keys: str = "all",
            edit_pairs=(), size=(64, 64), shift: float = 3.0, seed: int = 0, eval_samples: int = 4,
            schedule: str = "teacher", num_timesteps: int = 50, batch: int = 1, out: str | None = None,
            dist_: Dist | None = None, checkpointing: bool = False, save_every: int = 0, eval_every: int = 0,
            resume: bool = True, stop_after: int | None = None, save_dtype=None):
    """Run CFG distillation; returns ``(expert, report)`` with ``report = {"losses", "eval_before", "eval_after"}``.

    ``out``: with it, the state is saved in ``<out>.state/`` (resumable) and the expert written to ``out``.
    """
    dist_ = dist_ or Dist()
    grid = get_schedule(schedule, num_timesteps=num_timesteps, shift=shift)
    model = pipe.model
    student = Student.fresh(model, select_keys(model, train_keys), nfe=grid.nfe, schedule=schedule,
                            timesteps=tuple(grid.timesteps.tolist()),
                            shift=float(getattr(grid, "shift", shift)), base_name=str(pipe.path or ""))
    d = CFGDistiller(pipe, student, prompts, edit_pairs, size=size, shift=shift, seed=seed)
    rng, gen = step_rng(seed, -1)
    held = [d.draw(rng, gen) for _ in range(eval_samples)]
    targets = [d.teacher(s) for s in held]
    ddp = dist_.wrap(student)
    opt = make_optimizer(student.parameters(), lr, dist_)
    loop = Loop(out or "", steps, {"student": student}, {"opt": opt}, dist_, "heldout_loss", eval_every,
                save_every if out else 0, resume and out is not None, stop_after)
    before = d.evaluate(held, targets)

    def step(i):
        rng, gen = step_rng(seed, i)
        draws = [d.draw(rng, gen) for _ in range(batch)]
        with frozen(model):
            works = [d.work(s) for s in dist_.share(draws)]
            loss = accumulate(ddp, model, works, dist_, batch,
                              checkpointing)
        optimizer_step(opt, student.parameters(), grad_clip=None)
        return loss

    hist = loop.run(step, (lambda: d.evaluate(held, targets)) if eval_every else None)
    report = {"losses": hist["loss"], "eval_before": before, "eval_after": d.evaluate(held, targets)}
    expert = student.export(save_dtype, stages=("cfg_distillation",))
    if out and dist_.main and stop_after is None:
        expert.save(out)
    return expert, report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hyperbagel_core.training.stage1_cfg",
                                 description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--prompt", action="append", default=[], help="training prompt (repeatable)")
    ap.add_argument("--prompts-file", help="text file, one prompt per line")
    ap.add_argument("--edit-pairs", help='edits for the CFG-free editor: a JSONL of {"image": path, '
                                         '"instruction": text} lines')
    ap.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    ap.add_argument("--shift", type=float, default=3.0, help="training timestep shift (paper: >= 3)")
    ap.add_argument("--schedule", default="teacher", help="grid the expert is meant for (stored in the file)")
    ap.add_argument("--num-timesteps", type=int, default=50)
    ap.add_argument("--eval-samples", type=int, default=4)
    a = ap.parse_args(argv)
    from ..loading import resolve_dtype
    dist_ = init_distributed(a.distributed, a.shard)
    edits = read_edit_pairs(a.edit_pairs) if a.edit_pairs else []
    prompts = read_prompts(a.prompt, a.prompts_file)
    if not prompts and not edits:
        raise SystemExit("give training prompts (--prompt/--prompts-file) and/or edit pairs (--edit-pairs)")
    pipe = load_pipe(a)
    expert, rep = distill(pipe, prompts, edit_pairs=[(open_rgb(e.image), e.instruction) for e in edits],
                          steps=a.steps, lr=a.lr,
                          train_keys=a.train_keys, size=tuple(a.size), shift=a.shift, seed=a.seed,
                          schedule=a.schedule, num_timesteps=a.num_timesteps, batch=a.batch, out=a.out, dist_=dist_,
                          checkpointing=a.checkpointing, save_every=a.save_every, eval_every=a.eval_every,
                          resume=not a.no_resume, stop_after=a.stop_after, eval_samples=a.eval_samples,
                          save_dtype=resolve_dtype(a.save_dtype) if a.save_dtype else None)
    write_report(a.report, rep, dist_)
    if dist_.main:
        print(f"held-out loss {rep['eval_before']:.6f} -> {rep['eval_after']:.6f}; wrote {a.out}")


if __name__ == "__main__":
    main()
