"""DFloat11 folders (``DFloat11/BAGEL-7B-MoT-DF11``): BAGEL's bf16 weights Huffman-compressed without loss,
rebuilt on the GPU just before each compressed module runs by the optional ``dfloat11`` package (CUDA only,
``pip install dfloat11[cuda12]``; never a requirement of hyperbagel).

What the package (0.5.0, read for these facts) expects and does: ``config.json`` holds ``dfloat11_config``
(``version``, ``threads_per_block``, ``bytes_per_thread``, ``pattern_dict``); every ``*.safetensors`` at the
folder's root is read; a compressed module ``M`` is stored as ``M.encoded_exponent``, ``M.sign_mantissa``,
``M.luts``, ``M.output_positions``, ``M.gaps`` (+ ``M.split_positions`` when a ``pattern_dict`` entry spreads
its weights over the sub-modules it lists); ``DFloat11Model.from_pretrained(folder, bfloat16_model=model,
device=...)`` copies every plain tensor into the model's own, deletes the compressed weights and registers a
forward pre-hook on ``M`` that writes them back (views of one shared buffer) before ``M`` runs. BAGEL's
module names are the official ones (our state-dict keys are the release's), so the hooks find our modules;
our layers are called as modules, so the hooks run. The package prints, not raises, on a tensor it cannot
place, so the folder is checked here first: every weight of the model comes either plain or compressed.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch

from .config import BagelConfig
from .errors import CheckpointError, InputError
from .tensor_io import read_safetensors_header

PACKAGE = "dfloat11"
ALTERNATIVE = ("or load the official BF16 folder (ByteDance-Seed/BAGEL-7B-MoT) with weight_dtype int8, "
               "fp8_e4m3fn or nf4, hyperbagel's own quantized modes (docs/quantization.md)")
_PARTS = ("encoded_exponent", "sign_mantissa", "luts", "output_positions", "gaps", "split_positions")


def missing_requirement(device: torch.device) -> str | None:
    """Why a DFloat11 folder cannot load here (None when it can)."""
    if importlib.util.find_spec(PACKAGE) is None:
        return f"the '{PACKAGE}' package is not installed (pip install {PACKAGE}[cuda12]; it needs a CUDA GPU)"
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return f"the '{PACKAGE}' package decompresses on CUDA GPUs only, and the device is {torch.device(device)}"
    return None


def compressed_weights(folder: Path, model) -> set:
    """The model weights the package rebuilds from compressed tensors; a clear error when a weight of ``model``
    comes neither plain nor compressed, or with another shape."""
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))["dfloat11_config"]
    patterns = cfg.get("pattern_dict") or {}
    header = {}
    for f in sorted(folder.glob("*.safetensors")):
        header.update(read_safetensors_header(f))
    modules = dict(model.named_modules())
    rebuilt = set()
    for key in header:
        name, _, part = key.rpartition(".")
        if part != "encoded_exponent":
            continue
        if name not in modules:
            raise CheckpointError(f"{folder}: compressed module {name} is not a BAGEL module; this DFloat11 folder "
                                  "is not BAGEL-7B-MoT's")
        if isinstance(modules[name], (torch.nn.Linear, torch.nn.Embedding)):
            rebuilt.add(f"{name}.weight")
            continue
        subs = next((v for p, v in patterns.items() if re.fullmatch(p, name)), None)
        if subs is None:
            raise CheckpointError(f"{folder}: no pattern_dict entry of config.json matches {name}; re-download it")
        rebuilt.update(f"{name}.{s}.weight" for s in subs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plain = {k: tuple(s) for k, (s, _) in header.items() if k.rpartition(".")[2] not in _PARTS}
    missing = sorted(k for k in expected if k not in plain and k not in rebuilt)
    shapes = sorted(k for k in expected if k in plain and plain[k] != expected[k])
    if missing or shapes:
        raise CheckpointError(f"{folder}: the DFloat11 files do not hold this model's weights (missing "
                              f"{len(missing)}, e.g. {missing[:2]}; other shapes: {shapes[:2]}): check "
                              "llm_config.json / vit_config.json or re-download the folder")
    return rebuilt


def load_df11_model(folder: Path, config: BagelConfig, *, device, dtype, ops=None, weight_dtype: str = "default"):
    """BagelModel whose compressed weights the ``dfloat11`` package rebuilds on ``device`` (a CUDA GPU)."""
    from .model.bagel import BagelModel

    with torch.device("meta"):
        model = BagelModel(config, ops=ops)
    rebuilt = compressed_weights(folder, model)   # checked before the requirement: a broken folder says so
    why = missing_requirement(device)
    if why is not None:
        raise CheckpointError(f"{folder}: a DFloat11-compressed BAGEL folder, and {why}. Install it on a CUDA "
                              f"machine, {ALTERNATIVE}")
    if weight_dtype not in ("default", "auto"):
        raise InputError(f"weight_dtype {weight_dtype!r}: a DFloat11 folder loads its own lossless bf16 weights; use "
                         "'default', or the official BF16 folder to quantize")
    if dtype != torch.bfloat16:
        raise InputError(f"dtype {dtype}: DFloat11 rebuilds bf16 weights exactly; load it with dtype bfloat16")
    from dfloat11 import DFloat11Model

    # plain weights get CPU storage for the package to copy into; rebuilt ones stay on meta until it deletes them
    for mname, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if f"{mname}.{pname}".lstrip(".") not in rebuilt:
                module._parameters[pname] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False)
        for bname, b in list(module.named_buffers(recurse=False)):
            module._buffers[bname] = torch.empty(b.shape, dtype=b.dtype if not b.is_floating_point() else dtype)
    DFloat11Model.from_pretrained(str(folder), bfloat16_model=model, device="cpu")
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{folder}: the dfloat11 package left {len(left)} weights unset (e.g. {left[0]}); "
                              f"its version may not match this folder's; {ALTERNATIVE}")
    model = model.to(device)
    model.dfloat11 = True
    model.compute_dtype = dtype
    return model.requires_grad_(False).eval()
