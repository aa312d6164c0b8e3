"""The training loop every trainer shares: resume, progress bar, evaluation, state files, and one optimiser
step over this rank's share of the global batch.

  * Determinism per step: every random draw of step ``i`` comes from ``step_rng(seed, i)``; a resumed run
    therefore draws exactly what the uninterrupted run would have drawn, and needs no saved RNG state.
  * State files: ``<out>.state/`` holds ``tensors.safetensors`` (modules + optimizer tensors) and
    ``state.json`` (step, loss/metric history, optimizer scalars); no pickle. Sharded tensors are gathered
    to rank 0 for the file and every rank reads back only its shard, so the file is the same whatever
    ``--shard`` and world size wrote it.
docs/TRAINING.md.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .distributed import Dist, full_tensor, shard_like
from .student import activation_checkpointing, installed


def step_rng(seed: int, step: int) -> tuple[random.Random, torch.Generator]:
    """The Python and torch generators of one training step (independent of how the run got there)."""
    s = (int(seed) * 1_000_003 + int(step) * 7919 + 17) % (2 ** 62)
    return random.Random(s), torch.Generator().manual_seed(s)


def state_dir(out: str | Path) -> Path:
    return Path(str(out) + ".state")


def _opt_state(opt) -> dict:
    if hasattr(opt, "consolidate_state_dict"):   # ZeRO: gather the shards on rank 0
        opt.consolidate_state_dict(0)
        import torch.distributed as dist
        return opt.state_dict() if dist.get_rank() == 0 else {}
    return opt.state_dict()


def save_state(out, step: int, modules: dict, opts: dict, history: dict, dist_: Dist) -> None:
    """Write ``<out>.state/`` atomically (rank 0): weights, optimizer state, step and history. Sharded
    tensors are gathered one at a time (every rank takes part; only rank 0 keeps them)."""
    from safetensors.torch import save_file
    opt_sds = {name: _opt_state(o) for name, o in opts.items()}
    tensors, scalars = {}, {"step": step, "history": history, "optimizers": {}}

    def keep(key, v):
        v = full_tensor(v.detach())
        if dist_.main:
            tensors[key] = v.cpu().contiguous().reshape(v.shape)

    for name, m in modules.items():
        m = getattr(m, "module", m)
        for k, v in m.state_dict().items():
            keep(f"module.{name}.{k}", v)
    for name, sd in opt_sds.items():
        meta = {"param_groups": sd.get("param_groups"), "state": {}}
        for idx, st in sd.get("state", {}).items():
            meta["state"][str(idx)] = {}
            for k, v in st.items():
                if torch.is_tensor(v):
                    keep(f"opt.{name}.{idx}.{k}", v)
                else:
                    meta["state"][str(idx)][k] = v
        scalars["optimizers"][name] = meta
    if not dist_.main:
        return
    d = state_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "tensors.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, d / "tensors.safetensors")
    (d / "state.json.tmp").write_text(json.dumps(scalars))
    os.replace(d / "state.json.tmp", d / "state.json")


def load_state(out, modules: dict, opts: dict) -> tuple[int, dict]:
    """Restore a run from ``<out>.state/``; returns ``(step, history)`` or ``(0, {})`` when there is none.
    Tensors are read one at a time and each rank keeps its shard of sharded ones."""
    from safetensors import safe_open
    d = state_dir(out)
    if not (d / "state.json").is_file():
        return 0, {}
    scalars = json.loads((d / "state.json").read_text())
    with safe_open(str(d / "tensors.safetensors"), framework="pt") as f:
        names = list(f.keys())
        saved = {k.split(".")[1] for k in names if k.startswith("module.")}
        if saved != set(modules):   # e.g. a state written with --ema resumed without it: the EMA would be lost
            raise SystemExit(f"the training state in {d} holds {sorted(saved)}, this run trains {sorted(modules)}: "
                             "rerun with the flags that wrote it (e.g. --ema), or start over with --no-resume")
        for name, m in modules.items():
            m = getattr(m, "module", m)
            pre, live = f"module.{name}.", m.state_dict()
            sd = {k[len(pre):]: f.get_tensor(k) for k in names if k.startswith(pre)}
            m.load_state_dict({k: shard_like(v, live[k]) if k in live else v for k, v in sd.items()})
        for name, o in opts.items():
            meta = scalars["optimizers"][name]
            params = [p for g in o.param_groups for p in g["params"]]
            state = {}
            for idx, st in meta["state"].items():
                state[int(idx)] = dict(st)
            for k in names:
                if k.startswith(f"opt.{name}."):
                    idx, key = k[len(f"opt.{name}."):].split(".", 1)
                    v, p = f.get_tensor(k), params[int(idx)] if int(idx) < len(params) else None
                    if p is not None and v.shape == p.shape:   # AdamW's moments: sharded like their parameter
                        v = shard_like(v, p)
                    state.setdefault(int(idx), {})[key] = v
            o.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(scalars["step"]), scalars["history"]


@dataclass
class Loop:
    """Runs ``step_fn(i) -> loss`` from the saved step to ``steps`` with a tqdm bar (loss + quality metric),
    evaluating ``eval_fn() -> float`` every ``eval_every`` steps and saving state every ``save_every``
    (and at the end) in ``<out>.state/``; an empty ``out`` keeps no state (library calls)."""
    out: str
    steps: int
    modules: dict
    opts: dict
    dist: Dist
    metric_name: str = "metric"
    eval_every: int = 0
    save_every: int = 50
    resume: bool = True
    stop_after: int | None = None     # stop (saved) after this many steps of this process: kill/resume tests
    history: dict = field(default_factory=lambda: {"loss": [], "metric": []})

    def run(self, step_fn, eval_fn=None) -> dict:
        from tqdm.auto import tqdm
        start = 0
        if self.resume and self.out:
            start, hist = load_state(self.out, self.modules, self.opts)
            if hist:
                self.history = hist
        if eval_fn is not None and not self.history["metric"]:
            self.history["metric"].append([start, eval_fn()])
        bar = tqdm(total=self.steps, initial=start, desc=Path(self.out).name, disable=not self.dist.main,
                   dynamic_ncols=True)
        done = 0
        for i in range(start, self.steps):
            loss = self.dist.mean(step_fn(i))
            self.history["loss"].append(loss)
            last = i + 1 == self.steps
            if eval_fn is not None and self.eval_every and ((i + 1) % self.eval_every == 0 or last):
                self.history["metric"].append([i + 1, eval_fn()])
            post = {"loss": f"{loss:.4g}"}
            if self.history["metric"]:
                post[self.metric_name] = f"{self.history['metric'][-1][1]:.4g}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            done += 1
            stop = self.stop_after is not None and done >= self.stop_after
            if self.out and ((self.save_every and (i + 1) % self.save_every == 0) or last or stop):
                save_state(self.out, i + 1, self.modules, self.opts, self.history, self.dist)
            if stop:
                break
        bar.close()
        return self.history


def finite(x: float) -> float:
    if not math.isfinite(x):
        raise FloatingPointError("the loss is not finite; lower --lr")
    return x


def accumulate(student_ddp: nn.Module, model, works: list, dist_: Dist, global_batch: int,
               checkpointing: bool = False, defer_layers: bool = True) -> float:
    """``works``: ``[(s_txt or (s_txt, s_img), loss_fn(extra) -> loss)]`` of this rank. Each loss is
    backpropagated inside the student's install (gradient accumulation; DDP syncs on the last one).
    Under ``--shard full --checkpointing`` the layers' casts are made just in time, a gather per layer call:
    ``defer_layers=False`` for works whose number of passes differs between items (and so between ranks),
    which then gather each unit once per work. Returns this rank's mean loss."""
    scale, total = dist_.loss_scale(global_batch), 0.0
    for j, (scales, fn) in enumerate(works):
        s_txt, s_img = scales if isinstance(scales, tuple) else (scales, 1.0)
        last = j == len(works) - 1
        # DDP syncs once per step; FSDP2 reduce-scatters every pass (no unsharded gradient kept in between)
        sync = (student_ddp.no_sync() if dist_.enabled and dist_.shard != "full" and not last
                else contextlib.nullcontext())
        with sync:
            reps, extra = student_ddp(s_txt, s_img,
                                      defer_layers=defer_layers and checkpointing and dist_.shard == "full")
            with installed(model, reps), activation_checkpointing(model, checkpointing, reps.deferred):
                loss = fn(extra)
                (loss * scale).backward()
        total += finite(float(loss.detach()))
    return total / max(1, len(works))


def lr_at(base: float, step: int, total: int, warmup: int = 0, final: float = 0.02) -> float:
    """Linear warmup, then cosine decay to ``final * base``: a function of the step alone (exact on resume)."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def optimizer_step(opt, params, grad_clip: float | None = 1.0, lr: float | None = None) -> None:
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
