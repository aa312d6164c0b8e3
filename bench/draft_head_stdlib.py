"""Draft-head evidence on a target that has seen real text: the docstrings of Python's standard library.

A random target's greedy output repeats itself, so prompt lookup looks excellent on it and the comparison
says nothing. This script
  1. collects (first line, rest) pairs from the docstrings of a fixed list of stdlib modules;
  2. writes a small random checkpoint in the official format with the repo's tokenizer
     (``hyperbagel_core.testing``) and trains its language model (understanding expert) for
     ``--lm-seconds`` on ``<|im_start|>first line<|im_end|><|im_start|>rest<|im_end|>`` sequences, then
     stores the trained weights as the checkpoint's ema.safetensors;
  3. writes a JSONL of the first lines as questions and runs the draft-head recipe
     (``python -m hyperbagel_core.training.draft_head``) on it: answers regenerated and cached, 20 % held out,
     the mean acceptance length on the held-out questions for the trained head, the untrained head and
     prompt lookup.

    python bench/draft_head_stdlib.py --work /tmp/stdlib_target --lm-seconds 120 --steps 600
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODULES = ["argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "datetime",
           "decimal", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq",
           "hmac", "html", "inspect", "io", "ipaddress", "itertools", "json", "logging", "math", "mimetypes",
           "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "secrets", "shlex",
           "shutil", "socket", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
           "threading", "time", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse", "uuid",
           "warnings", "weakref", "zipfile", "zlib"]


def docstring_pairs(max_chars: int = 400) -> list[tuple[str, str]]:
    """(first line, rest) of every public function / class / method docstring with some body."""
    seen, out = set(), []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod]
        for _, obj in inspect.getmembers(mod):
            if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
                objs.append(obj)
                if inspect.isclass(obj):
                    objs += [m for _, m in inspect.getmembers(obj, inspect.isfunction)]
        for obj in objs:
            doc = inspect.getdoc(obj)
            if not doc or doc in seen:
                continue
            seen.add(doc)
            first, _, rest = doc.strip().partition("\n")
            rest = " ".join(rest.split())[:max_chars]
            if len(first) >= 12 and len(rest) >= 60:
                out.append((first.strip(), rest))
    return out


SMALL = dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384)


def text_sequences(tok, pairs, max_len: int = 128) -> list[list[int]]:
    """``<|im_start|>first line<|im_end|><|im_start|>rest<|im_end|>`` token ids, cut at ``max_len``."""
    return [(tok.text_block(q) + tok.text_block(a))[:max_len] for q, a in pairs]


def sequence_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the understanding expert on one sequence read from position 0."""
    x = model.embed_ids(ids[:-1])
    pos = torch.arange(ids.numel() - 1)[None]
    lm = model.language_model
    out = lm(x[None], pos, [None], gen=False, causal=True, update=False)
    return F.cross_entropy(lm.lm_head(out.hidden[0]).float(), ids[1:])


def train_target(folder: Path, pairs, seconds: float, seed: int, max_len: int = 128, sizes: dict | None = None,
                 lr: float = 3e-3) -> dict:
    """Write a random checkpoint of ``sizes`` (default ``SMALL``) at ``folder`` and train its language model
    (understanding expert) on ``pairs`` for ``seconds``; the trained weights replace its ema.safetensors."""
    from hyperbagel_core.pipeline import BagelPipeline
    from hyperbagel_core.testing import make_tiny_checkpoint
    make_tiny_checkpoint(folder, seed=seed, **(sizes or SMALL))
    pipe = BagelPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    model = pipe.model
    seqs = text_sequences(pipe.tokenizer, pairs, max_len)
    und = [p for n, p in model.named_parameters()
           if n.startswith("language_model.") and "_moe_gen" not in n]
    model.requires_grad_(False)
    for p in und:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(und, lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    t0, step, losses = time.time(), 0, []
    while time.time() - t0 < seconds:
        loss = sequence_loss(model, torch.tensor(seqs[rng.randrange(len(seqs))]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(und, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
    model.requires_grad_(False)
    from safetensors.torch import save_file
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
              str(folder / "ema.safetensors"), metadata={"format": "pt"})
    k = max(1, len(losses) // 10)
    return {"lm_steps": step, "lm_seconds": seconds, "lm_loss_first": sum(losses[:k]) / k,
            "lm_loss_last": sum(losses[-k:]) / k}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--lm-seconds", type=float, default=120)
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    pairs = docstring_pairs()
    random.Random(a.seed).shuffle(pairs)
    target = work / "target"
    lm = train_target(target, pairs, a.lm_seconds, a.seed)
    data = work / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q}) + "\n" for q, _ in pairs[:a.questions]), encoding="utf-8")
    from hyperbagel_core.training import draft_head
    rep = draft_head.main(["--model", str(target), "--data", str(data), "--out", str(work / "head.safetensors"),
                           "--steps", str(a.steps), "--max-new-tokens", str(a.max_new_tokens), "--k", str(a.k),
                           "--holdout", "0.2", "--dtype", "fp32", "--lr", "1e-3", "--eval-every",
                           str(max(1, a.steps // 4)), "--seed", str(a.seed), "--no-resume"])
    result = {"pairs": len(pairs), **lm, **{k: v for k, v in rep.items() if k != "history"},
              "accept_len_curve": rep["history"]["metric"]}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
