"""The flags and setup every stage CLI shares: common flags, the base pipeline, the diffusion stages'
conditions and held-out items, the JSON report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..distill.embedders import IMG_SCALE_RANGE
from .data import read_edit_pairs, read_prompts
from .distributed import SHARD_MODES, Dist
from .student import TRAIN_KEY_SETS
from .teacher import Teacher, heldout_items


def add_common_args(ap) -> None:
    """Flags every stage CLI shares."""
    ap.add_argument("--model", required=True, help="official BAGEL folder (teacher and base)")
    ap.add_argument("--out", required=True, help="output file; its training state lives in <out>.state/")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=1, help="global batch (items per step over all ranks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="base model dtype (default bf16 on CUDA, fp32 on CPU); the "
                    "trained tensors are fp32 masters either way")
    ap.add_argument("--save-dtype", default=None, help="dtype of the written file (default: the base dtype)")
    ap.add_argument("--train-keys", default="all", choices=TRAIN_KEY_SETS,
                    help="generation-expert tensors to train (docs/TRAINING.md: what fits one 80 GB GPU)")
    ap.add_argument("--distributed", action="store_true", help="DDP over the ranks torchrun started")
    ap.add_argument("--shard", default="none", choices=SHARD_MODES,
                    help="with --distributed: 'optimizer' shards AdamW's state (ZeRO-1); 'full' shards the fp32 "
                         "masters, gradients and AdamW state (FSDP2; docs/TRAINING.md: needed for all keys)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--no-resume", action="store_true", help="ignore <out>.state/ and start over")
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--report", default=None, help="write the loss / metric history as JSON here")


def load_pipe(a):
    """The base pipeline for a stage CLI (dtype default: bf16 on CUDA, fp32 on CPU)."""
    from ..loading import resolve_dtype
    from ..pipeline import BagelPipeline
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = resolve_dtype(a.dtype) if a.dtype else (torch.bfloat16 if str(a.device).startswith("cuda")
                                                    else torch.float32)
    return BagelPipeline.from_pretrained(a.model, device=a.device, dtype=dtype)


def write_report(path: str | None, data: dict, dist_: Dist) -> None:
    if path and dist_.main:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1))


def add_distill_args(ap) -> None:
    ap.add_argument("--prompt", action="append", default=[], help="training prompt (repeatable)")
    ap.add_argument("--prompts-file", help="training prompts, one per line")
    ap.add_argument("--eval-prompt", action="append", default=[], help="held-out prompt (repeatable)")
    ap.add_argument("--eval-prompts-file", help="held-out prompts, one per line")
    ap.add_argument("--eval-noises", type=int, default=2, help="held-out noises per held-out prompt")
    ap.add_argument("--eval-scale", type=float, default=4.0, help="text guidance scale of the evaluation")
    ap.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    ap.add_argument("--scale-range", type=float, nargs=2, default=(1.0, 5.0), help="training text scales")
    ap.add_argument("--cfg-interval", type=float, nargs=2, default=(0.4, 1.0),
                    help="the teacher's CFG interval (text-to-image)")
    ap.add_argument("--edit-pairs", help='training edits: a JSONL of {"image": path, "instruction": text} lines')
    ap.add_argument("--eval-edit-pairs", help="held-out edits (same format)")
    ap.add_argument("--img-scale-range", type=float, nargs=2, default=IMG_SCALE_RANGE,
                    help="training image scales (edits)")
    ap.add_argument("--eval-img-scale", type=float, default=1.5, help="image guidance scale of the evaluation")
    ap.add_argument("--edit-cfg-interval", type=float, nargs=2, default=(0.0, 1.0),
                    help="the teacher's CFG interval for edits (BagelPipeline.edit's default)")
    ap.add_argument("--init", default=None, help="distilled-expert file of the previous stage (default: base)")


def distill_setup(a):
    """Pipeline, teacher, training conditions (prompts, then edit pairs) and the held-out items (text-to-image,
    then edits)."""
    prompts = read_prompts(a.prompt, a.prompts_file)
    eval_prompts = read_prompts(a.eval_prompt, a.eval_prompts_file)
    edits = read_edit_pairs(a.edit_pairs) if a.edit_pairs else []
    eval_edits = read_edit_pairs(a.eval_edit_pairs) if a.eval_edit_pairs else []
    if not (prompts or edits) or not (eval_prompts or eval_edits):
        raise SystemExit("give training prompts (--prompt/--prompts-file) or edit pairs (--edit-pairs) and "
                         "held-out ones (--eval-prompt/--eval-prompts-file, --eval-edit-pairs)")
    if prompts and not eval_prompts:
        raise SystemExit("training prompts need held-out prompts (--eval-prompt/--eval-prompts-file) to measure "
                         "text-to-image")
    if edits and not eval_edits:
        raise SystemExit("--edit-pairs needs held-out edits (--eval-edit-pairs) to measure editing")
    pipe = load_pipe(a)
    teacher = Teacher(pipe, tuple(a.size), tuple(a.cfg_interval), edit_cfg_interval=tuple(a.edit_cfg_interval))
    held = heldout_items(teacher, eval_prompts, a.eval_noises, a.eval_scale, a.seed, eval_edits, a.eval_img_scale)
    return pipe, teacher, prompts + edits, held
