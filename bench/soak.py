"""Soak: many mixed runs in one process on a tiny checkpoint; memory must stay flat, outputs reproducible.

A seeded plan mixes answer (greedy, sampled, with images), speculative answer (prompt lookup, draft head),
generate (teacher Euler, training-free solvers, random sizes and settings), edit, and distilled generation;
some runs carry an injected fault: a bad argument (must raise ``InputError``), an interrupt (the callback
raises mid-run, as ComfyUI's Cancel does), a failed distilled-expert load (must raise ``CheckpointError`` and
keep the loaded expert), or an unload + reload of the expert. Resident memory (RSS, ``/proc/self/statm``) is
taken after every run (after ``gc.collect()``); the bound applies to the final RSS against the RSS after the
warm-up runs. Every successful run's output (answer token ids; image latent and uint8 pixels, hashed) is
then compared with a fresh process replaying the same inputs in reverse order, without the faults: bitwise,
since both processes run the same kernels on the same shapes, weights and thread count on one machine.

    python bench/soak.py --runs 200 --out soak.json          # the documented soak (docs/RELIABILITY.md)
    python bench/soak.py --runs 24 --edit-every 0 --replay 6  # a quick one
"""
from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hyperbagel_core.distill import DistilledExpert  # noqa: E402
from hyperbagel_core.errors import CheckpointError, InputError  # noqa: E402
from hyperbagel_core.pipeline import BagelPipeline  # noqa: E402
from hyperbagel_core.speculative import DraftHead, save_draft_head  # noqa: E402
from hyperbagel_core.testing import make_tiny_checkpoint  # noqa: E402

PROMPTS = ["a red fox in the snow", "a small house with a brown door", "two apples on a wooden table",
           "a mountain landscape with a river", "the cat sits on the mat"]
QUESTIONS = ["What is in this picture?", "Describe it in detail.", "What colour is it?", "Is there a dog?"]
EDITS = ["make it green", "add stars to the sky", "remove the person"]
BAD = {  # kind -> argument overrides that must be refused
    "answer": [{"temperature": float("nan"), "do_sample": True}, {"max_new_tokens": 2.5}, {"question": None},
               {"image": "photo.png"}],
    "generate": [{"cfg_text_scale": float("nan")}, {"height": 40}, {"width": None}, {"prompt": " "},
                 {"seed": -1}],
    "edit": [{"cfg_img_scale": float("inf")}, {"prompt": ""}],
}


class Interrupt(Exception):
    """What the callback raises to stop a run midway (ComfyUI raises its InterruptProcessingException)."""


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_assets(folder: Path) -> dict:
    """Tiny checkpoint, a draft head and a distilled expert (weights moved off the base) plus a broken file."""
    ckpt = folder / "tiny"
    if not (ckpt / "ema.safetensors").exists():
        make_tiny_checkpoint(ckpt, seed=0)
    pipe = BagelPipeline.from_pretrained(ckpt, dtype=torch.float32)
    head = save_draft_head(DraftHead.from_target(pipe.model, zero_init=False, seed=1), folder / "head",
                           pipe.model)
    expert = DistilledExpert.from_model(pipe.model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in list(expert.tensors.values()) + list(expert.guidance.parameters()):
            t.add_(0.02 * torch.randn(t.shape, generator=g))
    expert.save(folder / "expert.safetensors")
    data = (folder / "expert.safetensors").read_bytes()
    (folder / "broken.safetensors").write_bytes(data[: len(data) // 2])
    return dict(ckpt=str(ckpt), head=str(head), expert=str(folder / "expert.safetensors"),
                broken=str(folder / "broken.safetensors"))


def load(assets: dict) -> BagelPipeline:
    pipe = BagelPipeline.from_pretrained(assets["ckpt"], dtype=torch.float32, draft_head=assets["head"])
    pipe.load_distilled_expert(assets["expert"])
    return pipe


def plan(runs: int, seed: int, edit_every: int) -> list[dict]:
    """The mixed runs: kind, arguments, input image spec, fault. JSON-able so a fresh process can replay it."""
    rng = random.Random(seed)
    out = []
    for i in range(runs):
        if edit_every and i % edit_every == edit_every - 1:
            kind = "edit"
        else:
            kind = rng.choice(["answer", "answer", "spec", "generate", "generate", "distilled"])
        r = dict(i=i, kind=kind, fault=None, image=None)
        if kind in ("answer", "spec"):
            r["args"] = dict(question=rng.choice(QUESTIONS), max_new_tokens=rng.randint(2, 10),
                             do_sample=rng.random() < 0.3, temperature=round(rng.uniform(0.2, 1.2), 3),
                             seed=rng.randrange(2 ** 32))
            if kind == "spec":
                r["args"]["drafter"] = rng.choice(["prompt_lookup", "draft_head"])
                r["args"]["num_draft_tokens"] = rng.randint(0, 6)
            if rng.random() < 0.4:
                r["image"] = [rng.choice([16, 32, 48, 96]), rng.choice([16, 32, 64]), rng.randrange(1000)]
        elif kind == "edit":
            r["image"] = [32, 32, rng.randrange(1000)]
            r["args"] = dict(prompt=rng.choice(EDITS), num_timesteps=rng.randint(2, 3), seed=rng.randrange(2 ** 32),
                             cfg_text_scale=round(rng.uniform(1, 5), 2), cfg_img_scale=round(rng.uniform(1, 2.5), 2),
                             distilled=rng.random() < 0.5)
        else:
            r["args"] = dict(prompt=rng.choice(PROMPTS), height=16 * rng.randint(1, 6), width=16 * rng.randint(1, 6),
                             seed=rng.randrange(2 ** 32), cfg_text_scale=round(rng.uniform(1, 6), 2))
            if kind == "distilled":
                r["args"]["schedule"] = rng.choice(["hyper-1nfe", "hyper-6nfe", "hyper-6nfe-shift3"])
            else:
                r["args"].update(distilled=False, num_timesteps=rng.randint(2, 5),
                                 solver=rng.choice(["euler", "euler", "heun", "unipc", "dpmpp_2m"]),
                                 cfg_interval=rng.choice([(0.4, 1.0), (0.0, 1.0)]),
                                 cfg_renorm_type=rng.choice(["global", "channel", "text_channel"]),
                                 timestep_shift=rng.choice([1.0, 3.0]))
        u = rng.random()
        if u < 0.08 and kind in ("answer", "generate", "edit"):
            r["fault"], r["bad"] = "error", rng.choice(BAD[kind])
        elif u < 0.16:
            r["fault"], r["interrupt_at"] = "interrupt", 1
        elif u < 0.19:
            r["fault"] = "load_error"
        elif u < 0.21:
            r["fault"] = "reload"
        out.append(r)
    return out


def _image(spec) -> Image.Image:
    w, h, s = spec
    return Image.fromarray(np.random.default_rng(s).integers(0, 256, (h, w, 3), dtype=np.uint8))


def digest(res) -> str:
    if hasattr(res, "token_ids"):
        return "tokens:" + ",".join(map(str, res.token_ids))
    h = hashlib.sha256(res.latent.float().contiguous().numpy().tobytes())
    h.update(res.image_u8.numpy().tobytes())
    return "image:" + h.hexdigest()[:32]


def run_one(pipe: BagelPipeline, r: dict, assets: dict, faults: bool = True) -> str:
    """Execute one planned run; returns its outcome (output digest, or the fault's result)."""
    fault = r["fault"] if faults else None
    if fault == "load_error":
        before = pipe.distilled_expert
        try:
            pipe.load_distilled_expert(assets["broken"])
        except CheckpointError:
            assert pipe.distilled_expert is before, "a failed load dropped the loaded expert"
            return "load_error: refused, expert kept"
        raise AssertionError("a broken expert file was accepted")
    if fault == "reload":
        pipe.unload_distilled_expert()
        pipe.load_distilled_expert(assets["expert"])
    args = dict(r["args"])
    if fault == "error":
        args.update(r["bad"])
    if fault == "interrupt":
        def callback(step, total, at=r["interrupt_at"]):
            if step >= at:
                raise Interrupt()
        args["callback"] = callback
    img = _image(r["image"]) if r["image"] else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # scales clamped to the expert's range, few-step grid notes
            if r["kind"] in ("answer", "spec"):
                image = args.pop("image", img)
                res = pipe.answer(image, args.pop("question"), **args)
            elif r["kind"] == "edit":
                res = pipe.edit(img, args.pop("prompt"), **args)
            else:
                res = pipe.generate(args.pop("prompt"), **args)
    except InputError as e:
        if fault == "error":
            return "error: " + str(e)[:80]
        raise
    except Interrupt:
        if fault == "interrupt":
            return "interrupted"
        raise
    if fault == "error":
        raise AssertionError(f"run {r['i']}: the bad argument {r['bad']} was accepted")
    # an answer can end (stop token) before its first callback: the interrupt never came
    return ("finished before the interrupt: " if fault == "interrupt" else "") + digest(res)


def soak(runs: int, seed: int, assets: dict, warmup: int, edit_every: int, log=print) -> dict:
    torch.manual_seed(0)
    pipe = load(assets)
    runs_plan = plan(runs, seed, edit_every)
    outcomes, rss, t0 = [], [], time.perf_counter()
    for r in runs_plan:
        outcomes.append(run_one(pipe, r, assets))
        gc.collect()
        rss.append(rss_bytes())
        if log and (r["i"] + 1) % 25 == 0:
            log(f"  {r['i'] + 1}/{runs} runs, RSS {rss[-1] / 2 ** 20:.1f} MiB")
    warm = rss[min(warmup, runs) - 1]
    return dict(plan=runs_plan, outcomes=outcomes, seconds=time.perf_counter() - t0, rss_warm=warm,
                rss_peak=max(rss[warmup - 1:]), rss_final=rss[-1], rss=rss)


def replay(assets: dict, runs: list[dict]) -> list[str]:
    """Outcomes of ``runs`` (no faults) in this process, in the given order."""
    pipe = load(assets)
    return [run_one(pipe, r, assets, faults=False) for r in runs]


def replay_in_fresh_process(assets: dict, runs: list[dict], threads: int) -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "runs.json", Path(d) / "out.json"
        src.write_text(json.dumps(dict(assets=assets, runs=runs)))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        subprocess.run([sys.executable, __file__, "--replay-file", str(src), "--replay-out", str(dst),
                        "--threads", str(threads)], check=True, env=env)
        return json.loads(dst.read_text())


def compare(rep: dict, replay_count: int | None, threads: int, assets: dict) -> dict:
    ok = [(r, o) for r, o in zip(rep["plan"], rep["outcomes"]) if r["fault"] in (None, "reload")]
    if replay_count is not None and replay_count < len(ok):
        step = len(ok) / replay_count
        ok = [ok[int(k * step)] for k in range(replay_count)]
    fresh = replay_in_fresh_process(assets, [r for r, _ in reversed(ok)], threads)[::-1]
    bad = [r["i"] for (r, o), f in zip(ok, fresh) if o != f]
    return dict(replayed=len(ok), mismatches=len(bad), mismatched_runs=bad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=20, help="runs before the reference RSS is taken")
    ap.add_argument("--edit-every", type=int, default=10, help="every n-th run is an edit (0: none)")
    ap.add_argument("--replay", default="all", help="'all' or how many successful runs to replay afresh")
    ap.add_argument("--rss-bound-mib", type=float, default=64.0,
                    help="allowed growth of the final RSS over the post-warm-up RSS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--assets", help="folder for the tiny checkpoint and attachments (default: a temp dir)")
    ap.add_argument("--out", help="write the report (JSON) here")
    ap.add_argument("--replay-file", help=argparse.SUPPRESS)
    ap.add_argument("--replay-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.replay_file:
        job = json.loads(Path(a.replay_file).read_text())
        Path(a.replay_out).write_text(json.dumps(replay(job["assets"], job["runs"])))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.assets or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        assets = make_assets(folder)
        rep = soak(a.runs, a.seed, assets, a.warmup, a.edit_every)
        rep.update(compare(rep, None if a.replay == "all" else int(a.replay), a.threads, assets))
    kinds: dict = {}
    for r in rep["plan"]:
        key = r["kind"] if r["fault"] in (None, "reload") else f"{r['kind']}+{r['fault']}"
        kinds[key] = kinds.get(key, 0) + 1
    growth = (rep["rss_final"] - rep["rss_warm"]) / 2 ** 20
    summary = dict(runs=a.runs, seed=a.seed, kinds=kinds, seconds=round(rep["seconds"], 1),
                   rss_warm_mib=round(rep["rss_warm"] / 2 ** 20, 1), rss_peak_mib=round(rep["rss_peak"] / 2 ** 20, 1),
                   rss_final_mib=round(rep["rss_final"] / 2 ** 20, 1), rss_growth_mib=round(growth, 1),
                   rss_bound_mib=a.rss_bound_mib, replayed=rep["replayed"], mismatches=rep["mismatches"],
                   mismatched_runs=rep["mismatched_runs"], threads=a.threads, torch=torch.__version__,
                   machine=platform.processor() or platform.machine(),
                   date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    print(json.dumps(summary, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(dict(summary, rss_mib=[round(x / 2 ** 20, 1) for x in rep["rss"]],
                                               outcomes=rep["outcomes"]), indent=1))
    return 0 if rep["mismatches"] == 0 and growth <= a.rss_bound_mib else 1


if __name__ == "__main__":
    sys.exit(main())
