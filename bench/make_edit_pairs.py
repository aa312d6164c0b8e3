"""Synthetic edit pairs for the CPU training evidence: source scenes drawn with PIL (a background and one to
three coloured shapes) and an instruction each, written as the JSONL the distillation stages read
(``--edit-pairs`` / ``--eval-edit-pairs``). Deterministic per seed; the held-out scenes and instructions are
drawn after the training ones, so no held-out pair repeats a training pair.

    python3 bench/make_edit_pairs.py OUT_DIR --train 24 --held 4
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
           "purple": (130, 50, 160), "orange": (240, 130, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
EDITS = ("make the {shape} {colour}", "remove the {shape}", "add a {colour} {new}", "make the background {colour}",
         "move the {shape} to the left", "make the {shape} bigger")


def scene(rng: random.Random, size: int) -> tuple[Image.Image, list[str]]:
    bg = rng.choice(list(COLOURS))
    img = Image.new("RGB", (size, size), COLOURS[bg])
    draw, shapes = ImageDraw.Draw(img), []
    for _ in range(rng.randint(1, 3)):
        shape, colour = rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != bg])
        r = rng.randint(size // 10, size // 4)
        x, y = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
        shapes.append(shape)
    return img, shapes


def pairs(rng: random.Random, n: int, size: int, folder: Path, tag: str, seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        img, shapes = scene(rng, size)
        text = rng.choice(EDITS).format(shape=rng.choice(shapes), colour=rng.choice(list(COLOURS)),
                                        new=rng.choice(SHAPES))
        key = (img.tobytes(), text)
        if key in seen:
            continue
        seen.add(key)
        name = f"{tag}_{len(out):03d}.png"
        img.save(folder / name)
        out.append({"image": name, "instruction": text})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=24)
    ap.add_argument("--held", type=int, default=4)
    ap.add_argument("--size", type=int, default=128, help="source side (the pipeline resizes it to >= 512)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rng, seen = random.Random(a.seed), set()
    for tag, n in (("train", a.train), ("held", a.held)):
        lines = pairs(rng, n, a.size, a.out, tag, seen)
        (a.out / f"{tag}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    print(f"wrote {a.train} training and {a.held} held-out edit pairs to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
