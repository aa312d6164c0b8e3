"""Our side of the GPU side-by-side with the official BAGEL code, at BAGEL-7B-MoT's real shapes.

The official harness (``shared/perf/gpu/scripts/bench.py``) times ``t2i_1024``, ``edit_1024`` and
``und_980`` on random bf16 weights; this script runs the same workloads through ``BagelPipeline`` (what the
nodes call) with the same settings on a random real-shape pipeline, plus per-pass figures the issue asks for:
one 1024² denoising pass with 1, 2 and 3 CFG branches and the prefill of the edit's image block (seconds,
peak memory above what was allocated before, the CUDA kernels each attention call ran). ``--official``
merges the official results.json and prints ratios (official seconds / ours). ``t2i_1024_taylorseer`` and
``edit_1024_taylorseer`` (issue 20) run the same calls with ``cache="taylorseer"`` (the official harness's
cases of the same names set ``enable_taylorseer=True``); ``--cases`` picks workloads.

    python bench/gpu_side_by_side.py --out ours.json [--official results.json]
    python bench/gpu_side_by_side.py --only workloads --cases t2i_1024_taylorseer,edit_1024_taylorseer --out ts.json
    python bench/gpu_side_by_side.py --merge ours.json --official results.json     # ratios of earlier runs
    python bench/gpu_side_by_side.py --tiny --device cpu          # smoke run at tiny shapes

In ``bench/gpu_check.sh`` (step side_by_side) the five workloads run once each after a short warm-up
(``--repeats 1 --warmup-steps 8``); its official step merges the harness's results into this JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampler import ByteTokenizer, build_pipeline, sync  # noqa: E402

from hyperbagel_core.generation import CFGSettings, guided_velocity  # noqa: E402

# the official harness's prompts and settings
PROMPT_T2I = ("A female cosplayer portraying an ethereal fairy or elf, wearing a flowing dress made of delicate "
              "fabrics in soft, mystical colors like emerald green and silver. She has pointed ears, a gentle, "
              "enchanting expression, and her outfit is adorned with sparkling jewels and intricate patterns. The "
              "background is a magical forest with glowing plants, mystical creatures, and a serene atmosphere.")
PROMPT_EDIT = "She boards a modern subway, quietly reading a folded newspaper, wearing the same clothes."
PROMPT_UND = "Can someone explain what's funny about this meme??"
ATTN_KERNEL_WORDS = ("flash", "fmha", "attention", "attn", "sdpa", "softmax", "bmm")


class NoStopTokenizer(ByteTokenizer):
    """Answers run to ``max_new_tokens`` like the official harness (its end token can never be produced)."""
    eos_id = -1

    def text_block(self, text: str) -> list[int]:
        return super().text_block(text)[:-1] + [ByteTokenizer.eos_id]

    def answer_text(self, ids) -> str:
        return f"<{len(ids)} tokens>"


def rand_img(h: int, w: int, seed: int) -> Image.Image:
    rs = np.random.RandomState(seed)
    return Image.fromarray(rs.randint(0, 256, size=(h, w, 3), dtype=np.uint8))


def run(fn, dev, repeats: int, warm: bool = True, warmup=None) -> tuple[list[float], float, object]:
    """Wall seconds of ``repeats`` runs (after one warm-up: ``warmup()``, else ``fn()``), the peak memory above
    the start (GiB), the result."""
    res = (warmup or fn)() if warm else None
    times, peak = [], 0.0
    for _ in range(repeats):
        sync(dev)
        if dev.type == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2 ** 30)
    return times, peak, res


def attention_kernels(fn, dev) -> list[str]:
    """Names of the CUDA kernels of ``fn`` that look like attention (or its math-kernel pieces)."""
    if dev.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(dev)
    names = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
    return sorted(n[:120] for n in names if any(w in n.lower() for w in ATTN_KERNEL_WORDS))


WORKLOADS = ("t2i_1024", "edit_1024", "und_980", "t2i_1024_taylorseer", "edit_1024_taylorseer")
DEFAULT_CASES = "t2i_1024,edit_1024,und_980"


def workloads(pipe, dev, tiny: bool, repeats: int, ntok: int, names=WORKLOADS, warmup_steps: int = 0,
              on_result=None) -> dict:
    """The official harness's workloads through ``BagelPipeline``: one warm-up, then the timed runs. The
    warm-up is the same call, or with ``warmup_steps`` > 0 the same call at that many steps (it compiles,
    captures and autotunes the same shapes: every CFG branch count of the schedule, the VAE, the prefill).
    ``on_result(out)`` after each workload (the GPU check writes its JSON as it goes)."""
    s1024, s980 = (64, 56) if tiny else (1024, 980)
    steps = 3 if tiny else 50
    if tiny and any(n.endswith("taylorseer") for n in names):
        steps = 12   # past TaylorSeer's 5 warm-up steps, so the smoke run predicts some passes
    out = {}
    t2i = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), timestep_shift=3.0,
               cfg_renorm_type="global")
    edit = dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), timestep_shift=3.0,
                cfg_renorm_type="text_channel")
    cases = {   # name: (call at n steps, timed runs)
        "t2i_1024": (lambda n: pipe.generate(PROMPT_T2I, height=s1024, width=s1024, num_timesteps=n, **t2i),
                     repeats),
        "edit_1024": (lambda n: pipe.edit(rand_img(s1024, s1024, 1), PROMPT_EDIT, num_timesteps=n, **edit),
                      max(1, repeats - 1)),
        "und_980": (lambda n: pipe.answer(rand_img(s980, s980, 2), PROMPT_UND, max_new_tokens=ntok), repeats),
        "t2i_1024_taylorseer": (lambda n: pipe.generate(PROMPT_T2I, height=s1024, width=s1024, num_timesteps=n,
                                                        cache="taylorseer", **t2i), max(1, repeats - 1)),
        "edit_1024_taylorseer": (lambda n: pipe.edit(rand_img(s1024, s1024, 1), PROMPT_EDIT, num_timesteps=n,
                                                     cache="taylorseer", **edit), max(1, repeats - 1)),
    }
    unknown = set(names) - set(cases)
    if unknown:
        raise SystemExit(f"unknown workload(s) {sorted(unknown)}; choose from {', '.join(cases)}")
    for name in tqdm(names, desc="workloads", unit="workload", dynamic_ncols=True):
        call, n = cases[name]
        warm = (lambda: call(warmup_steps)) if warmup_steps else None
        times, peak, res = run(lambda: call(steps), dev, n, warmup=warm)
        rec = dict(total_s=statistics.median(times), runs=times, peak_above_GiB=peak,
                   warmup_steps=warmup_steps or steps)
        if name == "und_980":
            rec.update(tokens=res.stats.get("new_tokens"), decode_tokens_per_s=res.stats.get("tokens_per_second"))
        if "predicted" in res.stats:
            rec.update({k: res.stats[k] for k in ("passes", "computed", "predicted", "cache_peak_bytes")})
        out[name] = rec
        tqdm.write(f"{name}: {rec}")
        if on_result is not None:
            on_result(out)
    return out


def passes(pipe, dev, tiny: bool, repeats: int) -> dict:
    """One denoising pass of a 1024² edit with 1, 2, 3 CFG branches; the prefill of its image block."""
    size = 64 if tiny else 1024
    img = rand_img(size, size, 1)
    m = pipe.model
    out = {}
    times, peak, ctxs = run(lambda: pipe.build_contexts([img, PROMPT_EDIT]), dev, repeats)
    out["prefill_edit_image_and_prompt"] = dict(median_s=statistics.median(times), peak_above_GiB=peak,
                                                kv_tokens=ctxs.gen.kv_len,
                                                kernels=attention_kernels(
                                                    lambda: pipe.build_contexts([img, PROMPT_EDIT]), dev))
    h = w = size // pipe.config.latent_downsample
    x = torch.randn(h * w, pipe.config.patch_latent_dim, device=m.device)
    settings = {1: CFGSettings(1.0, 1.0, (0.0, 1.0), "global", 0.0),
                2: CFGSettings(4.0, 1.0, (0.0, 1.0), "global", 0.0),
                3: CFGSettings(4.0, 2.0, (0.0, 1.0), "text_channel", 0.0)}
    for b, cfg in settings.items():
        fn = lambda: guided_velocity(m, ctxs.gen, ctxs.cfg_text, ctxs.cfg_img, x, 0.5, h, w, cfg)  # noqa: E731
        times, peak, _ = run(fn, dev, repeats + 2)
        out[f"pass_{b}_branches"] = dict(median_s=statistics.median(times), peak_above_GiB=peak,
                                         query_tokens=h * w + 2, kernels=attention_kernels(fn, dev))
        print(f"pass {b} branches: {out[f'pass_{b}_branches']}", flush=True)
    dec = ctxs.gen.fork()
    m.forward_text(dec, torch.tensor([7]))
    out["decode_step_after_edit_context"] = dict(kernels=attention_kernels(
        lambda: m.forward_text(dec, torch.tensor([7])), dev))
    return out


def merge_official(ours: dict, official: dict) -> list[str]:
    """Markdown rows: official seconds / ours for the shared workloads and per-pass figures."""
    rows = ["| figure | official | ours | official / ours |", "|---|---|---|---|"]
    ow = official.get("workloads", {})
    for name in WORKLOADS:
        if name not in ow or name not in ours.get("workloads", {}) or not ow[name].get("runs"):
            continue
        o = statistics.median(r["total"] for r in ow[name]["runs"])
        u = ours["workloads"][name]["total_s"]
        rows.append(f"| {name} total s | {o:.3f} | {u:.3f} | {o / u:.2f}x |")
        op = max(r.get("peak_mem_GiB", 0) for r in ow[name]["runs"])
        rows.append(f"| {name} peak GiB (official: total allocated; ours: above weights) | {op:.2f} | "
                    f"{ours['workloads'][name]['peak_above_GiB']:.2f} | |")
    und = ow.get("und_980", {})
    dec = [r for r in und.get("runs", []) if r.get("decode_loop")]
    if dec and "und_980" in ours["workloads"]:
        otps = statistics.median(r["decode_tokens"] / r["decode_loop"] for r in dec)
        utps = ours["workloads"]["und_980"]["decode_tokens_per_s"]
        rows.append(f"| und_980 decode tokens/s | {otps:.1f} | {utps:.1f} | {utps / otps:.2f}x (ours/official) |")
    edit = ow.get("edit_1024", {}).get("warmup", {})
    if edit.get("nfe_median_s") and "passes" in ours:
        per = edit["nfe_median_s"]
        for b in (1, 2, 3):
            u = ours["passes"][f"pass_{b}_branches"]["median_s"]
            rows.append(f"| edit 1024² pass, {b} branch(es) s | {b * per:.4f} ({b} x {per:.4f}) | {u:.4f} | "
                        f"{b * per / u:.2f}x |")
    return rows


def summary(res: dict) -> list[dict]:
    """The GPU check's table rows (``gpu_check_merge.py``): our seconds and peak memory per workload (the
    official ratios are the official step's rows)."""
    out = []
    for name, w in res.get("workloads", {}).items():
        extra = f", {w['computed']} computed / {w['predicted']} predicted passes" if "predicted" in w else ""
        out.append(dict(figure=f"ours {name}: total s (peak GiB above weights{extra})",
                        value=f"{w['total_s']:.3f} ({w['peak_above_GiB']:.2f})"))
        if w.get("decode_tokens_per_s"):
            out.append(dict(figure=f"ours {name}: decode tokens/s", value=round(w["decode_tokens_per_s"], 1)))
    for name, p in res.get("passes", {}).items():
        if "median_s" in p:
            out.append(dict(figure=f"ours {name} s (peak GiB above)", value=f"{p['median_s']:.4f} "
                                                                            f"({p['peak_above_GiB']:.3f})"))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ntok", type=int, default=256, help="decoded tokens of und_980 (official: 256)")
    ap.add_argument("--only", default="workloads,passes")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="workloads to run, comma-separated: " + ", ".join(WORKLOADS))
    ap.add_argument("--official", default=None, help="the official harness's results.json to compare with")
    ap.add_argument("--merge", default=None, help="only merge: our earlier --out JSON with --official")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", default="none", choices=["none", "decode", "all"],
                    help="BagelPipeline.set_compile for our side (issue 21)")
    ap.add_argument("--warmup-steps", type=int, default=0,
                    help="warm each workload up with this many steps instead of the full call (0: the full call)")
    a = ap.parse_args(argv)
    if a.merge:
        res = json.loads(Path(a.merge).read_text())
        res["side_by_side"] = merge_official(res, json.loads(Path(a.official).read_text()))
        print("\n".join(res["side_by_side"]))
        Path(a.out or a.merge).write_text(json.dumps(res, indent=1))
        return
    dev = torch.device(a.device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    pipe = build_pipeline(a.tiny, a.device, dtype)
    pipe.tokenizer = NoStopTokenizer()
    pipe.set_compile(a.compile, backend="eager" if a.tiny and a.compile != "none" else "inductor")
    res = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
               dtype=str(dtype), tiny=a.tiny, build_s=time.perf_counter() - t0, compile=a.compile,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if dev.type == "cuda":
        res["weights_GiB"] = torch.cuda.memory_allocated() / 2 ** 30
    print(f"built in {res['build_s']:.1f} s", flush=True)
    only = a.only.split(",")

    def write(partial=None):
        if partial is not None:
            res["workloads"] = partial
        res["summary"] = summary(res)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))
    with torch.no_grad():
        if "passes" in only:
            res["passes"] = passes(pipe, dev, a.tiny, a.repeats)
            write()
        if "workloads" in only:
            res["workloads"] = workloads(pipe, dev, a.tiny, a.repeats, 8 if a.tiny else a.ntok,
                                         [c for c in a.cases.split(",") if c], a.warmup_steps, on_result=write)
    if a.official and Path(a.official).exists() and "workloads" in res:
        res["side_by_side"] = merge_official(res, json.loads(Path(a.official).read_text()))
        print("\n".join(res["side_by_side"]))
    if pipe.compiler is not None:
        res["compile_stats"] = pipe.compile_stats()
    write()


if __name__ == "__main__":
    main()
