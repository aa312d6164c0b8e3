"""Acceptance rules of speculative decoding as pure functions.

Greedy: accept the longest prefix of the draft that equals the target's argmax; the next token is the
target's argmax after that prefix (lossless by construction).
Sampling (Leviathan et al. / Chen et al.): draft token x_i ~ q_i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is drawn from
normalise(max(0, p_i - q_i)); if all k are accepted a bonus token is drawn from p_k. The emitted tokens
are then distributed exactly as sampling from p token by token. A deterministic drafter is the
special case q_i = one-hot(x_i): accept with probability p_i(x_i), residual = p_i with x_i removed.
"""
from __future__ import annotations

import torch


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row; ties go to the lowest index (torch.argmax returns the first maximum)."""
    return logits.argmax(dim=-1)


def greedy_accept(draft: list[int], target_argmax: list[int]) -> int:
    """Number m of leading draft tokens equal to the target's argmax predictions."""
    m = 0
    while m < len(draft) and draft[m] == target_argmax[m]:
        m += 1
    return m


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The decoding distribution of plain sampling: softmax(logits.float() / T)."""
    return torch.softmax(logits.float() / temperature, dim=-1)


def accept_probability(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    """min(1, p(x)/q(x)) for one position (q None = one-hot draft)."""
    if q is None:
        return p[token].clamp(max=1.0)
    if q[token] <= 0:  # never drafted by a proper sampler; accept iff the target allows it
        return (p[token] > 0).to(p.dtype)
    return (p[token] / q[token]).clamp(max=1.0)


def residual(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    """normalise(max(0, p - q)) for one position; falls back to p if the residual mass is zero."""
    if q is None:
        r = p.clone()
        r[token] = 0
    else:
        r = (p - q).clamp(min=0)
    s = r.sum()
    return r / s if s > 0 else p


def _uniform(generator: torch.Generator | None, device) -> float:
    dev = generator.device if generator is not None else device
    return torch.rand((), generator=generator, device=dev).item()


def _draw(dist: torch.Tensor, generator: torch.Generator | None) -> int:
    if generator is not None and generator.device != dist.device:
        dist = dist.to(generator.device)
    return int(torch.multinomial(dist, 1, generator=generator).item())


def speculative_accept(p: torch.Tensor, q: torch.Tensor | None, draft: list[int],
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """p [k+1, V] target probs, q [k, V] draft probs (None = deterministic drafter), draft k tokens.

    Returns (m, next_token): m accepted drafts, then the corrected or bonus token.
    """
    for i, x in enumerate(draft):
        qi = None if q is None else q[i]
        if _uniform(generator, p.device) < float(accept_probability(p[i], qi, x)):
            continue
        return i, _draw(residual(p[i], qi, x), generator)
    return len(draft), _draw(p[len(draft)], generator)
