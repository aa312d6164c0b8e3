"""Training conditions read from files: prompts (one per line) and edit pairs (JSONL), checked up front."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..image import pil_to_rgb


def read_prompts(args_list: list[str], file: str | None) -> list[str]:
    prompts = list(args_list or [])
    if file:
        with open(file, encoding="utf-8") as f:
            prompts += [ln.strip() for ln in f if ln.strip()]
    return prompts


@dataclass(frozen=True)
class EditPair:
    """An editing condition: the source image (a file) and the instruction."""
    image: Path
    instruction: str


def read_edit_pairs(path) -> list[EditPair]:
    """A JSONL of ``{"image": path, "instruction": text}`` lines (relative paths: from the file's folder).
    Every line is checked up front, so a bad line stops the run before any teacher work."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"edit pairs file {path} does not exist; give a JSONL of "
                         '{"image": "path/to/source.png", "instruction": "..."} lines')
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not JSON ({e.msg}); each line must be "
                             '{"image": "...", "instruction": "..."}') from None
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) \
                or not str(rec.get("instruction") or "").strip():
            raise SystemExit(f"{path}:{n}: needs a string \"image\" (a path) and a non-empty \"instruction\"")
        img = Path(rec["image"]).expanduser()
        img = img if img.is_absolute() else path.parent / img
        try:
            with Image.open(img) as im:
                im.verify()
        except (OSError, SyntaxError) as e:
            raise SystemExit(f"{path}:{n}: cannot read image {img} ({e}); fix the path (relative paths start "
                             f"at {path.parent})") from None
        pairs.append(EditPair(img, rec["instruction"].strip()))
    if not pairs:
        raise SystemExit(f"{path} has no edit pairs")
    return pairs


def open_rgb(path):
    """The image as the pipeline reads it (``image.pil_to_rgb``: transparency onto white, 16-bit scaled)."""
    with Image.open(path) as im:
        return pil_to_rgb(im)
