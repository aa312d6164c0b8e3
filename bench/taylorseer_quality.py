"""TaylorSeer's quality against network passes, on a teacher whose velocity field means something (issue 20).

The target is the flow-trained teacher of ``bench/flow_teacher.py`` (the tiny checkpoint's generation side trained
as a rectified flow on synthetic two-mode latents; docs/TRAINING.md, block C2). Held-out prompts
(``training_prompts/held.txt``) and noises (the held-out noise domain of ``training.teacher``), text to image at
64² with the pipeline's text-to-image CFG (text scale 4, interval (0.4, 1], global renorm), every sample made by
``BagelPipeline.generate`` (what the nodes call):

  * the 50-step teacher (49 Euler steps): the reference; and with TaylorSeer (the official settings);
  * every training-free solver (euler, heun, unipc, dpmpp_2m, shift 3) at a range of evaluation budgets;
  * solver + TaylorSeer (official settings, and other settings) on longer grids;
  * solver + the adaptive cache (``cache="adaptive"``: full steps decided by the input's change; beyond the
    official) at its default threshold and two others.

Cost = branch passes computed: each CFG branch's run of the decoder stack counts one (a predicted branch pass
counts zero; outside the CFG interval a step has one branch). Counted on the model, for every configuration.
Metrics: paired MSE of the final latent against the 50-step reference of the same noise, and the unpaired
Fréchet distance (``training.evaluation.frechet_distance``) of the latent patch tokens against the 50-step teacher's
samples of the same prompts from a disjoint noise set (the floor: the teacher against itself on the two sets).
The report says which configuration wins at each pass budget (the best MSE among those within the budget).

    python3 bench/flow_teacher.py --work /tmp/flow --steps 8000          # the teacher (5-10 min, once)
    python3 bench/taylorseer_quality.py --model /tmp/flow/teacher --out q.json [--noises 32] [--tiny]
        [--families solver,solver+taylorseer,...]   # only some configurations (the reference always runs)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hyperbagel_core.image import pack_latent  # noqa: E402
from hyperbagel_core.pipeline import BagelPipeline  # noqa: E402
from hyperbagel_core.sampling.solvers import grid_for_budget  # noqa: E402
from hyperbagel_core.training.data import read_prompts  # noqa: E402
from hyperbagel_core.training.evaluation import frechet_distance, latent_mse  # noqa: E402
from hyperbagel_core.training.teacher import HELD_OUT_DOMAIN, REFERENCE_DOMAIN, domain_generator  # noqa: E402

PROMPTS = Path(__file__).parent / "training_prompts" / "held.txt"
METHODS = ("euler", "heun", "unipc", "dpmpp_2m")
CFG = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global")


class PassCounter:
    """Counts the batch rows (CFG branches) that run the decoder stack, cached path or not."""

    def __init__(self, model):
        self.model, self.rows = model, 0
        real = model._decode_query

        def counted(q, ctxs, *a, **k):
            self.rows += len(ctxs)
            return real(q, ctxs, *a, **k)
        model._decode_query = counted

    def take(self) -> int:
        n, self.rows = self.rows, 0
        return n


def sample_set(pipe, counter, items, size, **kw) -> tuple[torch.Tensor, float, dict]:
    """Final latent tokens [N, h*w, 64] of every (prompt, noise) item; mean branch passes per item; stats."""
    outs, passes, stats = [], 0, {}
    for prompt, noise in items:
        res = pipe.generate(prompt, height=size, width=size, init_noise=noise, **CFG, **kw)
        outs.append(pack_latent(res.latent[0].float(), pipe.config.latent_patch_size))
        passes += counter.take()
        stats = res.stats
    return torch.stack(outs), passes / len(items), stats


def configurations(budgets, ts_steps, custom, custom_steps=(), adaptive_steps=(), thresholds=()) -> list[dict]:
    """(label, generate kwargs): solvers at evaluation budgets, solvers + TaylorSeer on longer grids."""
    out = []
    for m in METHODS:
        for b in budgets:
            if m == "heun":    # the pipeline's Heun ends with a plain Euler step: odd evaluation counts only
                b = b - 1 + b % 2
            grid, _ = grid_for_budget(m, b, 3.0)
            kw = dict(schedule="custom", timesteps=grid.tolist(), timestep_shift=1.0, solver=m)
            out.append(dict(label=f"{m} {b} eval", family="solver", kw=kw))
        for n in ts_steps:
            grid, _ = grid_for_budget("euler", n, 3.0)
            kw = dict(schedule="custom", timesteps=grid.tolist(), timestep_shift=1.0, solver=m)
            out.append(dict(label=f"{m} {n} steps + taylorseer", family="solver+taylorseer",
                            kw=dict(kw, cache="taylorseer")))
            for name, settings in custom.items():
                if n not in custom_steps or m not in ("euler", "unipc"):
                    continue
                out.append(dict(label=f"{m} {n} steps + taylorseer({name})", family="solver+taylorseer(custom)",
                                kw=dict(kw, cache=settings)))
            for ft in (2, 4):          # the official schedule with other intervals: adaptive's equal-pass rivals
                if (m, n) in (("euler", 49), ("unipc", 20)):
                    out.append(dict(label=f"{m} {n} steps + taylorseer(interval {ft})",
                                    family="solver+taylorseer(interval)", kw=dict(kw, cache={"fresh_threshold": ft})))
        for n in adaptive_steps:
            grid, _ = grid_for_budget("euler", n, 3.0)
            kw = dict(schedule="custom", timesteps=grid.tolist(), timestep_shift=1.0, solver=m)
            out.append(dict(label=f"{m} {n} steps + adaptive", family="solver+adaptive", kw=dict(kw, cache="adaptive")))
            for d in thresholds:
                if m in ("euler", "unipc") and n in (20, 49):
                    out.append(dict(label=f"{m} {n} steps + adaptive({d:g})", family="solver+adaptive(custom)",
                                    kw=dict(kw, cache={"change_threshold": d})))
    return out


def winners(rows: list[dict], budgets) -> list[dict]:
    """At each budget: the best (lowest MSE) configuration of each family within it, and the overall winner."""
    table = []
    for b in budgets:
        line = {"budget": b}
        for fam in sorted({r["family"] for r in rows}):
            ok = [r for r in rows if r["family"] == fam and r["passes"] <= b + 1e-9]
            if ok:
                best = min(ok, key=lambda r: r["mse"])
                line[fam] = {k: best[k] for k in ("label", "passes", "mse", "frechet")}
        fams = [f for f in line if f != "budget"]
        if fams:
            line["winner"] = min(fams, key=lambda f: line[f]["mse"])
        table.append(line)
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the flow teacher folder (bench/flow_teacher.py WORK/teacher)")
    ap.add_argument("--prompts-file", default=str(PROMPTS))
    ap.add_argument("--noises", type=int, default=32, help="held-out noises per prompt")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="smoke run: 2 noises, 2 budgets")
    ap.add_argument("--families", default=None, help="comma-separated families to run (default: all)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    t0 = time.time()
    pipe = BagelPipeline.from_pretrained(a.model, device="cpu", dtype=torch.float32)
    counter = PassCounter(pipe.model)
    prompts = read_prompts([], a.prompts_file)
    noises = 2 if a.tiny else a.noises
    n_tok = (a.size // pipe.config.latent_downsample) ** 2
    shape = (n_tok, pipe.config.patch_latent_dim)
    held, ref_gen = (domain_generator(a.seed, d) for d in (HELD_OUT_DOMAIN, REFERENCE_DOMAIN))
    items = [(p, torch.randn(shape, generator=held)) for p in prompts for _ in range(noises)]
    other = [(p, torch.randn(shape, generator=ref_gen)) for p in prompts for _ in range(noises)]
    budgets = (6, 12) if a.tiny else (4, 6, 8, 10, 12, 15, 19, 25, 33)
    ts_steps = (12,) if a.tiny else (8, 12, 16, 20, 26, 35, 49)
    custom = {} if a.tiny else {"warmup 3, interval 2, order 2": dict(first_enhance=3, fresh_threshold=2,
                                                                       max_order=2)}
    teacher = dict(num_timesteps=50, timestep_shift=3.0)
    ref, ref_passes, _ = sample_set(pipe, counter, items, a.size, **teacher)
    ref_other, _, _ = sample_set(pipe, counter, other, a.size, **teacher)
    tokens = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    floor = frechet_distance(tokens(ref), tokens(ref_other))
    print(f"reference: 50-step teacher, {ref_passes:.1f} branch passes; Fréchet floor {floor:.4f} "
          f"({len(items)} items)", flush=True)
    rows = [dict(label="teacher 49 steps (reference)", family="teacher", passes=ref_passes, mse=0.0,
                 frechet=frechet_distance(tokens(ref), tokens(ref_other)))]
    configs = [dict(label="teacher 49 steps + taylorseer", family="teacher+taylorseer",
                    kw=dict(teacher, cache="taylorseer")),
               dict(label="teacher 49 steps + adaptive", family="teacher+adaptive", kw=dict(teacher, cache="adaptive"))]
    configs += configurations(budgets, ts_steps, custom, (12, 20, 35), (12,) if a.tiny else (12, 20, 35, 49),
                              () if a.tiny else (0.05, 0.2))
    if a.families:
        configs = [c for c in configs if c["family"] in a.families.split(",")]
    for cfg in configs:
        x, passes, stats = sample_set(pipe, counter, items, a.size, **cfg["kw"])
        row = dict(label=cfg["label"], family=cfg["family"], passes=passes,
                   mse=latent_mse(x, ref), frechet=frechet_distance(tokens(x), tokens(ref_other)),
                   evaluations=stats.get("evaluations"), predicted=stats.get("predicted", 0))
        rows.append(row)
        print(f"{row['label']:>48}: {passes:6.1f} passes  MSE {row['mse']:.5f}  FD {row['frechet']:.4f}", flush=True)
    # each cached configuration's passes (and the reference's) as a budget: who wins at equal passes
    table = winners(rows, sorted({r["passes"] for r in rows if r["family"] != "solver"}))
    res = dict(model=a.model, items=len(items), prompts=prompts, noises=noises, size=a.size, cfg=CFG,
               frechet_floor=floor, reference_passes=ref_passes, rows=rows, winners=table,
               seconds=time.time() - t0, torch=torch.__version__, threads=a.threads,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    for line in table:
        print(json.dumps(line), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
