"""The trainable student: fp32 masters of generation-expert tensors + guidance embedders, installed into the
frozen base model for a pass with gradients, with activation checkpointing per decoder layer and an EMA.

Precision: trainable tensors are fp32 master weights (AdamW state fp32); each pass uses them cast to the
base model's dtype (bf16 on GPU) through autograd, so gradients reach the fp32 masters and small updates are
not rounded away (a bf16 weight + lr*update below half an ulp is lost). The frozen base is loaded once per
process (DDP shares nothing but gradients); it never gets gradients. docs/TRAINING.md.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import replace
from functools import partial

import torch
from torch import nn

from ..distill.embedders import GuidanceEmbedding
from ..distill.expert import DistilledExpert, gen_expert_keys
from .distributed import full_tensor
from .teacher import Item


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
