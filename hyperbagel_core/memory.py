"""Working memory one pipeline call needs beyond the weights, so a model manager can reserve it.

ComfyUI's ``load_models_gpu(..., memory_required=...)`` keeps that much free beside the weights (streaming
the rest of the weights when they do not fit). The estimate is an upper bound assuming fused attention
kernels (no query x key score matrix); bytes, with ``e`` the activation dtype's size:

* KV caches: every context holds ``2 * layers * kv_heads * head_dim * e`` bytes per token, and a cache that
  grows keeps up to twice its length (+16) as capacity. Contexts: generate = main and cfg_img with the
  prompt, cfg_text empty; edit = main (image + prompt), cfg_text (image), cfg_img (prompt); answer = the
  prefilled main context plus the decoding fork (prompt + new tokens). Without CFG (distilled) only main.
* One LLM pass over a block of ``n`` tokens for ``B`` branches, per token: residual, norm and split/merge
  copies ``6D``, q/k/v ``(Hq + 2Hkv) d``, attention output ``Hq d``, MLP gate/up/product ``3I`` (all ``e``),
  plus fp32 q/k for qk-norm/RoPE and the LSE ``4 (3 (Hq + Hkv) d + Hq)``; plus the gathered keys/values
  of one layer ``2 B (ctx + n) Hkv d e`` and, when decoding, logits of 16 tokens ``16 V (e + 4)``.
  Blocks: the denoising query (latents + 2 markers) x branches, each prefill block (ViT, VAE, text).
* ViT: per patch token ``e (6C + 2I_vit) + 8C`` (fp32 LayerNorm).
* VAE: at each resolution level ``j`` of the autoencoder, 5 tensors of ``(H/2^j)(W/2^j)`` pixels with the
  widest channel count next to that level (a resnet's input, norm and activation, an upsample's input and
  output), in the VAE dtype; plus the fused mid-block attention's q/k/v/out at the lowest level.

* TaylorSeer feature cache (``cache`` settings): per CFG branch ``max_order + 1`` factors of the latent
  tokens x hidden in the activation dtype, plus two such tensors while a factor is formed or a prediction
  summed (``sampling.taylorseer.cache_bytes``).

Total = KV + feature cache + the largest of (LLM pass, ViT, VAE encode, VAE decode): the caches stay alive
until the image is decoded; one pass's activations are freed before the next.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import image as im
from .config import BagelConfig
from .sampling.taylorseer import cache_bytes

TASKS = ("answer", "generate", "edit")


@dataclass(frozen=True)
class MemoryEstimate:
    kv: int            # bytes of context caches
    llm: int           # largest single LLM pass (activations)
    vit: int           # ViT encoder pass
    vae: int           # largest VAE encode/decode
    total: int
    feature_cache: int = 0  # TaylorSeer cache (sampling.taylorseer), 0 when off


def _size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _vae_bytes(cfg: dict, height: int, width: int, e: int) -> int:
    mult, ch = list(cfg["ch_mult"]), cfg["ch"]
    worst = 0
    for j in range(len(mult)):
        widest = ch * max(mult[max(j - 1, 0): j + 2])
        worst = max(worst, 5 * (height >> j) * (width >> j) * widest)
    low = len(mult) - 1
    attention = 4 * (height >> low) * (width >> low) * ch * mult[-1]
    return e * (worst + attention + 2 * 3 * height * width)


def estimate_run_memory(config: BagelConfig, task: str, *, height: int = 1024, width: int = 1024,
                        dtype=torch.bfloat16, vae_dtype=torch.float32, cfg_branches: int = 3,
                        text_tokens: int = 256, think_tokens: int = 0, max_new_tokens: int = 512,
                        num_images: int = 1, cache=None) -> MemoryEstimate:
    """Upper bound of the working memory for one call (see the module docstring for the formula).

    ``height``/``width``: the output image (generate), the input image (edit: it is VAE-resized, the output
    has that size; answer: each of ``num_images`` images). ``cfg_branches``: 3 for the teacher's CFG, 1 with
    a distilled expert. ``text_tokens``: the prompt/question budget (system prompts included). ``cache``:
    ``sampling.taylorseer.TaylorSeerSettings`` or None (off).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    llm, vit = config.llm, config.vit
    e, d = _size(dtype), llm.head_dim
    kv_token = 2 * llm.num_hidden_layers * llm.num_key_value_heads * d * e
    text = text_tokens + think_tokens

    if task != "generate":  # every input image is VAE-resized first, then ViT-resized
        width, height = im.resize_size(width, height, *im.VAE_RESIZE)
    vit_w, vit_h = im.resize_size(width, height, *im.VIT_RESIZE)
    n_vit = (vit_w // vit.patch_size) * (vit_h // vit.patch_size) + 2
    step = config.latent_downsample
    n_lat = (height // step) * (width // step) + 2

    if task == "answer":
        prompt = text + num_images * n_vit
        contexts = [prompt, prompt + max_new_tokens]
        blocks = [(1, n_vit, prompt), (1, text, prompt), (1, 16, prompt + max_new_tokens)]
    elif task == "generate":
        contexts = [text, text, 0] if cfg_branches > 1 else [text]
        blocks = [(1, text, text), (cfg_branches, n_lat, text)]
    else:
        image = n_lat + n_vit
        contexts = [image + text, image, text] if cfg_branches > 1 else [image + text]
        blocks = [(1, n_vit, image), (1, n_lat, image), (1, text, image + text),
                  (cfg_branches, n_lat, image + text)]
    if think_tokens:
        contexts.append(contexts[0])  # the fork that decodes the thinking
    kv = kv_token * sum(2 * n + 16 for n in contexts)

    per_token = (e * (6 * llm.hidden_size + (2 * llm.num_attention_heads + 2 * llm.num_key_value_heads) * d
                      + 3 * llm.intermediate_size)
                 + 4 * (3 * (llm.num_attention_heads + llm.num_key_value_heads) * d + llm.num_attention_heads))
    gather = 2 * llm.num_key_value_heads * d * e
    act = max(b * n * per_token + b * (ctx + n) * gather for b, n, ctx in blocks)
    if task == "answer" or think_tokens:
        act += 16 * llm.vocab_size * (e + 4)

    vit_bytes = 0 if task == "generate" else n_vit * (e * (6 * vit.hidden_size + 2 * vit.intermediate_size)
                                                     + 8 * vit.hidden_size)
    ev = _size(vae_dtype)
    vae = 0 if task == "answer" else _vae_bytes(config.vae, height, width, ev)
    feat = 0 if task == "answer" else cache_bytes(cache, n_lat - 2, llm.hidden_size, cfg_branches, e)
    return MemoryEstimate(kv, act, vit_bytes, vae, kv + feat + max(act, vit_bytes, vae), feat)


# -- weights per part and the weight-dtype plan -------------------------------------------------------------------
PARTS = ("und", "vit", "gen", "vae")
TASK_PARTS = {"answer": ("und", "vit"), "generate": ("und", "gen", "vae"), "edit": ("und", "vit", "gen", "vae")}
_GEN_PREFIXES = ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed", "distilled_expert.")
_VIT_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed")
# default first: exact, taken whenever it fits. The quantized modes after it are ordered fastest first by the
# 1024x1024 seconds per image of bench/quant_gpu.py ("auto_order"); PROVISIONAL: not yet measured on a GPU,
# this order is the bytes-read argument (docs/quantization.md, "auto")
AUTO_ORDER = ("default", "fp8_e4m3fn_fast", "int8", "nf4")
HEADROOM = 0.95  # of the free memory a plan may fill (allocator fragmentation, other tensors)


def part_of(key: str) -> str:
    """Which part a tensor of ``BagelModules`` (``bagel.*``, ``vae.*``, ``draft_head.*``,
    ``distilled_expert.*``) or of a bare ``BagelModel`` belongs to: "und" (understanding expert, embeddings,
    LM head; what every task runs), "vit" (ViT + connector: images in), "gen" (generation expert and the
    latent connectors: images out), "vae"."""
    key = key[len("bagel."):] if key.startswith("bagel.") else key
    if key.startswith("vae."):
        return "vae"
    if "_moe_gen" in key or key.startswith(_GEN_PREFIXES):
        return "gen"
    if key.startswith(_VIT_PREFIXES):
        return "vit"
    return "und"


def weight_bytes(config: BagelConfig, mode: str = "default", dtype=torch.bfloat16,
                 vae_dtype=torch.float32) -> dict[str, int]:
    """Stored bytes of each part in ``mode``: the real model and quantizer on the meta device (no data)."""
    from .model.bagel import BagelModel
    from .model.vae import FluxVAE
    from .quant import prepare_meta
    with torch.device("meta"):
        model = BagelModel(config).to(dtype)
        vae = FluxVAE.from_config(config.vae)
    if mode not in ("default", None):
        prepare_meta(model, mode, dtype)
    out = dict.fromkeys(PARTS, 0)
    for k, t in model.state_dict().items():
        out[part_of(k)] += t.numel() * t.element_size()
    out["vae"] = sum(t.numel() for t in vae.state_dict().values()) * _size(vae_dtype)
    return out


@dataclass(frozen=True)
class WeightPlan:
    mode: str          # the weight_dtype picked
    weights: int       # bytes of the task's parts in that mode
    working: int       # estimate_run_memory(...).total
    free: int
    fits: bool
    reason: str


def plan_weight_dtype(config: BagelConfig, free: int, task: str = "generate", *, height: int = 1024,
                      width: int = 1024, dtype=torch.bfloat16, vae_dtype=torch.float32, fp8_matmul: bool = False,
                      **run) -> WeightPlan:
    """The fastest weight dtype whose task parts plus working memory fit in ``free`` bytes (x HEADROOM).

    Order (``AUTO_ORDER``): default (exact), then fp8_e4m3fn_fast (only when the GPU has fp8 matmuls), int8,
    nf4 -- provisional until bench/quant_gpu.py has measured it on a GPU (docs/quantization.md). When nothing
    fits: nf4, and the model manager streams what does not fit.
    """
    if task not in TASK_PARTS:
        raise ValueError(f"unknown task {task!r}; choose one of {tuple(TASK_PARTS)}")
    working = estimate_run_memory(config, task, height=height, width=width, dtype=dtype, vae_dtype=vae_dtype,
                                  **run).total
    budget = int(free * HEADROOM)
    tried = []
    for mode in AUTO_ORDER:
        if mode == "fp8_e4m3fn_fast" and not fp8_matmul:
            continue
        parts = weight_bytes(config, mode, dtype, vae_dtype)
        weights = sum(parts[p] for p in TASK_PARTS[task])
        tried.append(f"{mode} {(weights + working) / 1e9:.1f} GB")
        if weights + working <= budget:
            reason = (f"auto -> {mode}: {task} {width}x{height} needs {weights / 1e9:.1f} GB of weights "
                      f"({'+'.join(TASK_PARTS[task])}) + {working / 1e9:.1f} GB working memory, "
                      f"within {budget / 1e9:.1f} GB of {free / 1e9:.1f} GB free")
            if len(tried) > 1:
                reason += " (too large: " + ", ".join(tried[:-1]) + ")"
            return WeightPlan(mode, weights, working, free, True, reason)
    reason = (f"auto -> nf4: {task} {width}x{height} does not fit in {free / 1e9:.1f} GB free in any mode ("
              + ", ".join(tried) + "); the model manager streams the weights that do not fit")
    return WeightPlan("nf4", weights, working, free, False, reason)


def model_parts(root: nn.Module) -> dict[str, nn.Module]:
    """``root`` (``BagelModules``) split into one container per part, for a model manager that loads and
    offloads the parts apart (ComfyUI: one ModelPatcher each). Each container holds the largest subtrees
    whose tensors all belong to one part, so every tensor is in exactly one container and moving a container
    moves the model's own modules (no copies)."""
    holders = {p: nn.ModuleDict() for p in PARTS}

    def visit(name: str, m: nn.Module) -> None:
        keys = [k for k, _ in m.named_parameters()] + [k for k, _ in m.named_buffers()]
        if not keys:
            return
        parts = {part_of(f"{name}.{k}") for k in keys}
        if len(parts) == 1:
            holders[parts.pop()][name.replace(".", "__") or "root"] = m
            return
        if next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None:
            raise ValueError(f"module {name!r} holds tensors of several parts itself; it cannot be split")
        for child, sub in m.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", root)
    return {p: BagelPart(p, h) for p, h in holders.items()}


class BagelPart(nn.Module):
    """One part's container (``model_parts``); named so that a model manager's log says what it loads."""

    def __init__(self, part: str, modules: nn.ModuleDict):
        super().__init__()
        self.part = part
        self.modules_of_part = modules

    def extra_repr(self) -> str:
        return f"part={self.part!r}"
