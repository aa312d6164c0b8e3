"""Plain autoregressive text decoding (spec 10.1): the reference that speculative decoding must equal."""
from __future__ import annotations

import time

import torch

from .context import Context
from .errors import InputError


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float, generator=None) -> int:
    """Greedy argmax (ties -> lowest id) or one multinomial draw from softmax(logits / T) in fp32."""
    if not do_sample:
        return int(torch.argmax(logits))
    if not 0 < temperature < float("inf"):    # also refuses NaN, which multinomial would choke on
        raise InputError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}; use "
                         "do_sample=False for greedy decoding")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_text(model, ctx: Context, *, bos_id: int, eos_id: int, max_new_tokens: int, do_sample: bool = False,
                  temperature: float = 1.0, generator=None, callback=None, stats: dict | None = None) -> list[int]:
    """Feed <|im_start|> at ``ctx.rope`` and decode until <|im_end|> (not emitted) or ``max_new_tokens``.

    ``model`` is a BagelModel (eager) or a ``StaticTextDecoder`` (fixed shapes, CUDA graphs). ``ctx`` is
    extended in place (callers pass a fork). Returns the new ids without the start token.
    """
    model.reserve_text(ctx, max_new_tokens)
    out: list[int] = []
    tok, t0 = bos_id, time.perf_counter()
    for step in range(max_new_tokens):
        step_out = model.forward_text(ctx, torch.tensor([tok]))
        if step_out.argmax is not None and not do_sample:      # the static step's fused argmax
            tok = int(step_out.argmax[-1])
        else:
            tok = next_token(step_out.logits[-1], do_sample, temperature, generator)
        if callback is not None:
            callback(step + 1, max_new_tokens)
        if tok == eos_id:
            break
        out.append(tok)
    if stats is not None:
        dt = time.perf_counter() - t0
        stats.update(drafter="none", rounds=len(out) + (len(out) < max_new_tokens), new_tokens=len(out),
                     seconds=dt, tokens_per_second=len(out) / dt if dt > 0 else float("inf"))
    return out
