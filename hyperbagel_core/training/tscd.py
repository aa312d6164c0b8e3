"""Stage 2 of Hyper-Bagel: TSCD, trajectory-segmented consistency distillation (hyper-bagel.md 2.3).

The time axis is cut into K segments ``b_0 = 1 > b_1 > ... > b_K = 0`` (the expert's grid reading: uniform
for ``hyper-6nfe``, shifted for ``hyper-6nfe-shift3``). From any point ``x_t`` of the teacher's guided ODE
trajectory inside segment j, one student step must land where the teacher's ODE lands at the segment's end:

    x_t - v_student(x_t, t; s_txt) * (t - b_{j+1})  ~  ODE_teacher(x_t, t -> b_{j+1})

i.e. the student predicts the segment's mean velocity (one pass, no CFG: the guidance scale enters through
the stage-1 embedders). The segment count falls stage by stage (``--segments 12,6``: half the steps with 12
segments, then 6 = the 6-NFE grid), Hyper-SD's progressive schedule, ending on the inference grid: each of
the 6 inference steps then starts at a segment start and ends at its end.

Items are text-to-image prompts and, with ``--edit-pairs``, edits (docs/TRAINING.md: the teacher of an edit is
``BagelPipeline.edit``'s dual CFG). Targets: the 50-step teacher's own Euler path (the evaluation reference), read at the segment boundaries
by linear interpolation (exact: Euler moves on straight lines within a step), computed once for a pool of
(prompt, noise, text scale) items (``--pool``); training points are the segment starts (the points the
sampler evaluates) and, with ``--start-weight`` below 1, that path's grid points inside the segments.
The consistency target with the skip equal to the rest of the segment is the teacher's own segment end,
so no target network is needed.
Where the paper is silent or differs, see docs/TRAINING.md (loss: MSE on the segment end, the paper used a
pure adversarial loss; the adversarial objective lives in stage 4 here).

    python -m hyperbagel_core.training.tscd --model DIR --out six.safetensors --prompts-file p.txt \\
        --eval-prompts-file held.txt --steps 2000 [--edit-pairs edits.jsonl --eval-edit-pairs held.jsonl]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from ..sampling.schedules import get_schedule, shift_timesteps
from .cli import add_common_args, add_distill_args, distill_setup, write_report
from .distributed import init_distributed, make_optimizer, shard_report
from .evaluation import latent_mse, task_means, training_free_errors
from .loop import Loop, accumulate, lr_at, optimizer_step, step_rng
from .student import EMA, Student, frozen, student_from_file, student_sample, train_keys, velocity_with_grad
from .teacher import Teacher, index_of, merged_grid, path_at


def segment_bounds(k: int, shift: float) -> torch.Tensor:
    return shift_timesteps(torch.linspace(1, 0, int(k) + 1, dtype=torch.float32), float(shift))


class TSCD:
    """Pool of teacher trajectories + the per-step draw and loss."""

    def __init__(self, pipe, teacher: Teacher, student: Student, conds: list, *, segments=(12, 6),
                 schedule: str = "hyper-6nfe", pool: int = 32, scale_range=(1.0, 5.0), seed: int = 0,
                 start_weight: float = 1.0, img_scale_range=(1.0, 2.5)):
        self.pipe, self.model, self.teacher, self.student = pipe, pipe.model, teacher, student
        sched = get_schedule(schedule)
        self.grid = sched.timesteps.float()
        self.shift = float(getattr(sched, "shift", 1.0))
        self.segments = tuple(int(s) for s in segments)
        if self.segments[-1] != self.grid.numel() - 1:
            raise ValueError(f"the last stage must have {self.grid.numel() - 1} segments (the {schedule} grid), "
                             f"got --segments {','.join(map(str, self.segments))}")
        self.bounds = [segment_bounds(k, self.shift) for k in self.segments]
        # the times a draw can reach: the segment boundaries, and with start_weight < 1 the reference grid too
        # (at start_weight 1 a pool item then holds 13 latents instead of ~60: a pool of 4096 at 128² fits in 1 GB)
        inside = (teacher.reference_grid(),) if start_weight < 1 else ()
        self.fine = merged_grid(*inside, *self.bounds)
        self.start_weight = start_weight
        gen = torch.Generator().manual_seed(int(seed))
        rng = step_rng(seed, -1)[0]
        self.items = [teacher.draw(conds, rng, gen, scale_range, img_scale_range) for _ in range(pool)]
        ref = teacher.reference_grid()
        self.trajs = [path_at(teacher.trajectory(it, ref), ref, self.fine) for it in self.items]

    def stage_of(self, step: int, total: int) -> int:
        return min(len(self.segments) - 1, step * len(self.segments) // max(1, total))

    def draw(self, rng, stage: int):
        """(item index, t index on the fine grid, segment-end index)."""
        b = self.bounds[stage]
        j = rng.randrange(b.numel() - 1)
        i0, i1 = index_of(self.fine, b[j]), index_of(self.fine, b[j + 1])
        p = i0 if rng.random() < self.start_weight else rng.randrange(i0, i1)
        return rng.randrange(len(self.items)), p, i1

    def loss_fn(self, draw):
        n, p, e = draw
        it, tr = self.items[n], self.trajs[n]
        t, s = float(self.fine[p]), float(self.fine[e])
        x_t, target_v = tr[p], (tr[p] - tr[e]) / (t - s)   # the segment's mean velocity

        def fn(extra):
            v = velocity_with_grad(self.model, it.ctxs.gen, x_t, t, it.h, it.w, extra)
            return F.mse_loss(v, target_v)
        return it.scales, fn

    @torch.no_grad()
    def evaluate(self, held: list, refs: list, per_item: bool = False):
        errs = [latent_mse(student_sample(self.student, self.model, it, self.grid), r) for it, r in zip(held, refs)]
        return errs if per_item else sum(errs) / len(errs)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m hyperbagel_core.training.tscd", description=__doc__.split("\n")[0])
    add_common_args(ap)
    add_distill_args(ap)
    ap.add_argument("--segments", default="12,6", help="segment counts per stage, ending at the grid's NFE")
    ap.add_argument("--schedule", default="hyper-6nfe", choices=["hyper-6nfe", "hyper-6nfe-shift3"])
    ap.add_argument("--pool", type=int, default=64, help="teacher trajectories computed up front")
    ap.add_argument("--start-weight", type=float, default=1.0,
                    help="share of draws at a segment start (the points the sampler evaluates); the rest are "
                         "inside segments (docs/TRAINING.md: on the tiny model 0.5 leaves a 2.5x higher floor)")
    ap.add_argument("--ema", type=float, default=None, metavar="DECAY",
                    help="keep an exponential moving average of the masters (e.g. 0.999); the held-out metric "
                         "and the written expert use it")
    a = ap.parse_args(argv)
    dist_ = init_distributed(a.distributed, a.shard)
    pipe, teacher, conds, held = distill_setup(a)
    model = pipe.model
    grid = get_schedule(a.schedule).timesteps
    student = student_from_file(model, a.init, train_keys(model, a.train_keys), nfe=grid.numel() - 1,
                                schedule=a.schedule, timesteps=tuple(grid.tolist()),
                                shift=float(get_schedule(a.schedule).shift), base_name=str(a.model))
    t0 = time.perf_counter()
    job = TSCD(pipe, teacher, student, conds, segments=[int(s) for s in a.segments.split(",")],
               schedule=a.schedule, pool=a.pool, scale_range=tuple(a.scale_range), seed=a.seed,
               start_weight=a.start_weight, img_scale_range=tuple(a.img_scale_range))
    if dist_.main:   # the pool's 50-step teacher runs are a large share of a run's time (docs/TRAINING.md)
        print(f"pool: {a.pool} teacher trajectories of {len(set((it.prompt, it.image) for it in job.items))} "
              f"conditions in {time.perf_counter() - t0:.0f} s", flush=True)
    refs = [teacher.reference(it) for it in held]
    ddp = dist_.wrap(student)
    opt = make_optimizer(student.parameters(), a.lr, dist_)
    ema = EMA(student, a.ema) if a.ema is not None else None   # after wrap: under --shard full, per shard
    modules = {"student": student, **({"ema": ema} if ema is not None else {})}
    loop = Loop(a.out, a.steps, modules, {"opt": opt}, dist_, "heldout_mse", a.eval_every,
                a.save_every, not a.no_resume, a.stop_after)
    weights = (lambda: ema.applied(student)) if ema is not None else contextlib.nullcontext

    def step(i):
        rng, _ = step_rng(a.seed, i)
        stage = job.stage_of(i, a.steps)
        draws = [job.draw(rng, stage) for _ in range(a.batch)]
        with frozen(model):
            loss = accumulate(ddp, model, [job.loss_fn(d) for d in dist_.share(draws)], dist_, a.batch,
                              a.checkpointing)
        optimizer_step(opt, student.parameters(), lr=lr_at(a.lr, i, a.steps, a.steps // 20))
        if ema is not None:
            ema.update(student)
        return loss

    def evaluate():
        with weights():
            return job.evaluate(held, refs)

    hist = loop.run(step, evaluate)
    report = {"history": hist, "shards": shard_report(student, opt, dist_)}
    if dist_.main:
        print("trained bytes held per rank (fp32 masters / AdamW state): " + ", ".join(
            f"rank {r['rank']} {r['master_bytes']} / {r['optimizer_bytes']}" for r in report["shards"]["ranks"])
            + f" of {report['shards']['master_bytes_total']} master bytes")
    if loop.stop_after is None:
        from ..loading import resolve_dtype
        with weights():
            expert = student.export(resolve_dtype(a.save_dtype) if a.save_dtype else None,   # every rank: a gather
                                    stages=tuple(student.config.stages) + ("tscd",))
    if dist_.main and loop.stop_after is None:
        expert.save(a.out)
        nfe = grid.numel() - 1  # the student's passes: one per step
        per_item = training_free_errors(teacher, held, refs, nfe, unit="passes", per_item=True)
        report["training_free"] = {k: sum(v) / len(v) for k, v in per_item.items()}
        report["training_free_evaluations"] = training_free_errors(teacher, held, refs, nfe)
        report["student"] = hist["metric"][-1][1]
        if any(it.task == "edit" for it in held):   # each task against its own baselines (3 passes per edit CFG step)
            with weights():
                per_item["student"] = job.evaluate(held, refs, per_item=True)
            report["by_task"] = {}
            for task, means in task_means(held, per_item).items():
                err = means.pop("student")
                report["by_task"][task] = {"student": err, "training_free": means}
                best = min(means.items(), key=lambda kv: kv[1])
                print(f"{task}: student {err:.5g}; best training-free solver within {nfe} network passes: "
                      f"{best[0]} {best[1]:.5g}")
        for key, what in (("training_free", f"{nfe} network passes (equal NFE)"),
                          ("training_free_evaluations", f"{nfe} guided evaluations (up to "
                                                        f"{max(teacher.passes_at(it, 1.0) for it in held) * nfe} passes)")):
            best = min(report[key].items(), key=lambda kv: kv[1])
            print(f"held-out final-latent MSE vs the 50-step teacher: student {report['student']:.5g}; best "
                  f"training-free solver within {what}: {best[0]} {best[1]:.5g}")
        print(f"wrote {a.out}")
    write_report(a.report, report, dist_)
    return report


if __name__ == "__main__":
    main()
