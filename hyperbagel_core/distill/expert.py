"""The CFG-distilled generation expert: file format, loader, and the prefill/denoise weight swap.

File format (``docs/distilled_expert.md``): one ``.safetensors`` file, no pickle.
  * ``gen.<official key>``: replacement tensors for generation-expert parameters (any subset of
    ``gen_expert_keys(model)``; a key that is absent keeps the base weight);
  * ``guidance.{text,img}_scale_embedder.mlp.{0,2}.{weight,bias}``: the two guidance-scale embedders;
  * metadata ``format`` = ``hyperbagel.distilled_expert``, ``format_version`` = ``1``, ``config`` = JSON of
    ``DistillConfig`` (NFE, schedule, timesteps, shift, scale ranges, base checkpoint fingerprint, the list
    of replaced keys).

Deployment (Hyper-Bagel 2.8): the base (original) generation-expert weights stay in the model and are used
for every prefill (source-image VAE tokens, clean latents); ``DistilledExpert.swapped_into(model)`` puts
the distilled tensors in place for the denoising passes only and restores the originals in ``finally``.
Only the replaced tensors are held twice; the swap re-points parameters (no copy, no allocation).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..fingerprint import fingerprint_tensors
from ..placement import check_weight_swaps
from ..quant import dense_shape, is_quantized
from ..tensor_io import aligned, read_safetensors_header
from .embedders import IMG_SCALE_RANGE, T2I_IMG_SCALE, TEXT_SCALE_RANGE, GuidanceEmbedding

FORMAT = "hyperbagel.distilled_expert"
FORMAT_VERSION = "1"
GEN_PREFIX, GUIDANCE_PREFIX = "gen.", "guidance."
_GEN_MODULES = ("time_embedder.", "vae2llm.", "llm2vae.")


def is_gen_expert_key(key: str) -> bool:
    """Generation-expert parameters: every ``_moe_gen`` key plus the latent-side embedders and head."""
    return "_moe_gen" in key or key.startswith(_GEN_MODULES)


def gen_expert_keys(model: nn.Module) -> list[str]:
    return [k for k, _ in model.named_parameters() if is_gen_expert_key(k)]


def base_fingerprint(model: nn.Module, samples: int = 1024) -> str:
    """A cheap identity of the base checkpoint: shapes + strided samples of a few tensors rounded to bf16.

    The same on CPU/GPU and for bf16/fp32 loads of a bf16 checkpoint. Computed from the weights in place,
    so it must be taken outside a swap (``swapped_into`` refuses nesting; the loader calls it first).
    A quantized model carries the fingerprint of the bf16 weights it was quantized from
    (``model.base_fingerprints``, set by ``loading``).
    """
    stored = getattr(model, "base_fingerprints", None)
    if stored:
        return stored["distilled_expert"]
    params = dict(model.named_parameters())
    return fingerprint_tensors(params, params.get, samples)


@dataclass(frozen=True)
class DistillConfig:
    """What a distilled-expert file is for (stored as JSON in the file's metadata)."""
    base_fingerprint: str
    base_hidden_size: int
    base_num_layers: int
    nfe: int = 6
    schedule: str = "hyper-6nfe"
    timesteps: tuple = ()
    shift: float = 1.0
    text_scale_range: tuple = TEXT_SCALE_RANGE
    img_scale_range: tuple = IMG_SCALE_RANGE
    t2i_img_scale: float = T2I_IMG_SCALE
    scale_encoding: str = "raw"
    stages: tuple = ("cfg_distillation",)
    base_name: str = ""
    replaced_keys: tuple = ()
    notes: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "DistillConfig":
        try:
            d = json.loads(text)
            known = {f for f in cls.__dataclass_fields__}
            d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
            return cls(**d)
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{where}: the 'config' metadata is not a valid distilled-expert config ({e}); "
                                  "re-export the file with hyperbagel_core.distill") from e


@dataclass
class DistilledExpert:
    config: DistillConfig
    guidance: GuidanceEmbedding
    tensors: dict = field(default_factory=dict)     # official key -> replacement tensor (or nn.Parameter)
    _module: nn.Module | None = field(default=None, repr=False)

    def as_module(self, model: nn.Module) -> nn.Module:
        """An nn.Module owning the embedders and the replacement weights, to attach beside ``model`` so that a
        model manager which moves, counts and streams ``pipe.modules`` (ComfyUI's ModelPatcher: ``model_size``
        sums the state dict, partial loading walks the modules holding parameters) does so with them too.

        The replacements become parameters (requires_grad False, sharing the loaded tensors) of stand-ins at
        the model's module paths under ``weights``: each stand-in is an empty module of the class of the layer
        whose parameter it replaces, so a model manager sizes, loads or streams it like that layer.
        """
        if self._module is None:
            m = nn.Module()
            m.guidance = self.guidance
            m.weights = nn.Module()
            for key, t in self.tensors.items():
                path, _, name = key.rpartition(".")
                _stand_in_at(m.weights, model, path).register_parameter(
                    name, nn.Parameter(t.detach(), requires_grad=False))
            self._module = m
            self.tensors = {k: m.weights.get_parameter(k) for k in self.tensors}
        return self._module

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, keys=None, **config) -> "DistilledExpert":
        """Start a distilled expert from the base model: copies of the gen-expert weights + zero-init embedders."""
        params = dict(model.named_parameters())
        keys = gen_expert_keys(model) if keys is None else list(keys)
        bad = [k for k in keys if k not in params or not is_gen_expert_key(k)]
        if bad:
            raise ValueError(f"not generation-expert parameters of this model: {bad[:5]}")
        ref = params["vae2llm.weight"]
        g = GuidanceEmbedding(ref.shape[0], config.get("text_scale_range", TEXT_SCALE_RANGE),
                              config.get("img_scale_range", IMG_SCALE_RANGE)).to(ref.device, ref.dtype)
        cfg = DistillConfig(base_fingerprint=base_fingerprint(model), base_hidden_size=ref.shape[0],
                            base_num_layers=_num_layers(model), replaced_keys=tuple(keys), **config)
        return cls(cfg, g, {k: params[k].detach().clone() for k in keys})

    # -- use ----------------------------------------------------------------------------------------------------
    def extra(self, text_scale: float, img_scale: float | None = None, dtype: torch.dtype | None = None,
              device=None):
        """The ``time_embed_extra`` for these scales (clamped to the trained ranges with a warning)."""
        s_img = self.config.t2i_img_scale if img_scale is None else img_scale
        return self.guidance(text_scale, s_img, dtype, device)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module):
        """Within the block the model's gen-expert parameters are the distilled ones; restored on exit.

        Each replacement sits where the parameter it replaces sits. Without a holder module the tensors (and
        the embedders) follow a moved model once and stay there. With one (``as_module``, attached beside the
        model so a model manager places it) the holder is left where the manager put it: a replacement for a
        parameter that the manager loaded elsewhere is copied there for this block only (a partial load
        streams some layers from the offload device and keeps others resident).
        """
        check_weight_swaps(model)
        params = dict(model.named_parameters())
        if self._module is not None:
            reps = {k: self._module.weights.get_parameter(k) for k in self.tensors}
        else:
            reps = dict(self.tensors)
            ref = params.get("vae2llm.weight")
            if ref is not None and next(self.guidance.parameters()).device != ref.device:
                self.guidance.to(ref.device)
        for k, v in list(reps.items()):
            p = params.get(k)
            if p is not None and v.device != p.device and not v.requires_grad:  # trained ones stay put
                reps[k] = v.detach().to(p.device)
        with swap_parameters(model, reps):
            yield model

    def to(self, device=None, dtype=None) -> "DistilledExpert":
        self.guidance.to(device=device, dtype=dtype)
        if self._module is not None:
            self._module.to(device=device, dtype=dtype)
            self.tensors = {k: self._module.weights.get_parameter(k) for k in self.tensors}
        else:
            self.tensors = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        return self

    def parameters(self):
        """Trainable tensors: replacements that are Parameters requiring grad, plus the embedders."""
        return [t for t in self.tensors.values() if isinstance(t, nn.Parameter) and t.requires_grad] + \
            list(self.guidance.parameters())

    def nbytes(self) -> int:
        """Extra memory this expert holds on top of the base model."""
        ts = list(self.tensors.values()) + list(self.guidance.parameters())
        return sum(t.numel() * t.element_size() for t in ts)

    # -- file format ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        from safetensors.torch import save_file

        out = {GEN_PREFIX + k: v.detach() for k, v in self.tensors.items()}
        out.update({GUIDANCE_PREFIX + k: v.detach() for k, v in self.guidance.state_dict().items()})
        out = {k: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in out.items()}
        cfg = self.config
        if tuple(cfg.replaced_keys) != tuple(self.tensors):
            cfg = DistillConfig(**{**asdict(cfg), "replaced_keys": tuple(self.tensors)})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_json()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(out, str(path), metadata=meta)


def _stand_in_at(root: nn.Module, model: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` under ``root``, created on the way: plain containers, and at the end a stand-in
    for ``model``'s module there (its class and plain settings such as sizes, no tensors; never called)."""
    mod = root
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part not in mod._modules:
            if i < len(parts) - 1:
                child = nn.Module()
            else:
                owner = model.get_submodule(path)
                child = type(owner).__new__(type(owner))
                nn.Module.__init__(child)
                child.__dict__.update({k: v for k, v in vars(owner).items() if k != "training" and
                                       not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple))})
                for name in owner._parameters:
                    child.register_parameter(name, None)   # filled by the caller or left empty
            mod.add_module(part, child)
        mod = mod._modules[part]
    return mod


def _num_layers(model: nn.Module) -> int:
    try:
        return int(model.config.llm.num_hidden_layers)
    except AttributeError:
        return len(model.language_model.model.layers)


@contextlib.contextmanager
def swap_parameters(model: nn.Module, replacements: dict):
    """Re-point ``model``'s parameters named in ``replacements`` to those tensors; restore in ``finally``.

    A replacement that is an ``nn.Parameter`` is installed as is (gradients flow into it: training); a plain
    tensor is wrapped without copying. Nested swaps of the same model are refused.
    """
    if getattr(model, "_hb_swapped", False):
        raise RuntimeError("a distilled expert is already swapped into this model")
    saved = []
    try:
        model._hb_swapped = True
        for key, new in replacements.items():
            mod_name, _, name = key.rpartition(".")
            mod = model.get_submodule(mod_name)
            old = mod._parameters[name]
            if dense_shape(model, key) != tuple(new.shape):
                raise CheckpointError(f"distilled tensor {key}: shape {tuple(new.shape)} != model "
                                      f"{dense_shape(model, key)}")
            param = new if isinstance(new, nn.Parameter) else nn.Parameter(new, requires_grad=False)
            saved.append((mod, name, old))
            mod._parameters[name] = param
        yield model
    finally:
        for mod, name, old in reversed(saved):
            mod._parameters[name] = old
        model._hb_swapped = False


# -- loading -----------------------------------------------------------------------------------------------------
def read_distilled_file(path: str | Path) -> tuple[DistillConfig, dict]:
    """Read and validate the container (format, metadata, tensor list). No model needed."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: distilled-expert file not found; check the path (the nodes list the "
                              "files in models/bagel/distilled)")
    read_safetensors_header(p)  # framing + truncation, one clear message
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / non-safetensors files
        raise CheckpointError(f"{p}: not a readable safetensors file ({type(e).__name__}: {e}); the file is "
                              "corrupt or truncated, or is not a distilled expert (pickled .pt/.bin is not "
                              "supported)") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}; this "
                              "safetensors file is not a hyperbagel distilled expert")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: distilled-expert format_version {meta.get('format_version')!r} is not "
                              f"supported (this hyperbagel reads {FORMAT_VERSION!r}); update hyperbagel")
    if "config" not in meta:
        raise CheckpointError(f"{p}: the 'config' metadata entry is missing")
    return DistillConfig.from_json(meta["config"], str(p)), tensors


def _check_against(model: nn.Module, cfg: DistillConfig, tensors: dict, where: str) -> None:
    D = model.vae2llm.weight.shape[0]
    if cfg.base_hidden_size != D or cfg.base_num_layers != _num_layers(model):
        raise CheckpointError(
            f"{where}: made for a base model with hidden size {cfg.base_hidden_size} and {cfg.base_num_layers} "
            f"layers, but the loaded model has {D} and {_num_layers(model)}; load the matching BAGEL checkpoint")
    fp = base_fingerprint(model)
    if cfg.base_fingerprint != fp:
        raise CheckpointError(
            f"{where}: made for base checkpoint {cfg.base_name or '(unnamed)'} with fingerprint {cfg.base_fingerprint}, "
            f"but the loaded model's fingerprint is {fp}; load the BAGEL weights this expert was distilled from")
    params = dict(model.named_parameters())
    gen = {k[len(GEN_PREFIX):] for k in tensors if k.startswith(GEN_PREFIX)}
    missing = sorted(set(cfg.replaced_keys) - gen)
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensors listed in the config are missing from the file, "
                              f"e.g. {missing[:3]}; the file is incomplete, re-export it")
    for k in sorted(gen):
        if k not in params or not is_gen_expert_key(k):
            raise CheckpointError(f"{where}: tensor {k!r} is not a generation-expert parameter of this model; "
                                  "a distilled expert may only replace generation-expert weights")
        if tuple(tensors[GEN_PREFIX + k].shape) != dense_shape(model, k):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {tuple(tensors[GEN_PREFIX + k].shape)}, the "
                                  f"model has {dense_shape(model, k)}")
    extra = sorted(k for k in tensors if not k.startswith((GEN_PREFIX, GUIDANCE_PREFIX)))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensors {extra[:3]} (only 'gen.*' and 'guidance.*' allowed)")


def load_distilled_expert(path: str | Path, model: nn.Module) -> DistilledExpert:
    """Load a distilled-expert file for ``model`` (checked against the base fingerprint) on its device/dtype.

    Raises:
        CheckpointError: missing/corrupt file, wrong format, wrong base model, missing or misshapen tensors.
    """
    check_weight_swaps(model)
    cfg, tensors = read_distilled_file(path)
    _check_against(model, cfg, tensors, str(path))
    ref = model.vae2llm.weight
    g = GuidanceEmbedding(cfg.base_hidden_size, cfg.text_scale_range, cfg.img_scale_range, zero_init=False)
    sd = {k[len(GUIDANCE_PREFIX):]: v for k, v in tensors.items() if k.startswith(GUIDANCE_PREFIX)}
    want = set(g.state_dict())
    if set(sd) != want:
        raise CheckpointError(f"{path}: guidance-embedder tensors missing {sorted(want - set(sd))[:4]} or unexpected "
                              f"{sorted(set(sd) - want)[:4]}; the file is incomplete, re-export it")
    try:
        g.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: guidance-embedder tensors do not fit hidden size "
                              f"{cfg.base_hidden_size}: {e}") from e
    g.to(ref.device, ref.dtype)
    params = dict(model.named_parameters())
    reps = {}
    for k in [k for k in tensors if k.startswith(GEN_PREFIX)]:
        key = k[len(GEN_PREFIX):]  # popped: the file's tensor is freed once its aligned copy exists
        dtype = model.get_submodule(key.rpartition(".")[0]).compute_dtype if is_quantized(params[key]) \
            else params[key].dtype  # a quantized base layer computes with the dense replacement as is
        reps[key] = aligned(tensors.pop(k).to(ref.device, dtype))
    return DistilledExpert(cfg, g, reps)
