"""Speculative greedy decoding is token-for-token plain greedy decoding, for every drafter and k."""
import random

import pytest
import torch

from hyperbagel_core.speculative import (DraftHead, DraftHeadDrafter, OracleDrafter, PromptLookupDrafter,
                                         speculative_generate)
from tests.speculative_helpers import BOS, decode, one_thread, tiny_target

KS = (1, 2, 4, 8, 10)
_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def target():
    return tiny_target(seed=1)


def _prompts(n, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randrange(0, 12))] for _ in range(n)]


def _drafters(model, ref_ids):
    V = model.config.llm.vocab_size
    return {
        "draft_head_zero_init": DraftHeadDrafter(DraftHead.from_target(model)),
        "draft_head_random": DraftHeadDrafter(DraftHead.from_target(model, zero_init=False, seed=3)),
        "eagle3": DraftHeadDrafter(DraftHead.from_target(model, "eagle3", seed=4)),
        # a reduced draft vocabulary: the answer's tokens plus a few others (some answer tokens left out)
        "draft_head_reduced_vocab": DraftHeadDrafter(DraftHead.from_target(
            model, zero_init=False, seed=6, draft_vocab=sorted(set(ref_ids[::2]) | {1, 2, 3}))),
        "prompt_lookup": PromptLookupDrafter(),
        "oracle": OracleDrafter(ref_ids, 0.6, V, seed=5),
        "oracle_perfect_with_head": OracleDrafter(ref_ids, 1.0, V, shadow=DraftHeadDrafter(
            DraftHead.from_target(model))),
    }


@pytest.mark.parametrize("adaptive", [True, False])
def test_greedy_equals_plain_many_prompts(target, adaptive):
    eos = 7
    for prompt in _prompts(4, target.config.llm.vocab_size, seed=int(adaptive)):
        ref, rctx = decode(target, prompt, None, eos_id=eos, max_new_tokens=24)
        for name, drafter in _drafters(target, ref.ids + [eos]).items():
            for k in KS:
                got, ctx = decode(target, prompt, drafter, eos_id=eos, max_new_tokens=24, num_draft_tokens=k,
                                  adaptive=adaptive)
                assert got.ids == ref.ids, (name, k, prompt)
                assert (ctx.kv_len, ctx.rope) == (rctx.kv_len, rctx.rope), (name, k)


def _stop_case(model, prompt, at):
    """An eos id whose first greedy occurrence is at output index ``at``."""
    free, _ = decode(model, prompt, None, eos_id=-1, max_new_tokens=40)
    for j, t in enumerate(free.ids):
        if j >= at and t not in free.ids[:j]:
            return t, free.ids[:j]
    pytest.skip("no fresh token to use as a stop token")


@pytest.mark.parametrize("k", KS)
def test_stop_token_inside_a_draft_block(target, k):
    prompt = [3, 1, 4, 1, 5]
    eos, expect = _stop_case(target, prompt, at=5)
    V = target.config.llm.vocab_size
    for drafter in (OracleDrafter(expect + [eos] + [1] * 20, 1.0, V), PromptLookupDrafter(),
                    DraftHeadDrafter(DraftHead.from_target(target, zero_init=False, seed=7))):
        got, ctx = decode(target, prompt, drafter, eos_id=eos, max_new_tokens=40, num_draft_tokens=k,
                          adaptive=False)
        ref, rctx = decode(target, prompt, None, eos_id=eos, max_new_tokens=40)
        assert got.ids == ref.ids == expect
        assert ctx.kv_len == rctx.kv_len
    if k > 1:   # the perfect oracle put the stop token inside a block: fewer rounds than tokens
        assert got.stats["rounds"] <= len(expect)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("max_new", [1, 2, 5, 7, 13])
def test_max_new_tokens_mid_block(target, k, max_new):
    prompt = [2, 7, 1, 8]
    free, _ = decode(target, prompt, None, eos_id=-1, max_new_tokens=40)
    oracle = OracleDrafter(free.ids, 1.0, target.config.llm.vocab_size)
    got, ctx = decode(target, prompt, oracle, eos_id=-1, max_new_tokens=max_new, num_draft_tokens=k,
                      adaptive=False)
    ref, rctx = decode(target, prompt, None, eos_id=-1, max_new_tokens=max_new)
    assert got.ids == ref.ids == free.ids[:max_new]
    assert ctx.kv_len == rctx.kv_len == len(prompt) + max_new


def test_perfect_oracle_tau_and_stats(target):
    free, _ = decode(target, [5, 5], None, eos_id=-1, max_new_tokens=41)
    got, _ = decode(target, [5, 5], OracleDrafter(free.ids, 1.0, 23), eos_id=-1, max_new_tokens=41,
                    num_draft_tokens=4, adaptive=False)
    s = got.stats
    assert got.ids == free.ids and s["acceptance_rate"] == 1.0 and s["tau"] == 5.0
    assert s["rounds"] == 8 and s["tokens"] == 41 and s["tokens_per_s"] > 0


def test_adaptive_pauses_a_useless_drafter(target):
    free, _ = decode(target, [9], None, eos_id=-1, max_new_tokens=120)
    got, _ = decode(target, [9], OracleDrafter(free.ids, 0.0, 23), eos_id=-1, max_new_tokens=120,
                    num_draft_tokens=10)
    s = got.stats
    assert got.ids == free.ids
    assert s["accepted"] == 0 and s["drafted"] <= 30 and s["draft_rounds"] <= 20   # mostly plain rounds


def test_callback_every_round_and_interrupt(target):
    calls = []
    got, _ = decode(target, [4, 2], PromptLookupDrafter(), eos_id=-1, max_new_tokens=10,
                    callback=lambda r, t: calls.append((r, t)))
    steps = [c[0] for c in calls]  # one call per round, reporting the tokens emitted so far
    assert len(calls) == got.stats["rounds"] and calls[0][1] == 10
    assert steps == sorted(set(steps)) and steps[-1] == len(got.ids) and steps[0] >= 1

    class Stop(Exception):
        pass

    def cb(r, t):
        if r >= 3:
            raise Stop
    with pytest.raises(Stop):
        decode(target, [4, 2], PromptLookupDrafter(), eos_id=-1, max_new_tokens=10, callback=cb)


def test_prompt_lookup_finds_copies():
    d = PromptLookupDrafter([1, 2, 3, 4, 5, 9, 9], max_ngram=3)
    d.reset(0, [1, 2, 3, 4, 5, 9, 9])
    d.observe([BOS], None, 1)
    d.observe([1], None, 2)
    assert d.propose(3)[0] == [3, 4, 5]
    d.observe([2, 3], None, 7)
    assert d.propose(2)[0] == []
    loop = PromptLookupDrafter()
    loop.reset(0, [])
    loop.observe([6, 8, 6], None, 8)
    assert loop.propose(5)[0] == [6, 8, 6, 8, 6]           # a loop continues periodically


def test_core_tiny_checkpoint_lossless(tmp_path):
    """Against the real BagelModel of a tiny random checkpoint (skipped until the core has landed)."""
    testing = pytest.importorskip("hyperbagel_core.testing")
    pipeline = pytest.importorskip("hyperbagel_core.pipeline")
    context = pytest.importorskip("hyperbagel_core.context")
    path = tmp_path / "ckpt"
    testing.make_tiny_checkpoint(path, seed=0)
    try:
        pipe = pipeline.BagelPipeline.from_pretrained(path, device="cpu", dtype=torch.float64)
    except Exception:
        pipe = pipeline.BagelPipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
    model, n_layers = pipe.model, pipe.model.config.llm.num_hidden_layers
    V = model.config.llm.vocab_size
    rng = random.Random(0)
    for _ in range(3):
        prompt = [rng.randrange(3, min(V, 200)) for _ in range(rng.randrange(1, 8))]
        base = context.Context(n_layers)
        model.prefill_text(base, torch.tensor(prompt))
        kw = dict(bos_id=1, eos_id=2, max_new_tokens=16)
        ref = speculative_generate(model, base.fork(), None, **kw)
        for drafter in (PromptLookupDrafter(), DraftHeadDrafter(DraftHead.from_target(model, zero_init=False)),
                        OracleDrafter(ref.ids + [2], 0.7, V)):
            for k in (1, 4, 10):
                got = speculative_generate(model, base.fork(), drafter, num_draft_tokens=k, prompt_ids=prompt,
                                           **kw)
                assert got.ids == ref.ids


def test_static_draft_chain_equals_dynamic(target):
    """The fixed-shape draft step (what the CUDA graph captures) proposes what the eager chain proposes,
    and the reused fixed cache stays correct across answers."""
    head = DraftHead.from_target(target, zero_init=False, seed=8)
    dyn, sta = DraftHeadDrafter(head), DraftHeadDrafter(head, capacity=64, static=True)
    for prompt in ([1, 2, 3], [4, 4], [7]):
        a, _ = decode(target, prompt, dyn, eos_id=-1, max_new_tokens=20, num_draft_tokens=6, adaptive=False)
        b, _ = decode(target, prompt, sta, eos_id=-1, max_new_tokens=20, num_draft_tokens=6, adaptive=False)
        assert a.ids == b.ids and a.stats["accepted"] == b.stats["accepted"] and a.stats["rounds"] == b.stats["rounds"]
    feats = torch.randn(5, target.config.llm.num_hidden_layers, target.config.llm.hidden_size, dtype=torch.float64)
    for d in (dyn, sta):
        d.reset(3)
        d.observe([BOS, 5, 6, 7, 8], feats, 9)
    assert dyn.propose(8)[0].tolist() == sta.propose(8)[0].tolist()
