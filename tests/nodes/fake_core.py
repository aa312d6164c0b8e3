"""A fake ``hyperbagel_core`` pipeline with the documented API, for node tests without weights."""
from __future__ import annotations

import types

import numpy as np
import torch

from hyperbagel_core.sampling.preview import wants_denoised


class FakeConfig:
    max_latent_size = 4
    latent_downsample = 16
    vae = {"scale_factor": 0.5, "shift_factor": 0.25}


class FakePipe:
    def __init__(self, steps=4, rounds=3):
        self.modules = torch.nn.Linear(2, 2)
        self.model = object()  # the base model the attachment loaders check files against
        self.config = FakeConfig()
        self.calls = []
        self.steps, self.rounds = steps, rounds
        self.draft_head = self.distilled_expert = None  # bound by BagelModel.prepare for each run
        self.ops = None
        self.compute_device = None
        self.memory_asks = []     # (task, run parameters) of memory_required calls
        self.weight_dtype, self.weight_plan = "default", None
        self.denoised_steps = 0   # steps that handed a denoised estimate to the callback
        self.compiled_as = None   # set_compile's mode

    def set_compile(self, mode):
        self.compiled_as = mode

    def memory_required(self, task, **run):
        self.memory_asks.append((task, run))
        return 1000 + run.get("height", 0) * run.get("width", 0)

    def bound(self) -> dict:
        """What the run sees: the attachments bound on the shared pipeline."""
        return dict(expert=getattr(self.distilled_expert, "path", None), head=getattr(self.draft_head, "path", None))

    def _loop(self, n, callback, latent_shape=None):
        """``callback(step, total)``; denoising steps give ``denoised`` (filled with the step number) to a callback
        that asks for it, as the core does (``sampling.preview``)."""
        for i in range(n):
            if callback is None:
                continue
            if latent_shape is not None and wants_denoised(callback):
                self.denoised_steps += 1
                callback(i + 1, n, denoised=torch.full(latent_shape, float(i + 1)))
            else:
                callback(i + 1, n)

    def answer(self, image=None, question="", *, max_new_tokens=512, do_sample=False, temperature=0.3, seed=None,
               think=False, drafter="none", num_draft_tokens=None, callback=None):
        self.calls.append(("answer", dict(image=image, question=question, seed=seed, drafter=drafter,
                                          do_sample=do_sample, k=num_draft_tokens, **self.bound())))
        self._loop(self.rounds, callback)
        n = len(image) if isinstance(image, list) else (0 if image is None else 1)
        return types.SimpleNamespace(text=f"{n} image(s): {question}", token_ids=[1, 2, 3],
                                     stats={"rounds": self.rounds, "new_tokens": 3, "seconds": 0.5})

    def _image(self, h, w, seed, thinking):
        rng = np.random.default_rng(seed)
        u8 = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        return types.SimpleNamespace(image_u8=u8, latent=torch.full((1, 16, h // 8, w // 8), float(seed % 7)),
                                     thinking="plan" if thinking else None, stats={"nfe": self.steps, "passes": self.steps})

    def generate(self, prompt, *, height=1024, width=1024, seed=0, callback=None, think=False, **kw):
        self.calls.append(("generate", dict(prompt=prompt, height=height, width=width, seed=seed, **kw, **self.bound())))
        self._loop(self.steps, callback, (1, 16, height // 8, width // 8))
        return self._image(height, width, seed, think)

    def edit(self, image, prompt, *, seed=0, callback=None, think=False, **kw):
        self.calls.append(("edit", dict(image=image, prompt=prompt, seed=seed, **kw, **self.bound())))
        w, h = image.size
        h, w = max(16, h // 16 * 16), max(16, w // 16 * 16)
        self._loop(self.steps, callback, (1, 16, h // 8, w // 8))
        return self._image(h, w, seed, think)


class FakeCore(types.SimpleNamespace):
    pass


class FakeExpert:
    """Stands in for distill.DistilledExpert: its file's config and a module holding its weights."""

    def __init__(self, path, schedule="hyper-6nfe", timesteps=(1.0, 5 / 6, 4 / 6, 0.5, 2 / 6, 1 / 6, 0.0)):
        self.path = path
        self.config = types.SimpleNamespace(schedule=schedule, timesteps=tuple(timesteps))
        self.module = torch.nn.Linear(2, 2)

    def as_module(self, model=None):
        return self.module


def _load_file(path, make):
    with open(path, "rb") as f:
        if f.read(3) == b"bad":
            raise ValueError(f"{path}: not a file for this base model (fingerprint mismatch)")
    return make(path)


def _head(path):
    head = torch.nn.Linear(2, 2)
    head.path = path
    return head


def make_core(pipe=None):
    pipe = pipe or FakePipe()
    loads = []
    attached = []   # (kind, path) of every attachment file read

    class BagelPipeline:
        @staticmethod
        def from_pretrained(path, device=None, dtype=None, ops=None, attn_backend="sdpa", compute_dtype=None,
                            weight_dtype="default", free_memory=None, **extra):
            loads.append(dict(path=path, device=device, dtype=dtype, ops=ops, attn_backend=attn_backend,
                              compute_dtype=compute_dtype, weight_dtype=weight_dtype, free_memory=free_memory, **extra))
            pipe.weight_dtype = weight_dtype
            return pipe

    def load_distilled_expert(path, model):
        attached.append(("distilled", path))
        return _load_file(path, FakeExpert)

    def load_draft_head(path, model, strict_fingerprint=True):
        attached.append(("draft", path))
        return _load_file(path, _head)

    from hyperbagel_core import quant   # the real option lists (no weights involved)
    from hyperbagel_core.model import compiled
    core = FakeCore(BagelPipeline=BagelPipeline, loads=loads, pipe=pipe, attached=attached, quant=quant,
                    distill=types.SimpleNamespace(load_distilled_expert=load_distilled_expert),
                    speculative=types.SimpleNamespace(load_draft_head=load_draft_head),
                    ops=types.SimpleNamespace(adopt_ops=lambda module, ops=None: module))
    setattr(core, "model.compiled", compiled)     # runtime.core_submodule("model.compiled")
    return core


def start_extension(models_dir, monkeypatch, core=None):
    """The stubbed ComfyUI with ``models_dir``, a fresh import of our nodes and ``core`` behind them.

    Returns (stub state, nodes.extension, core, nodes.runtime); the caller uninstalls the stub.
    """
    import asyncio
    import importlib
    import sys

    import comfy_stub

    state = comfy_stub.install(str(models_dir))
    for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
        sys.modules.pop(name)
    ext = importlib.import_module("nodes.extension")
    runtime = importlib.import_module("nodes.runtime")
    core = core or make_core()
    monkeypatch.setattr(runtime, "import_core", lambda: core)
    asyncio.run(ext.comfy_entrypoint())
    return state, ext, core, runtime
