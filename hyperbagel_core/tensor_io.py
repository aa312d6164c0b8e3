"""Tensor IO below the model: safetensors files read and checked without the model, in aligned storage.

Used by every loader (``loading`` for the checkpoint folder, ``model.vae``, ``distill``, ``conformance``), so it
imports nothing of the package but ``errors``. Headers are parsed by hand (a truncated or non-safetensors
file gets one clear message naming it) and never unpickled; every tensor read from a file goes through
``aligned`` (see there why).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .errors import CheckpointError

_ST_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3",
              "F8_E5M2"}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch.save zip / pickle


ALIGNMENT = 64  # bytes; what PyTorch's CPU allocator gives every fresh tensor


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous and ``ALIGNMENT``-aligned, else a fresh contiguous (aligned) copy.

    safetensors returns tensors at their offset in the file's data (e.g. ``data_ptr() % 64 == 24``). CPU
    kernels take a different code path for misaligned operands, so a weight read from a file and the same
    weight held in memory gave fp32 results differing in the last bits. Called tensor by tensor, so loading
    holds at most one extra tensor at a time.
    """
    if t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def read_safetensors_header(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Validate a .safetensors file's framing and return {name: (shape, dtype)}; never reads tensor data."""
    return _parse_header(Path(path))[0]


def read_safetensors_header_metadata(path: str | Path) -> tuple[dict, dict[str, str]]:
    """The header as above and the ``__metadata__`` strings ({} when none), from one read of the file."""
    header, meta = _parse_header(Path(path))
    return header, ({str(k): v for k, v in meta.items()} if isinstance(meta, dict) else {})


def _parse_header(path: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict]:
    if not path.exists():
        raise CheckpointError(f"{path}: file is missing")
    size = path.stat().st_size
    what = f"{path}: not a valid safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(_PICKLE_MAGIC):
            raise CheckpointError(f"{what}: it is a PyTorch pickle (torch.save / .bin / .pt); "
                                  "hyperbagel never unpickles (loading a pickle can run code): use the "
                                  ".safetensors file of the release, or convert it with safetensors.torch.save_file")
        if len(head) < 8:
            raise CheckpointError(f"{what} (only {size} bytes); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{what} (header length {n} does not fit in {size} bytes; is it a pickle/.bin "
                                  "file renamed, or truncated?); re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{what} (header is not JSON: {e}); re-download it") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} (header is not a JSON object)")
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, dt, (_, b) = tuple(info["shape"]), info["dtype"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{what} (entry {name!r} is malformed)") from e
        if dt not in _ST_DTYPES:
            raise CheckpointError(f"{what} (entry {name!r} has unknown dtype {dt})")
        out[name] = (shape, dt)
        end = max(end, b)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: file is truncated ({size} bytes, the header needs {8 + n + end}); "
                              "the download did not finish: re-download it")
    return out, header.get("__metadata__") or {}


def check_against(path: Path, header: dict, expected: dict[str, tuple[int, ...]]) -> None:
    """One message listing missing/unexpected keys and wrong shapes (strict key checking)."""
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    shapes = [f"{k}: file {list(header[k][0])} vs model {list(expected[k])}"
              for k in sorted(set(header) & set(expected)) if tuple(header[k][0]) != tuple(expected[k])]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("wrong shapes", shapes)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            parts.append(f"{label} ({len(items)}): " + "; ".join(items[:8]) + more)
    raise CheckpointError(f"{path}: does not match the configs in {path.parent} — " + " | ".join(parts) +
                          ". The folder mixes files of different models or a file is corrupt; re-download it.")


def check_dtypes(path: Path, header: dict) -> None:
    """Every BAGEL / VAE tensor is floating point; an integer tensor would load and then fail at first use."""
    bad = [f"{k}: {dt}" for k, (_, dt) in sorted(header.items()) if dt not in _FLOAT_DTYPES]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors are not floating point ({'; '.join(bad[:4])}"
                              f"{' ...' if len(bad) > 4 else ''}); this is not a BAGEL bf16/fp32 checkpoint file: "
                              "re-download it")
