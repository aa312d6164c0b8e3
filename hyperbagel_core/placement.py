"""One BAGEL model placed over several devices: accelerate's ``device_map`` / ``max_memory`` (docs/ARCHITECTURE.md).

The official ``app.py`` spreads the model with accelerate (spec 1.7): ``infer_auto_device_map`` with the decoder
layers never split and the embedding-side modules forced onto one device, because their outputs are summed or
concatenated into one packed sequence. The same rules here, stated as groups that share an execution device:

* a decoder layer (``Qwen2MoTDecoderLayer``) and a ViT encoder layer (``SiglipEncoderLayer``) are never split;
* ``EMBEDDING_SIDE`` (token embedding, ViT, connector, the two position tables, timestep embedder, vae2llm,
  llm2vae) share one device: the official list plus the whole ViT, whose output enters the sequence beside
  the connector's (its post-LayerNorm is applied by its parent, so the ViT is one unit);
* the two final norms share one device (a gen-mode block routes its marker rows through the und norm).

accelerate's hooks (``dispatch_model``) move each module's inputs to its execution device, so activations cross
devices at module boundaries (a [tokens, 3584] hidden state, or RoPE's cos/sin) and weights stay where they were
placed; modules mapped to ``"cpu"`` beside a GPU, or to ``"disk"``, are offloaded: accelerate copies their weights
to the main device for each forward (the official app's CPU/disk offload). Each decoder layer's KV cache is
allocated on that layer's execution device (``Context.reserve(devices=)``), so decoding and denoising read
and write every cache where its layer runs and no step copies a cache across devices.

Text decoding on a split placement runs eagerly: the static CUDA-graph step needs every und weight resident on
one CUDA device (``model/static_decode.use_static_decoding``); a graph per device would still need the host
to hand activations between graphs every token, and offloaded weights are loaded by Python hooks per forward,
which a graph cannot replay.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

from .errors import InputError

log = logging.getLogger(__name__)

NO_SPLIT = ["Qwen2MoTDecoderLayer", "SiglipEncoderLayer"]
EMBEDDING_SIDE = ("language_model.model.embed_tokens", "vit_model", "connector", "vit_pos_embed",
                  "latent_pos_embed", "time_embedder", "vae2llm", "llm2vae")
FINAL_NORMS = ("language_model.model.norm", "language_model.model.norm_moe_gen")
GROUPS = (EMBEDDING_SIDE, FINAL_NORMS)
# offloaded modules whose forward reads a child's weights directly (the ViT's fp32 LayerNorms): accelerate loads
# all their weights before their forward. Decoder layers are left to per-module loading, so a decoding step
# loads only the und expert of an offloaded layer.
PRELOAD = ["SiglipEncoderLayer", "SiglipVisionTransformer"]
OFFLOADED = ("cpu", "disk")


def _accelerate_at_least(major: int, minor: int) -> bool:
    import accelerate
    parts = accelerate.__version__.split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


def require_accelerate():
    """accelerate, or an error that says how to get it (it is in requirements.txt; ComfyUI installs may lack it)."""
    try:
        import accelerate
    except ImportError as e:
        raise InputError("placing a model over several devices (device_map / max_memory) needs the accelerate "
                         "package: pip install accelerate (pure Python; it uses the torch you have)") from e
    return accelerate


def parse_max_memory(text: str | dict | None) -> dict | None:
    """``"0=20GiB, 1=24GiB, cpu=64GiB"`` (the CLI's and the loader node's form) -> accelerate's ``max_memory``."""
    if text is None or isinstance(text, dict):
        return text
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, size = (s.strip() for s in item.partition("="))
        if not sep or not size:
            raise InputError(f"max_memory entry {item!r}: write DEVICE=SIZE, e.g. '0=20GiB, 1=24GiB, cpu=64GiB'")
        out[int(key) if key.isdigit() else key] = size
    return out or None


def parse_device_map(text: str | dict | None):
    """``auto``, a JSON object ``{"module": device}`` or the path of a JSON file -> ``device_map``."""
    if text is None or isinstance(text, dict) or text == "auto":
        return text
    import json
    try:
        raw = text if text.lstrip().startswith("{") else Path(text).read_text()
        dm = json.loads(raw)
    except (OSError, ValueError) as e:
        raise InputError(f"device_map {text!r}: give 'auto', a JSON object or a JSON file ({e})") from None
    if not isinstance(dm, dict):
        raise InputError(f"device_map {text!r}: the JSON must be an object of module name -> device")
    return dm


def execution_device(value, main: torch.device) -> torch.device:
    """Where a module mapped to ``value`` computes: offloaded ones on the main device."""
    if value in OFFLOADED:
        return main
    return normalize_device(value)


def normalize_device(value) -> torch.device:
    """A device-map value as a torch.device with its index (an int is accelerate's CUDA ordinal)."""
    if isinstance(value, int):
        return torch.device("cuda", value)
    d = torch.device(value)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


def covering_key(device_map: dict, name: str) -> str | None:
    """The device-map key that places module or tensor ``name`` (the longest prefix)."""
    while name not in device_map:
        if not name:
            return None
        name = name.rpartition(".")[0]
    return name


def _values_within(device_map: dict, name: str) -> set:
    """The devices that hold some tensor of module ``name``."""
    k = covering_key(device_map, name)
    if k is not None:
        return {device_map[k]}
    return {v for j, v in device_map.items() if j.startswith(name + ".")}


def _expand(device_map: dict, model: nn.Module, key: str) -> None:
    """Replace ``key`` by one entry per child module (same device), so a descendant can be placed apart."""
    mod = model.get_submodule(key)
    if next(mod.parameters(recurse=False), None) is not None or next(mod.buffers(recurse=False), None) is not None:
        raise InputError(f"device_map: {key or 'the model'} holds weights itself and cannot be split further")
    value = device_map.pop(key)
    for child, _ in mod.named_children():
        device_map[f"{key}.{child}" if key else child] = value


def _place(device_map: dict, model: nn.Module, name: str, value) -> None:
    """Put module ``name`` on ``value``, splitting coarser entries that cover it and dropping finer ones."""
    while True:
        k = covering_key(device_map, name)
        if k is None or k == name:
            break
        _expand(device_map, model, k)
    for k in [k for k in device_map if k.startswith(name + ".")]:
        del device_map[k]
    device_map[name] = value


class Placement:
    """A request to place a model (``device_map`` dict or ``"auto"``, ``max_memory``, ``offload_dir``) and, once
    ``plan`` has run on the meta model, the resolved map. Used by ``loading.load_bagel_model``: ``plan`` before
    any tensor is read, ``store`` for each tensor as it is read, ``dispatch`` at the end."""

    def __init__(self, device_map="auto", max_memory=None, offload_dir=None):
        if not (device_map == "auto" or isinstance(device_map, dict)):
            raise InputError(f"device_map must be 'auto' or a dict of module name -> device, got {device_map!r}")
        self.request = device_map
        self.max_memory = parse_max_memory(max_memory)
        self.offload_root = None if offload_dir is None else Path(offload_dir)
        self.device_map: dict | None = None
        self.main: torch.device | None = None
        self._offload_folder: Path | None = None
        self._offload_index: dict = {}

    # -- planning -------------------------------------------------------------------------------------------
    def plan(self, model: nn.Module, dtype: torch.dtype, main_reserve: int = 0) -> dict:
        """Resolve the device map on the meta-built ``model`` (stored dtypes already set for quantized layers).

        ``main_reserve`` bytes (the VAE, working memory) are kept free on the main device by the auto plan."""
        require_accelerate()
        if self.request == "auto":
            dm = self._infer(model, dtype, main_reserve)
        else:
            dm = self._check_user_map(model, dict(self.request))
        gpus = sorted({normalize_device(v) for v in dm.values() if v not in OFFLOADED},
                      key=lambda d: (d.type == "cpu", d.type, d.index or 0))
        self.main = gpus[0] if gpus else torch.device("cpu")
        self._enforce_groups(model, dm)
        if "disk" in dm.values() and self.offload_root is None:
            raise InputError("device_map puts modules on 'disk': pass offload_dir (a folder with room for them)")
        self.device_map = dm
        log.info("hyperbagel placement: main device %s, %s", self.main, self.summary(model))
        return dm

    def _infer(self, model, dtype, main_reserve: int) -> dict:
        from accelerate import infer_auto_device_map
        from accelerate.utils import compute_module_sizes, get_max_memory

        from .quant import is_quantized
        special = {n: t.dtype for n, t in model.state_dict().items() if is_quantized(t) or n.endswith("_scale")}
        budget = get_max_memory(None if self.max_memory is None else dict(self.max_memory))
        gpus = [k for k in budget if isinstance(k, int)]
        # the embedding side is moved onto the first device afterwards: charge it there up front
        sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)
        first = gpus[0] if gpus else "cpu"
        if first in budget:
            charge = main_reserve + sum(sizes[m] for m in EMBEDDING_SIDE[1:])
            budget[first] = max(0, budget[first] - charge)
        dm = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=NO_SPLIT, dtype=dtype,
                                   special_dtypes=special, offload_buffers=True)
        if not dm:
            raise InputError("max_memory leaves no room for the model; raise it or add 'cpu' / 'disk'")
        return dm

    def _check_user_map(self, model, dm: dict) -> dict:
        """A user's map, checked: known modules, every tensor covered, no layer split, known devices."""
        modules = dict(model.named_modules())
        unknown = [k for k in dm if k not in modules]
        if unknown:
            raise InputError(f"device_map: no module named {', '.join(map(repr, unknown))} in BAGEL; keys are module "
                             "names of the official checkpoint (e.g. language_model.model.layers.0, vit_model)")
        uncovered = [n for n in model.state_dict() if covering_key(dm, n) is None]
        if uncovered:
            raise InputError(f"device_map leaves {len(uncovered)} tensors unplaced (e.g. {uncovered[0]}); add their "
                             "modules or a '' entry for everything else")
        for k, v in dm.items():
            if v not in OFFLOADED:
                try:
                    d = normalize_device(v)
                except (RuntimeError, TypeError, ValueError):
                    d = torch.device("meta")
                if d.type == "meta" or isinstance(v, bool):
                    raise InputError(f"device_map[{k!r}] = {v!r}: use a GPU index, 'cuda:N', 'cpu' or 'disk'")
                if d.type == "cuda" and d.index >= torch.cuda.device_count():
                    raise InputError(f"device_map[{k!r}] = {v!r}: this machine has {torch.cuda.device_count()} "
                                     "CUDA devices")
            for cls in NO_SPLIT:
                parent = _enclosing(modules, k, cls)
                if parent is not None and parent != k:
                    raise InputError(f"device_map key {k!r} splits {parent!r}: a {cls} is never split across "
                                     "devices; place the whole layer")
        # disjoint entries (a "" entry or a coarse one split by finer ones becomes concrete modules), so every
        # module accelerate hooks has exactly one key
        out: dict = {}
        for k in sorted(dm, key=lambda k: (k != "", k.count("."))):
            _place(out, model, k, dm[k])
        return out

    def _enforce_groups(self, model, dm: dict) -> None:
        """Each group where its first member is: moved there in an auto plan (which charged the group to the
        first device), required to share one execution device in a user's map."""
        for group in GROUPS:
            target = dm[covering_key(dm, group[0])]
            for name in group[1:]:
                values = _values_within(dm, name)
                if self.request == "auto":
                    if values != {target}:
                        _place(dm, model, name, target)
                elif {execution_device(v, self.main) for v in values} != {execution_device(target, self.main)}:
                    raise InputError(f"device_map: {name} is on {', '.join(map(str, values))} but {group[0]} on "
                                     f"{target}; these modules feed one packed sequence and must share a device: "
                                     + ", ".join(group))
        from accelerate.utils.modeling import clean_device_map
        clean_device_map(dm)

    # -- loading ----------------------------------------------------------------------------------------------
    def value_of(self, name: str):
        return self.device_map[covering_key(self.device_map, name)]

    def store(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Where a freshly read tensor goes: its device (offloaded CPU tensors stay in RAM for accelerate), or,
        for "disk", a file in the offload folder and a meta tensor of the same dtype and shape in the model."""
        value = self.value_of(name)
        if value != "disk":
            return t.to("cpu" if value == "cpu" else normalize_device(value))
        from accelerate.utils import offload_weight
        if t.dtype.is_floating_point and t.element_size() == 1 and not _accelerate_at_least(1, 15):
            raise InputError("fp8 weights offloaded to 'disk' need accelerate >= 1.15 (pip install -U accelerate); "
                             "or keep them off the disk, or use weight_dtype int8 / nf4")
        offload_weight(t, name, str(self._folder()), index=self._offload_index)
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def _folder(self) -> Path:
        if self._offload_folder is None:
            self.offload_root.mkdir(parents=True, exist_ok=True)
            self._offload_folder = Path(tempfile.mkdtemp(prefix="hyperbagel-offload-", dir=self.offload_root))
        return self._offload_folder

    def dispatch(self, model: nn.Module) -> nn.Module:
        """accelerate's ``dispatch_model`` with this map; then the per-layer KV devices and the input device."""
        from accelerate import dispatch_model
        from accelerate.utils import save_offload_index

        folder = self._offload_folder
        if folder is not None:
            save_offload_index(self._offload_index, str(folder))
            weakref.finalize(model, shutil.rmtree, str(folder), True)  # the offload copy dies with the model
        dispatch_model(model, {k: (str(normalize_device(v)) if v not in OFFLOADED else v)
                               for k, v in self.device_map.items()},
                       main_device=str(self.main), offload_dir=None if folder is None else str(folder),
                       offload_index=self._offload_index or None, offload_buffers=True,
                       preload_module_classes=PRELOAD, force_hooks=len(set(map(str, self.device_map.values()))) > 1)
        n = len(model.language_model.model.layers)
        model.language_model.kv_devices = tuple(
            execution_device(self.value_of(f"language_model.model.layers.{i}"), self.main) for i in range(n))
        model.compute_device = execution_device(self.value_of(EMBEDDING_SIDE[0]), self.main)
        model.placement = self
        return model

    # -- reporting --------------------------------------------------------------------------------------------
    def bytes_per_device(self, model: nn.Module) -> dict[str, int]:
        """Weight bytes per device-map value ("cuda:0", "cpu", "disk"), from the placed tensors' dtypes."""
        out: dict[str, int] = {}
        for n, t in model.state_dict().items():
            v = self.value_of(n)
            key = v if v in OFFLOADED else str(normalize_device(v))
            out[key] = out.get(key, 0) + t.numel() * t.element_size()
        return out

    def summary(self, model: nn.Module) -> str:
        parts = [f"{k} {_size(v)}" for k, v in sorted(self.bytes_per_device(model).items())]
        layers = [str(self.value_of(f"language_model.model.layers.{i}"))
                  for i in range(len(model.language_model.model.layers))]
        return "weights " + ", ".join(parts) + "; decoder layers " + _runs(layers)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def _enclosing(modules: dict, key: str, cls: str) -> str | None:
    """The outermost module of class ``cls`` that contains ``key`` (or is it)."""
    parts = key.split(".") if key else []
    for i in range(len(parts) + 1):
        name = ".".join(parts[:i])
        if type(modules.get(name)).__name__ == cls:
            return name
    return None


def _runs(values: list[str]) -> str:
    """["0", "0", "1"] -> "0-1: 0, 2: 1" (layer ranges per device)."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append(f"{start}-{i - 1}: {values[start]}" if i - 1 > start else f"{start}: {values[start]}")
            start = i
    return ", ".join(out)


def spans_devices(model: nn.Module) -> bool:
    """The decoder layers run on more than one device."""
    devices = getattr(getattr(model, "language_model", None), "kv_devices", None)
    return devices is not None and len(set(devices)) > 1


def has_offloaded(model: nn.Module) -> bool:
    """Some weights of ``model`` are loaded per forward by accelerate (mapped to "cpu" beside a GPU, or "disk")."""
    p = getattr(model, "placement", None)
    if p is None:
        return False
    values = set(p.device_map.values())
    return "disk" in values or ("cpu" in values and p.main.type != "cpu")


def check_weight_swaps(model: nn.Module) -> None:
    """A distilled expert swaps gen-expert weights in place; accelerate reloads offloaded modules from their
    offload copy at every forward, which would silently run the base weights instead."""
    if has_offloaded(model):
        raise InputError("a distilled expert replaces gen-expert weights in place, but this model has offloaded "
                         "modules (device_map 'cpu' beside a GPU, or 'disk') that are reloaded at every forward; "
                         "place it without offload (GPUs only) to use a distilled expert")
