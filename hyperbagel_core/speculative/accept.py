"""Acceptance rules of speculative decoding as pure functions.

Greedy: accept the longest prefix of the draft that equals the target's argmax; the next token is the
target's argmax after that prefix (lossless by construction).
Sampling (Leviathan et al. / Chen et al.): draft token x_i ~ q_i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is drawn from
normalise(max(0, p_i - q_i)); if all k are accepted a bonus token is drawn from p_k. The emitted tokens
are then distributed exactly as sampling from p token by token. A deterministic drafter is the
special case q_i = one-hot(x_i): accept with probability p_i(x_i), residual = p_i with x_i removed.
Both rules run on the device (``acceptance_on_device``, ``greedy_accept_on_device``): speculative decoding
reads one small tensor back per round.
"""
from __future__ import annotations

import torch


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row; ties go to the lowest index (torch.argmax returns the first maximum)."""
    return logits.argmax(dim=-1)


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The decoding distribution of plain sampling: softmax(logits.float() / T)."""
    return torch.softmax(logits.float() / temperature, dim=-1)


def accept_probabilities(p: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor) -> torch.Tensor:
    """min(1, p_i(x_i) / q_i(x_i)) per position: p/q [k, V] (q None = one-hot drafts), draft [k] -> [k]."""
    idx = torch.arange(draft.numel(), device=p.device)
    px = p[idx, draft]
    if q is None:
        return px.clamp(max=1.0)
    qx = q[idx, draft]
    # q_i(x_i) = 0: never drafted by a proper sampler; accept iff the target allows it
    return torch.where(qx > 0, (px / qx.clamp_min(torch.finfo(qx.dtype).tiny)).clamp(max=1.0), (px > 0).to(p.dtype))


def residuals(p: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p_i - q_i)) per position (one-hot q: p_i without x_i); p_i itself where that mass
    is zero. p/q [k, V], draft [k] -> [k, V]."""
    if q is None:
        r = p.clone()
        r[torch.arange(draft.numel(), device=p.device), draft] = 0
    else:
        r = (p - q).clamp(min=0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(torch.finfo(r.dtype).tiny), p)


def acceptance_on_device(p: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The sampling rule above for a whole chain at once, on ``p``'s device, without a host sync.

    p [k+1, V] target probs, q [k, V] draft probs (None = deterministic drafter), draft [k] ids on p's device.
    All k uniforms are drawn up front (the ones past the first rejection are unused: the same law as drawing
    them one by one); the residual of every position is formed and the one at the first rejection (or the
    bonus distribution p_k) is drawn from. Returns a LongTensor [2]: (m accepted drafts, next token).
    """
    k = draft.numel()
    if k == 0:
        return torch.cat([torch.zeros(1, dtype=torch.long, device=p.device), _draw_t(p[0], generator)])
    a = accept_probabilities(p[:k], q, draft)
    m = (_uniforms(k, generator, p.device) < a).long().cumprod(0).sum().view(1)
    dist = torch.cat([residuals(p[:k], q, draft), p[k:k + 1]]).index_select(0, m)[0]
    return torch.cat([m, _draw_t(dist, generator)])


def speculative_accept(p: torch.Tensor, q: torch.Tensor | None, draft, generator: torch.Generator | None = None
                       ) -> tuple[int, int]:
    """``acceptance_on_device`` for a list or tensor draft; returns (m, next_token) as ints (one host sync)."""
    d = torch.as_tensor(draft, dtype=torch.long).reshape(-1).to(p.device)
    m, tok = acceptance_on_device(p, q, d, generator).tolist()
    return m, tok


def greedy_accept_on_device(draft: torch.Tensor, target_argmax: torch.Tensor) -> torch.Tensor:
    """Greedy rule on the device: [1] number of leading draft ids equal to the target's argmax."""
    k = draft.numel()
    return (draft == target_argmax[:k]).long().cumprod(0).sum().view(1)


def _uniforms(k: int, generator: torch.Generator | None, device) -> torch.Tensor:
    dev = generator.device if generator is not None else device
    return torch.rand(k, generator=generator, device=dev).to(device)


def _draw_t(dist: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is not None and generator.device != dist.device:
        return torch.multinomial(dist.to(generator.device), 1, generator=generator).to(dist.device)
    return torch.multinomial(dist, 1, generator=generator)
