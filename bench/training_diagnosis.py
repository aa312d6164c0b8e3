"""Diagnosis runs behind docs/TRAINING.md "Why targets A and C are not met" (CPU, one thread).

    python3 bench/training_diagnosis.py overfit --model DIR --scale 1 --steps 200
    python3 bench/training_diagnosis.py fit --model DIR --scale 4 --pool 64 --steps 1500 [--held FILE]
    python3 bench/training_diagnosis.py fd --model DIR --noises 16 [--seeds 100 200] EXPERT.safetensors ...

overfit: can the TSCD student fit ONE prompt + noise (its 6 segment starts)? An optimisation or target bug
         would show here. fit: a TSCD run at one fixed text scale that reports the student's error on its own
         training pool and on held-out items (the fitting vs generalisation split). fd: the noise floor of the
         Fréchet distance (teacher vs teacher on disjoint noises) next to experts' paired and unpaired distances.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hyperbagel_core.distill.expert import load_distilled_expert  # noqa: E402
from hyperbagel_core.pipeline import BagelPipeline  # noqa: E402
from hyperbagel_core.sampling.schedules import get_schedule  # noqa: E402
from hyperbagel_core.training import tscd as T  # noqa: E402
from hyperbagel_core.training.distributed import Dist, make_optimizer  # noqa: E402
from hyperbagel_core.training.evaluation import frechet_distance, latent_mse, training_free_errors  # noqa: E402
from hyperbagel_core.training.loop import accumulate, lr_at, optimizer_step  # noqa: E402
from hyperbagel_core.training.student import Student, frozen, student_sample, train_keys  # noqa: E402
from hyperbagel_core.training.teacher import Teacher, heldout_items  # noqa: E402

PROMPTS = Path(__file__).parent / "training_prompts"


def lines(path) -> list[str]:
    return [ln.strip() for ln in open(path, encoding="utf-8") if ln.strip()]


def train(job, student, model, steps, lr, batch, report):
    opt = make_optimizer(student.parameters(), lr, Dist())
    t0 = time.time()
    for i in range(steps):
        rng = random.Random(i)
        draws = [job.draw(rng, job.stage_of(i, steps)) for _ in range(batch)]
        with frozen(model):
            loss = accumulate(student, model, [job.loss_fn(d) for d in draws], Dist(), batch)
        optimizer_step(opt, student.parameters(), lr=lr_at(lr, i, steps, steps // 20))
        if (i + 1) % max(1, steps // 4) == 0:
            with torch.no_grad():
                print(f"step {i + 1} loss {loss:.3g} {report()} ({time.time() - t0:.0f} s)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["overfit", "fit", "fd"])
    ap.add_argument("experts", nargs="*", help="fd: distilled-expert files to compare")
    ap.add_argument("--model", required=True)
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--pool", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--start-weight", type=float, default=1.0)
    ap.add_argument("--held", default=str(PROMPTS / "held.txt"))
    ap.add_argument("--noises", type=int, default=16, help="fd: noises per held-out prompt and set")
    ap.add_argument("--seeds", type=int, nargs=2, default=(100, 200), metavar=("X", "Y"),
                    help="fd: noise seeds of the teacher-only set X and of the set Y the experts sample")
    a = ap.parse_intermixed_args(argv)
    torch.set_num_threads(1)
    pipe = BagelPipeline.from_pretrained(a.model, device="cpu", dtype=torch.float32)
    model, teacher = pipe.model, Teacher(pipe, (128, 128))
    grid = get_schedule("hyper-6nfe").timesteps
    if a.what == "fd":
        held = lines(a.held)
        items_x = heldout_items(teacher, held, a.noises, a.scale, a.seeds[0])
        x = torch.cat([teacher.reference(it) for it in items_x])
        items_y = heldout_items(teacher, held, a.noises, a.scale, a.seeds[1])
        y = torch.cat([teacher.reference(it) for it in items_y])
        print(f"{len(items_y)} items per set; teacher vs teacher (disjoint noises): {frechet_distance(x, y):.4f}")
        for p in a.experts:
            s = Student(model, load_distilled_expert(p, model))
            o = torch.cat([student_sample(s, model, it, grid) for it in items_y])
            print(f"{p}: unpaired (vs other noises) {frechet_distance(o, x):.4f}, "
                  f"paired (same noises) {frechet_distance(o, y):.4f}")
        return
    student = Student.fresh(model, train_keys(model, "all"), nfe=6, stages=())
    train_prompts = lines(PROMPTS / "train.txt")
    if a.what == "overfit":
        job = T.TSCD(pipe, teacher, student, train_prompts[:1], segments=(6,), pool=1,
                     scale_range=(a.scale, a.scale), start_weight=1.0)
        it, end = job.items[0], job.trajs[0][-1]
        assert torch.equal(end, teacher.reference(it)), "segment targets must end at the evaluation reference"
        print(f"step 0 MSE {latent_mse(student_sample(student, model, it, grid), end):.3g}")
        train(job, student, model, a.steps, a.lr, a.batch,
              lambda: f"6-NFE sample MSE {latent_mse(student_sample(student, model, it, grid), end):.3g}")
        return
    job = T.TSCD(pipe, teacher, student, train_prompts, segments=(6,), pool=a.pool,
                 scale_range=(a.scale, a.scale), start_weight=a.start_weight)
    held = heldout_items(teacher, lines(a.held), 2, a.scale, 0)
    refs = [teacher.reference(it) for it in held]
    for unit in ("passes", "evaluations"):
        best = min(training_free_errors(teacher, held, refs, 6, unit=unit).items(), key=lambda kv: kv[1])
        print(f"best training-free solver within 6 {unit} on the held-out items: {best[0]} {best[1]:.3g}")
    k = min(8, a.pool)

    def report():
        pool = sum(latent_mse(student_sample(student, model, it, grid), job.trajs[n][-1])
                   for n, it in enumerate(job.items[:k])) / k
        return f"training-pool MSE {pool:.3g} held-out MSE {job.evaluate(held, refs):.3g}"
    train(job, student, model, a.steps, a.lr, a.batch, report)


if __name__ == "__main__":
    main()
