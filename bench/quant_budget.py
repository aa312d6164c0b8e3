"""Budget runs (issue 22): the real ComfyUI server on this GPU with the memory it may use capped at 24, 16 and
12 GiB, running the shipped text-to-image, edit and VQA workflows with ``weight_dtype auto`` on random
real-shape weights written in the official format (a bf16 ``ema.safetensors``, so ``auto`` plans and
quantizes while loading, as for a user's download).

The cap emulates a card of that size inside one process (``LAUNCH``): PyTorch's allocator may hold at most
the cap less ``--context-gib`` (what the CUDA context and cuBLAS take outside it on a real card)
(``torch.cuda.set_per_process_memory_fraction``), and ``torch.cuda.mem_get_info`` reports the cap as the
card's total, so ComfyUI's accounting and the loader's plan see that card. Per budget: what ``auto`` chose
(the loader's log line), seconds of each workflow (the first text-to-image includes loading the model; a
second one, another seed, is the image alone), the nodes' own stats (tokens/s, seconds, kernels), the
allocator's peak, and any error (an out-of-memory fails the prompt and is reported).

    COMFYUI_DIR=... python bench/quant_budget.py --out quant_budget.json             # GPU, real shapes
    COMFYUI_DIR=... python bench/quant_budget.py --tiny --device cpu --out smoke.json  # smoke: tiny, CPU
COMFYUI_PYTHON: the python that runs ComfyUI (default: this one); COMFYUI_ARGS: more server arguments (the GPU
check passes ``--front-end-root DIR``: the budget runs need no frontend package). The random folder (29 GB at real shapes)
is written once into --folder and reused when it is already there.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "nodes"))

GIB = 1 << 30
WORKFLOWS = (("t2i", "hyperbagel_text_to_image.json"), ("t2i_again", "hyperbagel_text_to_image.json"),
             ("edit", "hyperbagel_edit.json"), ("vqa", "hyperbagel_speculative_vqa.json"))

# run before ComfyUI's main.py in its process: the memory cap and the card size ComfyUI and the loader see
LAUNCH = r"""
import os, runpy, sys, threading, time
import torch
cap = int(float(os.environ["HB_BUDGET_GIB"]) * (1 << 30))
ctx = int(float(os.environ.get("HB_CONTEXT_GIB", "0")) * (1 << 30))
peak_file = os.environ["HB_PEAK_FILE"]
if torch.cuda.is_available():
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((cap - ctx) / total, 0)
    def mem_get_info(device=None):
        return max(0, cap - ctx - torch.cuda.memory_reserved(device)), cap
    torch.cuda.mem_get_info = mem_get_info
    def watch():
        while True:
            with open(peak_file, "w") as f:
                f.write(str(torch.cuda.max_memory_allocated(0)))
            time.sleep(0.5)
    threading.Thread(target=watch, daemon=True).start()
comfy = os.environ["COMFYUI_DIR"]
sys.argv = [os.path.join(comfy, "main.py")] + sys.argv[1:]
sys.path.insert(0, comfy)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_real_folder(folder: Path, device) -> Path:
    """A BAGEL-7B-MoT folder of random weights in the official format: configs, a small BPE tokenizer (the
    model's vocabulary stays 152064), ``ema.safetensors`` in bf16 written tensor by tensor (made on
    ``device``; the 29 GB never sit in memory at once), a random FLUX ``ae.safetensors`` in fp32."""
    import torch
    from quant_real_shapes import NormalBank, _random, real_config
    from safetensors.torch import save_file

    from hyperbagel_core.config import FLUX_AE_DEFAULTS, BagelConfig
    from hyperbagel_core.model.bagel import BagelModel
    from hyperbagel_core.model.vae import FluxVAE
    from hyperbagel_core.testing import write_configs, write_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    base = real_config()
    cfg = BagelConfig(llm=base.llm, vit=base.vit, vae=dict(FLUX_AE_DEFAULTS))   # the real FLUX AE (workflows use it)
    write_configs(folder, cfg)
    with torch.device("meta"):
        model = BagelModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bank = NormalBank(0, device=torch.device(device))
    part = folder / "ema.safetensors.part"
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k, shape in shapes.items():
            t = _random(k, shape, bank, torch.bfloat16).contiguous().cpu()
            f.write(t.view(torch.uint8).numpy().tobytes())
    part.rename(folder / "ema.safetensors")
    torch.manual_seed(0)
    vae = FluxVAE.from_config(FLUX_AE_DEFAULTS)
    save_file({k: v.float().contiguous() for k, v in vae.official_state_dict().items()},
              str(folder / "ae.safetensors"), metadata={"format": "pt"})
    return folder


class Comfy:
    """One ComfyUI server under a memory cap, driven over HTTP (stdlib only)."""

    def __init__(self, base: Path, budget_gib: float, context_gib: float, cpu: bool):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.log_path, self.peak_file = f"http://127.0.0.1:{self.port}", base / "server.log", base / "peak"
        env = dict(os.environ, HB_BUDGET_GIB=str(budget_gib), HB_CONTEXT_GIB=str(context_gib),
                   HB_PEAK_FILE=str(self.peak_file))
        cmd = [os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", LAUNCH, "--listen", "127.0.0.1", "--port",
               str(self.port), "--base-directory", str(base), "--disable-auto-launch", "--disable-cuda-malloc"]
        if cpu:
            cmd.append("--cpu")
        cmd += os.environ.get("COMFYUI_ARGS", "").split()     # e.g. --front-end-root DIR (no frontend package)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=env["COMFYUI_DIR"], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.read_log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not come up:\n{self.read_log()[-4000:]}")

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def run(self, prompt: dict, timeout: float) -> tuple[float, dict]:
        """(wall seconds, history entry) of one prompt."""
        data = json.dumps({"prompt": prompt}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        t0 = time.time()
        with urllib.request.urlopen(req, timeout=30) as r:
            pid = json.loads(r.read())["prompt_id"]
        while time.time() - t0 < timeout:
            entry = self.get(f"/history/{pid}").get(pid)
            if entry and entry.get("status", {}).get("completed") is not None:
                return time.time() - t0, entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.read_log()[-4000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt did not finish in {timeout} s:\n{self.read_log()[-3000:]}")

    def peak(self) -> int | None:
        try:
            return int(self.peak_file.read_text())
        except (OSError, ValueError):
            return None

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def prompts(object_info: dict, checkpoint: str, size: int, steps: int | None, tokens: int) -> dict:
    """The shipped workflows in API format: our checkpoint, weight_dtype auto, ``size``², ``steps``."""
    import workflow_contract as wc
    flows = wc.load_workflows()
    out = {}
    for key, name in WORKFLOWS:
        prompt = wc.ui_to_api(flows[name], object_info)
        for node in prompt.values():
            inputs, t = node["inputs"], node["class_type"]
            over = {"HyperBagelModelLoader": {"checkpoint": checkpoint, "weight_dtype": "auto"},
                    "HyperBagelFewStepSampler": {"width": size, "height": size,
                                                 "seed": 43 if key == "t2i_again" else 42},
                    "HyperBagelSpeculativeVQA": {"max_new_tokens": tokens}}.get(t, {})
            if steps and t in ("HyperBagelFewStepSampler", "HyperBagelCFGFreeEditor"):
                over["steps"] = steps
            for k, v in over.items():
                if not isinstance(inputs.get(k), list):   # never a link
                    inputs[k] = v
        out[key] = prompt
    return out


def stats_of(entry: dict) -> dict:
    """The bagel_stats our nodes put in their UI output (seconds, tokens/s, kernels, ...), merged."""
    out = {}
    for node in entry.get("outputs", {}).values():
        for s in node.get("bagel_stats", []) or []:
            out.update({k: v for k, v in s.items() if isinstance(v, (int, float, str, bool))})
    return out


def run_budget(folder: Path, budget: float, args) -> dict:
    import numpy as np
    from PIL import Image
    with tempfile.TemporaryDirectory(prefix=f"budget{budget:g}-") as tmp:
        base = Path(tmp)
        for d in ("custom_nodes", "input", "output", "models/bagel"):
            (base / d).mkdir(parents=True)
        (base / "custom_nodes" / "hyperbagel").symlink_to(REPO)
        (base / "models" / "bagel" / "random-bagel").symlink_to(folder.resolve())
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(
            base / "input" / "example.png")
        t0 = time.time()
        srv = Comfy(base, budget, args.context_gib, cpu=args.device == "cpu")
        row = dict(budget_gib=budget, startup_s=time.time() - t0, runs={})
        try:
            info = srv.get("/object_info")
            for key, prompt in prompts(info, "random-bagel", args.size, args.steps, args.tokens).items():
                seconds, entry = srv.run(prompt, args.timeout)
                status = entry.get("status", {})
                errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                row["runs"][key] = dict(seconds=seconds, ok=status.get("status_str") == "success",
                                        stats=stats_of(entry),
                                        error=(errors[0].get("exception_type", "") + ": "
                                               + errors[0].get("exception_message", "")[:400]) if errors else None)
                print(json.dumps({"budget_gib": budget, key: row["runs"][key]}), flush=True)
            log = srv.read_log()
            plans = re.findall(r"auto -> (\S+?):.*", log)
            row.update(auto=plans[0] if plans else None, plan=next(iter(re.findall(r"(auto -> .*)", log)), None),
                       loads=log.count("hyperbagel: loaded"), peak_allocated=srv.peak(),
                       out_of_memory="OutOfMemoryError" in log or "out of memory" in log.lower())
        finally:
            srv.stop()
            if args.keep_logs:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                (args.keep_logs / f"server-{budget:g}.log").write_text(srv.read_log())
    return row


def summary(rows: list[dict], tiny: bool) -> list[dict]:
    """The GPU check's table rows (``gpu_check_merge.py``): per budget what auto chose, seconds, tokens/s,
    peak, and no out-of-memory (issue 22's must-show 3)."""
    out = []
    for r in rows:
        runs = r["runs"]
        errs = [f"{k}: {v['error']}" for k, v in runs.items() if v.get("error")]
        ok = all(v.get("ok") for v in runs.values()) and len(runs) == len(WORKFLOWS) and not r.get("out_of_memory")
        peak = r.get("peak_allocated")
        out.append(dict(
            figure=f"{r['budget_gib']:g} GiB: auto, t2i s (with load / again), edit s, VQA tok/s, peak GiB",
            value=f"{r.get('auto')}, {runs.get('t2i', {}).get('seconds', 0):.1f} / "
                  f"{runs.get('t2i_again', {}).get('seconds', 0):.1f}, {runs.get('edit', {}).get('seconds', 0):.1f}, "
                  f"{runs.get('vqa', {}).get('stats', {}).get('tokens_per_second', 0) or 0:.1f}, "
                  f"{peak / GIB if peak else 0:.2f}" + (f"; errors: {'; '.join(errs)[:200]}" if errs else ""),
            target="all workflows, no OOM", verdict="smoke" if tiny else ("PASS" if ok else "FAIL")))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budgets", type=float, nargs="+", default=[24, 16, 12], help="GiB the server may use")
    ap.add_argument("--context-gib", type=float, default=0.5, help="GiB a real card loses to the CUDA context")
    ap.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "hyperbagel-random-bagel")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the workflows' own, 8)")
    ap.add_argument("--tokens", type=int, default=128, help="the VQA workflow's max_new_tokens")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per workflow")
    ap.add_argument("--keep-logs", type=Path, help="copy each server's log into this folder")
    ap.add_argument("--tiny", action="store_true", help="tiny checkpoint (smoke run)")
    ap.add_argument("--min-budget-s", type=float, default=90,
                    help="start another budget only with this much (or the last budget's time) left of "
                         "STEP_DEADLINE (bench/gpu_check.sh)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    comfy = os.environ.get("COMFYUI_DIR")
    if not comfy or not (Path(comfy) / "main.py").exists():
        why = (f"no ComfyUI: COMFYUI_DIR={comfy or '(unset)'} holds no main.py; set COMFYUI_DIR to a ComfyUI "
               "checkout (and COMFYUI_PYTHON to its python); bench/gpu_prepare.sh puts a trimmed copy in .gpu/ComfyUI")
        print(f"quant_budget: skipped: {why}")
        if args.out:
            args.out.write_text(json.dumps(dict(skipped=why), indent=1) + "\n")
        return 3
    if args.tiny:
        args.size, args.steps, args.tokens, args.min_budget_s = 64, args.steps or 2, 8, 5
        if args.folder == ap.get_default("folder"):     # never mistake the tiny folder for the real one
            args.folder = args.folder.with_name("hyperbagel-tiny-bagel")
    folder = args.folder
    t0 = time.time()
    if not (folder / "ema.safetensors").exists():
        if args.tiny:
            from hyperbagel_core.testing import make_tiny_checkpoint
            make_tiny_checkpoint(folder)
        else:
            write_real_folder(folder, args.device)
    written = time.time() - t0
    import torch
    meta = dict(device=torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", torch=torch.__version__,
                folder_s=written, size=args.size, steps=args.steps or "workflow", tiny=args.tiny,
                date=time.strftime("%Y-%m-%d %H:%M"))
    rows, skipped = [], []
    deadline = float(os.environ.get("STEP_DEADLINE", "inf"))    # set by bench/gpu_check.sh

    def save():
        """Also after every budget: a run cut by the GPU check's time limit keeps the budgets it ran."""
        if args.out:
            skips = [dict(figure=f"budget {b:g} GiB", value="skipped: no time left") for b in skipped]
            args.out.write_text(json.dumps(dict(meta, rows=rows, skipped_budgets=skipped,
                                                summary=summary(rows, args.tiny) + skips), indent=1) + "\n")
    for b in args.budgets:
        last = max((r["seconds"] for r in rows), default=0.0)
        if time.time() + max(last, args.min_budget_s) > deadline:
            skipped.append(b)
            print(f"budget {b:g} GiB skipped: {deadline - time.time():.0f} s left of the step", flush=True)
            continue
        t1 = time.time()
        rows.append(dict(run_budget(folder, b, args), seconds=time.time() - t1))
        save()
    save()
    print("| budget GiB | auto | t2i s (with load) | t2i s | edit s | VQA tokens/s | peak GiB | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        runs = r["runs"]
        errs = [f"{k}: {v['error']}" for k, v in runs.items() if v.get("error")]
        peak = r.get("peak_allocated")
        print(f"| {r['budget_gib']:g} | {r.get('auto')} | {runs.get('t2i', {}).get('seconds', 0):.1f} | "
              f"{runs.get('t2i_again', {}).get('seconds', 0):.1f} | {runs.get('edit', {}).get('seconds', 0):.1f} | "
              f"{runs.get('vqa', {}).get('stats', {}).get('tokens_per_second', 0) or 0:.1f} | "
              f"{peak / GIB if peak else 0:.2f} | {'; '.join(errs) or 'none'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
