"""Every attention call the model issues can run PyTorch's fused FLASH kernel on CUDA (issue 9).

A TorchFunctionMode sees every ``F.scaled_dot_product_attention`` call made while it is active, whoever
makes it, so no call can slip past; each recorded call is checked against ``flash_eligible`` and the number of
calls is cross-checked against the layer forwards (one call per LLM decoder layer and batch row, one per
ViT layer). The CPU run checks rank, batch, head, layout and mask rules; dtype and GPU generation are CUDA
matters outside this test (the product runs bf16 there).
"""
import traceback

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention.bias import CausalBias, CausalVariant
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from hyperbagel_core.config import LLMConfig, ViTConfig
from hyperbagel_core.distill import DistilledExpert
from hyperbagel_core.generation import CFGSettings, branch_velocities, guided_velocity
from hyperbagel_core.model import attention as attn_mod
from hyperbagel_core.model.llm import Qwen2MoTDecoderLayer
from hyperbagel_core.model.vit import SiglipAttention

KW = dict(height=32, width=48, num_timesteps=3, cfg_interval=(0.0, 1.0))
IMG = Image.new("RGB", (32, 32), (10, 200, 30))


def flash_eligible(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> list:
    """Reasons why PyTorch's CUDA FLASH kernel could not take this SDPA call (empty list = it can).

    Rules, from aten/src/ATen/native/transformers/cuda/sdp_utils.cpp ``can_use_flash_attention`` and the
    checks it calls (sdp_utils_cpp.h), and torch/nn/attention/bias.py:
      * q, k, v are 4-D [B, H, n, d] (check_tensor_shapes; 3-D inputs only reach the math kernel);
      * one batch size; k and v have one head count, equal to q's or, with enable_gqa, dividing it
        (check_batch_size_and_num_heads_dense<supports_gqa=true>: flash runs GQA natively);
      * last dim contiguous, stride(-1) == 1 (check_last_dim_stride_equals_1_dense);
      * no empty sequence (check_nonzero_sequence_lengths_dense);
      * one head dim <= 256 (check_head_dim_size_flash), a multiple of 8 (else SDPA pads q/k/v with a copy);
      * attn_mask None (check_for_attn_mask: flash takes no mask), except a CausalBias: bias.py runs an
        upper-left one as is_causal=True and a lower-right one as ``_scaled_dot_product_flash_attention`` with
        is_causal=True (bottom-right in the flash kernel) when can_use_flash_attention(mask=None) holds;
      * is_causal only with n_q == n_k (check_flash_causal_non_square_seqlens: top-left otherwise);
      * dropout 0 (inference; flash could drop, but outputs must be deterministic).
    """
    bad = []
    if not all(t.dim() == 4 for t in (q, k, v)):
        return [f"not 4-D: {[t.dim() for t in (q, k, v)]}"]
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        bad.append("batch sizes differ")
    hq, hk = q.shape[1], k.shape[1]
    if hk != v.shape[1] or not (hq == hk or (enable_gqa and hq % hk == 0)):
        bad.append(f"heads q {hq} k {hk} v {v.shape[1]} enable_gqa={enable_gqa}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        bad.append("last dim not contiguous")
    if q.shape[2] == 0 or k.shape[2] == 0:
        bad.append("empty sequence")
    d = q.shape[-1]
    if not (d == k.shape[-1] == v.shape[-1] and d <= 256 and d % 8 == 0):
        bad.append(f"head dim {d}")
    if attn_mask is not None:
        if not isinstance(attn_mask, CausalBias):
            bad.append(f"dense {attn_mask.dtype} mask")
        elif attn_mask.variant != CausalVariant.LOWER_RIGHT and attn_mask.seq_len_q != attn_mask.seq_len_kv:
            bad.append("upper-left causal bias on a non-square block")
        elif is_causal:
            bad.append("CausalBias together with is_causal")
    if is_causal and q.shape[2] != k.shape[2]:
        bad.append("is_causal with n_q != n_k (top-left aligned)")
    if dropout_p:
        bad.append("dropout")
    return bad


class RecordSDPA(TorchFunctionMode):
    """Every F.scaled_dot_product_attention call while active: (issuing file, eligibility problems, shapes)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            caller = next(f.filename for f in reversed(traceback.extract_stack()[:-1])
                          if "/torch/" not in f.filename)
            self.calls.append((caller, flash_eligible(*args, **kwargs), [tuple(a.shape) for a in args[:3]]))
        return func(*args, **kwargs)


class CountIssued:
    """Attention calls the model must issue: one per decoder layer and batch row, one per ViT layer."""

    def __init__(self, model):
        self.n, self.handles = 0, []
        for m in model.modules():
            if isinstance(m, Qwen2MoTDecoderLayer):
                self.handles.append(m.register_forward_pre_hook(lambda mod, a: self._add(a[0].shape[0])))
            elif isinstance(m, SiglipAttention):
                self.handles.append(m.register_forward_pre_hook(lambda mod, a: self._add(1)))

    def _add(self, n):
        self.n += n

    def close(self):
        for h in self.handles:
            h.remove()


def record(model, fn):
    assert attn_mod._backend == "sdpa"
    count = CountIssued(model)
    try:
        with RecordSDPA() as rec:
            fn()
    finally:
        count.close()
    ours = [c for c in rec.calls if c[0] == attn_mod.__file__]
    # The only other SDPA caller is diffusers' VAE mid-block attention (one head of the VAE's channels):
    # not the product model's attention and outside this issue.
    assert all("diffusers" in c[0] for c in rec.calls if c[0] != attn_mod.__file__), {c[0] for c in rec.calls}
    assert ours and len(ours) == count.n, (len(ours), count.n)
    bad = [(shapes, why) for _, why, shapes in ours if why]
    assert not bad, bad[:5]
    return ours


def test_predicate_rejects_the_old_calls():
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 9, 16)
    assert flash_eligible(q, k, k, enable_gqa=True) == []
    assert flash_eligible(q, k, k, attn_mask=torch.nn.attention.bias.causal_lower_right(5, 9), enable_gqa=True) == []
    assert flash_eligible(q[0], k[0], k[0], enable_gqa=True)                                   # old 3-D call
    assert flash_eligible(q, k, k, attn_mask=torch.ones(5, 9, dtype=torch.bool), enable_gqa=True)  # dense mask
    assert flash_eligible(q, k, k, is_causal=True, enable_gqa=True)                            # top-left causal
    assert flash_eligible(q, k, k)                                                             # GQA without flag
    assert flash_eligible(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), k, enable_gqa=True)
    assert flash_eligible(torch.randn(2, 4, 5, 16), k, k, enable_gqa=True)                     # padded batch


def test_real_bagel_head_dims_fit_flash():
    """Tiny heads are 16 wide; the release's (spec 4.1, 5.3) must pass the same head-dim rule."""
    llm = LLMConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064)
    vit = ViTConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)
    for d in (llm.head_dim, vit.head_dim):
        assert d <= 256 and d % 8 == 0, d
    q, k = torch.randn(1, 28, 3, 128), torch.randn(1, 4, 7, 128)
    assert flash_eligible(q, k, k, enable_gqa=True) == []


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_generate_and_edit_calls_are_flash_eligible(tiny_pipe, batch_cfg):
    p = tiny_pipe
    gen = record(p.model, lambda: p.generate("a blue square", cfg_img_scale=1.5, batch_cfg=batch_cfg, **KW))
    assert any(c[2][0][0] == 1 and c[2][1][2] > c[2][0][2] for c in gen)  # denoising queries read a cache
    record(p.model, lambda: p.edit(IMG, "make it red", num_timesteps=3, cfg_img_scale=1.5,
                                   cfg_renorm_type="text_channel", batch_cfg=batch_cfg))


def test_answer_calls_are_flash_eligible_plain_and_speculative(tiny_pipe):
    p = tiny_pipe
    for drafter in ("none", "prompt_lookup"):
        calls = record(p.model, lambda: p.answer(IMG, "what colour? what colour?", max_new_tokens=8,
                                                 drafter=drafter))
        n_q = [c[2][0][2] for c in calls]
        n_k = [c[2][1][2] for c in calls]
        assert any(1 < a < b for a, b in zip(n_q, n_k))   # a block after the cache: lower-right bias
        assert any(a == 1 < b for a, b in zip(n_q, n_k))   # one-token decoding steps


def test_distilled_calls_are_flash_eligible(tiny_pipe):
    p = tiny_pipe
    p.distilled_expert = DistilledExpert.from_model(p.model, schedule="hyper-6nfe", nfe=6)
    try:
        record(p.model, lambda: p.generate("a red circle", height=32, width=32, schedule="hyper-6nfe", seed=1))
    finally:
        p.unload_distilled_expert()


def _caches(ctxs):
    return [(c, [t[i] for t in (c._store.k, c._store.v) for i in range(c.num_layers)]) for c in ctxs]


def test_per_branch_cfg_equals_sequential_and_copies_no_cache(tiny_pipe):
    """Batched rows equal single passes to fp32 rounding (atol 2e-5, rtol 1e-5: only the order of the
    batched linears' sums differs); a denoising step keeps every cache where it is and allocates nothing
    cache-sized (only views of a cache may span kv_len + n)."""
    p = tiny_pipe
    c = p.build_contexts([IMG, "make it red"], generator=torch.Generator().manual_seed(0))
    ctxs, m = [c.gen, c.cfg_text, c.cfg_img], p.model
    h, w = 2, 2
    x = torch.randn(h * w, 64)
    batched = branch_velocities(m, ctxs, x, 0.6, h, w, batch_cfg=True)
    for ctx, vb in zip(ctxs, batched):
        torch.testing.assert_close(vb, m.velocity(ctx, x, 0.6, h, w), atol=2e-5, rtol=1e-5)

    before = [[t.data_ptr() for t in ks] for _, ks in _caches(ctxs)]
    spans = {ctx.kv_len + h * w + 2 for ctx in ctxs[:2]}  # cfg_img holds 6 tokens: activation-sized
    assert min(spans) > 1000
    caches = {t.untyped_storage().data_ptr() for _, ks in _caches(ctxs) for t in ks}

    class Allocs(TorchDispatchMode):
        """Every aten op's outputs, those inside SDPA's math kernel included."""

        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.dim() and spans & set(t.shape) \
                        and t.untyped_storage().data_ptr() not in caches:
                    self.big.append((str(func), tuple(t.shape)))
            return out

    cfg = CFGSettings(4.0, 1.5, (0.0, 1.0), "text_channel", 0.0)
    with Allocs() as a:
        for t in (0.9, 0.5, 0.2):
            guided_velocity(m, c.gen, c.cfg_text, c.cfg_img, x, t, h, w, cfg, batch_cfg=True)
    assert a.big == []
    assert [[t.data_ptr() for t in ks] for _, ks in _caches(ctxs)] == before
