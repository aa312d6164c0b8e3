"""The Hyper-Bagel draft head (arXiv 2509.18824 Sec. 3.1) and plain EAGLE-3 as one configurable module.

Per target position t (all L layer outputs H_t [L, D]):
    c_t   = Flatten(CA(meta_queries, H_t, H_t)) + concat(H_t[low], H_t[mid], H_t[high])    # [Q*D]
    F_t   = Dec(fc1(c_t)) + H_t[high]                                                     # [D]
Draft entry for the token x_{t+1} (predicts x_{t+2}):
    z     = fc2(concat(embed(x_{t+1}), F_t));  g = DraftLayers(z);  logits = lm_head(norm(g))
Chain step j >= 1 reuses the draft's own output g of the previous entry in place of F.
With a reduced draft vocabulary (``draft_vocab_size`` > 0, EAGLE-3's d2t) the head's own LM head scores only
the ``d2t`` target tokens (the most frequent ones of its training data) and a draft id maps back through
``d2t``; the target still decides every token, so decoding stays lossless.
``docs/draft_head.md`` explains every choice; ``kind="eagle3"`` drops CA and Dec and uses 1 layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import _fmt_of, dense_dtype, dequantize, is_quantized
from .layers import (DecoderLayer, KVBuffer, RMSNorm, cached_layer, copy_layer_weights, inv_freq,
                     rope_cos_sin)

TARGET_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rms_norm_eps")


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3/SGLang's low/mid/high layers (2, L//2, L-3), clamped into [0, L-1] for tiny targets."""
    L = num_layers
    return (min(2, L - 1), L // 2, max(L - 3, 0))


@dataclass(frozen=True)
class DraftHeadConfig:
    # the target's LLM shape (copied from model.config.llm)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    # the head
    kind: str = "hyper-bagel"                  # "hyper-bagel" | "eagle3" (documentation only)
    num_meta_queries: int = 3                  # Q; 0 = no cross-attention (EAGLE-3)
    feature_layers: tuple[int, ...] = ()       # () = default_feature_layers(L)
    use_dec: bool = True                       # the intermediate target-style decoder layer "Dec"
    num_draft_layers: int = 2                  # N
    zero_init: bool = True
    share_lm_head: bool = True                 # lm_head + final norm taken from the target (not stored)
    draft_vocab_size: int = 0                  # > 0: own LM head over that many target tokens (d2t), else full

    def __post_init__(self):
        L = self.num_hidden_layers
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} must lie in [0, {self.vocab_size}] "
                             "(0 = the full vocabulary)")
        if not self.feature_layers:
            object.__setattr__(self, "feature_layers", default_feature_layers(L))
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
        if any(not 0 <= i < L for i in self.feature_layers):
            raise ValueError(f"feature_layers {self.feature_layers} must lie in [0, {L - 1}]")
        if self.num_meta_queries and self.num_meta_queries != len(self.feature_layers):
            raise ValueError(f"num_meta_queries ({self.num_meta_queries}) must equal the number of skip "
                             f"feature layers ({len(self.feature_layers)}) so that Q*D matches the skip width")
        if not 1 <= self.num_draft_layers <= L:
            raise ValueError(f"num_draft_layers must be in [1, {L}]")

    @classmethod
    def for_target(cls, llm_config, kind: str = "hyper-bagel", **overrides) -> "DraftHeadConfig":
        base = {f: getattr(llm_config, f) for f in TARGET_FIELDS}
        preset = dict(PRESET_KINDS[kind])
        preset.update(overrides)
        return cls(**base, kind=kind, **preset)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["feature_layers"] = list(self.feature_layers)
        return d


PRESET_KINDS = {
    "hyper-bagel": dict(num_meta_queries=3, use_dec=True, num_draft_layers=2, zero_init=True),
    "eagle3": dict(num_meta_queries=0, use_dec=False, num_draft_layers=1, zero_init=False),
}


class MetaQueryCA(nn.Module):
    """Q shared learnable queries attending, per token, over the L layer features of that token."""

    def __init__(self, c: DraftHeadConfig):
        super().__init__()
        D, H, Hkv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.heads, self.kv_heads, self.head_dim = H, Hkv, d
        self.meta_queries = nn.Parameter(torch.randn(c.num_meta_queries, D) * 0.02)
        self.layer_embed = nn.Parameter(torch.randn(c.num_hidden_layers, D) * 0.02)
        self.feature_norm = RMSNorm(D, c.rms_norm_eps)
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * d, bias=False)
        self.q_norm = RMSNorm(d, c.rms_norm_eps)
        self.k_norm = RMSNorm(d, c.rms_norm_eps)
        self.o_proj = nn.Linear(H * d, D, bias=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [n, L, D] -> [n, Q, D]."""
        n, L, _ = feats.shape
        Q = self.meta_queries.shape[0]
        kv = self.feature_norm(feats) + self.layer_embed.to(feats.device, feats.dtype)
        q = self.q_norm(self.q_proj(self.meta_queries.to(feats.device, feats.dtype)).view(Q, self.heads,
                                                                                          self.head_dim))
        k = self.k_norm(self.k_proj(kv).view(n, L, self.kv_heads, self.head_dim))
        v = self.v_proj(kv).view(n, L, self.kv_heads, self.head_dim)
        o = F.scaled_dot_product_attention(q.transpose(0, 1).expand(n, -1, -1, -1), k.transpose(1, 2),
                                           v.transpose(1, 2), enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(o.transpose(1, 2).reshape(n, Q, -1))


def _layer(c: DraftHeadConfig) -> DecoderLayer:
    return DecoderLayer(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                        c.head_dim, c.rms_norm_eps)


class DraftCache:
    """The draft's own KV: Dec (real target positions only) and the N draft layers (rolled back)."""

    def __init__(self, head: "DraftHead", capacity: int = 256, growable: bool = True):
        c, p = head.config, head.fc2.weight
        dev = head.compute_device or p.device
        mk = lambda n: KVBuffer(n, capacity, c.num_key_value_heads, c.head_dim, p.dtype, dev, growable)
        self.dec = mk(1) if c.use_dec else None
        self.layers = mk(c.num_draft_layers)
        self.dec_len = 0          # Dec entries (= target positions seen)
        self.real_len = 0         # draft-layer entries built from real target features


class DraftHead(nn.Module):
    compute_device: torch.device | None = None  # where its cache goes (set with the pipeline's); None: fc2's

    def __init__(self, config: DraftHeadConfig):
        super().__init__()
        c = self.config = config
        D, nf = c.hidden_size, len(c.feature_layers)
        self.ca = MetaQueryCA(c) if c.num_meta_queries else None
        self.fc1 = nn.Linear(nf * D, D, bias=False)
        self.dec = _layer(c) if c.use_dec else None
        self.fc2 = nn.Linear(2 * D, D, bias=False)
        self.layers = nn.ModuleList(_layer(c) for _ in range(c.num_draft_layers))
        if not c.share_lm_head:
            self.norm = RMSNorm(D, c.rms_norm_eps)
        if c.draft_vocab_size or not c.share_lm_head:
            self.lm_head = nn.Linear(D, c.draft_vocab_size or c.vocab_size, bias=False)
        if c.draft_vocab_size:      # draft id -> target id
            self.register_buffer("d2t", torch.arange(c.draft_vocab_size), persistent=True)
        self.register_buffer("inv_freq", inv_freq(c.head_dim, c.rope_theta), persistent=False)
        self._shared: dict[str, nn.Module] = {}
        if c.zero_init:
            self.apply_zero_init()

    # -- construction ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_zero_init(self) -> None:
        """Zero the last projections of CA and Dec, and fc1/fc2 (paper Sec. 3.1.2)."""
        zero = [self.fc1.weight, self.fc2.weight]
        if self.ca is not None:
            zero.append(self.ca.o_proj.weight)
        if self.dec is not None:
            zero += [self.dec.self_attn.o_proj.weight, self.dec.mlp.down_proj.weight]
        for w in zero:
            w.zero_()

    @classmethod
    def from_target(cls, model, kind: str = "hyper-bagel", seed: int = 0, draft_vocab=None,
                    **overrides) -> "DraftHead":
        """Initialise from a target: draft layers = the target's last N layers, Dec = the target's
        high feature layer, LM head/norm shared (or copied), then zero-init; other weights random.
        ``draft_vocab``: target ids the head drafts over (``select_draft_vocab``); its LM head starts as
        those rows of the target's."""
        if draft_vocab is not None:
            draft_vocab = torch.as_tensor(draft_vocab, dtype=torch.long).reshape(-1).sort().values
            overrides["draft_vocab_size"] = draft_vocab.numel()
        cfg = DraftHeadConfig.for_target(model.config.llm, kind, **overrides)
        lm = model.language_model
        ref = lm.lm_head.weight
        cuda = [ref.device] if ref.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.device(ref.device):   # init on the target's device
            torch.manual_seed(seed)
            head = cls(cfg).to(dtype=dense_dtype(lm.lm_head))
        layers, L = lm.model.layers, cfg.num_hidden_layers
        for i, layer in enumerate(head.layers):
            copy_layer_weights(layer, layers[L - cfg.num_draft_layers + i])
        if head.dec is not None:
            copy_layer_weights(head.dec, layers[cfg.feature_layers[-1]])
        if not cfg.share_lm_head:
            copy_layer_weights(head.norm, lm.model.norm)
        if cfg.draft_vocab_size or not cfg.share_lm_head:
            rows = draft_vocab.to(ref.device) if cfg.draft_vocab_size else slice(None)
            with torch.no_grad():
                head.lm_head.weight.copy_(dense_weight(lm.lm_head)[rows])
                if cfg.draft_vocab_size:
                    head.d2t.copy_(draft_vocab)
        if cfg.zero_init:
            head.apply_zero_init()
        return head.bind(model)

    def bind(self, model) -> "DraftHead":
        """Attach the target's frozen token embedding (and LM head + final norm when shared)."""
        lm = model.language_model
        self._shared = {"embed": lm.model.embed_tokens}
        if self.config.share_lm_head:
            self._shared["norm"] = lm.model.norm
            if not self.config.draft_vocab_size:
                self._shared["lm_head"] = lm.lm_head
        return self

    def _mod(self, name: str) -> nn.Module:
        if name in self._shared:
            return self._shared[name]
        if name == "embed":
            raise RuntimeError("draft head is not bound to a target: call head.bind(model) first")
        return getattr(self, name)

    def new_cache(self, capacity: int = 256, growable: bool = True) -> DraftCache:
        return DraftCache(self, capacity, growable)

    # -- computation -------------------------------------------------------------------------------------------
    def aggregate(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [n, L, D] -> fc1 input plus the high-level skip: (x [n, D], skip [n, D])."""
        fl = list(self.config.feature_layers)
        skip = feats[:, fl, :]                                           # [n, F, D]
        c = skip if self.ca is None else self.ca(feats) + skip
        return self.fc1(c.flatten(1)), feats[:, fl[-1], :]

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """Draft logits [n, draft vocabulary] (the full vocabulary unless reduced)."""
        head = self._mod("lm_head")
        return head(self._mod("norm")(g).to(dense_dtype(head)))

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids -> target ids."""
        return self.d2t[draft_ids] if self.config.draft_vocab_size else draft_ids

    def target_probs(self, q: torch.Tensor) -> torch.Tensor:
        """Draft probabilities [n, draft vocabulary] -> [n, V] over the target's vocabulary (0 off d2t)."""
        if not self.config.draft_vocab_size:
            return q
        return q.new_zeros(q.shape[0], self.config.vocab_size).index_copy_(1, self.d2t, q)

    def draft_input(self, feat: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        emb = self._mod("embed")(tokens).to(feat.dtype)
        return self.fc2(torch.cat([emb, feat], dim=-1))

    def features(self, feats: torch.Tensor, cache: DraftCache, rope0: int) -> torch.Tensor:
        """CA + fc1 + Dec over n new real target positions at RoPE rope0.. (Dec KV appended)."""
        x, skip = self.aggregate(feats.to(self.fc1.weight.dtype))
        if self.dec is None:
            return x
        n, dev = x.shape[0], x.device
        cache.dec.ensure(cache.dec_len + n)
        cos, sin = rope_cos_sin(torch.arange(rope0, rope0 + n, device=dev), self.inv_freq, x.dtype)
        slots = torch.arange(cache.dec_len, cache.dec_len + n, device=dev)
        x = cached_layer(self.dec, x, cos, sin, cache.dec.k[0], cache.dec.v[0], slots, cache.dec_len + n)
        cache.dec_len += n
        return x + skip.to(x.dtype)

    def run_layers(self, z: torch.Tensor, cache: DraftCache, slot0: int, rope0: int) -> torch.Tensor:
        """Draft layers over n entries written at slots slot0.. with RoPE rope0.. -> g [n, D]."""
        n, dev = z.shape[0], z.device
        cache.layers.ensure(slot0 + n)
        cos, sin = rope_cos_sin(torch.arange(rope0, rope0 + n, device=dev), self.inv_freq, z.dtype)
        slots = torch.arange(slot0, slot0 + n, device=dev)
        for i, layer in enumerate(self.layers):
            z = cached_layer(layer, z, cos, sin, cache.layers.k[i], cache.layers.v[i], slots, slot0 + n)
        return z


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """A (possibly quantized) Linear's weight in its high-precision dtype."""
    w = layer.weight
    if not is_quantized(w):
        return w.detach()
    return dequantize(w, layer.weight_scale, _fmt_of(w), dense_dtype(layer), layer.in_features)


def select_draft_vocab(counts: torch.Tensor, size: int, always=()) -> torch.Tensor:
    """EAGLE-3's draft vocabulary: the ``size`` most frequent target tokens of the training data (``counts``
    [V], ties to the lower id), ``always`` (e.g. the stop token) included; sorted target ids [size]."""
    counts = counts.double().clone()
    V = counts.numel()
    if not 0 < size <= V:
        raise ValueError(f"draft vocabulary size {size} must lie in [1, {V}]")
    if always:
        counts[torch.as_tensor(list(always), dtype=torch.long)] = float("inf")
    order = torch.argsort(counts, descending=True, stable=True)      # stable: ties keep the lower id first
    return order[:size].sort().values
