"""A text-only stand-in for BAGEL's language model (und expert only) with a static KV cache.

It implements the slice of the ``BagelModel`` contract that speculative decoding uses
(``forward_text``/``prefill_text``, ``config.llm``, ``language_model.model.{embed_tokens,layers,norm}``,
``language_model.lm_head``) so the bench can build BAGEL's LLM at its real shapes with random weights,
and unit tests get a cheap float64 target. Every call has a static shape per query length when
``StaticContext(static=True)`` (attention over all slots with a mask), which is what CUDA graphs need.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from .layers import DecoderLayer, KVBuffer, RMSNorm, cached_layer, capture_cuda_graph, inv_freq, rope_cos_sin


@dataclass(frozen=True)
class LLMShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6


PRESETS = {
    "bagel-7b": LLMShape(3584, 18944, 28, 28, 4, 128, 152064),
    "small": LLMShape(256, 512, 8, 8, 2, 32, 1024),
    "tiny": LLMShape(32, 64, 6, 4, 2, 8, 23),
}


@dataclass
class TextOutput:
    logits: torch.Tensor                              # [n, V]
    hidden: torch.Tensor                              # [n, D] after the final norm
    layer_hidden: tuple[torch.Tensor, ...] | None     # L x [n, D] before the final norm


class StaticContext:
    """KV slots + the ``kv_len``/``rope`` counters of spec section 3 (text only)."""

    def __init__(self, model: "StaticLLM", max_len: int = 256, static: bool = False):
        c = model.config.llm
        p = next(model.parameters())
        self.buf = KVBuffer(c.num_hidden_layers, max_len, c.num_key_value_heads, c.head_dim, p.dtype,
                            p.device, growable=not static)
        self.static = static
        self.kv_len = 0
        self.rope = 0

    def fork(self) -> "StaticContext":          # O(kv) copy: fine for a bench and tests
        other = StaticContext.__new__(StaticContext)
        other.buf, other.static, other.kv_len, other.rope = self.buf.clone(), self.static, self.kv_len, self.rope
        return other

    def truncate(self, kv_len: int, rope: int) -> None:
        if kv_len > self.kv_len or rope > self.rope:
            raise ValueError(f"truncate can only shrink: {self.kv_len}->{kv_len}, {self.rope}->{rope}")
        self.kv_len, self.rope = kv_len, rope

    def keys(self, layer: int) -> torch.Tensor:
        return self.buf.k[layer, : self.kv_len]

    def values(self, layer: int) -> torch.Tensor:
        return self.buf.v[layer, : self.kv_len]


class _Inner(nn.Module):
    def __init__(self, c: LLMShape):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                         c.head_dim, c.rms_norm_eps) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class _LM(nn.Module):
    def __init__(self, c: LLMShape):
        super().__init__()
        self.model = _Inner(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)


class StaticLLM(nn.Module):
    def __init__(self, shape: LLMShape | str):
        super().__init__()
        shape = PRESETS[shape] if isinstance(shape, str) else shape
        self.config = SimpleNamespace(llm=shape)
        self.language_model = _LM(shape)
        self.register_buffer("inv_freq", inv_freq(shape.head_dim, shape.rope_theta), persistent=False)
        self._graphs: dict | None = None

    @torch.no_grad()
    def randomize(self, seed: int = 0, std: float = 0.02, norm_jitter: float = 0.1) -> "StaticLLM":
        """Random weights (biases included; norms 1 +- jitter). A larger ``std`` gives peakier logits."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_((1 + norm_jitter * r) if "norm" in name else std * r)
        return self

    def new_context(self, max_len: int = 256, static: bool = False) -> StaticContext:
        return StaticContext(self, max_len, static)

    # -- the static-shape step: ids/pos/slots are device tensors, ``end`` a python int -------------------------
    def step(self, buf: KVBuffer, ids, pos, slots, end: int, want_layers: bool):
        lm = self.language_model
        x = lm.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(pos, self.inv_freq, x.dtype)
        outs = []
        for i, layer in enumerate(lm.model.layers):
            x = cached_layer(layer, x, cos, sin, buf, i, slots, end)
            if want_layers:
                outs.append(x)
        h = lm.model.norm(x)
        return lm.lm_head(h), h, (torch.stack(outs, 1) if want_layers else None)

    def enable_cuda_graphs(self) -> None:
        """Capture one CUDA graph per (query length, want_layers) on first use; needs static contexts."""
        self._graphs = {}

    def _run(self, ctx: StaticContext, ids, pos, slots, want_layers: bool):
        if self._graphs is None or not ctx.static or ids.device.type != "cuda":
            end = ctx.buf.capacity if ctx.static else ctx.kv_len + ids.shape[0]
            return self.step(ctx.buf, ids, pos, slots, end, want_layers)
        key = (ids.shape[0], want_layers, id(ctx.buf.k))
        if key not in self._graphs:
            self._graphs[key] = capture_cuda_graph(lambda a, b, c: self.step(ctx.buf, a, b, c, ctx.buf.capacity,
                                                                   want_layers), (ids, pos, slots))
        return self._graphs[key](ids, pos, slots)

    @torch.no_grad()
    def forward_text(self, ctx: StaticContext, ids: torch.Tensor, return_all_hidden: bool = False) -> TextOutput:
        n, dev = ids.shape[0], self.inv_freq.device
        ctx.buf.ensure(ctx.kv_len + n)
        pos = torch.arange(ctx.rope, ctx.rope + n, device=dev)
        slots = torch.arange(ctx.kv_len, ctx.kv_len + n, device=dev)
        logits, h, layers = self._run(ctx, ids.to(dev), pos, slots, return_all_hidden)
        ctx.kv_len += n
        ctx.rope += n
        return TextOutput(logits, h, None if layers is None else layers.unbind(1))

    def prefill_text(self, ctx: StaticContext, ids: torch.Tensor) -> None:
        self.forward_text(ctx, ids)
