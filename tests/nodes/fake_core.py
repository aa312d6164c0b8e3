"""A fake ``hyperbagel_core`` pipeline with the documented API, for node tests without weights."""
from __future__ import annotations

import types

import numpy as np
import torch


class FakeConfig:
    max_latent_size = 4
    latent_downsample = 16
    vae = {"scale_factor": 0.5, "shift_factor": 0.25}


class FakePipe:
    def __init__(self, steps=4, rounds=3):
        self.modules = torch.nn.Linear(2, 2)
        self.config = FakeConfig()
        self.calls = []
        self.steps, self.rounds = steps, rounds
        self.draft = self.distilled = None
        self.compute_device = None
        self.memory_asks = []     # (task, run parameters) of memory_required calls
        self.weight_dtype, self.weight_plan = "default", None

    def memory_required(self, task, **run):
        self.memory_asks.append((task, run))
        return 1000 + run.get("height", 0) * run.get("width", 0)

    def load_draft_head(self, path):
        self.draft = path

    def load_distilled_expert(self, path):
        self.distilled = path

    def _loop(self, n, callback):
        for i in range(n):
            if callback is not None:
                callback(i + 1, n)

    def answer(self, image=None, question="", *, max_new_tokens=512, do_sample=False, temperature=0.3, seed=None,
               think=False, drafter="none", num_draft_tokens=None, callback=None):
        self.calls.append(("answer", dict(image=image, question=question, seed=seed, drafter=drafter,
                                          do_sample=do_sample, k=num_draft_tokens)))
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
        self.calls.append(("generate", dict(prompt=prompt, height=height, width=width, seed=seed, **kw)))
        self._loop(self.steps, callback)
        return self._image(height, width, seed, think)

    def edit(self, image, prompt, *, seed=0, callback=None, think=False, **kw):
        self.calls.append(("edit", dict(image=image, prompt=prompt, seed=seed, **kw)))
        self._loop(self.steps, callback)
        w, h = image.size
        return self._image(max(16, h // 16 * 16), max(16, w // 16 * 16), seed, think)


class FakeCore(types.SimpleNamespace):
    pass


def make_core(pipe=None):
    pipe = pipe or FakePipe()
    loads = []

    class BagelPipeline:
        @staticmethod
        def from_pretrained(path, device=None, dtype=None, ops=None, attn_backend="sdpa", compute_dtype=None,
                            weight_dtype="default", free_memory=None):
            loads.append(dict(path=path, device=device, dtype=dtype, ops=ops, attn_backend=attn_backend,
                              compute_dtype=compute_dtype, weight_dtype=weight_dtype, free_memory=free_memory))
            pipe.weight_dtype = weight_dtype
            return pipe

    from hyperbagel_core import quant   # the real option list (no weights involved)
    return FakeCore(BagelPipeline=BagelPipeline, loads=loads, pipe=pipe, quant=quant)
