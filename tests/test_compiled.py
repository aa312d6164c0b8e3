"""Issue 21 on CPU: the compiled (inductor-fused) decode step and denoising pass equal the eager code within
stated tolerances; greedy and speculative decoding through the compiled step give the eager tokens; every
region compiles once per shape class (no recompiles for other block sizes, capacities, resolutions).

Inductor compiles are costly on 2 cores, so there are two: the decode step's middle region (attention over
the slot cache, the rest of a layer, the next layer's norm, q/k/v, q/k norms and RoPE: the code of all but
the first and last layer) and the pass's region. The other regions (the step's first and last, the draft
head's catch-up and chain step) go through dynamo with its "eager" backend: that checks they trace whole and
stay compiled across shapes (what the GPU run compiles with inductor); their fused numerics are those of
the same ops in the middle region. The pipeline test checks the routing with the plain region functions.

Tolerances: fp32 logits 1e-4 absolute and relative (values of order 1-10; the compiled regions fuse the
same fp32 arithmetic in another order, observed differences ~5e-6); pass velocities 1e-5 abs + 1e-4 rel.
Greedy ids are compared exactly only where the eager top-1/top-2 margin exceeds 1e-3, i.e. far above those
differences (asserted, so the comparison cannot silently lose its meaning).
"""
import pytest
import torch

from hyperbagel_core.model.compiled import RegionCompiler, resolve_compile
from hyperbagel_core.model.static_decode import StaticTextDecoder, decode_middle
from hyperbagel_core.speculative import DraftHead, DraftHeadDrafter, OracleDrafter
from tests.speculative_helpers import decode, one_thread, tiny_target

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
TOL = dict(rtol=1e-4, atol=1e-4)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def compiled():
    model = tiny_target(seed=2, dtype=torch.float32)           # 6 layers: the middle region serves 5 of them
    comp, fused = RegionCompiler("eager"), RegionCompiler("inductor")
    comp.regions["decode_middle"] = fused.region("decode_middle", decode_middle)
    dec = StaticTextDecoder(model, compiler=comp)
    dec.min_rows = 2         # CUDA's choice: one graph per region for every block size (CPU adds a 1-row one)
    return model, comp, fused, dec


def _prefilled(model, prompt=PROMPT):
    ctx = model.new_context()
    model.prefill_text(ctx, torch.tensor(prompt))
    return ctx


def _margin(logits: torch.Tensor) -> float:
    top = logits.topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def test_compiled_step_equals_eager(compiled):
    model, comp, fused, dec = compiled
    a, b = _prefilled(model), _prefilled(model)
    dec.reserve_text(b, 64)
    for ids in ([7], [5, 6, 7, 8, 9], [1], list(range(1, 12))):       # padded to 2, 8, 2, 16 rows
        layers = len(ids) > 1
        e = model.forward_text(a, torch.tensor(ids), return_all_hidden=layers)
        s = dec.forward_text(b, torch.tensor(ids), return_all_hidden=layers)
        torch.testing.assert_close(s.logits, e.logits, **TOL)
        torch.testing.assert_close(s.hidden, e.hidden, **TOL)
        assert _margin(e.logits) > 1e-3 and torch.equal(s.argmax, e.logits.argmax(-1))
        if layers:
            for x, y in zip(s.layer_hidden, e.layer_hidden):
                torch.testing.assert_close(x, y, **TOL)
        assert (b.kv_len, b.rope) == (a.kv_len, a.rope)
    assert not comp.failed and comp.graphs == {"decode_first": 1, "decode_last": 1}
    assert not fused.failed and fused.graphs == {"decode_middle": 1}


def test_greedy_and_speculative_through_the_compiled_step_are_lossless(compiled):
    model, comp, fused, dec = compiled
    V = model.config.llm.vocab_size
    for prompt in ([3, 3, 5], [9, 1, 2, 2, 7]):
        ref, rctx = decode(model, prompt, None, eos_id=-1, max_new_tokens=30)
        got, ctx = decode(dec, prompt, None, eos_id=-1, max_new_tokens=30)      # a new capacity each prompt
        assert got.ids == ref.ids and (ctx.kv_len, ctx.rope) == (rctx.kv_len, rctx.rope)
        reduced = DraftHead.from_target(model, zero_init=False, seed=3, draft_vocab=sorted(set(ref.ids) | {0}))
        for drafter in (OracleDrafter(ref.ids, 0.6, V, seed=1), DraftHeadDrafter(reduced, capacity=64, static=True)):
            for k, adaptive in ((4, False), (10, True)):
                got, ctx = decode(dec, prompt, drafter, eos_id=-1, max_new_tokens=30, num_draft_tokens=k,
                                  adaptive=adaptive)
                assert got.ids == ref.ids, (type(drafter).__name__, k, prompt)
                assert (ctx.kv_len, ctx.rope) == (rctx.kv_len, rctx.rope)
    assert not comp.failed and sum(comp.graphs.values()) + sum(fused.graphs.values()) == 3   # nothing recompiled


def test_compiled_draft_head_regions_trace_whole():
    """The draft head's catch-up and chain step as compiled regions propose what the uncompiled fixed-shape
    steps propose, over answers of other lengths, without recompiling."""
    model = tiny_target(seed=1)
    comp = RegionCompiler("eager")
    head = DraftHead.from_target(model, zero_init=False, seed=8, draft_vocab=list(range(2, 20)))
    plain, fused = DraftHeadDrafter(head, capacity=64, static=True), \
        DraftHeadDrafter(head, capacity=64, static=True, compiler=comp)
    for prompt in ([1, 2, 3], [4, 4], [7, 1, 1, 2, 9]):
        a, _ = decode(model, prompt, plain, eos_id=-1, max_new_tokens=20, num_draft_tokens=5, adaptive=False)
        b, _ = decode(model, prompt, fused, eos_id=-1, max_new_tokens=20, num_draft_tokens=5, adaptive=False)
        assert a.ids == b.ids and a.stats["accepted"] == b.stats["accepted"]
    assert not comp.failed
    assert comp.graphs == {"draft_catch_up": 2, "draft_chain_step": 1}   # catch-up: 1 row, and 2+ rows


@pytest.fixture(scope="module")
def pass_model():
    from hyperbagel_core.testing import random_model, tiny_config
    model = random_model(tiny_config(vocab_size=50, layers=3).llm, seed=3, dtype=torch.float32)
    model.set_special_tokens(1, 2)
    ctxs = []
    for n in (7, 4, 9):
        ctx = model.new_context()
        model.prefill_text(ctx, torch.arange(3, 3 + n))
        ctxs.append(ctx)
    return model, ctxs


def test_compiled_pass_equals_eager(pass_model):
    model, ctxs = pass_model
    comp, lm = RegionCompiler("inductor"), model.language_model
    for branches, h, w in ((3, 4, 4), (2, 4, 4), (3, 6, 5)):          # CFG batches and resolutions: one graph
        x = torch.randn(h * w, 64, generator=torch.Generator().manual_seed(h))
        want = model.velocity_batched(ctxs[:branches], x, 0.7, h, w)
        lm.pass_compiler = comp
        try:
            got = model.velocity_batched(ctxs[:branches], x, 0.7, h, w)
        finally:
            lm.pass_compiler = None
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not comp.failed and comp.graphs == {"pass_middle": 1}
    assert [c.kv_len for c in ctxs] == [7, 4, 9]                       # caches only read


def test_compile_option_and_pipeline_paths(tiny_pipe, monkeypatch):
    """compile= on the API: answers decode through the static step's regions on CPU (the model when the weights
    are streamed or patched), images through the pass region; stats say so; off restores the eager paths.
    The regions run uncompiled here (backend None): the compiled numerics are the tests above."""
    from hyperbagel_core.errors import InputError
    from hyperbagel_core.model import compiled as C
    assert [resolve_compile(v) for v in (False, None, True, "decode", "all", "none")] == \
        ["none", "none", "all", "decode", "all", "none"]
    with pytest.raises(InputError, match="compile mode"):
        resolve_compile("fast")
    monkeypatch.setattr(C, "_shared", {})                  # this test's own compiler
    ref = tiny_pipe.answer(None, "hello there", max_new_tokens=6)
    img_ref = tiny_pipe.generate("a red square", height=64, width=64, num_timesteps=3, cfg_interval=(0.0, 1.0))
    cached = dict(height=64, width=64, num_timesteps=9, cfg_interval=(0.0, 1.0), cache="taylorseer")
    ts_ref = tiny_pipe.generate("a red square", **cached)   # the pass region also serves the feature cache
    try:
        tiny_pipe.set_compile("all", backend=None)
        got = tiny_pipe.answer(None, "hello there", max_new_tokens=6)
        assert got.token_ids == ref.token_ids and got.stats["decoder"] == "static" and got.stats["compiled"]
        img = tiny_pipe.generate("a red square", height=64, width=64, num_timesteps=3, cfg_interval=(0.0, 1.0))
        assert img.stats["compiled"] and tiny_pipe.model.language_model.pass_compiler is None
        torch.testing.assert_close(img.latent, img_ref.latent, rtol=1e-4, atol=1e-5)
        ts = tiny_pipe.generate("a red square", **cached)
        assert ts.stats["compiled"] and ts.stats["predicted"] > 0
        torch.testing.assert_close(ts.latent, ts_ref.latent, rtol=1e-4, atol=1e-5)
        assert tiny_pipe.compile_stats()["mode"] == "all" and not tiny_pipe.compiler.failed
        assert {"decode_first", "decode_middle", "decode_last", "pass_middle"} <= set(tiny_pipe.compiler.regions)
        layer = tiny_pipe.model.language_model.model.layers[0].mlp.up_proj
        monkeypatch.setattr(layer, "weight_function", [lambda w: w], raising=False)   # ComfyUI's per-call patch
        assert tiny_pipe.text_decoder() is tiny_pipe.model
        assert tiny_pipe._pass_compiler() is None
    finally:
        tiny_pipe.set_compile(False)
    assert tiny_pipe.text_decoder() is tiny_pipe.model and tiny_pipe.compile_stats() == {"mode": "none"}


def test_compiled_step_traces_quantized_layers():
    """The quantized linears (issue 10) trace into the regions (dequantization fused there): same tokens."""
    from hyperbagel_core import quant
    model = tiny_target(seed=2, dtype=torch.float32)
    quant.quantize_model_(model, "int8", torch.float32)
    model.compute_dtype = torch.float32
    comp = RegionCompiler("eager")
    ref, _ = decode(model, [3, 3, 5], None, eos_id=-1, max_new_tokens=12)
    got, _ = decode(StaticTextDecoder(model, compiler=comp), [3, 3, 5], None, eos_id=-1, max_new_tokens=12)
    assert got.ids == ref.ids and not comp.failed and sum(comp.graphs.values()) == 3
