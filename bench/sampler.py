"""End-to-end image sampling benchmark: teacher vs few-step vs distilled, batched vs sequential CFG.

Real shapes (BAGEL-7B-MoT: 28 layers, hidden 3584, FLUX VAE) with random weights; no checkpoint needed.
Times are wall-clock seconds per image with CUDA synchronisation, prompt prefill + denoising + VAE decode
(edits also include VAE encode + ViT prefill of the source image). Prints a markdown table and writes JSON.

    python bench/sampler.py                                # CUDA, bf16, 512 and 1024
    python bench/sampler.py --tiny --device cpu            # smoke run at tiny shapes on CPU
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperbagel_core.config import BagelConfig, LLMConfig, ViTConfig  # noqa: E402
from hyperbagel_core.distill import DistilledExpert  # noqa: E402
from hyperbagel_core.generation import CFGSettings, guided_velocity  # noqa: E402
from hyperbagel_core.model.bagel import BagelModel  # noqa: E402
from hyperbagel_core.model.vae import FluxVAE  # noqa: E402

REAL = dict(llm=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064),
            vit=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16))
TINY = dict(llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024),
            vit=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
            vae=dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1))
PROMPT = "A photo of a red fox sitting in fresh snow at sunrise, detailed fur, soft light"
EDIT = "Turn the fox into a watercolor painting"


class ByteTokenizer:
    """Stand-in for the Qwen2 tokenizer (bytes + the four BAGEL markers); prompt lengths are realistic."""
    bos_id, eos_id, start_of_image, end_of_image = 256, 257, 258, 259

    def __len__(self):
        return 260

    def text_block(self, text: str) -> list[int]:
        return [self.bos_id] + list(text.encode()[: max(1, len(text) // 4)]) + [self.eos_id]


def build_pipeline(tiny: bool, device: str, dtype: torch.dtype):
    from hyperbagel_core.pipeline import BagelPipeline

    spec = TINY if tiny else REAL
    cfg = BagelConfig(llm=LLMConfig(**spec["llm"]), vit=ViTConfig(**spec["vit"]))
    if "vae" in spec:
        cfg = BagelConfig(llm=cfg.llm, vit=cfg.vit, vae={**cfg.vae, **spec["vae"]})
    with torch.device("meta"):
        model = BagelModel(cfg)
        vae = FluxVAE.from_config(cfg.vae)
    model = model.to(dtype=dtype).to_empty(device=device)
    vae = vae.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    for name, p in list(model.named_parameters()) + list(vae.named_parameters()):
        with torch.no_grad():
            if p.dim() == 1 and ("norm" in name or name.endswith(".weight")):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    for buf in list(model.buffers()) + list(vae.buffers()):
        if buf.is_floating_point():
            buf.zero_()
    model.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    return BagelPipeline(model, vae, ByteTokenizer(), cfg)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, with_result: bool = False):
    """Median wall seconds over ``repeats`` runs after one warm-up (allocator, kernels)."""
    res = fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        res = fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return (statistics.median(out), res) if with_result else statistics.median(out)


def end_to_end(pipe, expert, size: int, steps: int, device: str, repeats: int) -> list[dict]:
    img = Image.new("RGB", (size, size), (120, 90, 60))
    t2i = dict(height=size, width=size, cfg_text_scale=4.0, cfg_interval=(0.0, 1.0))
    edit = dict(cfg_text_scale=4.0, cfg_img_scale=1.5, cfg_interval=(0.4, 1.0), cfg_renorm_type="text_channel")
    cases = [
        ("t2i", f"teacher {steps} pts, CFG, batched", lambda: pipe.generate(PROMPT, num_timesteps=steps, **t2i)),
        ("t2i", f"teacher {steps} pts, CFG, sequential",
         lambda: pipe.generate(PROMPT, num_timesteps=steps, batch_cfg=False, **t2i)),
        ("t2i", "training-free unipc 10 steps, CFG batched",
         lambda: pipe.generate(PROMPT, num_timesteps=11, solver="unipc", **t2i)),
        ("edit", f"teacher {steps} pts, CFG, batched", lambda: pipe.edit(img, EDIT, num_timesteps=steps, **edit)),
        ("edit", f"teacher {steps} pts, CFG, sequential",
         lambda: pipe.edit(img, EDIT, num_timesteps=steps, batch_cfg=False, **edit)),
    ]
    if expert is not None:
        cases += [
            ("t2i", "distilled 6-NFE", lambda: pipe.generate(PROMPT, schedule="hyper-6nfe", **t2i)),
            ("t2i", "distilled 1-NFE", lambda: pipe.generate(PROMPT, schedule="hyper-1nfe", **t2i)),
            ("edit", "distilled 6-NFE", lambda: pipe.edit(img, EDIT, schedule="hyper-6nfe", **edit)),
            ("edit", "distilled 1-NFE", lambda: pipe.edit(img, EDIT, schedule="hyper-1nfe", **edit)),
        ]
    rows = []
    # progress between timed runs only (rate and ETA on stderr), never inside one
    for task, label, fn in tqdm(cases, desc=f"end to end {size}^2", unit="case", dynamic_ncols=True):
        s, res = timed(fn, device, repeats, with_result=True)
        W, H = res.image.size  # edits run at the VAE-resized input size (at least 512 on the short side)
        rows.append(dict(kind="end_to_end", task=task, size=f"{W}x{H}", config=label, seconds=s,
                         steps=res.stats.get("steps")))
        tqdm.write(f"  {task:4s} {W}x{H}  {label:45s} {s:8.3f} s")
    return rows


def cfg_step(pipe, size: int, device: str, repeats: int) -> list[dict]:
    """One denoising step's guided velocity: batched vs sequential branches (T2I 2 branches, edit 3)."""
    m = pipe.model
    h = w = size // pipe.config.latent_downsample
    x = torch.randn(h * w, pipe.config.patch_latent_dim, device=m.device)
    img = Image.new("RGB", (size, size), (120, 90, 60))
    rows = []
    for task, ctxs, cfg in tqdm((
        ("t2i", pipe.build_contexts([PROMPT]), CFGSettings(4.0, 1.0, (0.0, 1.0), "global", 0.0)),
        ("edit", pipe.build_contexts([img, EDIT]), CFGSettings(4.0, 1.5, (0.0, 1.0), "text_channel", 0.0)),
    ), desc=f"cfg step {size}^2", unit="task", total=2, dynamic_ncols=True):
        res = {}
        for batched in (True, False):
            res[batched] = timed(lambda: guided_velocity(m, ctxs.gen, ctxs.cfg_text, ctxs.cfg_img, x, 0.5, h, w, cfg,
                                                         batch_cfg=batched), device, repeats)
        rows.append(dict(kind="cfg_step", task=task, size=size, batched=res[True], sequential=res[False],
                         speedup=res[False] / res[True]))
        tqdm.write(f"  cfg step {task:4s} {size}^2 batched {res[True]:.4f} s sequential {res[False]:.4f} s "
                   f"speedup {res[False] / res[True]:.2f}x")
    return rows


def few_step_table(budgets=(8, 10, 12), seeds=(0, 1, 2), size: int = 64) -> list[dict]:
    """Training-free solvers vs Euler at equal guided evaluations, error to a 200-step Euler reference of the
    same guided ODE (tiny random checkpoint, CPU, fp32). Relative L2 error of the final latent, mean over seeds."""
    import tempfile

    from hyperbagel_core.generation import solver_sample, teacher_sample
    from hyperbagel_core.pipeline import BagelPipeline
    from hyperbagel_core.sampling.solvers import SOLVERS, grid_for_budget
    from hyperbagel_core.testing import make_tiny_checkpoint

    folder = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-bagel", seed=0)
    pipe = BagelPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    img = Image.new("RGB", (1024, 16), (120, 90, 60))
    cases = [
        ("t2i, cfg 4, interval [0, 1], global", pipe.build_contexts(["a red circle and a blue square"]),
         CFGSettings(4.0, 1.0, (0.0, 1.0), "global", 0.0), size // 16, size // 16),
        ("t2i, cfg 4, interval [0.4, 1], global", pipe.build_contexts(["a red circle and a blue square"]),
         CFGSettings(4.0, 1.0, (0.4, 1.0), "global", 0.0), size // 16, size // 16),
        ("edit, cfg 4 / 1.5, interval [0, 1], text_channel",
         pipe.build_contexts([img, "make it red"], generator=torch.Generator().manual_seed(0)),
         CFGSettings(4.0, 1.5, (0.0, 1.0), "text_channel", 0.0), 1, 64),
    ]
    rows = []
    for label, c, cfg, h, w in cases:
        errs: dict = {}
        for seed in seeds:
            noise = torch.randn(h * w, 64, generator=torch.Generator().manual_seed(seed))
            ref = teacher_sample(pipe.model, c.gen, c.cfg_text, c.cfg_img, h, w, noise, cfg, num_timesteps=201)
            for budget in budgets:
                for method in SOLVERS:
                    grid, opts = grid_for_budget(method, budget, 3.0)
                    out = solver_sample(pipe.model, c.gen, c.cfg_text, c.cfg_img, h, w, noise, cfg, grid, method,
                                        **opts)
                    errs.setdefault((budget, method), []).append(((out - ref).norm() / ref.norm()).item())
        for budget in budgets:
            row = dict(kind="few_step", case=label, evaluations=budget)
            row.update({m: statistics.mean(errs[(budget, m)]) for m in SOLVERS})
            rows.append(row)
    print(f"\n| case | guided evaluations | {' | '.join(SOLVERS)} |\n|---|---|" + "---|" * len(SOLVERS))
    for r in rows:
        cells = " | ".join(f"{r[m]:.4f}" for m in SOLVERS)
        print(f"| {r['case']} | {r['evaluations']} | {cells} |")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="square sizes (default 512 1024; tiny 64 128)")
    ap.add_argument("--e2e-sizes", type=int, nargs="+", default=None, help="sizes for end-to-end (default: largest)")
    ap.add_argument("--steps", type=int, default=50, help="teacher num_timesteps (50 = 49 Euler steps)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-distilled", action="store_true", help="skip the distilled-expert rows")
    ap.add_argument("--out", default=None, help="write JSON results here")
    ap.add_argument("--few-step-table", action="store_true",
                    help="only the solver-accuracy table on a tiny checkpoint (CPU, fp32), then exit")
    a = ap.parse_args(argv)
    if a.few_step_table:
        rows = few_step_table()
        if a.out:
            Path(a.out).write_text(json.dumps(dict(rows=rows, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
                                              indent=2))
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    sizes = a.sizes or ([64, 128] if a.tiny else [512, 1024])
    e2e_sizes = a.e2e_sizes or [max(sizes)]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pipe = build_pipeline(a.tiny, a.device, dtype)
    print(f"built {'tiny' if a.tiny else 'BAGEL-7B-MoT-shaped'} random pipeline on {a.device} ({a.dtype}) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    expert = None
    if not a.no_distilled:
        expert = DistilledExpert.from_model(pipe.model)  # zero-init embedders: same cost as a trained expert
        pipe.distilled_expert = expert
    rows = []
    for size in sizes:
        rows += cfg_step(pipe, size, a.device, a.repeats)
    for size in e2e_sizes:
        rows += end_to_end(pipe, expert, size, a.steps, a.device, a.repeats)
    dev = torch.cuda.get_device_name() if torch.device(a.device).type == "cuda" else platform.processor() or "cpu"
    result = dict(device=dev, dtype=a.dtype, tiny=a.tiny, torch=torch.__version__, steps=a.steps, rows=rows,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    print("\n| task | size | config | seconds |\n|---|---|---|---|")
    for r in rows:
        if r["kind"] == "end_to_end":
            print(f"| {r['task']} | {r['size']} | {r['config']} | {r['seconds']:.3f} |")
    print("\n| CFG step | size | batched s | sequential s | speedup |\n|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "cfg_step":
            print(f"| {r['task']} | {r['size']}² | {r['batched']:.4f} | {r['sequential']:.4f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
