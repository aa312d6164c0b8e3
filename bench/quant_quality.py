"""Quality of each quantized weight mode against the unquantized model (issue 10), on CPU.

Two models, both in bf16 (the deployment dtype; compute bf16 in every mode):
  * ``--model medium``: a medium random checkpoint in the official format written by
    ``hyperbagel_core.testing.make_tiny_checkpoint`` (LLM 6 layers, hidden 512, GQA 8/2, intermediate 1408;
    ViT 2 layers hidden 128; VAE ch 64), loaded with ``from_pretrained(weight_dtype=mode)``;
  * ``--model real``: BAGEL-7B-MoT's real shapes with ``--layers`` decoder layers (full vocabulary, ViT
    layers per ``--vit-layers``), random weights from bench/quant_real_shapes.py, the quantized copy made by
    ``quant.quantize_model_`` of the same weights;
  * ``--model stdlib``: the medium shapes, official format and repo tokenizer, with the language model
    (understanding expert) first trained for ``--lm-seconds`` on the docstrings of Python's standard library
    (``bench/draft_head_stdlib.py``), the last ``--prompts`` docstrings held out of training; cached under
    ``--cache`` (keyed by seed and budget) so reruns reuse it. A target that has seen real text has peaked
    next-token distributions, which random weights do not. Its image side is untrained: no latent errors.

Metrics, each mode against ``default``:
  * greedy agreement: the reference decodes ``--tokens`` greedy tokens after an image + question prompt
    (``stdlib``: ``--tokens / --prompts`` tokens after each held-out docstring's first line, as in training);
    the quantized model reads that sequence teacher-forced and we count positions whose argmax equals the
    reference's next token; also the free-running agreement (both decode on their own; position-wise);
  * mean KL(reference || quantized) of the next-token distributions over those positions;
  * relative error ||z_q - z|| / ||z|| of the final latent after a 50-point teacher run (49 passes, dual CFG)
    and after 8 UniPC steps, same seed and prompt.
A ``default`` row compares the reference with itself read teacher-forced (one block instead of one token
per step): the floor set by bf16 arithmetic alone. ``block_agreement`` (beside the issue's metric, not
instead of it): argmax agreement with that bf16 block read, the same arithmetic path as the mode's read.
Random weights give flat, repetitive next-token distributions; read the agreement with that caveat.

    python bench/quant_quality.py --model medium --out quality_medium.json
    python bench/quant_quality.py --model real --layers 2 --size 128 --out quality_real.json
    python bench/quant_quality.py --model stdlib --lm-seconds 300 --out quality_stdlib.json
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hyperbagel_core import quant as Q  # noqa: E402
from hyperbagel_core.pipeline import BagelPipeline  # noqa: E402

PROMPT = "A photo of a red fox sitting in fresh snow at sunrise, detailed fur, soft light"
QUESTION = "Describe this image in detail."
MODES = ("default", "fp8_e4m3fn", "int8", "nf4")
MEDIUM = dict(hidden=512, layers=6, heads=8, kv_heads=2, intermediate=1408, vit_hidden=128, vit_layers=2,
              vit_heads=2, vit_intermediate=512, vae_ch=64)


def prompt_context(pipe, question: str | None = None):
    """The image + question prompt, or (``stdlib``) a docstring's first line as its own text block."""
    if question is not None:
        return pipe.build_contexts([question], understanding_output=True).gen
    img = Image.new("RGB", (224, 224), (120, 90, 60))
    return pipe.build_contexts([img, QUESTION], understanding_output=True).gen


@torch.no_grad()
def greedy(pipe, n: int, question: str | None = None) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens one step at a time (no stop token) and the fp32 logits of every step."""
    m, ctx = pipe.model, prompt_context(pipe, question)
    tok, ids, logits = pipe.tokenizer.bos_id, [], []
    m.reserve_text(ctx, n)
    for _ in range(n):
        lg = m.forward_text(ctx, torch.tensor([tok])).logits[-1].float()
        tok = int(lg.argmax())
        ids.append(tok)
        logits.append(lg)
    return ids, torch.stack(logits)


@torch.no_grad()
def teacher_forced(pipe, ids: list[int], question: str | None = None) -> torch.Tensor:
    m, ctx = pipe.model, prompt_context(pipe, question)
    seq = [pipe.tokenizer.bos_id] + ids[:-1]
    return m.forward_text(ctx, torch.tensor(seq)).logits.float()


def latent(pipe, size: int, **kw) -> torch.Tensor:
    return pipe.generate(PROMPT, height=size, width=size, seed=0, **kw).latent.float()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def measure(pipe, ref: dict, size: int, latents: bool = True) -> dict:
    t0 = time.perf_counter()
    lq, same = [], 0
    for q, ids in zip(ref["questions"], ref["ids"]):
        lq.append(teacher_forced(pipe, ids, q))
        free_ids, _ = greedy(pipe, len(ids), q)
        same += sum(a == b for a, b in zip(free_ids, ids))
    lq, target = torch.cat(lq), torch.tensor(sum(ref["ids"], []))
    p_ref = F.log_softmax(ref["logits"], -1)
    kl = F.kl_div(F.log_softmax(lq, -1), p_ref, log_target=True, reduction="none").sum(-1)
    out = dict(greedy_agreement=float((lq.argmax(-1) == target).float().mean()),
               block_agreement=float((lq.argmax(-1) == ref["block"].argmax(-1)).float().mean()),
               free_running_agreement=same / target.numel(), mean_kl=float(kl.mean()), max_kl=float(kl.max()))
    if latents:
        out.update(latent_rel_err_teacher50=rel(latent(pipe, size, num_timesteps=50), ref["teacher"]),
                   latent_rel_err_unipc8=rel(latent(pipe, size, num_timesteps=9, solver="unipc"), ref["unipc"]))
    out["seconds"] = time.perf_counter() - t0
    return out


def reference(pipe, size: int, tokens: int, questions=(None,), latents: bool = True) -> dict:
    """The default model's greedy tokens and logits, ``tokens`` spread evenly over ``questions``."""
    per = tokens // len(questions)
    ids, logits = zip(*(greedy(pipe, per, q) for q in questions))
    ref = dict(questions=list(questions), ids=list(ids), logits=torch.cat(logits),
               distinct_tokens=len(set(sum(ids, []))),
               block=torch.cat([teacher_forced(pipe, x, q) for q, x in zip(questions, ids)]),
               after_eos=sum(len(x) - 1 - x.index(pipe.tokenizer.eos_id) for x in ids if pipe.tokenizer.eos_id in x))
    if latents:
        ref.update(teacher=latent(pipe, size, num_timesteps=50), unipc=latent(pipe, size, num_timesteps=9,
                                                                             solver="unipc"))
    return ref


def medium_pipes(modes, seed: int):
    from hyperbagel_core.testing import make_tiny_checkpoint
    folder = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="hb-medium-")) / "medium", seed=seed, **MEDIUM)
    for mode in modes:
        yield mode, BagelPipeline.from_pretrained(folder, dtype=torch.bfloat16, vae_dtype=torch.float32,
                                                  weight_dtype=mode)


def real_pipes(modes, layers: int, vit_layers: int):
    from quant_real_shapes import AnswerTokenizer, build_quantized, random_vae, real_config
    cfg = real_config(layers, vit_layers)
    dense = build_quantized(cfg, "default")
    vae = random_vae(cfg)
    for mode in modes:
        model = dense
        if mode != "default":
            model = copy.deepcopy(dense)
            Q.quantize_model_(model, mode, torch.bfloat16)
            model.weight_dtype = mode
        yield mode, BagelPipeline(model, vae, AnswerTokenizer(), cfg)


def stdlib_target(cache: Path, seconds: float, seed: int, prompts: int, lr: float) -> tuple[Path, dict]:
    """The medium checkpoint trained on stdlib docstrings (all but the first ``prompts`` of the seeded
    shuffle), trained once per (seed, budget, prompts, lr) and reused from ``cache``; returns (folder, record)."""
    from draft_head_stdlib import docstring_pairs, sequence_loss, text_sequences, train_target
    work = cache / f"medium-seed{seed}-{seconds:g}s-held{prompts}-lr{lr:g}"
    record = work / "training.json"
    if record.is_file():
        return work / "target", json.loads(record.read_text())
    pairs = docstring_pairs()
    random.Random(seed).shuffle(pairs)
    held, train = pairs[:prompts], pairs[prompts:]
    info = train_target(work / "target", train, seconds, seed, sizes=MEDIUM, lr=lr)
    pipe = BagelPipeline.from_pretrained(work / "target", dtype=torch.float32)
    with torch.no_grad():
        info["heldout_loss"] = sum(float(sequence_loss(pipe.model, torch.tensor(x)))
                                   for x in text_sequences(pipe.tokenizer, held)) / len(held)
    info.update(pairs=len(pairs), train_pairs=len(train), python=sys.version.split()[0],
                held_out=[q for q, _ in held], lr=lr, seed=seed)
    record.write_text(json.dumps(info, indent=1) + "\n")
    return work / "target", info


def stdlib_pipes(modes, folder: Path):
    for mode in modes:
        yield mode, BagelPipeline.from_pretrained(folder, dtype=torch.bfloat16, vae_dtype=torch.float32,
                                                  weight_dtype=mode)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["medium", "real", "stdlib"], default="medium")
    ap.add_argument("--modes", nargs="+", default=list(MODES[1:]), choices=list(MODES[1:]))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--size", type=int, default=256, help="image side for the latent runs")
    ap.add_argument("--layers", type=int, default=2, help="--model real: decoder layers")
    ap.add_argument("--vit-layers", type=int, default=2, help="--model real: ViT layers")
    ap.add_argument("--lm-seconds", type=float, default=300, help="--model stdlib: training budget")
    ap.add_argument("--lm-lr", type=float, default=1e-3, help="--model stdlib: AdamW learning rate")
    ap.add_argument("--prompts", type=int, default=8,
                    help="--model stdlib: held-out docstrings, --tokens spread evenly over them")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hb-quant-stdlib",
                    help="--model stdlib: where the trained checkpoint is kept")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ("default",) + tuple(args.modes)
    questions, extra, latents = (None,), {}, args.model != "stdlib"
    if args.model == "stdlib":
        folder, extra = stdlib_target(args.cache, args.lm_seconds, args.seed, args.prompts, args.lm_lr)
        questions = extra["held_out"]
        print(json.dumps({k: v for k, v in extra.items() if k != "held_out"}), flush=True)
    torch.set_grad_enabled(False)
    pipes = (medium_pipes(modes, args.seed) if args.model == "medium"
             else real_pipes(modes, args.layers, args.vit_layers) if args.model == "real"
             else stdlib_pipes(modes, folder))
    rows, ref = [], None
    for mode, pipe in pipes:
        if ref is None:
            ref = reference(pipe, args.size, args.tokens, questions, latents)
        row = dict(mode=mode, weight_bytes=Q.storage_bytes(pipe.model), **measure(pipe, ref, args.size, latents))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del pipe
    result = dict(model=args.model, tokens=sum(map(len, ref["ids"])), size=args.size if latents else None,
                  distinct_reference_tokens=ref["distinct_tokens"], reference_tokens_after_eos=ref["after_eos"],
                  layers=args.layers if args.model == "real" else MEDIUM["layers"], threads=torch.get_num_threads(),
                  **({"target": extra} if extra else {}), rows=rows)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
