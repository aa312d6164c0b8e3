"""Qwen2 Mixture-of-Transformers language model (spec section 4).

Every decoder layer holds two full weight sets: understanding ("und") and generation ("gen", suffix
``_moe_gen``). Routing is by token type, not learned: in gen mode the first and last query tokens (the
vision markers) use und weights and the latents in between use gen weights; attention is one joint
softmax. Module names equal the official state-dict keys.

Precision follows the reference: in und mode qk-norm and RoPE run in the model dtype; in gen mode q/k
are upcast to fp32 for qk-norm and RoPE, then cast back (spec 4.3, 14.3-4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig
from ..ops import resolve_ops
from .attention import attention
from .compiled import mark_dynamic


class RMSNorm(nn.Module):
    """HF Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        w = self.weight.to(x.device)
        if torch.is_grad_enabled() or w.dtype != y.dtype:
            return w * y
        return y.mul_(w)  # same product (elementwise multiplication commutes), one allocation fewer


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [..., head_dim] for integer positions, computed in fp32 then cast to ``dtype`` (spec 4.5)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                .float() / head_dim))
    angle = positions.float()[..., None] * inv_freq
    emb = torch.cat([angle, angle], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, x * cos + cat(-x2, x1) * sin, per half so that no rotated copy is built;
    x [..., n, H, d], cos/sin [..., n, d]. Bitwise equal to the formula (a + (-b) == a - b)."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, ops):
        super().__init__()
        self.gate_proj = ops.Linear(dim, hidden, bias=False)
        self.up_proj = ops.Linear(dim, hidden, bias=False)
        self.down_proj = ops.Linear(hidden, dim, bias=False)

    def forward(self, x):
        g = self.gate_proj(x)
        if torch.is_grad_enabled():  # distillation trains through this: no in-place ops
            return self.down_proj(F.silu(g) * self.up_proj(x))
        return self.down_proj(F.silu(g, inplace=True).mul_(self.up_proj(x)))  # no two block-sized temporaries


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, ops):
        super().__init__()
        D, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        for sfx in ("", "_moe_gen"):
            setattr(self, "q_proj" + sfx, ops.Linear(D, self.num_heads * d, bias=True))
            setattr(self, "k_proj" + sfx, ops.Linear(D, self.num_kv_heads * d, bias=True))
            setattr(self, "v_proj" + sfx, ops.Linear(D, self.num_kv_heads * d, bias=True))
            setattr(self, "o_proj" + sfx, ops.Linear(self.num_heads * d, D, bias=False))
            setattr(self, "q_norm" + sfx, RMSNorm(d, cfg.rms_norm_eps))
            setattr(self, "k_norm" + sfx, RMSNorm(d, cfg.rms_norm_eps))

    def qkv(self, h: torch.Tensor, sfx: str):
        B, n, _ = h.shape
        q = getattr(self, "q_proj" + sfx)(h).view(B, n, self.num_heads, self.head_dim)
        k = getattr(self, "k_proj" + sfx)(h).view(B, n, self.num_kv_heads, self.head_dim)
        v = getattr(self, "v_proj" + sfx)(h).view(B, n, self.num_kv_heads, self.head_dim)
        return q, k, v

    def qk_norm(self, q, k, sfx: str):
        return getattr(self, "q_norm" + sfx)(q), getattr(self, "k_norm" + sfx)(k)


def _routed(x: torch.Tensor, und, gen) -> torch.Tensor:
    """gen-mode token routing for a block [marker, latents..., marker]: ``gen`` runs on the whole block, then
    the two marker rows are overwritten with ``und`` of the markers. Row-wise modules make this exact; the
    two wasted rows cost far less than splitting and re-concatenating the block in every sub-layer."""
    out = gen(x)
    ends = slice(None, None, x.shape[1] - 1)  # rows 0 and n-1
    out[:, ends] = und(_rows(x, ends))
    return out


def _rows(x: torch.Tensor, ends: slice) -> torch.Tensor:
    """The marker rows as a contiguous block: a strided [B, 2, D] view would send each linear to a
    batched matmul with the weight broadcast per branch."""
    return x[:, ends].contiguous()


class Qwen2MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, ops):
        super().__init__()
        self.self_attn = MoTAttention(cfg, ops)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, ops)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size, ops)
        for sfx in ("", "_moe_gen"):
            setattr(self, "input_layernorm" + sfx, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            setattr(self, "post_attention_layernorm" + sfx, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def _expert(self, name: str, x: torch.Tensor, gen: bool) -> torch.Tensor:
        """Apply module ``name`` (und) / ``name_moe_gen`` (gen) per token group."""
        if not gen:
            return getattr(self, name)(x)
        return _routed(x, getattr(self, name), getattr(self, name + "_moe_gen"))

    def attention_inputs(self, x, cos, sin, gen: bool):
        """Input norm, q/k/v projections, qk-norm and RoPE -> q [B, n, H, d], k/v [B, n, Hkv, d]."""
        a = self.self_attn
        h = self._expert("input_layernorm", x, gen)
        if not gen:
            q, k, v = a.qkv(h, "")
            q, k = a.qk_norm(q, k, "")
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
        # _routed, spelled out: qk-norm and RoPE in fp32 (spec 4.3)
        ends = slice(None, None, h.shape[1] - 1)
        q, k, v = a.qkv(h, "_moe_gen")
        qu, ku, vu = a.qkv(_rows(h, ends), "")
        q, k = a.qk_norm(q.float(), k.float(), "_moe_gen")
        q[:, ends], k[:, ends], v[:, ends] = (*a.qk_norm(qu.float(), ku.float(), ""), vu)
        q, k = apply_rope(q, cos.float(), sin.float()), apply_rope(k, cos.float(), sin.float())
        return q.to(x.dtype), k.to(x.dtype), v

    def finish(self, x, o, gen: bool):
        """After attention (o [B, n, H*d]): output projection, residual, post norm, MLP, residual."""
        a = self.self_attn
        x = x + (_routed(o, a.o_proj, a.o_proj_moe_gen) if gen else a.o_proj(o))
        b = self._expert("post_attention_layernorm", x, gen)
        return x + self._expert("mlp", b, gen)

    def forward(self, x, cos, sin, kv: "KVAccess", gen: bool):
        q, k, v = self.attention_inputs(x, cos, sin, gen)
        return self.finish(x, kv.attend(q, k, v).flatten(2), gen)


class KVAccess:
    """How one forward reads and writes the context caches for each layer.

    One context per batch row (None = empty); each row gets its own exact-length attention call on its own
    cache while the linears and MLPs around it stay batched (CFG branches). The block's K/V are written
    right after the context's ``kv_len`` (``Context.reserve`` + ``write``), so attention reads one contiguous
    cache view and no cache is copied per layer or step. With ``update`` the caller then commits the block
    (``advance``: prefill, decoding, verification); without it the write is scratch past ``kv_len`` that the
    next query overwrites (a denoising query is never cached). Under autograd (distillation's student pass)
    the block is concatenated instead, so the caches never join a graph.
    """

    def __init__(self, ctxs, causal: bool, update: bool, like: torch.Tensor, num_kv_heads: int, head_dim: int,
                 devices=None):
        if len(ctxs) > 1 and update:
            raise ValueError("only a single context can be appended to in one forward")
        self.ctxs, self.causal, self.update, self.layer = ctxs, causal, update, 0
        self.in_place = update or not torch.is_grad_enabled()
        if self.in_place:
            for c in ctxs:
                if c is not None and (update or c.kv_len):
                    c.reserve(like.shape[1], like, num_kv_heads, head_dim, grow=update, devices=devices)

    def _cache(self, ctx, layer: int, k: torch.Tensor, v: torch.Tensor):
        """All keys/values this row attends to: [kv_len + n, Hkv, d]."""
        if ctx is None or not (self.update or ctx.kv_len):
            return k, v
        if self.in_place:
            return ctx.write(layer, k, v)
        return torch.cat([ctx.keys(layer), k]), torch.cat([ctx.values(layer), v])

    def attend(self, q, k, v):
        layer, self.layer = self.layer, self.layer + 1
        outs = []
        for b, ctx in enumerate(self.ctxs):
            K, V = self._cache(ctx, layer, k[b], v[b])
            outs.append(attention(q[b:b + 1], K[None], V[None], self.causal))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


@dataclass
class LLMOutput:
    hidden: torch.Tensor                      # [B, n, D] after the final norm
    layer_hidden: tuple | None = None         # L x [B, n, D], each decoder layer's output


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig, ops):
        super().__init__()
        self.embed_tokens = ops.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2MoTDecoderLayer(cfg, ops) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2MoTForCausalLM(nn.Module):
    """``language_model`` of BAGEL: the MoT decoder stack plus the untied LM head."""
    kv_devices: tuple | None = None  # each layer's execution device when placed over several (placement.py)

    def __init__(self, cfg: LLMConfig, ops=None):
        super().__init__()
        ops = resolve_ops(ops)
        self.config = cfg
        self.model = Qwen2MoTModel(cfg, ops)
        self.lm_head = ops.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # a ``compiled.RegionCompiler`` for the denoising passes (``BagelPipeline(compile="all")``), else None
    pass_compiler = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctxs: list, *, gen: bool, causal: bool,
                update: bool, return_all_hidden: bool = False, final_norm: bool = True) -> LLMOutput:
        """x [B, n, D] in the model dtype, positions [B, n]; one context per batch row (None = empty).
        ``final_norm=False``: ``hidden`` is the last decoder layer's output (a feature cache stores that)."""
        cfg = self.config
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        kv = KVAccess(ctxs, causal, update, x, cfg.num_key_value_heads, cfg.head_dim, self.kv_devices)
        if (self.pass_compiler is not None and gen and not update and not torch.is_grad_enabled()
                and len(self.model.layers) > 1):
            return self._compiled_pass(x, cos, sin, kv, return_all_hidden, final_norm)
        hiddens = []
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv, gen)
            if return_all_hidden:
                hiddens.append(x)
        m = self.model
        if final_norm:
            x = _routed(x, m.norm, m.norm_moe_gen) if gen else m.norm(x)
        return LLMOutput(x, tuple(hiddens) if return_all_hidden else None)

    def _compiled_pass(self, x, cos, sin, kv: KVAccess, return_all_hidden: bool, final_norm: bool) -> LLMOutput:
        """A denoising query (gen mode, read-only caches) with ``pass_middle`` compiled: the end of each layer
        fused with the start of the next (``model/compiled.py``). Attention runs between the regions on each
        branch's own cache; the first layer's start and the last layer's end run as in ``forward``."""
        layers, m = self.model.layers, self.model
        middle = self.pass_compiler.region("pass_middle", pass_middle)
        x = x.contiguous()     # the branches' shared query arrives broadcast (stride 0): one graph for all inputs
        q, k, v = layers[0].attention_inputs(x, cos, sin, True)
        hiddens = []
        for i in range(len(layers) - 1):
            o = kv.attend(q, k, v).flatten(2)
            x, q, k, v = middle(layers[i], layers[i + 1], _dyn_block(x), _dyn_block(o), _dyn_block(cos),
                                _dyn_block(sin))
            hiddens.append(x)
        x = layers[-1].finish(x, kv.attend(q, k, v).flatten(2), True)
        hiddens.append(x)
        if final_norm:
            x = _routed(x, m.norm, m.norm_moe_gen)
        return LLMOutput(x, tuple(hiddens) if return_all_hidden else None)


def pass_middle(layer, nxt, x, o, cos, sin):
    """Compiled region of a denoising pass: the rest of ``layer`` after attention, then ``nxt`` up to its
    attention inputs -> (x, q, k, v)."""
    x = layer.finish(x, o, True)
    return (x, *nxt.attention_inputs(x, cos, sin, True))


def _dyn_block(t: torch.Tensor) -> torch.Tensor:
    """One graph for every CFG batch of 2+ branches and every resolution (``compiled.mark_dynamic``)."""
    return mark_dynamic(t, 0, 1)
