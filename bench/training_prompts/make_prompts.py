"""Write a training prompt file: the prompts of ``--base`` first, then prompts made by combining colours,
objects, sizes, counts and places under a few sentence patterns, until ``--n`` distinct prompts; any prompt
of ``--held`` is refused (the held-out evaluation must see new prompts). Deterministic for a given seed.

    python3 bench/training_prompts/make_prompts.py --n 1000 --out bench/training_prompts/train_1000.txt
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray",
           "golden"]
OBJECTS = {"circle": "circles", "square": "squares", "triangle": "triangles", "ball": "balls",
           "apple": "apples", "cat": "cats", "dog": "dogs", "bird": "birds", "house": "houses",
           "cabin": "cabins", "car": "cars", "boat": "boats", "tree": "trees", "flower": "flowers",
           "horse": "horses", "cup": "cups", "chair": "chairs", "book": "books", "fish": "fish",
           "star": "stars"}
PLACES = ["on a white background", "in the park", "near the lake", "by the river", "under the stars",
          "under the sky", "at sunset", "in the snow", "on the table", "on the mat", "in the forest",
          "on the beach", "in the city", "on a wooden table", "in the desert", "in the garden"]
SIZES = ["small", "big", "tiny", "large", "old"]
COUNTS = ["two", "three", "four", "five"]
SCENES = ["a river", "a lake", "a field", "a garden", "a street", "a mountain", "a beach", "a forest"]
ACTIONS = {"cat": ["sits", "sleeping", "jumping"], "dog": ["running", "sits", "sleeping"],
           "bird": ["flying", "sits", "singing"], "horse": ["running", "standing"],
           "fish": ["swimming"], "boat": ["sailing", "floating"], "car": ["driving", "parked"]}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def one(rng: random.Random) -> str:
    c, o, p = rng.choice(COLOURS), rng.choice(list(OBJECTS)), rng.choice(PLACES)
    pattern = rng.randrange(6)
    if pattern == 0:
        return f"{article(c)} {c} {o} {p}"
    if pattern == 1:
        s = rng.choice(SIZES)
        return f"{article(s)} {s} {c} {o} {p}"
    if pattern == 2:
        return f"{rng.choice(COUNTS)} {c} {OBJECTS[o]} {p}"
    if pattern == 3:
        c2, o2 = rng.choice(COLOURS), rng.choice([k for k in OBJECTS if k != o])
        return f"{article(c)} {c} {o} and {article(c2)} {c2} {o2}"
    if pattern == 4:
        o2, o3 = rng.sample(list(OBJECTS), 2)
        return f"{rng.choice(SCENES)} with {OBJECTS[o2]} and {article(o3)} {o3}"
    a = rng.choice(list(ACTIONS))
    return f"{article(c)} {c} {a} {rng.choice(ACTIONS[a])} {p}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default=str(HERE / "train_200.txt"), help="prompts kept first, in order")
    ap.add_argument("--held", default=str(HERE / "held.txt"), help="prompts never written")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    held = {s.strip() for s in Path(a.held).read_text().splitlines() if s.strip()}
    base = [s.strip() for s in Path(a.base).read_text().splitlines() if s.strip()] if a.base else []
    if held & set(base):
        raise SystemExit(f"--base {a.base} contains held-out prompts: {sorted(held & set(base))}")
    out, seen, rng = [], set(), random.Random(a.seed)
    for p in base:
        if p not in seen:
            out.append(p), seen.add(p)
    for _ in range(100 * a.n):
        if len(out) >= a.n:
            break
        p = one(rng)
        if p not in seen and p not in held:
            out.append(p), seen.add(p)
    if len(out) < a.n:
        raise SystemExit(f"only {len(out)} distinct prompts can be made; lower --n")
    Path(a.out).write_text("\n".join(out[:a.n]) + "\n")
    print(f"wrote {a.n} prompts ({len(base)} from --base) to {a.out}; none of the {len(held)} held-out prompts")


if __name__ == "__main__":
    main()
