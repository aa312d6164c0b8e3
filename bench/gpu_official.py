"""The official side of the GPU side by side (issues 9, 20, 21): the official BAGEL code (ByteDance-Seed/Bagel at
056b5fd) timed by the project's harness ``shared/perf/gpu/scripts/bench.py`` at the real shapes, in its own
Python path (transformers 4.49.0, tokenizers 0.21.x, huggingface_hub 0.36.x), then merged with our side
(``bench/gpu_side_by_side.py --merge``: official seconds / ours).

The harness is run unchanged, steered only by its environment (``ONLY``, ``BUDGET_S``, ``NTOK``, ``OUT``,
``TINY``). It runs its workloads in its own order with fixed repeats (warm-up + 2-3 runs), so the cases are
split into groups run one after the other in priority order, each only while time is left (``--budget-s``, or
the GPU check's ``STEP_DEADLINE``); ``BUDGET_S`` of each group is what is left less one run, so the harness
stops by itself. Every group pays the model build again (about 15 s on a GPU, an estimate).

    python3 bench/gpu_official.py --out official.json --kit .gpu/official --pythonpath /tmp/site/official \\
        --ours side_by_side.json                                  # GPU
    python3 bench/gpu_official.py --tiny --device cpu --out o.json ...   # CPU smoke: the harness's TINY=1

Exit status 3 (the GPU check records "skipped" with the reason): the official code or its Python path is not
there (``bench/gpu_prepare.sh`` makes both; CI has neither).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GROUPS = "t2i_1024_taylorseer,edit_1024_taylorseer;edit_1024;t2i_1024,und_980"
# the longest single run of each workload on a GPU (H200, issue 9: t2i 15.5 s, edit 27.8 s, und 17.5 s at 256
# tokens); the TaylorSeer cases are estimates (about half). BUDGET_S of a group keeps one such run in hand.
LONGEST_RUN_S = {"t2i_1024": 18, "edit_1024": 32, "und_980": 20, "t2i_1024_taylorseer": 10,
                 "edit_1024_taylorseer": 18}
BUILD_S = 20          # import + build + attention probe of one harness process (estimate)


def skip(out: Path | None, reason: str) -> int:
    print(f"official: skipped: {reason}", flush=True)
    if out:
        out.write_text(json.dumps(dict(skipped=reason), indent=1))
    return 3


def prerequisites(kit: Path, pythonpath: str) -> str | None:
    """Why the official side cannot run here, or None."""
    for need in ("scripts/bench.py", "shim/flash_attn", "tok/vocab.json", "bagel/modeling", "bagel/inferencer.py"):
        if not (kit / need).exists():
            return (f"no official kit at {kit} ({need} missing): run bench/gpu_prepare.sh (it copies "
                    f"shared/perf/gpu and the official code at 056b5fd into .gpu/official)")
    if not any(Path(p).glob("transformers-4.49.*.dist-info") for p in pythonpath.split(os.pathsep) if p):
        return ("no transformers 4.49 on the official Python path (--pythonpath / OFFICIAL_PYTHONPATH): "
                "bench/gpu_check.sh installs it from .gpu/whl/official")
    return None


def merge_results(parts: list[dict]) -> dict:
    """One results.json of the harness from the groups' results (workloads joined; env and probe of the first)."""
    out = dict(parts[0]) if parts else {}
    out["workloads"] = {}
    for p in parts:
        out["workloads"].update(p.get("workloads", {}))
    return out


def pass_rows(official: dict, passes: dict) -> list[dict]:
    """Issue 9's per-pass comparison: the official code runs one forward per CFG branch (its synced median
    forward of the edit warm-up, times the branches) against our batched pass (bench/denoise_pass.py: the same
    1024² edit shapes), compiled and eager."""
    per = official.get("workloads", {}).get("edit_1024", {}).get("warmup", {}).get("nfe_median_s")
    rows = []
    for r in passes.get("rows", []) if per else []:
        b, ours = r["branches"], r.get("compiled", r["eager"])
        rows.append(dict(figure=f"official vs ours: edit 1024² pass, {b} branch(es) s (official {b} x forward; "
                                f"ours {'compiled' if 'compiled' in r else 'eager'}, eager {r['eager']['median_s']:.4f})",
                         value=f"{b * per:.4f} / {ours['median_s']:.4f}", target="",
                         verdict=f"{b * per / ours['median_s']:.2f}x"))
    return rows


def summary(official: dict, merged_rows: list[str]) -> list[dict]:
    rows = []
    for name, w in official.get("workloads", {}).items():
        runs = w.get("runs") or []
        if "error" in w:
            rows.append(dict(figure=f"official {name}", value="error", verdict=w["error"][:120]))
        elif runs:
            tot = sorted(r["total"] for r in runs)[len(runs) // 2]
            peak = max(r.get("peak_mem_GiB", 0) for r in runs)
            rows.append(dict(figure=f"official {name}: total s, median of {len(runs)} (peak GiB allocated)",
                             value=f"{tot:.3f} ({peak:.2f})"))
        else:
            rows.append(dict(figure=f"official {name}", value="warm-up only (no timed run in the budget)"))
    for line in merged_rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(dict(figure=f"official vs ours: {cells[0]}", value=f"{cells[1]} / {cells[2]}", target="",
                         verdict=cells[3]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="the harness's TINY=1 (tiny config on the CPU)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu with --tiny (the harness picks by TINY)")
    ap.add_argument("--kit", type=Path, default=ROOT / ".gpu" / "official",
                    help="scripts/, shim/, tok/ of shared/perf/gpu and bagel/ (the official code)")
    ap.add_argument("--pythonpath", default=os.environ.get("OFFICIAL_PYTHONPATH", ""),
                    help="the official side's PYTHONPATH (transformers 4.49.0 first)")
    ap.add_argument("--python", default=os.environ.get("OFFICIAL_PYTHON", sys.executable))
    ap.add_argument("--groups", default=DEFAULT_GROUPS, help="';'-separated groups of ','-separated workloads, "
                                                             "run in this order while time is left")
    ap.add_argument("--ntok", type=int, default=256, help="und_980's decoded tokens (NTOK; ours: --ntok)")
    ap.add_argument("--ours", type=Path, help="our gpu_side_by_side.py JSON to merge with (updated in place)")
    ap.add_argument("--passes", type=Path, help="our bench/denoise_pass.py JSON: per-pass rows against the "
                                                 "official edit forward")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for all groups (default: until the GPU check's STEP_DEADLINE, else 420)")
    a = ap.parse_args(argv)
    t0 = time.time()
    deadline = (t0 + a.budget_s if a.budget_s else float(os.environ.get("STEP_DEADLINE", t0 + 420))) - 5
    why = prerequisites(a.kit, a.pythonpath)
    if why:
        return skip(a.out, why)
    if a.tiny != (a.device == "cpu"):
        return skip(a.out, "the harness runs on CUDA, or on the CPU with --tiny only")
    work = a.out.with_suffix("")            # official/<group>/results.json + bench_log.txt beside --out
    # the harness puts <tmp>/cv2shim on its path when cv2 is missing (its data module imports cv2, inference
    # never calls it): the CPU smoke has no OpenCV, the GPU machine does
    tmp = Path(tempfile.mkdtemp(prefix="official-"))
    (tmp / "cv2shim").mkdir()
    (tmp / "cv2shim" / "cv2.py").write_text("def __getattr__(name):\n    raise AttributeError("
                                            "f'cv2 stand-in of the official harness smoke run: {name}')\n")
    res = dict(kit=str(a.kit), python=a.python, pythonpath=a.pythonpath, ntok=a.ntok, groups=[], tiny=a.tiny)
    parts = []
    for i, group in enumerate(g for g in a.groups.split(";") if g):
        names = group.split(",")
        longest = 5 if a.tiny else max(LONGEST_RUN_S.get(n, 30) for n in names)
        left = deadline - time.time()
        need = (5 if a.tiny else BUILD_S) + 2 * longest           # build, warm-up and one timed run
        rec = dict(cases=names, left_s=round(left))
        if left < need:
            rec.update(status="skipped", reason=f"{left:.0f} s left < {need} s (build + warm-up + one run)")
            res["groups"].append(rec)
            print(f"official group {group}: {rec['reason']}", flush=True)
            continue
        gout = work / f"group{i}"
        gout.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=a.pythonpath, OUT=str(gout), ONLY=group, NTOK=str(8 if a.tiny else a.ntok),
                   BUDGET_S=str(int(left - longest - 5)), CPU_VAE="0", TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
        env.pop("TINY", None)
        if a.tiny:
            env["TINY"] = "1"
        print(f"official group {group}: BUDGET_S={env['BUDGET_S']} ({left:.0f} s left)", flush=True)
        g0 = time.time()
        try:
            p = subprocess.run([a.python, "scripts/bench.py"], cwd=a.kit, env=env, timeout=max(10.0, left - 2))
            rec.update(status="ok" if p.returncode == 0 else "failed", rc=p.returncode)
        except subprocess.TimeoutExpired:
            rec.update(status="timeout")
        rec["seconds"] = round(time.time() - g0, 1)
        if (gout / "results.json").exists():
            parts.append(json.loads((gout / "results.json").read_text()))
        res["groups"].append(rec)
        res["official"] = merge_results(parts)
        res["summary"] = summary(res["official"], [])
        a.out.write_text(json.dumps(res, indent=1))
    if not parts:
        res["summary"] = [dict(figure="official", value="no group ran", verdict="; ".join(
            g.get("reason", g.get("status", "")) for g in res["groups"]))]
        a.out.write_text(json.dumps(res, indent=1))
        return 1
    official = merge_results(parts)
    (work / "results.json").write_text(json.dumps(official, indent=1))
    merged = []
    if a.ours and a.ours.exists() and "workloads" in json.loads(a.ours.read_text()):
        p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_side_by_side.py"), "--merge", str(a.ours),
                            "--official", str(work / "results.json")], capture_output=True, text=True)
        print(p.stdout[-3000:] + p.stderr[-3000:], flush=True)
        merged = json.loads(a.ours.read_text()).get("side_by_side", []) if p.returncode == 0 else []
    passes = json.loads(a.passes.read_text()) if a.passes and a.passes.exists() else {}
    res.update(official=official, side_by_side=merged,
               summary=summary(official, merged) + pass_rows(official, passes))
    a.out.write_text(json.dumps(res, indent=1))
    return 0 if all(g["status"] in ("ok", "skipped") for g in res["groups"]) else 1


if __name__ == "__main__":
    sys.exit(main())
