"""A minimal stand-in for the parts of ComfyUI the nodes touch, installed into ``sys.modules``.

Only what ``nodes/`` uses: ``comfy_api.latest`` (io types, Schema, ComfyNode, NodeOutput, ComfyExtension),
``comfy.model_management`` (devices, dtype checks, load_models_gpu, interrupts), ``comfy.utils.ProgressBar``,
``comfy.ops`` (pick_operations), ``comfy.model_patcher.ModelPatcher``, ``folder_paths``, ``comfy.latent_formats.Flux``
and ``latent_preview.get_previewer`` (previews off unless ``STATE.preview_method`` says otherwise). Calls are
recorded on ``STATE`` so tests can assert on them.
"""
from __future__ import annotations

import os
import sys
import types

import torch


class _State:
    def reset(self):
        self.loaded = []          # patchers passed to load_models_gpu
        self.progress = []        # (value, total)
        self.interrupt_after = None  # raise on the n-th interrupt check
        self.checks = 0
        self.models_dir = None
        self.ops_picked = []      # (weight dtype, compute dtype, load device) passed to pick_operations
        self.patchers = []        # every ModelPatcher made
        self.preview_method = "none"  # as ComfyUI's --preview-method (default: no previews)
        self.previewers = []      # (device, latent format) of every get_previewer call
        self.previewed = []       # latents the previewer decoded
        self.freed = []           # (memory_required, device) passed to free_memory


STATE = _State()
STATE.reset()


class InterruptProcessingException(Exception):
    pass


# ------------------------------------------------------------------ comfy_api.latest.io
class _Input:
    def __init__(self, id, display_name=None, optional=False, tooltip=None, **kw):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.extra = kw
        self.io_type = self.Parent.io_type

    @property
    def options(self):
        return self.extra.get("options")

    @property
    def default(self):
        return self.extra.get("default")


class _Output:
    def __init__(self, id=None, display_name=None, tooltip=None, **kw):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip
        self.io_type = self.Parent.io_type


def _comfytype(io_type, widget=False):
    cls = type(io_type, (), {"io_type": io_type, "widget": widget})
    cls.Input = type("Input", (_Input,), {"Parent": cls})
    cls.Output = type("Output", (_Output,), {"Parent": cls})
    return cls


class _ComboInput(_Input):
    def __init__(self, id, options=None, **kw):
        super().__init__(id, options=options, **kw)


io = types.ModuleType("comfy_api.latest.io")
io.Custom = lambda io_type: _comfytype(io_type)
io.Int = _comfytype("INT", True)
io.Float = _comfytype("FLOAT", True)
io.String = _comfytype("STRING", True)
io.Boolean = _comfytype("BOOLEAN", True)
io.Combo = _comfytype("COMBO", True)
io.Combo.Input = type("Input", (_ComboInput,), {"Parent": io.Combo})
io.Image = _comfytype("IMAGE")
io.Latent = _comfytype("LATENT")
io.Vae = _comfytype("VAE")
io.Mask = _comfytype("MASK")


class Schema:
    def __init__(self, node_id, display_name=None, category="sd", inputs=None, outputs=None, description="",
                 is_output_node=False, **kw):
        self.node_id, self.display_name, self.category = node_id, display_name, category
        self.inputs, self.outputs = inputs or [], outputs or []
        self.description, self.is_output_node = description, is_output_node


class ComfyNode:
    pass


class NodeOutput:
    def __init__(self, *args, ui=None, **kw):
        self.args, self.ui = args, ui


io.Schema, io.ComfyNode, io.NodeOutput = Schema, ComfyNode, NodeOutput


class ComfyExtension:
    async def on_load(self):
        return None


# ------------------------------------------------------------------ comfy.*
class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        STATE.progress.append((value, total if total is not None else self.total) + ((preview,) if preview else ()))


class Flux:
    """comfy.latent_formats.Flux: its normalisation and previewer names (the RGB factors are not needed here)."""
    scale_factor, shift_factor, latent_channels = 0.3611, 0.1159, 16
    taesd_decoder_name = "taef1_decoder"

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scale_factor


class _Previewer:
    def decode_latent_to_preview_image(self, preview_format, x0):
        STATE.previewed.append(x0.clone())
        return (preview_format, f"preview {len(STATE.previewed)}", 512)


def get_previewer(device, latent_format):
    STATE.previewers.append((device, latent_format))
    return None if STATE.preview_method == "none" else _Previewer()


def throw_exception_if_processing_interrupted():
    STATE.checks += 1
    if STATE.interrupt_after is not None and STATE.checks >= STATE.interrupt_after:
        raise InterruptProcessingException()


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        STATE.patchers.append(self)

    def model_size(self):
        """As ComfyUI's (``comfy.model_management.module_size``): the bytes of the module's state dict."""
        return sum(t.nelement() * t.element_size() for t in self.model.state_dict().values())


class disable_weight_init:
    Linear = torch.nn.Linear
    LayerNorm = torch.nn.LayerNorm
    Embedding = torch.nn.Embedding
    Conv2d = torch.nn.Conv2d
    GroupNorm = torch.nn.GroupNorm


class manual_cast(disable_weight_init):
    pass


def pick_operations(weight_dtype, compute_dtype, load_device=None, **kw):
    STATE.ops_picked.append((weight_dtype, compute_dtype, load_device))
    return disable_weight_init if compute_dtype is None or weight_dtype == compute_dtype else manual_cast


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def install(models_dir: str | None = None) -> _State:
    """Put the stubs into ``sys.modules`` (idempotent) and reset the recorded state."""
    STATE.reset()
    STATE.models_dir = models_dir
    latest = _module("comfy_api.latest", io=io, ComfyExtension=ComfyExtension, ui=_module("comfy_api.latest.ui"))
    mm = _module(
        "comfy.model_management",
        get_torch_device=lambda: torch.device("cpu"), unet_offload_device=lambda: torch.device("cpu"),
        should_use_bf16=lambda device=None: False, should_use_fp16=lambda device=None: False,
        load_models_gpu=lambda models, **kw: STATE.loaded.append((list(models), kw)),
        free_memory=lambda memory_required, device, keep_loaded=(): STATE.freed.append((memory_required, device)),
        throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
        InterruptProcessingException=InterruptProcessingException, current_loaded_models=[],
        soft_empty_cache=lambda force=False: None)
    fnp = {}
    fp = _module("folder_paths", folder_names_and_paths=fnp, models_dir=models_dir or "/nonexistent/models")

    def get_filename_list(key):
        out = []
        for root in fnp[key][0]:
            for d, _, files in os.walk(root):
                out += [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for f in files]
        return sorted(out)

    def get_full_path(key, name):
        for root in fnp.get(key, ([], None))[0]:
            p = os.path.join(root, name)
            if os.path.isfile(p):
                return p
        return None

    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_folder_paths = lambda key: list(fnp[key][0])
    comfy = _module("comfy", model_management=mm, utils=_module("comfy.utils", ProgressBar=ProgressBar),
                    ops=_module("comfy.ops", manual_cast=manual_cast, disable_weight_init=disable_weight_init,
                                pick_operations=pick_operations),
                    model_patcher=_module("comfy.model_patcher", ModelPatcher=ModelPatcher),
                    latent_formats=_module("comfy.latent_formats", Flux=Flux))
    sys.modules.update({
        "comfy_api": _module("comfy_api", latest=latest), "comfy_api.latest": latest,
        "comfy": comfy, "comfy.model_management": mm, "comfy.utils": comfy.utils, "comfy.ops": comfy.ops,
        "comfy.model_patcher": comfy.model_patcher, "folder_paths": fp,
        "comfy.latent_formats": comfy.latent_formats,
        "latent_preview": _module("latent_preview", get_previewer=get_previewer),
    })
    return STATE


def uninstall() -> None:
    for name in ["comfy_api", "comfy_api.latest", "comfy", "comfy.model_management", "comfy.utils", "comfy.ops",
                 "comfy.model_patcher", "folder_paths", "comfy.latent_formats", "latent_preview"]:
        sys.modules.pop(name, None)
    for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
        sys.modules.pop(name, None)
