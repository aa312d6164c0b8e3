"""BAGEL: MoT LLM + SigLIP ViT + connector + latent embedders (spec sections 3-9).

State-dict keys equal the official ``ema.safetensors`` keys. The methods implement the four context
operations of spec section 3 (text, ViT image, VAE image prefill; denoising query) and text decoding steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import BagelConfig
from ..context import Context, new_block
from ..image import latent_position_ids, pack_latent, patchify_vit
from ..ops import resolve_ops
from .embeddings import PositionEmbedding2D, TimestepEmbedder
from .llm import LLMOutput, Qwen2MoTForCausalLM
from .vit import MLPConnector, SiglipVisionModel


@dataclass
class TextStep:
    logits: torch.Tensor            # [n, vocab] (model dtype)
    hidden: torch.Tensor            # [n, D] after the final norm
    layer_hidden: tuple | None      # L x [n, D] decoder-layer outputs, when asked for
    argmax: torch.Tensor | None = None  # [n] greedy ids on the device (the static step computes them fused)


@dataclass
class VitEmbedding:
    llm_input: torch.Tensor         # [n, D] connector + 2-D pos table: what enters the LLM
    features: torch.Tensor          # [n, C] SigLIP output after the post-LN
    connector: torch.Tensor         # [n, D]
    pos_embed: torch.Tensor         # [n, D]
    tokens: torch.Tensor            # [n, 3*p*p]
    position_ids: torch.Tensor      # [n]


class BagelModel(nn.Module):
    def __init__(self, config: BagelConfig, ops=None):
        super().__init__()
        ops = resolve_ops(ops)
        self.config = config
        D, C = config.llm.hidden_size, config.vit.hidden_size
        self.language_model = Qwen2MoTForCausalLM(config.llm, ops)
        self.vit_model = SiglipVisionModel(config.vit, ops)
        self.connector = MLPConnector(C, D, ops)
        self.vit_pos_embed = PositionEmbedding2D(config.vit_max_num_patch_per_side, D)
        self.latent_pos_embed = PositionEmbedding2D(config.max_latent_size, D)
        self.time_embedder = TimestepEmbedder(D, ops=ops)
        self.vae2llm = ops.Linear(config.patch_latent_dim, D)
        self.llm2vae = ops.Linear(D, config.patch_latent_dim)
        self._special: dict[str, int] = {}

    # -- helpers -------------------------------------------------------------------------------------------------
    def set_special_tokens(self, start_of_image: int, end_of_image: int) -> None:
        """The vision markers are looked up in the tokenizer at load time (spec 2.2)."""
        self._special = dict(start=start_of_image, end=end_of_image)

    # Where inputs go and the activation dtype. A model manager that streams weights (ComfyUI's partial
    # loading) leaves some on the offload device and may compute above their storage dtype, so the caller
    # sets these; None falls back to the LM head's weight.
    compute_device: torch.device | None = None
    compute_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return self.compute_device or self.language_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.language_model.lm_head.weight.dtype

    def new_context(self) -> Context:
        return Context(self.config.llm.num_hidden_layers)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids.to(self.device)).to(self.dtype)

    def _markers(self) -> tuple[int, int]:
        return self._special["start"], self._special["end"]

    def _with_markers(self, body: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self._markers(), device=self.device)
        m = self.embed_ids(ids)
        return torch.cat([m[:1], body.to(self.dtype), m[1:]])

    def _llm(self, x, positions, ctxs, **kw) -> LLMOutput:
        return self.language_model(x[None] if x.dim() == 2 else x, positions, ctxs, **kw)

    # -- context operations (spec section 3) ---------------------------------------------------------------------
    @torch.no_grad()
    def prefill_text(self, ctx: Context, ids: torch.Tensor) -> None:
        """A text block (the caller wraps it in <|im_start|> ... <|im_end|>): und expert, causal."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        ctx.layout.append(new_block("text", ids.numel(), ctx.rope, ids.tolist()))
        self.forward_text(ctx, ids, logits=False)

    @torch.no_grad()
    def forward_text(self, ctx: Context, ids: torch.Tensor, return_all_hidden: bool = False,
                     logits: bool = True) -> TextStep:
        """Run text tokens causally after the cache, append them to ``ctx``; logits for every position."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        n = ids.numel()
        pos = torch.arange(ctx.rope, ctx.rope + n, device=self.device)[None]
        out = self._llm(self.embed_ids(ids), pos, [ctx], gen=False, causal=True, update=True,
                        return_all_hidden=return_all_hidden)
        ctx.advance(n, n)
        h = out.hidden[0]
        lay = tuple(t[0] for t in out.layer_hidden) if out.layer_hidden else None
        return TextStep(self.language_model.lm_head(h) if logits else None, h, lay)

    def reserve_text(self, ctx: Context, n: int) -> None:
        """Room for ``n`` more text tokens in ``ctx`` up front: a decode then appends without regrowing."""
        c = self.config.llm
        ctx.reserve(n, torch.empty(0, dtype=self.dtype, device=self.device), c.num_key_value_heads, c.head_dim,
                    devices=self.language_model.kv_devices)

    @torch.no_grad()
    def vit_embed(self, pixels: torch.Tensor) -> VitEmbedding:
        """[3, H, W] in [-1, 1] (already ViT-resized) -> the ViT tokens written into the LLM sequence."""
        tokens, pids = patchify_vit(pixels, self.config.vit.patch_size, self.config.vit_max_num_patch_per_side)
        tokens, pids = tokens.to(self.device, self.dtype), pids.to(self.device)
        feats = self.vit_model(tokens, pids)
        conn = self.connector(feats)
        pos = self.vit_pos_embed(pids)
        return VitEmbedding((conn + pos).to(self.dtype), feats, conn, pos, tokens, pids)

    @torch.no_grad()
    def prefill_vit(self, ctx: Context, pixels: torch.Tensor) -> VitEmbedding:
        """ViT image block: markers + patches, all at one RoPE position, und expert, non-causal."""
        emb = self.vit_embed(pixels)
        x = self._with_markers(emb.llm_input)
        pos = torch.full((1, x.shape[0]), ctx.rope, device=self.device)
        self._llm(x, pos, [ctx], gen=False, causal=False, update=True)
        ctx.layout.append(new_block("vit", x.shape[0], ctx.rope, self._markers()))
        ctx.advance(x.shape[0], 1)
        return emb

    def latent_embed(self, x: torch.Tensor, t, h: int, w: int, time_embed_extra=None) -> torch.Tensor:
        """(vae2llm(x) + time(t)) + pos, rounded to the model dtype after each sum (spec 6.4)."""
        pid = latent_position_ids(h, w, self.config.max_latent_size).to(self.device)
        t = torch.as_tensor(t, device=self.device).reshape(1)
        temb = self.time_embedder(t, self.dtype)
        if time_embed_extra is not None:
            temb = temb + time_embed_extra.to(temb)
        return (self.vae2llm(x.to(self.device, self.dtype)) + temb) + self.latent_pos_embed(pid)

    @torch.no_grad()
    def prefill_vae(self, ctx: Context, latent: torch.Tensor) -> None:
        """Clean VAE image block (t = 0): markers und, latents gen, non-causal, one RoPE position."""
        z = latent[0] if latent.dim() == 4 else latent
        p = self.config.latent_patch_size
        h, w = z.shape[1] // p, z.shape[2] // p
        x = self._with_markers(self.latent_embed(pack_latent(z, p), torch.zeros((), dtype=torch.long), h, w))
        pos = torch.full((1, x.shape[0]), ctx.rope, device=self.device)
        self._llm(x, pos, [ctx], gen=True, causal=False, update=True)
        ctx.layout.append(new_block("vae", x.shape[0], ctx.rope, self._markers()))
        ctx.advance(x.shape[0], 1)

    @torch.no_grad()
    def velocity(self, ctx: Context | None, x: torch.Tensor, t, h: int, w: int,
                 time_embed_extra=None, feature_cache=None) -> torch.Tensor:
        """One denoising pass for one branch: v [h*w, 64] (model dtype); the cache is only read."""
        return self.velocity_batched([ctx], x, t, h, w, time_embed_extra, feature_cache)[0]

    @torch.no_grad()
    def velocity_batched(self, ctxs: list, x: torch.Tensor, t, h: int, w: int,
                         time_embed_extra=None, feature_cache=None) -> torch.Tensor:
        """All CFG branches in ONE forward: the same query against each branch's cache -> [B, h*w, 64].

        ``feature_cache`` (``sampling.taylorseer.CachedRows``, one branch per row): rows it predicts this step
        skip the decoder stack; the others run it as one batch and feed the cache."""
        q = self._with_markers(self.latent_embed(x, t, h, w, time_embed_extra))
        if feature_cache is not None:
            hidden = feature_cache.hidden(
                lambda rows: self._decode_query(q, [ctxs[i] for i in rows], False)[:, 1:-1], q[1:-1])
            return self.llm2vae(self.language_model.model.norm_moe_gen(hidden))
        return self.llm2vae(self._decode_query(q, ctxs)[:, 1:-1])

    def _decode_query(self, q: torch.Tensor, ctxs: list, final_norm: bool = True) -> torch.Tensor:
        """The denoising query [n, D] against each context (batch rows) -> hidden states [B, n, D]."""
        B, n = len(ctxs), q.shape[0]
        pos = torch.tensor([0 if c is None else c.rope for c in ctxs], device=self.device)[:, None].expand(B, n)
        return self._llm(q[None].expand(B, n, q.shape[1]), pos, list(ctxs), gen=True, causal=False, update=False,
                         final_norm=final_norm).hidden
