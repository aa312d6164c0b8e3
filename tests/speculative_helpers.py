"""Shared fixtures of the speculative tests: tiny float64 BagelModels and plain reference decoding."""
from __future__ import annotations

import torch

from hyperbagel_core.config import LLMConfig
from hyperbagel_core.speculative import speculative_generate
from hyperbagel_core.testing import random_model

TINY = LLMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=23)
MICRO = LLMConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=5)
BOS = 0


def tiny_target(seed: int = 1, shape: LLMConfig = TINY, std: float = 0.3, dtype=torch.float64):
    return random_model(shape, seed=seed, std=std, dtype=dtype)


def decode(model, prompt, drafter=None, **kw):
    """Prefill ``prompt`` then decode; returns (SpecResult, ctx). ``model``: BagelModel or StaticTextDecoder."""
    base = getattr(model, "model", model)
    ctx = base.new_context()
    if len(prompt):
        base.prefill_text(ctx, torch.tensor(list(prompt)))
    kw.setdefault("bos_id", BOS)
    return speculative_generate(model, ctx, drafter, prompt_ids=list(prompt), **kw), ctx


def one_thread():
    """Generator for an autouse fixture: tiny models run fastest (and steadiest) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
