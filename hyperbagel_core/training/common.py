"""What every trainer shares: the loop (resume, progress bar, evaluation), the distributed flag, the
fp32-master student, weight installation for gradient passes, activation checkpointing, and the teacher's
guided ODE on prompt/noise items (text-to-image prompts and, for the CFG-free editor, edit pairs).

Design (docs/TRAINING.md):
  * Determinism per step: every random draw of step ``i`` comes from ``step_rng(seed, i)``; a resumed run
    therefore draws exactly what the uninterrupted run would have drawn, and needs no saved RNG state.
  * Distributed: ``--distributed`` initialises ``torch.distributed`` from the launcher's environment
    (torchrun: gloo on CPU, NCCL on CUDA) and wraps the trainable module in DDP. Each step draws one global
    batch (the same on every rank) and rank r runs items ``r::world``; each rank scales its loss by
    ``world / global_batch`` so DDP's gradient average equals the 1-process mean over the global batch.
    ``--shard optimizer`` shards the AdamW state over the ranks (ZeroRedundancyOptimizer, ZeRO-1);
    ``--shard full`` shards the fp32 masters, their gradients and so the AdamW state with FSDP2
    (``fully_shard`` per decoder layer's trained tensors, then the rest): each unit is all-gathered when the
    student casts it for a pass and its gradient is reduce-scattered (a mean, like DDP's) in backward; with
    ``--checkpointing`` too, each layer's unit is gathered and cast just in time inside its checkpointed region.
  * Precision: trainable tensors are fp32 master weights (AdamW state fp32); each pass uses them cast to the
    base model's dtype (bf16 on GPU) through autograd, so gradients reach the fp32 masters and small updates
    are not rounded away (a bf16 weight + lr*update below half an ulp is lost).
  * The frozen base is loaded once per process (DDP shares nothing but gradients); it never gets gradients.
  * State files: ``<out>.state/`` holds ``tensors.safetensors`` (modules + optimizer tensors) and
    ``state.json`` (step, loss/metric history, optimizer scalars); no pickle. Sharded tensors are gathered
    to rank 0 for the file and every rank reads back only its shard, so the file is the same whatever
    ``--shard`` and world size wrote it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..distill.embedders import IMG_SCALE_RANGE, T2I_IMG_SCALE, GuidanceEmbedding
from ..distill.expert import DistilledExpert, gen_expert_keys
from ..generation import CFGSettings, guided_velocity
from ..image import pil_to_rgb
from ..sampling.guidance import branches_needed, cfg_active
from ..sampling.schedules import teacher_timesteps
from ..sampling.solvers import grid_for_budget, solve


# -- randomness ---------------------------------------------------------------------------------------------
def step_rng(seed: int, step: int) -> tuple[random.Random, torch.Generator]:
    """The Python and torch generators of one training step (independent of how the run got there)."""
    s = (int(seed) * 1_000_003 + int(step) * 7919 + 17) % (2 ** 62)
    return random.Random(s), torch.Generator().manual_seed(s)


# -- distributed --------------------------------------------------------------------------------------------
SHARD_MODES = ("none", "optimizer", "full")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    enabled: bool = False
    shard: str = "none"      # SHARD_MODES: replicated (DDP), ZeRO-1 AdamW state, or FSDP2 masters + grads + state

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's items of a global batch."""
        if self.shard == "full" and len(items) % self.world:
            # every pass gathers the sharded masters collectively: all ranks must run the same number of passes
            raise ValueError(f"--shard full needs a global batch divisible by the {self.world} processes "
                             f"(got {len(items)}): pass --batch {self.world * max(1, len(items) // self.world)}")
        return items[self.rank::self.world]

    def loss_scale(self, global_batch: int) -> float:
        return self.world / global_batch

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP, or with ``shard="full"`` FSDP2 in place: each of ``module.shard_units()`` (one decoder layer's
        masters) is its own all-gather / reduce-scatter unit, the root holds the rest."""
        if not self.enabled:
            return module
        if self.shard == "full":
            from torch.distributed.fsdp import fully_shard
            for unit in module.shard_units():
                fully_shard(unit)
            return fully_shard(module)
        from torch.nn.parallel import DistributedDataParallel as DDP
        dev = next(module.parameters()).device
        return DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None)

    def mean(self, value: float) -> float:
        """Mean of a scalar over the ranks (for the logged loss)."""
        if not self.enabled:
            return value
        import torch.distributed as dist
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    def average_grads(self, params) -> None:
        """All-reduce-mean of gradients (a module trained outside DDP's forward, e.g. discriminators)."""
        if not self.enabled:
            return
        import torch.distributed as dist
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()


def init_distributed(enabled: bool, shard: str = "none") -> Dist:
    """``enabled``: join the process group the launcher (torchrun) describes in the environment."""
    if shard not in SHARD_MODES:
        raise ValueError(f"unknown --shard {shard!r}; valid: {', '.join(SHARD_MODES)}")
    if not enabled:
        if shard != "none":
            raise SystemExit(f"--shard {shard} splits state over processes: add --distributed and launch with "
                             "torchrun --nproc_per_node N")
        return Dist()
    import torch.distributed as dist
    if "RANK" not in os.environ:
        raise SystemExit("--distributed needs a launcher: torchrun --nproc_per_node N -m hyperbagel_core.training...")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return Dist(dist.get_rank(), dist.get_world_size(), True, shard)


def make_optimizer(params, lr: float, dist_: Dist, weight_decay: float = 0.0):
    """AdamW over fp32 masters; ``--shard optimizer`` splits its state over the ranks (ZeRO-1). Under
    ``--shard full`` the masters of a wrapped module are already shards, and so is the state AdamW keeps."""
    params = [p for p in params if p.requires_grad]
    if dist_.shard == "optimizer" and dist_.enabled:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's whole value (a collective: every rank must call it in the same order); any other
    tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like``: this rank's shard when ``like`` is sharded (no communication: every
    rank holds ``full``), else ``full`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def local_bytes(tensors) -> int:
    """Bytes this rank holds of ``tensors`` (a shard's local part for sharded ones)."""
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def shard_report(module: nn.Module, opt, dist_: Dist) -> dict:
    """Per rank: bytes of the module's trainable fp32 masters and of the optimizer's state tensors it holds
    (the evidence that ``--shard full`` splits them), next to the unsharded totals."""
    params = [p for p in module.parameters() if p.requires_grad]
    local = getattr(opt, "optim", opt)   # ZeRO-1: the optimizer over this rank's partition
    state = [v for st in local.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    mine = {"rank": dist_.rank, "master_bytes": local_bytes(params), "optimizer_bytes": local_bytes(state)}
    if dist_.enabled:
        import torch.distributed as dist
        ranks = [None] * dist_.world
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    return {"ranks": ranks, "master_bytes_total": sum(p.numel() * p.element_size() for p in params)}


# -- installing weights for a pass with gradients -----------------------------------------------------------
@contextlib.contextmanager
def installed(model: nn.Module, tensors: dict):
    """Within the block ``model``'s parameters named in ``tensors`` read those tensors (any autograd graph).

    Unlike ``distill.swap_parameters`` (inference: parameters re-pointed to leaves), a value here may be a
    non-leaf (the bf16 cast of an fp32 master), so gradients flow to the master. Blocks nest: the exit puts
    back exactly the objects that were there, so a backward that recomputes checkpointed layers inside the
    outer block reads the outer block's tensors again.
    """
    saved = []
    try:
        for key, value in tensors.items():
            mod_name, _, name = key.rpartition(".")
            mod = model.get_submodule(mod_name)
            prev = mod._parameters.pop(name) if name in mod._parameters else mod.__dict__.pop(name)
            saved.append((mod, name, prev))
            if isinstance(value, nn.Parameter):
                mod._parameters[name] = value
            else:
                mod.__dict__[name] = value
        yield model
    finally:
        for mod, name, prev in reversed(saved):
            mod._parameters.pop(name, None)
            mod.__dict__.pop(name, None)
            if isinstance(prev, nn.Parameter):
                mod._parameters[name] = prev
            else:
                mod.__dict__[name] = prev


@contextlib.contextmanager
def teacher_block(model: nn.Module, base: dict):
    """The original weights (``base_tensors``) for a pass inside a student block, not checkpointed: its
    backward (if any) must not recompute under the student's weights."""
    layers = list(model.language_model.model.layers)
    patched = [(layer, layer.__dict__.pop("forward")) for layer in layers if "forward" in layer.__dict__]
    try:
        with installed(model, base):
            yield model
    finally:
        for layer, fwd in patched:
            layer.forward = fwd


def base_tensors(model: nn.Module, keys) -> dict:
    """The model's own (original) parameters for ``keys``: install them to run the teacher inside a student block."""
    params = dict(model.named_parameters())
    return {k: params[k] for k in keys}


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool = True, deferred: dict | None = None):
    """Recompute each decoder layer in backward instead of keeping its activations (torch.utils.checkpoint).

    The recomputation reads the weights installed when backward runs, so call backward inside the same
    ``installed`` block as the forward (every trainer here does). ``deferred`` (``Casts.deferred``): per layer
    index, a callable giving that layer's casts; they are made and installed inside the checkpointed region,
    so forward keeps one layer's casts at a time and the recomputation makes them again.
    """
    layers = list(model.language_model.model.layers) if enabled else []
    if deferred and not enabled:
        raise ValueError("deferred layer casts need activation checkpointing (their recomputation makes them)")
    deferred = deferred or {}
    try:
        for i, layer in enumerate(layers):
            layer.forward = partial(_checkpointed_layer, type(layer).forward.__get__(layer), model, deferred.get(i))
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def _checkpointed_layer(forward, model, casts, x, cos, sin, kv, gen):
    """One decoder layer under torch.utils.checkpoint. The KV access counts layers as they attend, so the
    recomputation rewinds its counter to this layer (under autograd it reads the caches and writes nothing).
    ``casts``: None, or the callable giving this layer's weights, installed for the forward and again for the
    recomputation."""
    from torch.utils.checkpoint import checkpoint
    index = kv.layer

    def run(x, cos, sin):
        kv.layer = index
        with installed(model, casts() if casts is not None else {}):
            return forward(x, cos, sin, kv, gen)
    return checkpoint(run, x, cos, sin, use_reentrant=False)


def velocity_with_grad(model, ctx, x, t, h: int, w: int, extra=None) -> torch.Tensor:
    """``model.velocity`` without its no_grad wrapper (fp32 out)."""
    fn = getattr(type(model).velocity_batched, "__wrapped__", type(model).velocity_batched)
    return fn(model, [ctx], x, t, h, w, extra)[0].float()


# -- the trainable student ----------------------------------------------------------------------------------
class _Cast(torch.autograd.Function):
    """``master.to(dtype)`` (always a copy) that also consumes ``anchor``, a zero scalar the unit's forward
    receives: autograd reaches ``anchor`` only after the gradient of every cast of the unit, and FSDP2 hooks
    its post-backward (reduce-scatter, reshard) onto a forward's inputs, so a layer's fp32 masters and
    gradients are freed as soon as backward has passed that layer, not at the end of backward. The copy:
    with an fp32 base a plain ``.to`` would return the gathered master itself, whose storage FSDP2 frees."""

    @staticmethod
    def forward(ctx, anchor, master, dtype):
        ctx.anchor_meta, ctx.master_dtype = (anchor.dtype, anchor.device), master.dtype
        return master.to(dtype, copy=True)

    @staticmethod
    def backward(ctx, grad):
        dtype, device = ctx.anchor_meta
        return torch.zeros((), dtype=dtype, device=device), grad.to(ctx.master_dtype), None


class Masters(nn.Module):
    """The fp32 masters of one decoder layer's trained tensors (or of the others): the unit ``--shard full``
    all-gathers for a pass and reduce-scatters the gradients of."""

    def __init__(self, tensors: dict, dtypes: dict):
        super().__init__()
        self.keys = list(tensors)
        self.dtypes = dtypes
        self.p = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v.detach().float().clone())
                                   for k, v in tensors.items()})

    def forward(self, anchor: torch.Tensor) -> dict:
        """The masters cast to the base dtypes, through autograd (``_Cast``)."""
        return {k: _Cast.apply(anchor, self.p[k.replace(".", "__")], self.dtypes[k]) for k in self.keys}


class Casts(dict):
    """The student's cast tensors to install for a pass; ``deferred``: per decoder layer index, a callable
    giving that layer's casts just in time (``activation_checkpointing`` calls it inside the layer's
    checkpointed region), empty unless ``Student.forward(..., defer_layers=True)``."""

    def __init__(self):
        super().__init__()
        self.deferred = {}


def _unit_of(key: str) -> str:
    m = re.search(r"\.layers\.(\d+)\.", key)
    return f"layer{m.group(1)}" if m else "rest"


class Student(nn.Module):
    """Trainable copy of (part of) the generation expert + guidance embedders, fp32 masters.

    ``forward(s_txt, s_img)`` returns ``(tensors, extra)``: the replacement tensors cast to the base dtype and
    the guidance embedding; install them with ``installed`` for the pass. Running that through ``forward``
    lets DDP see every use of the parameters and lets FSDP2 gather each layer's ``Masters`` in turn.
    """

    def __init__(self, model: nn.Module, expert: DistilledExpert):
        super().__init__()
        self.config = expert.config
        self.keys = list(expert.tensors)
        params = dict(model.named_parameters())
        self.dtypes = {k: params[k].dtype for k in self.keys}
        units: dict = {}
        for k, v in expert.tensors.items():
            units.setdefault(_unit_of(k), {})[k] = v
        self.master = nn.ModuleDict({u: Masters(t, {k: self.dtypes[k] for k in t}) for u, t in units.items()})
        g = expert.guidance
        self.guidance = GuidanceEmbedding(g.text_scale_embedder.mlp[0].weight.shape[0], g.text_range, g.img_range,
                                          zero_init=False)
        self.guidance.load_state_dict({k: v.float() for k, v in g.state_dict().items()})
        self.guidance.to(model.vae2llm.weight.device)
        self.compute_dtype = model.dtype

    @classmethod
    def fresh(cls, model: nn.Module, keys=None, seed: int = 0, **config) -> "Student":
        """From the base weights; the embedders' random first layers depend on ``seed`` only."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(model, DistilledExpert.from_model(model, keys, **config))

    def shard_units(self) -> list:
        return list(self.master.values())

    def forward(self, s_txt, s_img, defer_layers: bool = False):
        """``defer_layers``: the decoder layers' casts are made just in time by the checkpointed layers
        (``Casts.deferred``; ``--shard full --checkpointing``: one layer's gathered masters and casts at a time)."""
        dev = self.guidance.text_scale_embedder.mlp[0].weight.device
        anchor = torch.zeros((), device=dev, requires_grad=torch.is_grad_enabled())
        reps = Casts()
        for name, unit in self.master.items():
            if defer_layers and name != "rest":
                reps.deferred[int(name.removeprefix("layer"))] = partial(unit, anchor)
            else:
                reps.update(unit(anchor))
        st = torch.as_tensor(s_txt, dtype=torch.float32, device=dev).reshape(-1)
        si = torch.as_tensor(s_img, dtype=torch.float32, device=dev).reshape(-1)
        extra = self.guidance(st, si, self.compute_dtype)[0].clone()   # not a view: FSDP2 hooks the outputs
        return reps, extra

    def export(self, dtype: torch.dtype | None = None, **config_updates) -> DistilledExpert:
        """A ``DistilledExpert`` (our file format) with the current weights, in ``dtype`` (default: the base's).
        Sharded masters are gathered (on the CPU): with ``--shard full`` every rank must call this."""
        masters = {k: unit.p[k.replace(".", "__")] for unit in self.master.values() for k in unit.keys}
        tensors = {}
        for k in self.keys:
            p = masters[k].detach()
            t = full_tensor(p)
            tensors[k] = t.to("cpu" if t is not p else t.device, dtype or self.dtypes[k]).clone()
        g = GuidanceEmbedding(self.guidance.text_scale_embedder.mlp[0].weight.shape[0], self.guidance.text_range,
                              self.guidance.img_range, zero_init=False)
        g.load_state_dict({k: full_tensor(v) for k, v in self.guidance.state_dict().items()})
        g.to(dtype or self.compute_dtype)
        return DistilledExpert(replace(self.config, replaced_keys=tuple(self.keys), **config_updates), g, tensors)


class EMA(nn.Module):
    """Exponential moving average of a module's trainable fp32 masters (consistency distillation and
    Hyper-SD evaluate and ship the EMA weights): ``ema = decay * ema + (1 - decay) * master`` after every
    optimiser step. Built after ``Dist.wrap``, so under ``--shard full`` each shadow is a shard like its
    master (each rank averages its own shard, the state file gathers it as it gathers the masters); under
    DDP the masters are equal on every rank, and so are the shadows. The shadows are buffers: ``Loop``
    saves and resumes them with the module's state."""

    def __init__(self, module: nn.Module, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema {decay}: the decay must be in [0, 1) (e.g. 0.999; 0 keeps the last weights)")
        self.register_buffer("decay", torch.tensor(float(decay), dtype=torch.float64))
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        for n, p in module.named_parameters():
            if p.requires_grad:
                self.register_buffer(n.replace(".", ":"), p.detach().clone())

    def pairs(self, module: nn.Module):
        if hasattr(module, "reshard"):   # FSDP2 keeps the root's gathered weights registered after a forward
            module.reshard()             # without backward (an evaluation): put the shards back first
        params = dict(module.named_parameters())
        return [(params[n], getattr(self, n.replace(".", ":"))) for n in self.names]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        w = 1.0 - float(self.decay)
        for p, e in self.pairs(module):
            e.lerp_(p.detach(), w)      # weight 1 (decay 0) gives p exactly: lerp computes p - (p - e) * 0

    @contextlib.contextmanager
    def applied(self, module: nn.Module):
        """Within the block the module's masters hold the EMA weights (evaluation, export); swapped in place
        one tensor at a time (one tensor's copy of extra memory) and swapped back exactly."""
        def swap():
            with torch.no_grad():
                for p, e in self.pairs(module):
                    tmp = p.detach().clone()
                    p.copy_(e)
                    e.copy_(tmp)
        swap()
        try:
            yield
        finally:
            swap()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "decay")
        if saved is not None and float(saved) != float(self.decay):
            raise SystemExit(f"the training state was written with --ema {float(saved):g}, this run has --ema "
                             f"{float(self.decay):g}: rerun with the same --ema, or start over with --no-resume")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def student_from_file(model, path: str | None, keys, **config) -> Student:
    """Start from a distilled-expert file (the previous stage) or from the base weights."""
    if path:
        from ..distill.expert import load_distilled_expert
        return Student(model, load_distilled_expert(path, model))
    return Student.fresh(model, keys, **{"stages": (), **config})


@contextlib.contextmanager
def student_pass(student: nn.Module, model: nn.Module, s_txt: float, s_img: float = 1.0,
                 checkpointing: bool = False):
    """Install the student's weights; yields the guidance ``extra``. Run forward AND backward inside."""
    reps, extra = student(s_txt, s_img)
    with installed(model, reps), activation_checkpointing(model, checkpointing):
        yield extra


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Base parameters never require grad during training (restored afterwards)."""
    req = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)


def train_keys(model, which: str) -> list[str]:
    """Generation-expert keys by set name (all / attn / mlp / norms / embedders = none)."""
    keys = gen_expert_keys(model)
    pick = {"all": lambda k: True, "embedders": lambda k: False,
            "attn": lambda k: ".self_attn." in k, "mlp": lambda k: ".mlp_moe_gen." in k,
            "norms": lambda k: "norm" in k}
    if which not in pick:
        raise ValueError(f"unknown train-keys set {which!r}; valid: {', '.join(pick)}")
    return [k for k in keys if pick[which](k)]


TRAIN_KEY_SETS = ("all", "attn", "mlp", "norms", "embedders")


# -- the teacher's guided ODE on prompt / noise items -----------------------------------------------------------
@dataclass(frozen=True)
class EditPair:
    """An editing condition: the source image (a file) and the instruction."""
    image: Path
    instruction: str


def read_edit_pairs(path) -> list[EditPair]:
    """A JSONL of ``{"image": path, "instruction": text}`` lines (relative paths: from the file's folder).
    Every line is checked up front, so a bad line stops the run before any teacher work."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"edit pairs file {path} does not exist; give a JSONL of "
                         '{"image": "path/to/source.png", "instruction": "..."} lines')
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not JSON ({e.msg}); each line must be "
                             '{"image": "...", "instruction": "..."}') from None
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) \
                or not str(rec.get("instruction") or "").strip():
            raise SystemExit(f"{path}:{n}: needs a string \"image\" (a path) and a non-empty \"instruction\"")
        img = Path(rec["image"]).expanduser()
        img = img if img.is_absolute() else path.parent / img
        try:
            with Image.open(img) as im:
                im.verify()
        except (OSError, SyntaxError) as e:
            raise SystemExit(f"{path}:{n}: cannot read image {img} ({e}); fix the path (relative paths start "
                             f"at {path.parent})") from None
        pairs.append(EditPair(img, rec["instruction"].strip()))
    if not pairs:
        raise SystemExit(f"{path} has no edit pairs")
    return pairs


def open_rgb(path):
    """The image as the pipeline reads it (``image.pil_to_rgb``: transparency onto white, 16-bit scaled)."""
    with Image.open(path) as im:
        return pil_to_rgb(im)


@dataclass
class Item:
    """One sample: a condition's contexts (original weights), its noise, its guidance scales. ``prompt`` is the
    text (an edit's instruction); ``image`` the edit's source (None for text-to-image)."""
    prompt: str
    ctxs: object
    noise: torch.Tensor      # [h*w, 64] fp32
    s_txt: float
    h: int
    w: int
    s_img: float = T2I_IMG_SCALE
    image: Path | None = None

    @property
    def scales(self) -> tuple[float, float]:
        return self.s_txt, self.s_img

    @property
    def task(self) -> str:
        return "t2i" if self.image is None else "edit"


class Teacher:
    """The stock model with dual CFG: guided velocity, 50-step reference, training-free solvers.

    Text-to-image uses ``cfg_interval`` and global renorm (``BagelPipeline.generate``'s defaults); edits the
    image scale too, ``edit_cfg_interval`` and text-channel renorm (``BagelPipeline.edit``'s defaults)."""

    def __init__(self, pipe, size=(64, 64), cfg_interval=(0.4, 1.0), num_timesteps: int = 50, shift: float = 3.0,
                 edit_cfg_interval=(0.0, 1.0)):
        self.pipe, self.model = pipe, pipe.model
        self.h, self.w = pipe._check_size(*size)
        self.interval, self.edit_interval = tuple(cfg_interval), tuple(edit_cfg_interval)
        self.num_timesteps, self.shift = num_timesteps, shift
        self._ctx_cache: dict = {}

    EDIT_CONTEXTS = 8   # an edit's contexts hold its image's KV: ~2 350 tokens x 56 KB = 135 MB on BAGEL at 512²

    def contexts(self, cond: str | EditPair):
        """Contexts of a prompt (all kept: text only) or an edit (the last ``EDIT_CONTEXTS`` kept)."""
        if cond in self._ctx_cache:
            self._ctx_cache[cond] = self._ctx_cache.pop(cond)   # most recently used last
            return self._ctx_cache[cond]
        if isinstance(cond, EditPair):
            edits = [k for k in self._ctx_cache if isinstance(k, EditPair)]
            for k in edits[:max(0, len(edits) - self.EDIT_CONTEXTS + 1)]:
                del self._ctx_cache[k]
            ctxs = self.pipe.build_contexts([open_rgb(cond.image), cond.instruction],
                                            generator=torch.Generator().manual_seed(0))
        else:
            ctxs = self.pipe.build_contexts([cond])
        self._ctx_cache[cond] = ctxs
        return ctxs

    def item(self, cond: str | EditPair, gen: torch.Generator, s_txt: float, s_img: float = T2I_IMG_SCALE) -> Item:
        ctxs = self.contexts(cond)
        h, w = (self.pipe._check_size(*ctxs.image_shapes) if isinstance(cond, EditPair) else (self.h, self.w))
        noise = torch.randn((h * w, self.pipe.config.patch_latent_dim), generator=gen).to(self.model.device)
        if isinstance(cond, EditPair):
            return Item(cond.instruction, ctxs, noise, float(s_txt), h, w, float(s_img), cond.image)
        return Item(cond, ctxs, noise, float(s_txt), h, w)

    def draw(self, conds: list, rng: random.Random, gen: torch.Generator, scale_range, img_scale_range) -> Item:
        """A training item: a condition, a noise, a text scale and (edits only) an image scale."""
        cond = rng.choice(conds)
        s_txt = rng.uniform(*scale_range)
        if isinstance(cond, EditPair):
            return self.item(cond, gen, s_txt, rng.uniform(*img_scale_range))
        return self.item(cond, gen, s_txt)

    def interval_of(self, it: Item) -> tuple:
        return self.edit_interval if it.task == "edit" else self.interval

    def cfg(self, it: Item) -> CFGSettings:
        if it.task == "edit":
            return CFGSettings(it.s_txt, it.s_img, self.edit_interval, "text_channel", 0.0)
        return CFGSettings(it.s_txt, 1.0, self.interval, "global", 0.0)

    def velocity(self, it: Item, x, t) -> torch.Tensor:
        c = it.ctxs
        return guided_velocity(self.model, c.gen, c.cfg_text, c.cfg_img, x, float(t), it.h, it.w,
                               self.cfg(it)).float()

    def restarts(self, grid: torch.Tensor, it: Item) -> list[int]:
        lo, hi = self.interval_of(it)
        act = [lo <= float(t) <= hi for t in grid[:-1]]
        return [k for k in range(1, len(act)) if act[k] != act[k - 1]]

    @torch.no_grad()
    def trajectory(self, it: Item, grid: torch.Tensor, x=None) -> torch.Tensor:
        """Euler over ``grid`` from ``x`` (default the item's noise at grid[0]): [len(grid), h*w, 64]."""
        x = (it.noise if x is None else x).float()
        out = [x]
        for k in range(grid.numel() - 1):
            x = x - self.velocity(it, x, grid[k]) * float(grid[k] - grid[k + 1])
            out.append(x)
        return torch.stack(out)

    def reference_grid(self) -> torch.Tensor:
        return teacher_timesteps(self.num_timesteps, self.shift)

    @torch.no_grad()
    def reference(self, it: Item) -> torch.Tensor:
        """The 50-step teacher's final latent from the item's noise (the evaluation reference)."""
        return self.trajectory(it, self.reference_grid())[-1]

    def passes_at(self, it: Item, t) -> int:
        """Network passes of one guided evaluation at ``t``: the main branch plus the uncond branches CFG runs."""
        cfg = self.cfg(it)
        return 1 + sum(branches_needed(cfg.text_scale, cfg.img_scale, cfg_active(float(t), cfg.interval)))

    def solver_grid(self, it: Item, method: str, budget: int, shift: float, unit: str = "evaluations"):
        """The grid of ``method`` that spends at most ``budget`` guided evaluations, or, with ``unit="passes"``,
        network passes (the paper's NFE: a guided evaluation inside the CFG interval costs one pass per branch).
        Returns ``(grid, options, evaluations, passes)``."""
        if unit not in ("evaluations", "passes"):
            raise ValueError(f"unit must be 'evaluations' or 'passes', not {unit!r}")
        for n in range(budget, 0, -1):
            if method == "heun" and n < 2:
                break
            grid, opts = grid_for_budget(method, n, shift)
            times = []
            solve(lambda x, t: times.append(float(t)) or torch.zeros_like(x), torch.zeros_like(it.noise), grid, method,
                  restart_at=self.restarts(grid, it), **opts)  # a dry run: where this solver evaluates
            passes = sum(self.passes_at(it, t) for t in times)
            if (passes if unit == "passes" else len(times)) <= budget:
                return grid, opts, len(times), passes
        raise ValueError(f"{method} cannot run within {budget} {unit}")

    @torch.no_grad()
    def solver(self, it: Item, method: str, budget: int, shift: float, unit: str = "evaluations") -> torch.Tensor:
        grid, opts, _, _ = self.solver_grid(it, method, budget, shift, unit)
        return solve(lambda x, t: self.velocity(it, x, t), it.noise.float(), grid, method,
                     restart_at=self.restarts(grid, it), **opts)


def merged_grid(*grids) -> torch.Tensor:
    """Sorted union (descending) of time grids, near-duplicates (1e-6) merged."""
    ts = sorted({round(float(t), 6) for g in grids for t in torch.as_tensor(g).flatten().tolist()}, reverse=True)
    return torch.tensor(ts, dtype=torch.float32)


def path_at(traj: torch.Tensor, grid: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """An Euler trajectory over ``grid`` read at ``times``: within a step Euler moves on a straight line, so
    linear interpolation between the two grid points is exactly the path the teacher took."""
    out = []
    for tau in torch.as_tensor(times).tolist():
        i = int(min(max((grid >= tau).sum().item() - 1, 0), grid.numel() - 2))
        w = float((grid[i] - tau) / (grid[i] - grid[i + 1]))
        out.append((1 - w) * traj[i] + w * traj[i + 1])
    return torch.stack(out)


def index_of(grid: torch.Tensor, t: float) -> int:
    return int((grid - float(t)).abs().argmin())


@torch.no_grad()
def student_trajectory(student: Student, model, it: Item, grid: torch.Tensor, x=None) -> torch.Tensor:
    """Euler with the student over ``grid`` (one pass per step, no CFG): [len(grid), h*w, 64] fp32."""
    x = (it.noise if x is None else x).float()
    out = [x]
    with student_pass(student, model, it.s_txt, it.s_img) as extra:
        for k in range(grid.numel() - 1):
            v = velocity_with_grad(model, it.ctxs.gen, x, float(grid[k]), it.h, it.w, extra)
            x = x - v * float(grid[k] - grid[k + 1])
            out.append(x)
    return torch.stack(out)


def student_sample(student: Student, model, it: Item, grid: torch.Tensor) -> torch.Tensor:
    return student_trajectory(student, model, it, grid)[-1]


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between two sets of vectors [N, d] (Gaussian fits; the FID formula, float64)."""
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.mse_loss(a.float(), b.float()))


def training_free_errors(teacher: Teacher, items: list[Item], refs: list[torch.Tensor], budget: int,
                         methods=("euler", "heun", "unipc", "dpmpp_2m"), shifts=(1.0, 3.0),
                         unit: str = "evaluations", per_item: bool = False) -> dict:
    """Mean final-latent MSE vs the reference of each training-free solver within ``budget`` guided
    evaluations (``unit="evaluations"``, keys ``euler-6eval@shift1``) or network passes (``"passes"``, keys
    ``euler-6pass@shift1``; the distilled student spends one pass per step, so this is the equal-NFE match).
    ``per_item``: the list of per-item errors instead of their mean (``task_means`` splits them by task)."""
    out = {}
    tag = "eval" if unit == "evaluations" else "pass"
    one_per_task = {it.task: it for it in items}.values()   # the grid depends on the task's CFG branches
    for m in methods:
        if m == "heun" and budget < 2:
            continue
        for s in shifts:
            try:
                for it in one_per_task:
                    teacher.solver_grid(it, m, budget, s, unit)
            except ValueError:  # e.g. Heun needs two evaluations, which may cost more passes than the budget
                continue
            errs = [latent_mse(teacher.solver(it, m, budget, s, unit), r) for it, r in zip(items, refs)]
            out[f"{m}-{budget}{tag}@shift{s:g}"] = errs if per_item else sum(errs) / len(errs)
    return out


def task_means(items: list[Item], per_item: dict) -> dict:
    """``{task: {key: mean over that task's items}}`` of per-item values ``{key: [value per item]}``."""
    out: dict = {}
    for task in dict.fromkeys(it.task for it in items):
        mask = [it.task == task for it in items]
        out[task] = {k: sum(x for x, m in zip(v, mask) if m) / sum(mask) for k, v in per_item.items()}
    return out


# -- state files (resume) ---------------------------------------------------------------------------------------
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


# -- the loop ------------------------------------------------------------------------------------------------
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


def add_common_args(ap) -> None:
    """Flags every stage CLI shares."""
    ap.add_argument("--model", required=True, help="official BAGEL folder (teacher and base)")
    ap.add_argument("--out", required=True, help="output file; its training state lives in <out>.state/")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=1, help="global batch (items per step over all ranks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="base model dtype (default bf16 on CUDA, fp32 on CPU); the "
                    "trained tensors are fp32 masters either way")
    ap.add_argument("--save-dtype", default=None, help="dtype of the written file (default: the base dtype)")
    ap.add_argument("--train-keys", default="all", choices=TRAIN_KEY_SETS,
                    help="generation-expert tensors to train (docs/TRAINING.md: what fits one 80 GB GPU)")
    ap.add_argument("--distributed", action="store_true", help="DDP over the ranks torchrun started")
    ap.add_argument("--shard", default="none", choices=SHARD_MODES,
                    help="with --distributed: 'optimizer' shards AdamW's state (ZeRO-1); 'full' shards the fp32 "
                         "masters, gradients and AdamW state (FSDP2; docs/TRAINING.md: needed for all keys)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--no-resume", action="store_true", help="ignore <out>.state/ and start over")
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--report", default=None, help="write the loss / metric history as JSON here")


def read_prompts(args_list: list[str], file: str | None) -> list[str]:
    prompts = list(args_list or [])
    if file:
        with open(file, encoding="utf-8") as f:
            prompts += [ln.strip() for ln in f if ln.strip()]
    return prompts


def load_pipe(a):
    """The base pipeline for a stage CLI (dtype default: bf16 on CUDA, fp32 on CPU)."""
    from ..loading import resolve_dtype
    from ..pipeline import BagelPipeline
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = resolve_dtype(a.dtype) if a.dtype else (torch.bfloat16 if str(a.device).startswith("cuda")
                                                    else torch.float32)
    return BagelPipeline.from_pretrained(a.model, device=a.device, dtype=dtype)


def write_report(path: str | None, data: dict, dist_: Dist) -> None:
    if path and dist_.main:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1))


def finite(x: float) -> float:
    if not math.isfinite(x):
        raise FloatingPointError("the loss is not finite; lower --lr")
    return x


# -- one optimiser step over this rank's share of the global batch --------------------------------------------
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


# -- shared CLI of the diffusion stages --------------------------------------------------------------------------
def add_distill_args(ap) -> None:
    ap.add_argument("--prompt", action="append", default=[], help="training prompt (repeatable)")
    ap.add_argument("--prompts-file", help="training prompts, one per line")
    ap.add_argument("--eval-prompt", action="append", default=[], help="held-out prompt (repeatable)")
    ap.add_argument("--eval-prompts-file", help="held-out prompts, one per line")
    ap.add_argument("--eval-noises", type=int, default=2, help="held-out noises per held-out prompt")
    ap.add_argument("--eval-scale", type=float, default=4.0, help="text guidance scale of the evaluation")
    ap.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    ap.add_argument("--scale-range", type=float, nargs=2, default=(1.0, 5.0), help="training text scales")
    ap.add_argument("--cfg-interval", type=float, nargs=2, default=(0.4, 1.0),
                    help="the teacher's CFG interval (text-to-image)")
    ap.add_argument("--edit-pairs", help='training edits: a JSONL of {"image": path, "instruction": text} lines')
    ap.add_argument("--eval-edit-pairs", help="held-out edits (same format)")
    ap.add_argument("--img-scale-range", type=float, nargs=2, default=IMG_SCALE_RANGE,
                    help="training image scales (edits)")
    ap.add_argument("--eval-img-scale", type=float, default=1.5, help="image guidance scale of the evaluation")
    ap.add_argument("--edit-cfg-interval", type=float, nargs=2, default=(0.0, 1.0),
                    help="the teacher's CFG interval for edits (BagelPipeline.edit's default)")
    ap.add_argument("--init", default=None, help="distilled-expert file of the previous stage (default: base)")


def distill_setup(a):
    """Pipeline, teacher, training conditions (prompts, then edit pairs) and the held-out items (text-to-image,
    then edits)."""
    prompts = read_prompts(a.prompt, a.prompts_file)
    eval_prompts = read_prompts(a.eval_prompt, a.eval_prompts_file)
    edits = read_edit_pairs(a.edit_pairs) if a.edit_pairs else []
    eval_edits = read_edit_pairs(a.eval_edit_pairs) if a.eval_edit_pairs else []
    if not (prompts or edits) or not (eval_prompts or eval_edits):
        raise SystemExit("give training prompts (--prompt/--prompts-file) or edit pairs (--edit-pairs) and "
                         "held-out ones (--eval-prompt/--eval-prompts-file, --eval-edit-pairs)")
    if prompts and not eval_prompts:
        raise SystemExit("training prompts need held-out prompts (--eval-prompt/--eval-prompts-file) to measure "
                         "text-to-image")
    if edits and not eval_edits:
        raise SystemExit("--edit-pairs needs held-out edits (--eval-edit-pairs) to measure editing")
    pipe = load_pipe(a)
    teacher = Teacher(pipe, tuple(a.size), tuple(a.cfg_interval), edit_cfg_interval=tuple(a.edit_cfg_interval))
    held = heldout_items(teacher, eval_prompts, a.eval_noises, a.eval_scale, a.seed, eval_edits, a.eval_img_scale)
    return pipe, teacher, prompts + edits, held


# torch's CPU generator keeps 32 bits of its seed: the evaluation noise domains are offsets within them
# (the held-out one is the run's seed itself; no training step's seed, ``step_rng``, takes either value in
# the first million steps of seeds 0-3: a test)
HELD_OUT_DOMAIN, REFERENCE_DOMAIN = 0, 0x5EED_0001


def domain_generator(seed: int, domain: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) + domain) % 2 ** 32)


def with_fresh_noises(items: list[Item], seed: int) -> list[Item]:
    """The same conditions and scales with noises of the reference domain (an unpaired reference set)."""
    gen = domain_generator(seed, REFERENCE_DOMAIN)
    return [replace(it, noise=torch.randn(it.noise.shape, generator=gen).to(it.noise)) for it in items]


def heldout_items(teacher: Teacher, prompts: list[str], noises: int, scale: float, seed: int,
                  edits: list[EditPair] = (), img_scale: float = 1.5) -> list[Item]:
    """Held-out items: their noises come from the held-out domain."""
    gen = domain_generator(seed, HELD_OUT_DOMAIN)
    return ([teacher.item(p, gen, scale) for p in prompts for _ in range(noises)]
            + [teacher.item(e, gen, scale, img_scale) for e in edits for _ in range(noises)])

