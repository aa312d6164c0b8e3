"""On-disk format of a draft head: ``<name>.safetensors`` (weights + metadata) and a ``<name>.json`` twin.

The safetensors metadata (all strings) is authoritative:
    format   "hyperbagel-draft-head"      version  "2" (1: before the reduced draft vocabulary; read as a
                                          full-vocabulary head, which it is: nothing changes in its meaning)
    config   JSON of DraftHeadConfig (target shape + head options)
    target   JSON {hidden_size, vocab_size, num_hidden_layers, ..., fingerprint}
    sha256   hash of every tensor's name, dtype, shape and bytes (in key order)
The JSON twin holds {format, version, config, target} for humans; if present it must agree.
No pickle anywhere. Every refusal raises ``CheckpointError`` naming the file and what to do.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..fingerprint import fingerprint_head
from ..quant import dense_dtype
from .draft_head import TARGET_FIELDS, DraftHead, DraftHeadConfig

try:
    from ..errors import CheckpointError
except ImportError:  # pragma: no cover - the core's errors module is optional for this package
    class CheckpointError(ValueError):
        pass

log = logging.getLogger(__name__)
FORMAT, VERSION = "hyperbagel-draft-head", "2"
READABLE = ("1", "2")


def target_fingerprint(model) -> str:
    """sha256 of the LM head/embedding shapes and 16 sampled rows x 16 columns of each (rounded to bf16,
    so fp32/bf16 loads of the same bf16 checkpoint agree). A quantized model carries the fingerprint of
    the bf16 weights it was quantized from (``model.base_fingerprints``, set by ``loading``)."""
    stored = getattr(model, "base_fingerprints", None)
    if stored:
        return stored["draft_head"]
    lm = model.language_model
    return fingerprint_head(lm.lm_head.weight, lm.model.embed_tokens.weight)


def target_record(model) -> dict:
    c = model.config.llm
    rec = {f: getattr(c, f) for f in TARGET_FIELDS}
    rec["fingerprint"] = target_fingerprint(model)
    return rec


def _tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _paths(path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def save_draft_head(head: DraftHead, path, model) -> Path:
    """Write ``head`` (made for ``model``) to ``path`` (.safetensors) plus its ``.json`` twin."""
    st, js = _paths(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, "config": json.dumps(head.config.to_dict()),
            "target": json.dumps(target_record(model)), "sha256": _tensor_hash(tensors)}
    st.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(st), metadata=meta)
    twin = {k: (json.loads(meta[k]) if k in ("config", "target") else meta[k]) for k in meta}
    js.write_text(json.dumps(twin, indent=2) + "\n")
    return st


def _read(st: Path):
    if not st.is_file():
        raise CheckpointError(f"draft head file {st} not found; pass the .safetensors written by "
                              "save_draft_head or `python -m hyperbagel_core.training.draft_head`")
    try:
        with safe_open(str(st), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise CheckpointError(f"draft head file {st} is corrupt or truncated ({e}); re-download or "
                              "re-export it") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{st} is not a hyperbagel draft head (metadata format="
                              f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("version") not in READABLE:
        raise CheckpointError(f"{st} has draft-head format version {meta.get('version')!r}; this "
                              f"hyperbagel reads versions {', '.join(READABLE)}: update hyperbagel, or retrain the "
                              "head with `python -m hyperbagel_core.training.draft_head`")
    if meta["version"] == "1":
        log.info("%s: draft-head format 1, read as a full-vocabulary head (each draft token reads the target's "
                 "whole LM head); retrained with --draft-vocab, a head drafts over a reduced vocabulary", st)
    try:
        return meta, json.loads(meta["config"]), json.loads(meta["target"]), tensors
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{st}: config/target metadata missing or not JSON ({e})") from e


def check_target(record: dict, model, where: str, strict_fingerprint: bool = True) -> None:
    """Refuse a head made for another target: shapes first (clear numbers), then the fingerprint."""
    c = model.config.llm
    bad = []
    for f in TARGET_FIELDS:
        want, got = getattr(c, f), record.get(f)
        if f in ("rope_theta", "rms_norm_eps"):
            same = got is not None and abs(float(got) - float(want)) <= 1e-9 * max(1.0, abs(float(want)))
        else:
            same = got == want
        if not same:
            bad.append(f"{f}: file {got!r} vs model {want!r}")
    if bad:
        raise CheckpointError(f"draft head {where} was made for a different target model ("
                              + "; ".join(bad) + "); use a draft head trained for this BAGEL checkpoint")
    fp = target_fingerprint(model)
    if strict_fingerprint and record.get("fingerprint") != fp:
        raise CheckpointError(f"draft head {where} was made for a target with the same shapes but different "
                              f"weights (fingerprint {record.get('fingerprint')} vs {fp}); use the head "
                              "trained for this checkpoint, or pass strict_fingerprint=False to force it")


def load_draft_head(path, model, *, strict_fingerprint: bool = True, verify_checksum: bool = True,
                    device=None, dtype=None) -> DraftHead:
    """Load a draft head for ``model``; raises CheckpointError on any mismatch or corruption."""
    st, js = _paths(path)
    meta, cfg_d, record, tensors = _read(st)
    if verify_checksum and meta.get("sha256") != _tensor_hash(tensors):
        raise CheckpointError(f"draft head file {st} is corrupt: tensor checksum does not match its "
                              "metadata; re-download or re-export it")
    if js.is_file():
        try:
            twin = json.loads(js.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{js} is not valid JSON ({e}); delete it or re-export the head") from e
        if twin.get("config") != cfg_d or twin.get("target") != record:
            raise CheckpointError(f"{js} disagrees with the metadata of {st}; delete the .json or re-export")
    check_target(record, model, str(st), strict_fingerprint)
    try:
        cfg_d = dict(cfg_d, feature_layers=tuple(cfg_d["feature_layers"]))
        cfg = DraftHeadConfig(**cfg_d)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{st}: invalid draft-head config ({e})") from e
    if cfg.draft_vocab_size:
        d2t = tensors.get("d2t")
        if d2t is None or d2t.dtype != torch.int64 or d2t.shape != (cfg.draft_vocab_size,) \
                or not bool(((d2t >= 0) & (d2t < cfg.vocab_size)).all()) or d2t.unique().numel() != d2t.numel():
            raise CheckpointError(f"{st}: its draft vocabulary map d2t must be {cfg.draft_vocab_size} distinct "
                                  f"target ids in [0, {cfg.vocab_size}); the file is corrupt: re-export the head")
    head = DraftHead(cfg)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or extra or shapes:
        raise CheckpointError(f"{st}: tensors do not match its config (missing {missing[:3]}, unexpected "
                              f"{extra[:3]}, wrong shape {shapes[:3]}); re-export the head")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{st}: non-finite values in {bad[:3]}; the head is corrupt or diverged")
    head.load_state_dict(tensors)  # copies into the head's own fresh (so 64-byte aligned) parameters
    lm_head = model.language_model.lm_head
    head = head.to(device=device or lm_head.weight.device, dtype=dtype or dense_dtype(lm_head))
    return head.bind(model)
