"""The fixed-shape (CUDA-graph capturable) decode step equals the eager ``forward_text``; decoding through it
(plain and speculative) gives the eager tokens and leaves the context consistent; the pipeline picks it
only on CUDA with resident weights. On CPU the step runs eagerly: the very function a graph captures."""
import pytest
import torch
from PIL import Image

from hyperbagel_core import pipeline as pipeline_mod
from hyperbagel_core.model import static_decode
from hyperbagel_core.decoding import generate_text
from hyperbagel_core.model.static_decode import StaticTextDecoder, use_static_decoding, weights_resident
from hyperbagel_core.pipeline import BagelPipeline
from hyperbagel_core.speculative import (DraftHead, DraftHeadDrafter, OracleDrafter, PromptLookupDrafter,
                                         speculative_generate)
from tests.speculative_helpers import BOS, decode, one_thread, tiny_target

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def pipe64(tiny_ckpt):
    return BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float64)


def _prefilled(model, prompt=PROMPT):
    ctx = model.new_context()
    model.prefill_text(ctx, torch.tensor(prompt))
    return ctx


def test_step_logits_equal_eager_fp32():
    """fp32, within 1e-4 (abs and rel; values of order 1-10): single tokens and k+1 blocks with all layers."""
    model = tiny_target(seed=2, dtype=torch.float32)
    static = StaticTextDecoder(model)
    a, b = _prefilled(model), _prefilled(model)
    static.reserve_text(b, 64)
    for ids in ([7], [2], [5, 6, 7, 8, 9], [1], list(range(1, 12)), [4]):
        want_layers = len(ids) > 1
        e = model.forward_text(a, torch.tensor(ids), return_all_hidden=want_layers)
        s = static.forward_text(b, torch.tensor(ids), return_all_hidden=want_layers)
        assert s.logits.shape == e.logits.shape
        torch.testing.assert_close(s.logits, e.logits, **TOL)
        torch.testing.assert_close(s.hidden, e.hidden, **TOL)
        if want_layers:
            assert len(s.layer_hidden) == len(e.layer_hidden)
            for x, y in zip(s.layer_hidden, e.layer_hidden):
                torch.testing.assert_close(x, y, **TOL)
        assert (b.kv_len, b.rope) == (a.kv_len, a.rope)


def test_64_token_greedy_decode_equals_eager_on_tiny_checkpoint(pipe64):
    model = pipe64.model
    base = _prefilled(model, pipe64.tokenizer.text_block("describe the picture in detail"))
    kw = dict(bos_id=pipe64.tokenizer.bos_id, eos_id=-1, max_new_tokens=64)
    eager_ctx, static_ctx = base.fork(), base.fork()
    ref = generate_text(model, eager_ctx, **kw)
    got = generate_text(StaticTextDecoder(model), static_ctx, **kw)
    assert len(ref) == 64 and got == ref
    assert (static_ctx.kv_len, static_ctx.rope) == (eager_ctx.kv_len, eager_ctx.rope) == (base.kv_len + 64,) * 2
    # the base context (shared storage before the forks copied) is untouched
    again = generate_text(model, base.fork(), **kw)
    assert again == ref


def test_context_consistent_after_static_decode(pipe64):
    """After a static decode the context takes further prefills and decodes exactly like an eager one."""
    model, tok = pipe64.model, pipe64.tokenizer
    static = StaticTextDecoder(model)
    pixels, ctxs = torch.rand(3, 56, 42, generator=torch.Generator().manual_seed(0)) * 2 - 1, []
    for m in (model, static):
        ctx = _prefilled(model, tok.text_block("what is this"))
        generate_text(m, ctx, bos_id=tok.bos_id, eos_id=-1, max_new_tokens=9)
        model.prefill_text(ctx, tok.text_block("and then"))
        model.prefill_vit(ctx, pixels)
        ctxs.append(ctx)
    (a, b) = ctxs
    assert (a.kv_len, a.rope) == (b.kv_len, b.rope)
    for layer in (0, model.config.llm.num_hidden_layers - 1):
        torch.testing.assert_close(b.keys(layer), a.keys(layer), rtol=1e-12, atol=1e-12)
    kw = dict(bos_id=tok.bos_id, eos_id=-1, max_new_tokens=12)
    assert generate_text(static, b, **kw) == generate_text(model, a, **kw)


def test_speculative_through_static_path_is_lossless():
    model = tiny_target(seed=1)
    static = StaticTextDecoder(model)
    V = model.config.llm.vocab_size
    for prompt in ([3, 3, 5], [], [9, 1, 2, 2, 7]):
        ref, rctx = decode(model, prompt, None, eos_id=7, max_new_tokens=30)
        drafters = (PromptLookupDrafter(), OracleDrafter(ref.ids + [7], 0.6, V, seed=1),
                    DraftHeadDrafter(DraftHead.from_target(model, zero_init=False, seed=3)))
        for drafter in drafters:
            for k in (1, 4, 10, 15, 20):      # 20: blocks past the largest bucket fall back to eager
                got, ctx = decode(static, prompt, drafter, eos_id=7, max_new_tokens=30, num_draft_tokens=k,
                                  adaptive=False)
                assert got.ids == ref.ids, (type(drafter).__name__, k, prompt)
                assert (ctx.kv_len, ctx.rope) == (rctx.kv_len, rctx.rope)
    plain, _ = decode(static, [3, 3, 5], None, eos_id=7, max_new_tokens=30)
    assert plain.ids == decode(model, [3, 3, 5], None, eos_id=7, max_new_tokens=30)[0].ids


def test_storage_change_drops_graph_state():
    """A new storage (another context, or growth past the reserve) is picked up and its tail zeroed."""
    model = tiny_target(seed=1)
    static = StaticTextDecoder(model)
    a = _prefilled(model)
    static.forward_text(a, torch.tensor([1]))
    first = static._storage
    b = _prefilled(model)
    for t in (*b._store.k, *b._store.v):
        t[b.kv_len:] = float("nan")                 # what torch.empty may hold
    out = static.forward_text(b, torch.tensor([1]))
    assert static._storage is not first and torch.isfinite(out.logits).all()
    static.release()
    assert static._storage is None and not static._graphs


def test_graph_bookkeeping_with_a_stand_in_capture(monkeypatch):
    """CPU stand-in for CUDA graphs (static inputs copied in, then the captured function re-run): one capture
    per (block size, want_layers) on a storage, recaptured for a new storage, outputs never aliased."""
    captures = []

    def fake_capture(fn, example):
        static_in = [t.clone() for t in example]
        captures.append(static_in[0].shape[1])

        def replay(*args):
            for dst, src in zip(static_in, args):
                dst.copy_(src)
            return fn(*static_in)
        return replay
    monkeypatch.setattr(static_decode, "capture_cuda_graph", fake_capture)
    monkeypatch.setattr(StaticTextDecoder, "_graphs_on", lambda self, device: True)
    model = tiny_target(seed=1)
    static = StaticTextDecoder(model)
    ref, _ = decode(model, [3, 3, 5], None, eos_id=-1, max_new_tokens=24)
    got, _ = decode(static, [3, 3, 5], None, eos_id=-1, max_new_tokens=24)
    assert got.ids == ref.ids and captures == [1]
    got, _ = decode(static, [3, 3, 5], PromptLookupDrafter(), eos_id=-1, max_new_tokens=24,
                    num_draft_tokens=6, adaptive=False)
    assert got.ids == ref.ids and captures[0] == 1 and set(captures[1:]) <= {1, 2, 4, 8}
    assert len(captures[1:]) == len(set(captures[1:]))            # once per block size on this storage
    assert len(static._graphs) == len(captures) - 1


def test_failed_capture_falls_back_to_eager(monkeypatch, caplog):
    def broken(fn, example):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(static_decode, "capture_cuda_graph", broken)
    monkeypatch.setattr(StaticTextDecoder, "_graphs_on", lambda self, device: self.cuda_graphs)
    model = tiny_target(seed=1)
    static = StaticTextDecoder(model)
    ref, _ = decode(model, [4, 2], None, eos_id=-1, max_new_tokens=10)
    got, _ = decode(static, [4, 2], None, eos_id=-1, max_new_tokens=10)
    assert got.ids == ref.ids and not static.cuda_graphs and "decoding eagerly" in caplog.text


def test_weights_resident_and_selection(monkeypatch):
    model = tiny_target(seed=1)
    cpu = torch.device("cpu")
    assert weights_resident(model, cpu)
    assert not use_static_decoding(model, cpu)                       # CPU: eager
    model.language_model.model.layers[0].mlp_moe_gen.up_proj.to("meta")
    assert weights_resident(model, cpu)                              # the gen expert is not read
    model.language_model.model.layers[1].self_attn.q_proj.to("meta")
    assert not weights_resident(model, cpu)                          # a streamed und weight
    patched = tiny_target(seed=1)
    patched.language_model.lm_head.weight_function = [lambda w: w]    # ComfyUI's per-call patches
    assert not weights_resident(patched, cpu)


def test_pipeline_chooses_the_decoder(pipe64, monkeypatch):
    assert pipe64.text_decoder() is pipe64.model                    # CPU
    assert pipe64.answer(None, "hello", max_new_tokens=3).stats["decoder"] == "eager"
    cuda = torch.device("cuda")
    monkeypatch.setattr(BagelPipeline, "device", property(lambda self: cuda))
    assert pipe64.text_decoder() is pipe64.model                    # weights not on the CUDA device
    monkeypatch.setattr(pipeline_mod, "use_static_decoding",
                        lambda model, device, enabled: enabled and device.type == "cuda")
    assert pipe64.text_decoder() is pipe64._static_decoder          # CUDA + resident weights
    pipe64.cuda_graphs = False
    try:
        assert pipe64.text_decoder() is pipe64.model                # opted out
    finally:
        pipe64.cuda_graphs = True


def test_answer_through_the_static_decoder_equals_eager(pipe64, monkeypatch):
    """The product path end to end with the static decoder forced on (CPU: same step, no graph)."""
    img = Image.new("RGB", (64, 48), (20, 130, 40))
    ref = pipe64.answer(img, "describe it", max_new_tokens=16)
    monkeypatch.setattr(pipe64, "text_decoder", lambda: pipe64._static_decoder)
    monkeypatch.setattr(pipe64, "draft_head", DraftHead.from_target(pipe64.model, zero_init=False, seed=1))
    for drafter, k in (("none", None), ("prompt_lookup", 4), ("draft_head", 4), ("draft_head", None)):
        got = pipe64.answer(img, "describe it", max_new_tokens=16, drafter=drafter, num_draft_tokens=k)
        assert got.token_ids == ref.token_ids and got.stats["decoder"] == "static"
    assert pipe64._static_decoder._storage is None                 # released after the answer
    res = speculative_generate(pipe64._static_decoder, _prefilled(pipe64.model), None, bos_id=BOS, eos_id=-1,
                               max_new_tokens=5)
    assert len(res.ids) == 5
