"""Shared fixtures of the speculative tests: tiny float64 targets and plain reference decoding."""
from __future__ import annotations

import torch

from hyperbagel_core.speculative import speculative_generate
from hyperbagel_core.speculative.static_llm import LLMShape, StaticLLM

TINY = LLMShape(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=23)
MICRO = LLMShape(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, vocab_size=5)
BOS = 0


def tiny_target(seed: int = 1, shape: LLMShape = TINY, std: float = 0.3) -> StaticLLM:
    return StaticLLM(shape).double().randomize(seed=seed, std=std)


def decode(model, prompt, drafter=None, **kw):
    """Prefill ``prompt`` then decode; returns (SpecResult, ctx)."""
    ctx = model.new_context(8)
    if len(prompt):
        model.prefill_text(ctx, torch.tensor(list(prompt)))
    kw.setdefault("bos_id", BOS)
    return speculative_generate(model, ctx, drafter, prompt_ids=list(prompt), **kw), ctx


def one_thread():
    """Generator for an autouse fixture: tiny models run fastest (and steadiest) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
