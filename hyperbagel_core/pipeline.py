"""BagelPipeline: the plain Python API used by the nodes, the CLI and the tests.

It composes the model, the contexts and the samplers exactly as the official ``InterleaveInferencer``
does (spec 2.6 and 11): three contexts (main, cfg_text, cfg_img), every input image first VAE-resized,
think mode with the official system prompts, noise drawn from one CPU generator in the reference order
(VAE posterior noise of each context image, then the initial latent noise).
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from . import image as im
from . import validate
from .config import BagelConfig
from .context import Context
from .decoding import generate_text
from .errors import InputError
from .distill.sampling import distilled_sample
from .generation import CFGSettings, solver_sample, teacher_sample
from .model.compiled import resolve_compile, shared_compiler
from .model.static_decode import StaticTextDecoder, use_static_decoding, weights_resident
from .loading import load_bagel_model, load_vae, resolve_dtype
from .ops import adopt_ops
from .sampling.preview import unpacking
from .sampling.schedules import FIXED_GRIDS, get_schedule
from .sampling.solvers import SOLVERS, evaluations_for
from .sampling.taylorseer import TaylorSeerState, resolve_cache
from .tokenizer import BagelTokenizer

log = logging.getLogger(__name__)

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here")
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here")


class BagelModules(nn.Module):
    """One nn.Module holding every weight (BAGEL + VAE), so ComfyUI's ModelPatcher can move it as a whole."""

    def __init__(self, bagel: nn.Module, vae: nn.Module):
        super().__init__()
        self.bagel, self.vae = bagel, vae


def _plan_weights(weights, config, weight_dtype, device, free_memory, task, size, dtype, vae_dtype):
    """Resolve ``weight_dtype="auto"`` to a ``memory.WeightPlan`` (None for an explicit choice)."""
    from .quant import WEIGHT_DTYPES, read_quantized_metadata
    if weight_dtype not in WEIGHT_DTYPES:
        raise InputError(f"unknown weight_dtype {weight_dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
    if weight_dtype != "auto":
        return None
    from .memory import WeightPlan, plan_weight_dtype
    stored = read_quantized_metadata(weights)
    if stored is not None:
        return WeightPlan(stored["mode"], 0, 0, free_memory or 0, True,
                          f"auto -> {stored['mode']}: the folder is pre-quantized")
    if free_memory is None:
        if device.type != "cuda":
            return WeightPlan("default", 0, 0, 0, True, f"auto -> default: weights in {device.type} memory")
        free_memory = torch.cuda.mem_get_info(device)[0]
    fp8_matmul = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    plan = plan_weight_dtype(config, free_memory, task, width=size[0], height=size[1], dtype=dtype,
                             vae_dtype=vae_dtype, fp8_matmul=fp8_matmul)
    log.info("hyperbagel: %s", plan.reason)
    return plan


def _compiled_passes(sample):
    """Denoise with the compiled pass regions when ``_pass_compiler`` allows it; the result's stats say so and
    how many seconds compiling took in this call. The model is left uncompiled afterwards (ComfyUI may stream
    its weights next time)."""
    @functools.wraps(sample)
    def run(self, *args, **kw):
        lm, c0 = self.model.language_model, self._compile_seconds()
        lm.pass_compiler = self._pass_compiler()
        try:
            res = sample(self, *args, **kw)
        finally:
            compiled = lm.pass_compiler is not None
            del lm.pass_compiler   # back to the class default (None): no per-call state stays on the module
        res.stats.update(compiled=compiled, compile_s=round(self._compile_seconds() - c0, 3))
        return res
    return run


@dataclass
class AnswerResult:
    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


@dataclass
class ImageResult:
    image: Image.Image
    image_u8: torch.Tensor            # [H, W, 3] uint8 (truncated, as the reference)
    latent: torch.Tensor              # [1, z, H/8, W/8], BAGEL-normalised (decode divides by scale, adds shift)
    decoded: torch.Tensor             # [1, 3, H, W] float, VAE output before post-processing
    thinking: str | None = None
    stats: dict = field(default_factory=dict)


@dataclass
class Contexts:
    """The three contexts of spec 2.6 plus what the sampler needs to know about the inputs."""
    gen: Context
    cfg_text: Context
    cfg_img: Context
    image_shapes: tuple[int, int] | None = None
    vit: list = field(default_factory=list)
    vae_latents: list = field(default_factory=list)


class BagelPipeline:
    def __init__(self, model, vae, tokenizer: BagelTokenizer, config: BagelConfig, path: str | None = None,
                 ops=None, cuda_graphs: bool = True, compile=False):
        """``ops``: the layer namespace of the weights (later attachments are re-classed to it);
        ``cuda_graphs``: decode text with fixed-shape CUDA-graphed steps when the und-expert weights are
        resident on a CUDA device (``model/static_decode.py``); False always decodes eagerly (unless compiled);
        ``compile``: see ``set_compile``."""
        self.model, self.vae, self.tokenizer, self.config, self.path = model, vae, tokenizer, config, path
        self.ops = ops
        self.cuda_graphs = cuda_graphs
        self._static_decoder = StaticTextDecoder(model)
        self.compile_mode, self.compiler = "none", None
        self.set_compile(compile)
        self.modules = BagelModules(model, vae)
        model.set_special_tokens(tokenizer.start_of_image, tokenizer.end_of_image)
        self.distilled_expert = None  # distill.DistilledExpert: one-pass CFG-free denoising when set
        self.draft_head = None  # speculative.DraftHead for drafter="draft_head" (docs/draft_head.md)

    # -- distilled generation expert (Hyper-Bagel) -------------------------------------------------------------
    def load_distilled_expert(self, path) -> None:
        """Attach a distilled-expert file (docs/distilled_expert.md); generate/edit then use it by default.

        All or nothing: a file that fails to load leaves the expert loaded before (if any) in place. The new
        one is read before the old one is dropped; call ``unload_distilled_expert()`` first to avoid holding
        both for that moment."""
        from .distill import load_distilled_expert
        expert = load_distilled_expert(path, self.model)
        # moved, counted and streamed with the weights (ComfyUI's ModelPatcher): see DistilledExpert.as_module
        module = adopt_ops(expert.as_module(self.model), self.ops)
        self.unload_distilled_expert()
        self.distilled_expert, self.modules.distilled_expert = expert, module

    def unload_distilled_expert(self) -> None:
        self.modules._modules.pop("distilled_expert", None)
        self.distilled_expert = None

    # -- speculative decoding draft head (Hyper-Bagel) ---------------------------------------------------------
    def load_draft_head(self, path, strict_fingerprint: bool = True) -> None:
        """Attach a draft-head file (docs/draft_head.md) for answer(..., drafter="draft_head")."""
        from .speculative import load_draft_head
        self.draft_head = adopt_ops(load_draft_head(path, self.model, strict_fingerprint=strict_fingerprint),
                                    self.ops)
        self.draft_head.compute_device = self.model.compute_device
        self.modules.draft_head = self.draft_head  # moves with the weights (ComfyUI ModelPatcher)

    def unload_draft_head(self) -> None:
        if self.draft_head is not None:
            del self.modules.draft_head
        self.draft_head = None

    # -- torch.compile (issue 21) ------------------------------------------------------------------------------
    def set_compile(self, mode=True, backend: str = "inductor") -> None:
        """Run the model's repeated regions through ``torch.compile`` (``model/compiled.py``): "decode" the
        text decode step (answers, thinking, speculative verification, the draft head's chain), "all" also
        the denoising passes; True = "all", False/"none" = off. Regions compile on first use per shape class
        (seconds to a minute each; ``compile_stats()`` and the calls' ``stats["compile_s"]`` say how long)
        and are cached for the process and, by inductor, on disk. Weights that ComfyUI streams or patches
        per call keep the eager path; a region that fails to compile runs eagerly with a warning. ``backend``:
        the torch.compile backend ("inductor"; None runs the region functions uncompiled)."""
        mode = resolve_compile(mode)
        self._static_decoder.release()
        self.compile_mode = mode
        self.compiler = None if mode == "none" else shared_compiler(backend)
        self._static_decoder.compiler = self.compiler

    def compile_stats(self) -> dict:
        """Compile seconds and graphs per region in this process (``compiled.RegionCompiler.stats``)."""
        return dict(mode=self.compile_mode, **(self.compiler.stats() if self.compiler else {}))

    def _compile_seconds(self) -> float:
        return sum(self.compiler.compile_s.values()) if self.compiler else 0.0

    def _pass_compiler(self):
        """The compiler for this call's denoising passes: compile "all" and every LLM weight resident on the
        compute device, none streamed or patched per call (``weights_resident`` for the whole LLM)."""
        if self.compile_mode != "all":
            return None
        return self.compiler if weights_resident(self.model, self.device, experts="all") else None

    def _use_distilled(self, distilled: bool | None) -> bool:
        if distilled and self.distilled_expert is None:
            raise InputError("distilled=True but no distilled expert is loaded; call load_distilled_expert(path)")
        return self.distilled_expert is not None if distilled is None else bool(distilled)

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.bfloat16, ops=None, vae_dtype=torch.float32,
                        attn_backend: str = "sdpa", draft_head=None, compute_dtype=None,
                        cuda_graphs: bool = True, weight_dtype: str = "default", free_memory: int | None = None,
                        plan_task: str = "generate", plan_size: tuple[int, int] = (1024, 1024),
                        device_map=None, max_memory=None, offload_dir=None, tokenizer=None, vae=None,
                        search_paths=None, compile=False) -> "BagelPipeline":
        """Load BAGEL from what is on disk (docs/loading.md): an official folder (llm/vit configs,
        ema.safetensors, ae.safetensors, tokenizer), a fine-tune in that layout, a single-file BAGEL
        .safetensors (the ComfyUI-BAGEL format), or a DFloat11 folder (with the ``dfloat11`` package on CUDA).

        Weights are stored in ``dtype`` on ``device`` (also the compute device until ``compute_device`` is
        set). ``compute_dtype`` (default ``dtype``) is the activation dtype; a different one needs ``ops``
        that cast weights per call (ComfyUI's ``manual_cast``), e.g. bf16 weights computed in fp32.

        ``weight_dtype`` (docs/quantization.md): "default" stores every weight in ``dtype``; "fp8_e4m3fn",
        "fp8_e4m3fn_fast", "int8", "nf4" store the linear layers quantized (dequantized to the activation
        dtype per call); "auto" picks the fastest that fits ``free_memory`` bytes (default: the CUDA device's
        free memory; on CPU "default") for a ``plan_task`` call at ``plan_size`` (W, H); ``weight_plan``
        says what and why. A pre-quantized folder loads in its own mode.

        ``device_map`` / ``max_memory`` / ``offload_dir`` (``placement.py``, accelerate's meanings): one model over
        several devices instead of ``device``. ``device_map="auto"`` (the default once ``max_memory`` is given)
        fills the devices of ``max_memory`` in order (GPUs, then "cpu", then "disk") keeping ``plan_task``'s
        working memory at ``plan_size`` and the VAE free on the main device; a dict maps module names to a GPU
        index, "cuda:N", "cpu" or "disk". Decoder and ViT layers are never split and the embedding-side
        modules share one device (the official app's rules). The VAE and the inputs go to the main device.

        ``tokenizer`` (a folder of tokenizer files), ``vae`` (an ``ae.safetensors`` path, or a state dict under
        the official FLUX names such as ComfyUI's core VAE holds) and ``search_paths`` (``formats.SearchPaths``:
        where else to look) supply what a single file lacks; ``checkpoint`` then says where each part came from.

        ``compile`` (False | "decode" | "all" | True): ``torch.compile`` the text decode step and (all) the
        denoising passes (``set_compile``; the ComfyUI loader's ``compile`` option).
        """
        from .formats import resolve
        from .model.attention import set_backend
        set_backend(attn_backend)
        device, dtype, vae_dtype = torch.device(device), resolve_dtype(dtype), resolve_dtype(vae_dtype)
        compute_dtype = dtype if compute_dtype is None else resolve_dtype(compute_dtype)
        if compute_dtype != dtype and ops is None:
            raise InputError(f"compute_dtype {compute_dtype} differs from the weights' {dtype}: pass ops that "
                             "cast weights per call (e.g. comfy.ops.manual_cast)")
        ckpt = resolve(path, tokenizer=tokenizer, vae=vae, search=search_paths)
        config = ckpt.config
        placement = reserve = None
        if device_map is not None or max_memory is not None:
            if ckpt.layout == "df11":
                raise InputError("a DFloat11 model is placed by the dfloat11 package itself: load it without "
                                 "device_map / max_memory")
            from .memory import estimate_run_memory
            from .placement import Placement
            placement = Placement(device_map or "auto", max_memory, offload_dir)
            if weight_dtype == "auto":
                raise InputError("weight_dtype='auto' plans for one device; with a device_map / max_memory choose "
                                 "the weight dtype yourself ('default', 'int8', ...)")
            vae_bytes = (ckpt.vae.stat().st_size if isinstance(ckpt.vae, Path)
                         else sum(t.numel() * t.element_size() for t in ckpt.vae.values()))
            reserve = estimate_run_memory(config, plan_task, width=plan_size[0], height=plan_size[1], dtype=dtype,
                                          vae_dtype=vae_dtype).total + vae_bytes
        t0 = time.perf_counter()
        if ckpt.layout == "df11":
            from .df11 import load_df11_model
            plan, cuda_graphs = None, False   # its weights are rebuilt per call by the package: no graph replay
            model = load_df11_model(ckpt.weights, config, device=device, dtype=dtype, ops=ops,
                                    weight_dtype=weight_dtype)
        else:
            plan = _plan_weights(ckpt.weights, config, weight_dtype, device, free_memory, plan_task, plan_size,
                                 dtype, vae_dtype)
            model = load_bagel_model(ckpt.weights, config, device=device, dtype=dtype, ops=ops,
                                     weight_dtype=plan.mode if plan else weight_dtype, placement=placement,
                                     main_reserve=reserve or 0)
        if placement is not None:
            device = model.compute_device
        vae = load_vae(ckpt.vae, config, device=device, dtype=vae_dtype, ops=ops)
        if not isinstance(ckpt.vae, Path):
            ckpt.vae = None   # weights handed over were copied: keep no reference to the caller's tensors
        log.info("loaded BAGEL from %s in %.1fs (%s, %s; %s)", ckpt.path, time.perf_counter() - t0, device, dtype,
                 ckpt.describe())
        pipe = cls(model, vae, ckpt.tokenizer, config, str(ckpt.path), ops=ops, cuda_graphs=cuda_graphs,
                   compile=compile)
        pipe.model.compute_dtype, pipe.compute_device = compute_dtype, device
        pipe.weight_plan, pipe.checkpoint = plan, ckpt
        if draft_head is not None:
            pipe.load_draft_head(draft_head)
        return pipe

    weight_plan = None  # memory.WeightPlan when loaded with weight_dtype="auto"
    checkpoint = None   # formats.Checkpoint: what from_pretrained loaded, and where each part came from

    @property
    def weight_dtype(self) -> str:
        """How the weights are stored: "default" or the quantization mode (``quant.QUANT_MODES``)."""
        return getattr(self.model, "weight_dtype", "default")

    @property
    def compute_device(self) -> torch.device:
        """Where inputs, noise and caches go. A model manager that streams weights (ComfyUI) sets it to its
        load device, since a partially loaded model's weights do not tell."""
        return self.model.device

    @compute_device.setter
    def compute_device(self, device) -> None:
        device = torch.device(device)
        self.model.compute_device = self.vae.compute_device = device
        if self.draft_head is not None:
            self.draft_head.compute_device = device
        from .quant import select_kernels   # quantized layers choose their matmul for this device, once
        select_kernels(self.model, device)

    @property
    def weight_kernels(self) -> str | None:
        """How the quantized layers multiply on the compute device (``quant.select_kernels``), or None."""
        return getattr(self.model, "weight_kernels", None) or None

    @property
    def device(self) -> torch.device:
        return self.compute_device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def memory_required(self, task: str, *, height: int = 1024, width: int = 1024, distilled: bool | None = None,
                        think: bool = False, max_think_tokens: int = 1000, cache=None, **kw) -> int:
        """Bytes of working memory one ``task`` call ("answer", "generate", "edit") needs beyond the weights.

        ``memory.estimate_run_memory`` with this model's config and dtypes; with a distilled expert (one
        branch, no CFG) plus its replacement tensors, which are copied next to resident weights while
        denoising. ``height``/``width``: the output (generate) or the input image (edit, answer); ``cache``: the
        generate/edit argument (the TaylorSeer cache's bytes are added).
        """
        from .memory import estimate_run_memory
        use_distilled = task != "answer" and self._use_distilled(distilled)
        est = estimate_run_memory(self.config, task, height=height, width=width, dtype=self.dtype,
                                  vae_dtype=self.vae.model.encoder.conv_in.weight.dtype,
                                  cfg_branches=1 if use_distilled else 3,
                                  think_tokens=max_think_tokens if think else 0,
                                  cache=None if task == "answer" else resolve_cache(cache), **kw)
        return est.total + (self.distilled_expert.nbytes() if use_distilled else 0)

    # -- context building --------------------------------------------------------------------------------------
    def append_text(self, ctx: Context, text: str) -> None:
        ids = self.tokenizer.text_block(text)
        limit = self.config.llm.max_position_embeddings
        if ctx.rope + len(ids) > limit:
            before = f" after the {ctx.rope} positions before it" if ctx.rope else ""
            raise InputError(f"the text is {len(ids)} tokens ({len(text)} characters){before}, more than the "
                             f"model's context of {limit} positions; shorten it")
        self.model.prefill_text(ctx, torch.tensor(ids))

    def append_image(self, ctx: Context, img: Image.Image, *, vae: bool, vit: bool, vae_noise=None,
                     generator=None, record: dict | None = None) -> tuple[int, int]:
        """VAE-resize the image, then append a VAE block and/or a ViT block; returns the (H, W) used."""
        img = im.vae_resize(im.pil_to_rgb(img))
        if vae:
            px = im.image_to_tensor(img)[None]
            moments = self.vae.encode_moments(px)
            latent = self.vae.encode(px, noise=vae_noise, generator=generator, moments=moments)
            self.model.prefill_vae(ctx, latent.to(self.device))
            if record is not None:
                record.setdefault("vae_latents", []).append(latent)
                record.setdefault("vae_moments", []).append(moments)
        if vit:
            emb = self.model.prefill_vit(ctx, im.vit_transform(img))
            if record is not None:
                record.setdefault("vit", []).append(emb)
        return img.size[1], img.size[0]

    def build_contexts(self, inputs: list, *, understanding_output: bool = False, think: bool = False,
                       vae_noise=None, generator=None, record: dict | None = None,
                       cfg_branches: bool = True) -> Contexts:
        """The official context recipe: images update only the main context, texts main and cfg_img.

        ``cfg_branches=False`` (distilled, CFG-free sampling) leaves cfg_img empty: no CFG prefill is done.
        """
        m = self.model
        gen, cfg_text, cfg_img = m.new_context(), m.new_context(), m.new_context()
        if think:
            sys_prompt = VLM_THINK_SYSTEM_PROMPT if understanding_output else GEN_THINK_SYSTEM_PROMPT
            self.append_text(gen, sys_prompt)
            if cfg_branches:
                self.append_text(cfg_img, sys_prompt)
        noises = list(vae_noise) if isinstance(vae_noise, (list, tuple)) else [vae_noise]
        shapes = None
        for item in inputs:
            if isinstance(item, str):
                cfg_text = gen.fork()
                self.append_text(gen, item)
                if cfg_branches:
                    self.append_text(cfg_img, item)
            elif isinstance(item, Image.Image):
                noise = noises.pop(0) if noises else None
                shapes = self.append_image(gen, item, vae=not understanding_output, vit=True, vae_noise=noise,
                                           generator=generator, record=record)
                cfg_text = gen.fork()
            else:
                raise InputError(f"interleave inputs must be str or PIL.Image, got {type(item).__name__}")
        return Contexts(gen, cfg_text, cfg_img, shapes)

    # -- text --------------------------------------------------------------------------------------------------
    def text_decoder(self):
        """What decodes text now: the static, CUDA-graphed decoder when the weights allow it, else the model.

        Asked per call: ComfyUI may have moved or partially loaded the weights since the last one. A failed
        capture turns the decoder's graphs off; the eager model serves from then on (compiled: the static
        step's compiled regions without graphs, also on CPU)."""
        dec = self._static_decoder
        dec.graphs_wanted = self.cuda_graphs
        if use_static_decoding(self.model, self.device, self.cuda_graphs and dec.cuda_graphs):
            return dec
        if self.compiler is not None and weights_resident(self.model, self.device):
            return dec
        return self.model

    def _decode(self, ctx: Context, max_new_tokens: int, do_sample: bool, temperature: float, seed,
                callback, drafter: str = "none", num_draft_tokens=None) -> tuple[list[int], dict]:
        if drafter == "draft_head":
            from .placement import spans_devices
            if spans_devices(self.model):
                raise InputError("drafter='draft_head' reads every decoder layer's hidden state on one device; this "
                                 "model's layers run on several: use drafter='prompt_lookup' or 'none'")
        gen = None
        if do_sample:
            gen = torch.Generator(self.device).manual_seed(int(seed if seed is not None else 0))
        stats: dict = {}
        tok, target = self.tokenizer, self.text_decoder()
        compiled = target is self._static_decoder and self.compiler is not None
        c0 = self._compile_seconds()
        try:
            if drafter != "none":
                from .speculative.api import decode_with_drafter
                ids, stats = decode_with_drafter(target, ctx.fork(), drafter, self.draft_head, bos_id=tok.bos_id,
                                                 eos_id=tok.eos_id, max_new_tokens=max_new_tokens,
                                                 do_sample=do_sample, temperature=temperature, generator=gen,
                                                 callback=callback, num_draft_tokens=num_draft_tokens,
                                                 compiler=self.compiler if compiled else None)
            else:
                ids = generate_text(target, ctx.fork(), bos_id=tok.bos_id, eos_id=tok.eos_id,
                                    max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                    generator=gen, callback=callback, stats=stats)
        finally:
            self._static_decoder.release()      # the graphs pin this answer's KV storage
        stats["decoder"] = "static" if target is self._static_decoder else "eager"
        if self.weight_kernels:
            stats["weight_kernels"] = self.weight_kernels
        stats.update(compiled=compiled, compile_s=round(self._compile_seconds() - c0, 3))
        return ids, stats

    def answer(self, image=None, question: str = "", *, max_new_tokens: int = 512, do_sample: bool = False,
               temperature: float = 0.3, seed=None, think: bool = False, drafter: str = "none",
               num_draft_tokens=None, callback=None) -> AnswerResult:
        """VQA / chat: images (ViT blocks) then the question, then decode (spec 11c)."""
        validate.check(self, "answer", locals())
        images = [] if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
        ctxs = self.build_contexts(images + ([question] if question else []), understanding_output=True,
                                   think=think)
        ids, stats = self._decode(ctxs.gen, max_new_tokens, do_sample, temperature, seed, callback,
                                  drafter, num_draft_tokens)
        text = self.tokenizer.answer_text([self.tokenizer.bos_id] + ids)
        return AnswerResult(text, ids, stats)

    # -- images ------------------------------------------------------------------------------------------------
    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        step, limit = self.config.latent_downsample, self.config.latent_downsample * self.config.max_latent_size
        for name, v in (("height", height), ("width", width)):
            if int(v) != v or v < step or v % step:
                raise InputError(f"{name} {v} must be a positive multiple of {step}")
            if v > limit:
                raise InputError(f"{name} {v} exceeds {limit}, the largest size BAGEL's latent position table "
                                 f"covers ({self.config.max_latent_size} latents per side)")
        return int(height) // step, int(width) // step

    def _noise(self, h: int, w: int, generator, init_noise) -> torch.Tensor:
        shape = (h * w, self.config.patch_latent_dim)
        if init_noise is not None:
            if tuple(init_noise.shape) != shape:
                raise InputError(f"init_noise must have shape {shape} (packed latent tokens), "
                                 f"got {tuple(init_noise.shape)}")
            return init_noise.float()
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    @_compiled_passes
    def _sample_image(self, ctxs: Contexts, height: int, width: int, *, generator, init_noise, cfg: CFGSettings,
                      num_timesteps: int, timestep_shift: float, schedule: str, batch_cfg: bool, callback,
                      trace: dict | None, thinking: str | None = None, t_start: float | None = None,
                      solver: str = "euler", timesteps=None, distilled: bool = False, cache=None):
        h, w = self._check_size(height, width)
        try:
            settings = resolve_cache(cache)
        except ValueError as e:
            raise InputError(str(e)) from None
        state = TaylorSeerState(settings) if settings is not None else None  # this call's only cache state
        try:
            grid = get_schedule(schedule, num_timesteps, timestep_shift, timesteps).timesteps
        except ValueError as e:
            raise InputError(str(e)) from None
        if solver not in SOLVERS:
            raise InputError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")
        noise = self._noise(h, w, generator, init_noise)
        if trace is not None:
            trace["init_noise"] = noise.clone()
        callback = unpacking(callback, lambda tokens: im.unpack_latent(
            tokens, h, w, self.config.latent_channels, self.config.latent_patch_size)[None])
        if distilled:  # one pass per step on the main context, distilled weights swapped in for denoising only
            img_scale = cfg.img_scale if ctxs.image_shapes is not None else None
            x = distilled_sample(self.model, self.distilled_expert, ctxs.gen, h, w, noise, grid, cfg.text_scale,
                                 img_scale, solver, callback, cache=state)
        elif solver == "euler":
            if schedule in FIXED_GRIDS:
                log.warning("schedule %r is meant for a distilled expert; running it with the teacher's CFG", schedule)
            x = teacher_sample(self.model, ctxs.gen, ctxs.cfg_text, ctxs.cfg_img, h, w, noise, cfg,
                               timesteps=grid, batch_cfg=batch_cfg, callback=callback, trace=trace, cache=state)
        else:
            x = solver_sample(self.model, ctxs.gen, ctxs.cfg_text, ctxs.cfg_img, h, w, noise, cfg, grid, solver,
                              batch_cfg, callback, cache=state)
        t_start = time.perf_counter() if t_start is None else t_start
        res = self.decode_tokens(x, h, w, thinking=thinking,
                                 stats=dict(schedule=schedule, steps=grid.numel() - 1, solver=solver,
                                            evaluations=evaluations_for(solver, grid.numel() - 1),
                                            distilled=bool(distilled)))
        if state is not None:
            res.stats.update(state.stats())
        res.stats["seconds"] = time.perf_counter() - t_start  # end to end, VAE decode included
        if self.weight_kernels:
            res.stats["weight_kernels"] = self.weight_kernels
        return res

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, h: int, w: int, thinking=None, stats=None) -> ImageResult:
        """Packed latent tokens [h*w, 64] -> VAE decode -> ImageResult (uint8 by truncation)."""
        latent = im.unpack_latent(tokens.float().cpu(), h, w, self.config.latent_channels,
                                  self.config.latent_patch_size)[None]
        decoded = self.vae.decode(latent).float().cpu()
        u8 = im.to_uint8(decoded)
        return ImageResult(Image.fromarray(u8.numpy()), u8, latent, decoded, thinking, stats or {})

    def _think(self, ctxs: Contexts, max_think_tokens: int, do_sample: bool, temperature: float, seed,
               callback) -> str:
        ids, _ = self._decode(ctxs.gen, max_think_tokens, do_sample, temperature, seed, callback)
        thinking = self.tokenizer.answer_text([self.tokenizer.bos_id] + ids)
        self.append_text(ctxs.gen, thinking)
        return thinking

    def generate(self, prompt: str, *, height: int = 1024, width: int = 1024, seed: int = 0,
                 num_timesteps: int = 50, timestep_shift: float = 3.0, cfg_text_scale: float = 4.0,
                 cfg_img_scale: float = 1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type: str = "global",
                 cfg_renorm_min: float = 0.0, think: bool = False, max_think_tokens: int = 1000,
                 do_sample: bool = False, text_temperature: float = 0.3, schedule: str = "teacher",
                 batch_cfg: bool = True, callback=None, init_noise=None, trace: dict | None = None,
                 solver: str = "euler", timesteps=None, distilled: bool | None = None, cache=None) -> ImageResult:
        """Text to image (spec 11a); defaults = the notebook's.

        ``schedule`` names a grid of ``sampling.schedules.SCHEDULES`` ("custom": ``timesteps``, then
        ``timestep_shift`` applied on top; pass 1.0 to use them as given; the fixed Hyper-Bagel grids ignore
        ``num_timesteps``/``timestep_shift``), ``solver`` a
        method of ``sampling.solvers.SOLVERS``. With a distilled expert loaded (``distilled`` None or True) each
        step is one pass with the scales as inputs and no CFG contexts are built; otherwise the teacher's CFG.
        ``cache``: "off" (None), "taylorseer" (the official TaylorSeer feature cache, ``enable_taylorseer``), or
        custom settings (``sampling.taylorseer.TaylorSeerSettings`` or a dict of its fields); its counts are in
        ``stats`` (computed / predicted branch passes).
        """
        t0 = time.perf_counter()
        validate.check(self, "generate", locals())
        use_distilled = self._use_distilled(distilled)
        ctxs = self.build_contexts([prompt], think=think, cfg_branches=not use_distilled)
        thinking = (self._think(ctxs, max_think_tokens, do_sample, text_temperature, seed, callback)
                    if think else None)
        gen = torch.Generator("cpu").manual_seed(int(seed))
        cfg = CFGSettings(cfg_text_scale, cfg_img_scale, tuple(cfg_interval), cfg_renorm_type, cfg_renorm_min)
        return self._sample_image(ctxs, height, width, generator=gen, init_noise=init_noise, cfg=cfg,
                                  num_timesteps=num_timesteps, timestep_shift=timestep_shift, schedule=schedule,
                                  batch_cfg=batch_cfg, callback=callback, trace=trace, thinking=thinking,
                                  t_start=t0, solver=solver, timesteps=timesteps, distilled=use_distilled,
                                  cache=cache)

    def edit(self, image: Image.Image, prompt: str, *, seed: int = 0, num_timesteps: int = 50,
             timestep_shift: float = 3.0, cfg_text_scale: float = 4.0, cfg_img_scale: float = 2.0,
             cfg_interval=(0.0, 1.0), cfg_renorm_type: str = "text_channel", cfg_renorm_min: float = 0.0,
             think: bool = False, max_think_tokens: int = 1000, do_sample: bool = False,
             text_temperature: float = 0.3, schedule: str = "teacher", batch_cfg: bool = True, callback=None,
             init_noise=None, vae_noise=None, trace: dict | None = None, solver: str = "euler", timesteps=None,
             distilled: bool | None = None, cache=None) -> ImageResult:
        """Image editing (spec 11b); the output has the VAE-resized input's size; ``cache`` as in ``generate``.

        With a distilled expert: CFG-free, one pass per step, ``cfg_text_scale``/``cfg_img_scale`` are model
        inputs (clamped to the trained ranges); the source image is prefilled with the ORIGINAL weights.
        """
        t0 = time.perf_counter()
        validate.check(self, "edit", locals())
        use_distilled = self._use_distilled(distilled)
        gen = torch.Generator("cpu").manual_seed(int(seed))
        ctxs = self.build_contexts([image, prompt], think=think, vae_noise=vae_noise, generator=gen,
                                   cfg_branches=not use_distilled)
        thinking = (self._think(ctxs, max_think_tokens, do_sample, text_temperature, seed, callback)
                    if think else None)
        cfg = CFGSettings(cfg_text_scale, cfg_img_scale, tuple(cfg_interval), cfg_renorm_type, cfg_renorm_min)
        H, W = ctxs.image_shapes
        return self._sample_image(ctxs, H, W, generator=gen, init_noise=init_noise, cfg=cfg,
                                  num_timesteps=num_timesteps, timestep_shift=timestep_shift, schedule=schedule,
                                  batch_cfg=batch_cfg, callback=callback, trace=trace, thinking=thinking,
                                  t_start=t0, solver=solver, timesteps=timesteps, distilled=use_distilled,
                                  cache=cache)

    def interleave(self, inputs: list, *, understanding_output: bool = False, think: bool = False,
                   max_think_token_n: int = 1000, do_sample: bool = False, text_temperature: float = 0.3,
                   cfg_text_scale: float = 3.0, cfg_img_scale: float = 1.5, cfg_interval=(0.4, 1.0),
                   timestep_shift: float = 3.0, num_timesteps: int = 50, cfg_renorm_min: float = 0.0,
                   cfg_renorm_type: str = "global", image_shapes=(1024, 1024), seed: int = 0,
                   init_noise=None, vae_noise=None, callback=None, trace: dict | None = None,
                   batch_cfg: bool = True, enable_taylorseer: bool = False) -> list:
        """The official inferencer's entry: a list of texts and images in, [thinking text?, text | image] out.

        ``max_think_token_n`` keeps the official meaning (it counts the start token). Defaults are
        ``InterleaveInferencer.interleave_inference``'s; ``enable_taylorseer`` is ``cache="taylorseer"``.
        """
        validate.check(self, "interleave", locals())
        gen = torch.Generator("cpu").manual_seed(int(seed))
        ctxs = self.build_contexts(list(inputs), understanding_output=understanding_output, think=think,
                                   vae_noise=vae_noise, generator=gen, record=trace)
        if trace is not None:
            trace["contexts"] = ctxs
        if understanding_output:
            ids, _ = self._decode(ctxs.gen, max_think_token_n - 1, do_sample, text_temperature, seed, callback)
            return [self.tokenizer.answer_text([self.tokenizer.bos_id] + ids)]
        out = []
        if think:
            out.append(self._think(ctxs, max_think_token_n - 1, do_sample, text_temperature, seed, callback))
        H, W = ctxs.image_shapes or tuple(image_shapes)
        cfg = CFGSettings(cfg_text_scale, cfg_img_scale, tuple(cfg_interval), cfg_renorm_type, cfg_renorm_min)
        out.append(self._sample_image(ctxs, H, W, generator=gen, init_noise=init_noise, cfg=cfg,
                                      num_timesteps=num_timesteps, timestep_shift=timestep_shift,
                                      schedule="teacher", batch_cfg=batch_cfg, callback=callback, trace=trace,
                                      thinking=out[0] if think else None,
                                      cache="taylorseer" if enable_taylorseer else None))
        return out
