"""ComfyUI runtime glue: the HYPERBAGEL_MODEL object, memory management, progress and interrupts.

ComfyUI modules are imported inside functions so that this file can be imported (and its logic tested)
with ``comfy`` stubbed out.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from .adapters import NodeInputError, StepProgress

log = logging.getLogger("hyperbagel")

MEMORY_MODES = ["auto", "gpu_full", "offload_after_run", "multi_gpu"]


def import_core():
    """Import ``hyperbagel_core`` (inside the pack when loaded by ComfyUI, else from ``sys.path``)."""
    try:
        from .. import hyperbagel_core as core  # the pack is a package: <pack>.hyperbagel_core
    except ImportError:
        import hyperbagel_core as core
    return core


MODEL_TYPE = "HYPERBAGEL_MODEL"  # our socket type; not BAGEL_MODEL, which another BAGEL pack uses for its own object


@dataclass(frozen=True)
class Attachment:
    """A draft head or distilled expert applied to a model: the core object and its own ModelPatcher."""
    path: str
    obj: Any        # speculative.DraftHead (an nn.Module) or distill.DistilledExpert
    patcher: Any    # ModelPatcher over the weights it adds, loaded by ComfyUI beside the base model's


@dataclass(frozen=True)
class BagelModel:
    """What flows through a ``HYPERBAGEL_MODEL`` socket: the shared pipeline, its ModelPatcher and what is applied.

    Frozen: an apply node returns a new ``BagelModel`` sharing the pipeline and the base patcher (no reload), so
    other branches of the graph keep the model they were given. The pipeline's ``distilled_expert`` and
    ``draft_head`` are bound from this object at the start of every run (``prepare``).
    """
    pipe: Any
    patcher: Any
    checkpoint: str
    dtype_name: str
    attn_backend: str
    memory_mode: str = "auto"
    draft: Attachment | None = None
    distilled: Attachment | None = None
    weight_dtype: str = "default"
    plan: str | None = None          # what weight_dtype="auto" picked and why
    compile_mode: str = "none"       # torch.compile of the decode step ("decode") and the denoising passes ("all")
    parts: dict | None = None        # part name -> ModelPatcher (memory.model_parts): loaded per task
    placement: str | None = None     # multi_gpu: where the weights were placed (they stay there; see prepare)

    @property
    def draft_head(self) -> str | None:
        return self.draft.path if self.draft else None

    @property
    def distilled_expert(self) -> str | None:
        return self.distilled.path if self.distilled else None

    def expert_grid(self) -> tuple | None:
        """``(schedule, timesteps)`` the applied distilled expert was made for (its file's config), else None."""
        if self.distilled is None:
            return None
        cfg = self.distilled.obj.config
        return cfg.schedule, list(cfg.timesteps)

    def _base_patchers(self) -> list:
        """The base model's patchers for ComfyUI to load: none when placed (accelerate holds the weights)."""
        if self.placement is not None:
            return []
        return list(self.parts.values()) if self.parts else [self.patcher]

    def patchers(self) -> list:
        """Every patcher this model may load: the base (per part when split) and the attachments."""
        base = self._base_patchers()
        return base + [a.patcher for a in (self.draft, self.distilled) if a is not None]

    def bind(self) -> Any:
        """Point the shared pipeline at this branch's draft head and distilled expert (or none)."""
        self.pipe.distilled_expert = self.distilled.obj if self.distilled else None
        self.pipe.draft_head = self.draft.obj if self.draft else None
        return self.pipe

    def prepare(self, task: str | None = None, **run) -> Any:
        """Ask ComfyUI to (re)load the weights for a run of ``task``; returns the pipeline.

        ComfyUI keeps the run's working memory free beside the weights (``pipe.memory_required(task, **run)``,
        an upper bound of caches + activations + VAE at that size) and streams the weights that do not fit.
        The compute device is ComfyUI's load device: a partial load leaves some weights on the offload device,
        so no weight tells where inputs go. An applied draft head or distilled expert has its own patcher,
        loaded in the same call, so ComfyUI places (and streams) it with the rest.
        """
        import comfy.model_management as mm

        pipe = self.bind()
        need = pipe.memory_required(task, **run) if task else 0
        if self.placement is not None:
            # placed over several GPUs: ComfyUI never moves these weights; it frees the run's working memory on
            # every GPU the model computes on (unloading its own models) and loads the attachments
            for device in placed_devices(pipe):
                mm.free_memory(need, device)
            attachments = self.patchers_for(task)
            if attachments:
                mm.load_models_gpu(attachments, memory_required=need)
            return pipe
        mm.load_models_gpu(self.patchers_for(task), memory_required=need,
                           force_full_load=self.memory_mode == "gpu_full")
        pipe.compute_device = self.patcher.load_device
        return pipe

    def patchers_for(self, task: str | None) -> list:
        """The parts a ``task`` runs (answer: und + ViT (+ draft head); generate: und + gen + VAE (+ expert);
        edit: all (+ expert)), so ComfyUI neither loads nor keeps resident what the task never touches."""
        if self.placement is not None or not self.parts:
            base = self._base_patchers()
        else:
            memory = core_submodule("memory")
            base = [self.parts[n] for n in memory.TASK_PARTS.get(task, memory.PARTS)]
        wanted = {"answer": (self.draft,), "generate": (self.distilled,), "edit": (self.distilled,)}
        return base + [a.patcher for a in wanted.get(task, (self.draft, self.distilled)) if a is not None]

    def release(self) -> None:
        """After a run in ``offload_after_run`` mode: move the weights back to the offload device."""
        if self.memory_mode != "offload_after_run":
            return
        import comfy.model_management as mm

        mine = [self.patcher] + self.patchers()
        for loaded in list(getattr(mm, "current_loaded_models", [])):
            if any(getattr(loaded, "model", None) is p for p in mine):
                loaded.model_unload()
                mm.current_loaded_models.remove(loaded)
        mm.soft_empty_cache()

    def describe(self) -> str:
        parts = [os.path.basename(self.checkpoint.rstrip("/\\")), self.dtype_name, self.attn_backend]
        if self.weight_dtype != "default":
            parts.append(f"weights {self.weight_dtype}")
        if self.plan:
            parts.append(self.plan)
        if self.placement:
            parts.append(f"placed: {self.placement}")
        if self.compile_mode != "none":
            parts.append(f"compiled ({self.compile_mode})")
        if self.draft_head:
            parts.append(f"draft head {os.path.basename(self.draft_head)}")
        if self.distilled_expert:
            parts.append(f"distilled {os.path.basename(self.distilled_expert)}")
        return ", ".join(parts)


def core_submodule(name: str):
    """``hyperbagel_core.<name>``; None when a stand-in core (tests/nodes) leaves it out."""
    import importlib
    import types

    core = import_core()
    if isinstance(core, types.ModuleType):
        return importlib.import_module(f"{core.__name__}.{name}")
    return getattr(core, name, None)


def weight_dtype_choices() -> list[str]:
    """The loader's weight_dtype options, named like ComfyUI's UNETLoader's (``quant.WEIGHT_DTYPES``)."""
    quant = core_submodule("quant")
    return list(quant.WEIGHT_DTYPES) if quant is not None else ["default"]


def compile_choices() -> list[str]:
    """The loader's compile options (``model.compiled.COMPILE_MODES``: none, decode, all)."""
    compiled = core_submodule("model.compiled")
    return list(compiled.COMPILE_MODES) if compiled is not None else ["none"]


def bf16_native(device) -> bool:
    """bf16 arithmetic in hardware: CPUs, CUDA compute capability >= 8.0 (Ampere), else ComfyUI's verdict."""
    import comfy.model_management as mm
    import torch

    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return bool(mm.should_use_bf16(device))


def placed_devices(pipe) -> list:
    """The GPUs a placed model computes on (its decoder layers' devices and its main device)."""
    model = pipe.model
    devices = list(getattr(model.language_model, "kv_devices", None) or []) + [pipe.device]
    return sorted({d for d in devices if d.type != "cpu"}, key=str)


def check_model(model: Any) -> BagelModel:
    if not isinstance(model, BagelModel):
        raise NodeInputError("model: connect the output of 'BAGEL Model Loader (Hyper-Bagel)' (or of an apply node "
                             "after it) to this input.")
    return model


def attention_backends() -> list[str]:
    """``sdpa`` always; ``flash_attn`` only when the package is importable (checked without importing it)."""
    import importlib.util

    out = ["sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        out.append("flash_attn")
    return out


def interrupt_check() -> None:
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def make_progress(items: int, steps_hint: int, node_id: str | None = None, preview=None) -> StepProgress:
    """A batch-aware progress reporter driving ``comfy.utils.ProgressBar`` and checking for interrupts; with
    ``preview`` (``latent_previewer``) each denoising step also sends a preview image through the bar."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(1, items * max(1, steps_hint)), node_id=node_id)
    return StepProgress(items, bar.update_absolute, interrupt_check, preview)


def latent_previewer(bagel: BagelModel):
    """``latent -> preview`` for the bar, made by ComfyUI's own previewer for the FLUX latent format, or None.

    ``latent_preview.get_previewer`` applies the user's setting (``--preview-method`` and the per-run override
    ComfyUI sets before a prompt runs): None when previews are off, then the core computes no estimate at all;
    TAEF1 (``models/vae_approx/taef1_decoder.*``) or the FLUX latent-to-RGB factors otherwise. Built per run,
    as core samplers build theirs.
    """
    import comfy.latent_formats
    import latent_preview

    from .adapters import bagel_latent_to_format

    fmt = comfy.latent_formats.Flux()
    previewer = latent_preview.get_previewer(bagel.patcher.load_device, fmt)
    if previewer is None:
        return None
    vae = getattr(getattr(bagel.pipe, "config", None), "vae", None) or {}
    scale, shift = vae.get("scale_factor", fmt.scale_factor), vae.get("shift_factor", fmt.shift_factor)

    def preview(latent):
        return previewer.decode_latent_to_preview_image("JPEG", bagel_latent_to_format(latent, scale, shift, fmt))

    return preview


def core_vae_weights(vae) -> dict:
    """The weights of a core VAE (core 'Load VAE' on FLUX's ae.safetensors) under their file names, the official
    FLUX names the core converts from; the core copies them into BAGEL's own VAE and checks the architecture."""
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        raise NodeInputError("vae: connect the VAE output of core 'Load VAE' with FLUX's ae.safetensors (or leave it "
                             "unconnected to use the ae.safetensors found beside the checkpoint or in models/vae).")
    dtype = getattr(vae, "vae_dtype", None)
    if dtype is not None and str(dtype) != "torch.float32":
        log.info("hyperbagel: the connected VAE holds %s weights (ComfyUI's VAE dtype); BAGEL's VAE gets those "
                 "values (start ComfyUI with --fp32-vae for the file's fp32 weights)", dtype)
    return model.state_dict()


def load_bagel(checkpoint_dir: str, dtype_choice: str, attn_backend: str, memory_mode: str,
               weight_dtype: str = "default", compile_mode: str = "none", max_memory: str = "",
               vae=None) -> BagelModel:
    """Build the pipeline on the offload device with ``comfy.ops`` layers and wrap it in a ModelPatcher.

    ``checkpoint_dir``: a folder or a single file of models/bagel; ``vae``: a core VAE to use as BAGEL's.
    ``memory_mode="multi_gpu"``: placed over every GPU ComfyUI sees instead (``max_memory``: the budget per
    device, accelerate's form "0=20GiB, 1=24GiB, cpu=48GiB"; empty = their free memory, overflow to CPU RAM).
    The placed weights stay where they were put: ComfyUI's model manager does not load, stream or offload
    them (``BagelModel.prepare``); the ModelPatcher only anchors the attachments on the main GPU."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import torch

    from .adapters import resolve_dtypes

    core = import_core()
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    dtype, compute_dtype, warning = resolve_dtypes(dtype_choice, bf16_native(load_device))
    if warning:
        log.warning("hyperbagel: %s", warning)
    if memory_mode not in MEMORY_MODES:
        raise NodeInputError(f"unknown memory mode {memory_mode!r}; choose one of {', '.join(MEMORY_MODES)}.")
    if attn_backend not in attention_backends():
        raise NodeInputError(f"attention backend {attn_backend!r} is not available here; use 'sdpa' "
                             "(flash_attn needs the optional flash-attn package).")
    placed = memory_mode == "multi_gpu"
    if placed and torch.cuda.device_count() < 2:
        raise NodeInputError(f"memory 'multi_gpu' places the model over several GPUs, but {torch.cuda.device_count()} "
                             "CUDA device(s) are visible; use 'auto' (ComfyUI streams what does not fit).")
    if max_memory.strip() and not placed:
        raise NodeInputError("max_memory is the per-device budget of memory 'multi_gpu'; clear it or choose "
                             "'multi_gpu'.")
    t0 = time.perf_counter()
    # ComfyUI's own choice of layers: plain ones (cast only when partial loading streams them) when the
    # weights are stored in the compute dtype, casting ones otherwise.
    ops = comfy.ops.pick_operations(dtype, compute_dtype, load_device=load_device)
    free = mm.get_free_memory(load_device) if weight_dtype == "auto" and load_device.type != "cpu" else None
    where = dict(device_map="auto", max_memory=max_memory.strip() or None) if placed else dict(device=offload_device)
    extra = {}   # what a single file lacks: where to look, and the VAE connected to the loader
    formats = core_submodule("formats")
    if formats is not None:
        from .paths import search_paths
        extra["search_paths"] = search_paths(formats)
    if vae is not None:
        extra["vae"] = core_vae_weights(vae)
    pipe = core.BagelPipeline.from_pretrained(checkpoint_dir, dtype=dtype, ops=ops, compute_dtype=compute_dtype,
                                              attn_backend=attn_backend, weight_dtype=weight_dtype, free_memory=free,
                                              **where, **extra)
    if getattr(pipe.model, "dfloat11", False) and memory_mode != "gpu_full":
        log.info("hyperbagel: DFloat11 weights are rebuilt on the GPU per layer; keeping them all there (gpu_full)")
        memory_mode = "gpu_full"
    plan = pipe.weight_plan.reason if pipe.weight_plan is not None else None
    if plan:
        log.info("hyperbagel: %s", plan)
    placement = None
    if placed:  # the main GPU (inputs, VAE, attachments) is the placement's, not necessarily ComfyUI's
        load_device = offload_device = pipe.compute_device
        placement = pipe.model.placement.summary(pipe.model)
    pipe.compute_device = load_device
    if compile_mode != "none":       # regions compile on first use; streamed or patched weights stay eager
        pipe.set_compile(compile_mode)
    patcher = comfy.model_patcher.ModelPatcher(pipe.modules, load_device=load_device, offload_device=offload_device)
    memory = core_submodule("memory")
    parts = None if memory is None or placed else {
        name: comfy.model_patcher.ModelPatcher(m, load_device=load_device, offload_device=offload_device)
        for name, m in memory.model_parts(pipe.modules).items()}
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    dtype_name = names.get(dtype, str(dtype))
    if compute_dtype != dtype:
        dtype_name += f" (computed in {names.get(compute_dtype, str(compute_dtype))})"
    model = BagelModel(pipe=pipe, patcher=patcher, checkpoint=checkpoint_dir, dtype_name=dtype_name,
                       attn_backend=attn_backend, memory_mode=memory_mode, weight_dtype=pipe.weight_dtype,
                       plan=plan, parts=parts, placement=placement, compile_mode=compile_mode)
    ckpt = getattr(pipe, "checkpoint", None)
    log.info("hyperbagel: loaded %s in %.1f s%s", model.describe(), time.perf_counter() - t0,
             f" ({ckpt.describe()})" if ckpt is not None else "")
    return model


def load_flux_vae(checkpoint: str):
    """The checkpoint's FLUX ``ae.safetensors`` as a core ``comfy.sd.VAE``, built exactly as core ``VAELoader``
    does: a folder's own (or its vae/ one), for a single file the one beside it or in models/vae."""
    import comfy.sd
    import comfy.utils

    from .paths import search_paths

    formats = core_submodule("formats")
    if formats is not None:
        found = formats.find_ae([checkpoint] if os.path.isdir(checkpoint) else [os.path.dirname(checkpoint)],
                                formats.SearchPaths() if os.path.isdir(checkpoint) else search_paths(formats))
        path = str(found) if found is not None else os.path.join(checkpoint, "ae.safetensors")
    else:
        path = os.path.join(checkpoint, "ae.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no FLUX ae.safetensors for {checkpoint}: the BAGEL-7B-MoT folder ships it as "
                                "ae.safetensors; put it there (beside a single file, or in models/vae), or use core "
                                "'Load VAE' with the FLUX ae file.")
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path))
    vae.throw_exception_if_invalid()
    return vae


def core_module(name: str):
    """A sub-module of the core (``distill``, ``speculative``, ``ops``), imported on first use."""
    import importlib

    core = import_core()
    mod = getattr(core, name, None)
    return mod if mod is not None else importlib.import_module(f"{core.__name__}.{name}")


def apply_draft_head(model: BagelModel, path: str) -> BagelModel:
    """A new BagelModel with the draft head at ``path``; ``model`` is left as it was (also on error)."""
    import comfy.model_patcher

    model = check_model(model)
    pipe = model.pipe
    head = core_module("speculative").load_draft_head(path, pipe.model, strict_fingerprint=True)
    head = core_module("ops").adopt_ops(head, getattr(pipe, "ops", None))
    head.compute_device = model.patcher.load_device
    patcher = comfy.model_patcher.ModelPatcher(head, load_device=model.patcher.load_device,
                                               offload_device=model.patcher.offload_device)
    log.info("hyperbagel: draft head %s applied to %s", os.path.basename(path), model.describe())
    return replace(model, draft=Attachment(path, head, patcher))


def apply_distilled_expert(model: BagelModel, path: str) -> BagelModel:
    """A new BagelModel with the distilled expert at ``path``; ``model`` is left as it was (also on error)."""
    import comfy.model_patcher

    model = check_model(model)
    pipe = model.pipe
    expert = core_module("distill").load_distilled_expert(path, pipe.model)
    holder = core_module("ops").adopt_ops(expert.as_module(pipe.model), getattr(pipe, "ops", None))
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device=model.patcher.load_device,
                                               offload_device=model.patcher.offload_device)
    log.info("hyperbagel: distilled expert %s applied to %s", os.path.basename(path), model.describe())
    return replace(model, distilled=Attachment(path, expert, patcher))


def call_core(fn: Callable, *args, **kwargs):
    """Call a pipeline method, turning an unsupported keyword into an actionable error (not a TypeError)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise NodeInputError(f"this hyperbagel_core's {getattr(fn, '__name__', 'method')}() does not support "
                                 f"{', '.join(unknown)}; pick another schedule/option or update hyperbagel.")
    return fn(*args, **kwargs)
