"""Stage 3 of Hyper-Bagel: DMDO, distribution matching distillation with ODE pairs (hyper-bagel.md 2.4).

On top of the stage-2 (TSCD) 6-NFE expert. Each step, per item (prompt, noise x_T, text scale):
  1. the generator (the 6-NFE student) runs its own deterministic Euler ODE x_T -> ... -> x_0 (no grad);
  2. fake-model update: x_t = (1 - t) x_0 + t x_T, t ~ U(0, 1); the fake model (a second trainable copy of
     the generation expert, started from the base weights) regresses the pair's velocity x_T - x_0;
     The fake model starts from the stage-2 expert (the generator), so the first generator gradients are not
     dominated by the fake's misfit; ``--fake-warmup`` steps update the fake alone;
  3. generator update: a grid index k is drawn, the generator re-runs from x_{t_k} to x̂_0 WITH gradients;
     x̂_t' = (1 - t') x̂_0 + t' x_T, t' ~ U(0.02, 0.98); the real score is the teacher's guided velocity, the
     fake score the fake model's; in x0-prediction form x0_r = x̂_t' - t' v_real, x0_f = x̂_t' - t' v_fake,
     and the DMD loss is 0.5 || x̂_0 - sg(x̂_0 - (x0_f - x0_r) / mean|x̂_0 - x0_r|) ||^2 (DMD's normalised
     gradient); no regulariser, as the paper says.
``--noise fresh`` interpolates with fresh noise instead of the trajectory's x_T in both updates (DMD's
marginal form: the fake then models the generator's marginal flow, which is what the teacher's velocity is
for its own distribution) [ours, an option; the paper's pairing is the default].
The distribution distance reported as the quality metric: the Fréchet distance between the 64-d latent patch
tokens of the student's 6-NFE samples on the held-out prompts and noises and the 50-step teacher's samples of the
same prompts from a disjoint set of noises (unpaired: a distance between distributions, not between matched
samples); its floor, the teacher against itself on the two noise sets, is in the report (``floor``), and the
paired distance and MSE (same noises) sit beside it.

    python -m hyperbagel_core.training.dmdo --model DIR --init six_tscd.safetensors --out six.safetensors \\
        --prompts-file p.txt --eval-prompts-file held.txt
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ..sampling.schedules import get_schedule
from .cli import add_common_args, add_distill_args, distill_setup, write_report
from .distributed import init_distributed, make_optimizer
from .evaluation import frechet_distance, latent_mse
from .loop import Loop, accumulate, lr_at, optimizer_step, step_rng
from .student import (Student, base_tensors, frozen, installed, student_from_file, student_sample, student_trajectory,
                      teacher_block, velocity_with_grad)
from .teacher import Item, Teacher, with_fresh_noises


class DMDO:
    def __init__(self, pipe, teacher: Teacher, generator: Student, fake: Student, conds: list,
                 grid: torch.Tensor, scale_range=(1.0, 5.0), t_range=(0.02, 0.98), img_scale_range=(1.0, 2.5)):
        self.pipe, self.model, self.teacher = pipe, pipe.model, teacher
        self.generator, self.fake, self.conds, self.grid = generator, fake, conds, grid
        self.scale_range, self.t_range, self.img_scale_range = tuple(scale_range), tuple(t_range), tuple(img_scale_range)
        self.base = base_tensors(self.model, sorted(set(generator.keys) | set(fake.keys)))

    def draw(self, rng, gen) -> Item:
        return self.teacher.draw(self.conds, rng, gen, self.scale_range, self.img_scale_range)

    def fake_work(self, it: Item, traj: torch.Tensor, t: float, noise: torch.Tensor | None = None):
        x0 = traj[-1]
        xT = traj[0] if noise is None else noise
        x_t, target = (1 - t) * x0 + t * xT, xT - x0

        def fn(extra):
            return F.mse_loss(velocity_with_grad(self.model, it.ctxs.gen, x_t, t, it.h, it.w, extra), target)
        return it.scales, fn

    @torch.no_grad()
    def scores(self, it: Item, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Real (teacher, guided) and fake velocities at x; base weights installed under any student block."""
        with teacher_block(self.model, self.base):
            v_real = self.teacher.velocity(it, x, t)
            reps, extra = self.fake(it.s_txt, it.s_img)
            with installed(self.model, reps):
                v_fake = velocity_with_grad(self.model, it.ctxs.gen, x, t, it.h, it.w, extra)
        return v_real, v_fake

    def generator_work(self, it: Item, traj: torch.Tensor, k: int, t: float, noise: torch.Tensor | None = None):
        xT = traj[0] if noise is None else noise

        def fn(extra):
            x = traj[k]
            for j in range(k, self.grid.numel() - 1):
                v = velocity_with_grad(self.model, it.ctxs.gen, x, float(self.grid[j]), it.h, it.w, extra)
                x = x - v * float(self.grid[j] - self.grid[j + 1])
            x0_hat = x
            with torch.no_grad():
                x_t = (1 - t) * x0_hat + t * xT
                v_real, v_fake = self.scores(it, x_t, t)
                x0_real, x0_fake = x_t - t * v_real, x_t - t * v_fake
                norm = (x0_hat - x0_real).abs().mean().clamp_min(1e-6)
                target = x0_hat - (x0_fake - x0_real) / norm
            return 0.5 * F.mse_loss(x0_hat, target)
        return it.scales, fn

    @torch.no_grad()
    def evaluate(self, held: list, refs: list, others: list) -> dict:
        """``refs``: the teacher's samples from the held-out noises; ``others``: from disjoint noises."""
        outs = torch.cat([student_sample(self.generator, self.model, it, self.grid) for it in held])
        mse = sum(latent_mse(o, r) for o, r in zip(outs.split([it.h * it.w for it in held]), refs)) / len(held)
        return {"frechet": frechet_distance(outs, torch.cat(others)),
                "frechet_paired": frechet_distance(outs, torch.cat(refs)), "mse": mse}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m hyperbagel_core.training.dmdo", description=__doc__.split("\n")[0])
    add_common_args(ap)
    add_distill_args(ap)
    ap.add_argument("--schedule", default="hyper-6nfe", choices=["hyper-6nfe", "hyper-6nfe-shift3"])
    ap.add_argument("--fake-lr", type=float, default=None, help="fake-model learning rate (default --lr)")
    ap.add_argument("--fake-updates", type=int, default=2, help="fake-model updates per generator update")
    ap.add_argument("--fake-warmup", type=int, default=20, help="first steps update the fake model only")
    ap.add_argument("--fake-init", default="generator", choices=["generator", "base"],
                    help="start the fake model at the stage-2 expert or at the base weights (DMD's choice: the "
                         "real model; exact when the teacher runs unguided, --scale-range 1 1)")
    ap.add_argument("--noise", default="pair", choices=["pair", "fresh"],
                    help="interpolate with the trajectory's own x_T (paper) or with fresh noise (DMD's marginal)")
    a = ap.parse_args(argv)
    if not a.init:
        ap.error("DMDO starts from the stage-2 expert: pass --init six_tscd.safetensors")
    dist_ = init_distributed(a.distributed, a.shard)
    pipe, teacher, conds, held = distill_setup(a)
    model = pipe.model
    grid = get_schedule(a.schedule).timesteps
    generator = student_from_file(model, a.init, None)
    fake = (student_from_file(model, a.init, None) if a.fake_init == "generator"
            else Student.fresh(model, generator.keys, seed=a.seed, text_scale_range=generator.config.text_scale_range,
                               img_scale_range=generator.config.img_scale_range))
    job = DMDO(pipe, teacher, generator, fake, conds, grid, tuple(a.scale_range),
               img_scale_range=tuple(a.img_scale_range))
    refs = [teacher.reference(it) for it in held]
    others = [teacher.reference(it) for it in with_fresh_noises(held, a.seed)]
    floor = frechet_distance(torch.cat(refs), torch.cat(others))
    g_ddp, f_ddp = dist_.wrap(generator), dist_.wrap(fake)
    g_opt = make_optimizer(generator.parameters(), a.lr, dist_)
    f_opt = make_optimizer(fake.parameters(), a.fake_lr or a.lr, dist_)
    evals = []

    def evaluate():
        r = job.evaluate(held, refs, others)
        evals.append(r)
        return r["frechet"]

    loop = Loop(a.out, a.steps, {"generator": generator, "fake": fake}, {"g": g_opt, "f": f_opt}, dist_,
                "frechet", a.eval_every, a.save_every, not a.no_resume, a.stop_after)

    def step(i):
        rng, gen = step_rng(a.seed, i)
        items = [job.draw(rng, gen) for _ in range(a.batch)]
        fake_ts = [[rng.random() for _ in items] for _ in range(a.fake_updates)]
        gen_draws = [(rng.randrange(grid.numel() - 1), rng.uniform(*job.t_range)) for _ in items]
        fresh = None if a.noise == "pair" else [[torch.randn(it.noise.shape, generator=gen).to(it.noise)
                                                for it in items] for _ in range(a.fake_updates + 1)]
        mine = dist_.share(list(range(len(items))))
        trajs = {n: student_trajectory(generator, model, items[n], grid) for n in mine}
        def noise(u, n):
            return None if fresh is None else fresh[u][n]
        with frozen(model):
            for u, ts in enumerate(fake_ts):
                f_loss = accumulate(f_ddp, model, [job.fake_work(items[n], trajs[n], ts[n], noise(u, n))
                                                   for n in mine], dist_, a.batch, a.checkpointing)
                optimizer_step(f_opt, fake.parameters())
            if i < a.fake_warmup:
                return f_loss
            works = [job.generator_work(items[n], trajs[n], *gen_draws[n], noise(-1, n)) for n in mine]
            # the generator's passes per item depend on its start step: casts made once per work, not per layer call
            loss = accumulate(g_ddp, model, works, dist_, a.batch, a.checkpointing, defer_layers=False)
        optimizer_step(g_opt, generator.parameters(), lr=lr_at(a.lr, i - a.fake_warmup, a.steps - a.fake_warmup))
        return loss

    hist = loop.run(step, evaluate)
    report = {"history": hist, "evals": evals, "floor": floor}
    if loop.stop_after is None:
        from ..loading import resolve_dtype
        expert = generator.export(resolve_dtype(a.save_dtype) if a.save_dtype else None,   # every rank: a gather
                                  stages=tuple(generator.config.stages) + ("dmdo",))
    if dist_.main and loop.stop_after is None:
        expert.save(a.out)
        m = hist["metric"]
        print(f"held-out Fréchet distance (latent patch tokens, unpaired) {m[0][1]:.5g} -> {m[-1][1]:.5g} "
              f"(teacher vs teacher: {floor:.5g}); wrote {a.out}")
    write_report(a.report, report, dist_)
    return report


if __name__ == "__main__":
    main()
