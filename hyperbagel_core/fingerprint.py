"""Fingerprints of a base checkpoint's bf16 weights, which draft heads and distilled experts record to refuse
another base model. Computed on a loaded model (``speculative.draft_io``, ``distill.expert``) or from a file
reading only the sampled tensors (``quant``, ``loading``), so it sits below all of them.
"""
from __future__ import annotations

import hashlib

import torch


def fingerprint_tensors(keys, get, samples: int = 1024) -> str:
    """``base_fingerprint`` of the tensors named ``keys``, read one at a time by ``get(key)``."""
    layers = [k for k in keys if ".layers." in k and k.startswith("language_model.")]
    last = max((int(k.split(".layers.")[1].split(".")[0]) for k in layers), default=0)
    picks = ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
             "language_model.model.layers.0.self_attn.q_proj.weight",
             "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight",
             f"language_model.model.layers.{last}.mlp_moe_gen.down_proj.weight",
             f"language_model.model.layers.{last}.mlp.down_proj.weight",
             "time_embedder.mlp.0.weight", "vae2llm.weight", "llm2vae.weight", "connector.fc1.weight"]
    h = hashlib.sha256()
    for key in picks:
        p = get(key) if key in keys else None
        if p is None:
            continue
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
        vals = flat[idx].to(torch.bfloat16).float().cpu().numpy().tobytes()
        h.update(f"{key}:{tuple(p.shape)};".encode())
        h.update(vals)
    return h.hexdigest()[:24]


def fingerprint_head(lm_head: torch.Tensor, embed_tokens: torch.Tensor) -> str:
    h = hashlib.sha256()
    for w in (lm_head, embed_tokens):
        h.update(str(tuple(w.shape)).encode())
        rows = torch.linspace(0, w.shape[0] - 1, 16).round().long().to(w.device)
        cols = torch.cat([torch.arange(8), torch.arange(w.shape[1] - 8, w.shape[1])]).to(w.device)
        sample = w.detach()[rows][:, cols].to(torch.bfloat16).float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def file_fingerprints(path, keys) -> dict[str, str]:
    """The draft-head and distilled-expert fingerprints of the bf16 weights in ``path``, computed exactly as
    on a loaded model, reading only the few tensors they sample (one at a time)."""
    from safetensors import safe_open

    keys = set(keys)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        distilled = fingerprint_tensors(keys, f.get_tensor)
        head = fingerprint_head(f.get_tensor("language_model.lm_head.weight"),
                                f.get_tensor("language_model.model.embed_tokens.weight"))
    return {"distilled_expert": distilled, "draft_head": head}
