"""Speculative sampling keeps the target's distribution: the acceptance rule against its formula, and
chi-square tests of the emitted tokens against the exact distribution of plain sampling.

Every chi-square test below rejects at level 1e-3 (Wilson-Hilferty quantile): with fresh seeds a
correct implementation fails one given test with probability 1e-3 (the seeds are fixed, so the suite
is deterministic). Cells with an expected count below 5 are pooled.
"""
from statistics import NormalDist

import pytest
import torch

from hyperbagel_core.speculative import DraftHead, DraftHeadDrafter, OracleDrafter, speculative_generate
from hyperbagel_core.speculative.accept import accept_probabilities, residuals, speculative_accept
from tests.speculative_helpers import BOS, MICRO, one_thread, tiny_target

ALPHA = 1e-3
_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def chi2_quantile(dof: int, alpha: float = ALPHA) -> float:
    z = NormalDist().inv_cdf(1 - alpha)
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def chi2_ok(counts: dict, probs: dict, n: int) -> tuple[bool, float, float]:
    """Pearson chi-square of observed counts against exact probabilities (pooling small cells)."""
    stat, pooled_o, pooled_e, cells = 0.0, 0, 0.0, 0
    for key, p in probs.items():
        e, o = n * p, counts.get(key, 0)
        if e < 5:
            pooled_o, pooled_e = pooled_o + o, pooled_e + e
            continue
        stat, cells = stat + (o - e) ** 2 / e, cells + 1
    assert not set(counts) - set(probs), "observed an outcome of probability 0"
    if pooled_e > 0:
        stat, cells = stat + (pooled_o - pooled_e) ** 2 / pooled_e, cells + 1
    q = chi2_quantile(max(cells - 1, 1))
    return stat < q, stat, q


def _rand_dist(g, v, zeros=0):
    p = torch.rand(v, generator=g, dtype=torch.float64) ** 3
    p[torch.randperm(v, generator=g)[:zeros]] = 0
    return p / p.sum()


def test_accept_rule_matches_formula():
    """The per-position rule (accept_probabilities, residuals) against its formula and the identity
    q(x) a(x) + (1 - sum_y q(y) a(y)) r(x) = p(x) that makes it lossless."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        v = 7
        p, q = _rand_dist(g, v, trial % 3), _rand_dist(g, v, (trial + 1) % 3)
        xs = torch.arange(v)
        P, Q = p.expand(v, v), q.expand(v, v)            # row x: the rule at one position with draft x
        a = accept_probabilities(P, Q, xs)
        ok = q > 0
        assert torch.allclose(a[ok], torch.clamp(p[ok] / q[ok], max=1.0))
        r = residuals(P, Q, xs)[0]
        if (p - q).clamp(min=0).sum() > 0:
            assert torch.allclose(r, (p - q).clamp(min=0) / (p - q).clamp(min=0).sum())
        acc = q * a
        assert torch.allclose(acc + (1 - acc.sum()) * r, p, atol=1e-12)
        # deterministic drafter (q one-hot at x)
        a1, r1 = accept_probabilities(P, None, xs), residuals(P, None, xs)
        out = (1 - a1)[:, None] * r1 + torch.diag(a1)
        assert torch.allclose(out, P, atol=1e-12)


@pytest.mark.parametrize("deterministic", [False, True])
def test_speculative_accept_monte_carlo(deterministic):
    g = torch.Generator().manual_seed(1)
    V, n = 5, 20000
    p = torch.stack([_rand_dist(g, V, 1) for _ in range(3)])
    q = torch.stack([_rand_dist(g, V) for _ in range(2)])
    first, second, n2 = {}, {}, 0
    for _ in range(n):
        if deterministic:
            draft, qq = [0, 1], None
        else:
            draft, qq = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)], q
        m, nxt = speculative_accept(p, qq, draft, g)
        emitted = draft[:m] + [nxt]
        first[emitted[0]] = first.get(emitted[0], 0) + 1
        if len(emitted) > 1:
            second[emitted[1]] = second.get(emitted[1], 0) + 1
            n2 += 1
    for counts, row, total in ((first, p[0], n), (second, p[1], n2)):
        ok, stat, q_ = chi2_ok(counts, {x: float(row[x]) for x in range(V) if row[x] > 0}, total)
        assert ok, (stat, q_, counts)


def _exact_joint(model, prompt, T, depth=3):
    """P(y1..y_depth) of plain sampling, by enumeration (small vocab)."""
    V = model.config.llm.vocab_size
    base = model.new_context()
    model.prefill_text(base, torch.tensor(prompt))
    out = {}

    def rec(ctx, tok, prefix, pr):
        logits = model.forward_text(ctx, torch.tensor([tok])).logits[0]
        probs = torch.softmax(logits.float() / T, -1).double()
        for y in range(V):
            if len(prefix) + 1 == depth:
                out[tuple(prefix + [y])] = pr * float(probs[y])
            else:
                rec(ctx.fork(), y, prefix + [y], pr * float(probs[y]))
    rec(base, BOS, [], 1.0)
    return out


@pytest.mark.parametrize("case", ["draft_head_reduced_vocab", "deterministic"])
def test_first_tokens_distribution_equals_plain_sampling(case):
    model = tiny_target(seed=2, shape=MICRO, std=0.6)
    prompt, T, n = [1, 3, 2], 0.9, 3000
    exact = _exact_joint(model, prompt, T)
    base = model.new_context()
    model.prefill_text(base, torch.tensor(prompt))
    if case == "draft_head_reduced_vocab":
        # the draft head's sampling path with q 0 off its 3 tokens (the residual covers the rest); a full
        # vocabulary is the special case d2t = identity (and test_speculative_accept_monte_carlo's dense q)
        drafter = DraftHeadDrafter(DraftHead.from_target(model, zero_init=False, seed=11, draft_vocab=[0, 2, 4]))
    else:
        drafter = OracleDrafter([2, 2, 4, 1, 0, 3], 1.0, MICRO.vocab_size)    # fixed proposals, one-hot q
    g = torch.Generator().manual_seed(123)
    counts, accepted = {}, 0
    for _ in range(n):
        r = speculative_generate(model, base.fork(), drafter, bos_id=BOS, eos_id=-1, max_new_tokens=3,
                                 do_sample=True, temperature=T, generator=g, num_draft_tokens=2, adaptive=False)
        key = tuple(r.ids)
        counts[key] = counts.get(key, 0) + 1
        accepted += r.stats["accepted"]
    assert 0 < accepted < 2 * n          # both branches of the rule were exercised
    ok, stat, q = chi2_ok(counts, exact, n)
    assert ok, (stat, q)
