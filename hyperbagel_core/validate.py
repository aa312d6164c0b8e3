"""Argument checks of the pipeline's entry points (answer, generate, edit, interleave).

Each entry point makes one call, ``check(pipe, "<entry>", locals())``, before any work: a bad value raises
``InputError`` naming the argument, the value and what to pass instead, rather than failing deep inside
torch (``multinomial`` on a NaN temperature, ``int(inf)``, a None question). Rules are per argument name, so
a name means the same thing in every entry point; the table below is the single place they live.
"""
from __future__ import annotations

import math
import numbers
from pathlib import PurePath

import torch
from PIL import Image

from .errors import InputError

MAX_SEED = 2 ** 64 - 1          # torch.Generator.manual_seed takes unsigned 64-bit seeds
MAX_GUIDANCE = 100.0            # far above any useful CFG scale (reference 4.0; distilled experts train on 1-5)
MAX_SHIFT = 100.0
MAX_TIMESTEPS = 1000
MAX_DRAFT_TOKENS = 64


def _show(value) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _fail(name: str, need: str, value, hint: str = "") -> InputError:
    return InputError(f"{name} must be {need}, got {_show(value)}" + (f"; {hint}" if hint else ""))


def number(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hint: str = "") -> float:
    """A finite real number (not a bool) in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    need = "a finite number" + _range(lo, hi, lo_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, need, value, hint)
    v = float(value)
    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise _fail(name, need, value, hint)
    return v


def integer(name: str, value, lo: int | None = None, hi: int | None = None, *, hint: str = "") -> int:
    """A Python/numpy integer (not a bool, not a float) in [lo, hi]."""
    need = "an integer" + _range(lo, hi)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, need, value, hint)
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _fail(name, need, value, hint)
    return v


def _range(lo, hi, lo_open=False) -> str:
    lo, hi = (v if v is None or isinstance(v, int) else f"{v:g}" for v in (lo, hi))
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    return f" <= {hi}" if hi is not None else ""


def flag(name: str, value) -> bool:
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise _fail(name, "True or False", value)
    return bool(value)


def choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise InputError(f"unknown {name} {_show(value)}; choose one of " + ", ".join(map(repr, options)))
    return value


def text(name: str, value, *, allow_empty: bool = False) -> str:
    """A str that is valid Unicode (encodable as UTF-8: no lone surrogates); non-blank unless ``allow_empty``."""
    if not isinstance(value, str):
        raise _fail(name, "a str", value, "pass '' for no text" if allow_empty else f"type a {name}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{name} contains {value[e.start]!r} at character {e.start}, an unpaired surrogate that is "
                         "not valid Unicode text (it cannot be encoded as UTF-8); remove it, or decode the source "
                         "with errors='replace'") from None
    if not allow_empty and not value.strip():
        raise InputError(f"{name} is empty (or only whitespace); type a {name}")
    return value


def image(name: str, value) -> Image.Image:
    """A PIL image with at least one pixel. A path is refused, never read as text or opened silently."""
    if isinstance(value, (str, bytes, PurePath)):
        raise InputError(f"{name} must be a PIL image, got {_show(str(value))} (a {type(value).__name__}); open the "
                         "file first (PIL.Image.open(path)); text belongs in the question/prompt argument")
    if isinstance(value, torch.Tensor) or type(value).__name__ == "ndarray":
        raise InputError(f"{name} must be a PIL image, got a {type(value).__name__} of shape {tuple(value.shape)}; "
                         "convert it (PIL.Image.fromarray(uint8 [H, W, 3] array))")
    if not isinstance(value, Image.Image):
        raise _fail(name, "a PIL image", value)
    if value.width < 1 or value.height < 1:
        raise InputError(f"{name} has no pixels ({value.width}x{value.height}); pass a non-empty image")
    return value


def images(name: str, value) -> list:
    """None, one image or a list/tuple of images -> list of images."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [image(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [image(name, value)]


def tensor(name: str, value, *, allow_list: bool = False):
    """None or a tensor (or list of tensors) of finite values."""
    if value is None:
        return value
    items = value if allow_list and isinstance(value, (list, tuple)) else [value]
    for v in items:
        if not isinstance(v, torch.Tensor):
            raise _fail(name, "a torch.Tensor or None", v)
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise InputError(f"{name} contains NaN or inf values; pass finite numbers (or None to draw them "
                             "from the seed)")
    return value


def size(pipe, name: str, value) -> int:
    """An output side in pixels: a multiple of the latent stride within BAGEL's latent position table."""
    step = pipe.config.latent_downsample
    limit = step * pipe.config.max_latent_size
    need = f"a whole number of pixels, a multiple of {step} in [{step}, {limit}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or int(value) != value:
        raise _fail(name, need, value)
    v = int(value)
    if v < step or v > limit or v % step:
        lo, hi = max(step, min(limit, v // step * step)), max(step, min(limit, -(-v // step) * step))
        hint = (f"BAGEL's latent position table covers {pipe.config.max_latent_size} latents per side; generate "
                "smaller and upscale afterwards") if v > limit else f"use {lo}" + (f" or {hi}" if hi != lo else "")
        raise _fail(name, need, value, hint)
    return v


def _tokens(pipe, name, value) -> int:
    limit = pipe.config.llm.max_position_embeddings
    return integer(name, value, 1, limit, hint=f"the model's context holds {limit} positions")


def _temperature(name):
    def rule(pipe, value, args):
        if args.get("do_sample") == True:  # noqa: E712 - numpy bools too; a non-bool is refused by its own rule
            return number(name, value, 0, None, lo_open=True,
                          hint="e.g. 0.3, or do_sample=False for greedy decoding")
        return number(name, value, 0, None, hint="it is used only with do_sample=True")
    return rule


def _seed(pipe, value, args):
    if value is None and args["_entry"] == "answer":     # answer: None = seed 0 when sampling
        return value
    return integer("seed", value, 0, MAX_SEED)


def _interval(pipe, value, args):
    need = "two finite numbers (start, end) with 0 <= start <= end <= 1"
    try:
        start, end = value
        start, end = number("cfg_interval start", start, 0, 1), number("cfg_interval end", end, 0, 1)
    except (TypeError, ValueError):
        raise _fail("cfg_interval", need, value, "e.g. (0.4, 1.0)") from None
    if start > end:
        raise _fail("cfg_interval", need, value, "e.g. (0.4, 1.0)")
    return value


def _timesteps(pipe, value, args):
    if value is None:
        return value
    vals = value.tolist() if isinstance(value, torch.Tensor) else value
    if not isinstance(vals, (list, tuple)) or not vals:
        raise _fail("timesteps", "a non-empty list of times in [0, 1]", value, "e.g. [1.0, 0.75, 0.5, 0.25, 0.0]")
    for i, t in enumerate(vals):
        number(f"timesteps[{i}]", t, 0, 1, hint="times run from 1 (noise) down to 0")
    return value


def _dict_or_none(name, value):
    if value is not None and not isinstance(value, dict):
        raise _fail(name, "a dict or None", value)


def _optional(rule):
    return lambda pipe, value, args: None if value is None else rule(pipe, value, args)


def _callable(pipe, value, args):
    if value is not None and not callable(value):
        raise _fail("callback", "a callable(step, total) or None", value)


def _inputs(pipe, value, args):
    example = "e.g. ['a red fox'] or [image, 'make it green']"
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail("inputs", "a non-empty list of str and PIL images", value, example)
    for i, item in enumerate(value):
        if isinstance(item, str):
            text(f"inputs[{i}]", item, allow_empty=True)
        elif isinstance(item, Image.Image):
            image(f"inputs[{i}]", item)
        else:
            raise _fail(f"inputs[{i}]", "a str or a PIL image", item, example)


def _image_shapes(pipe, value, args):
    try:
        h, w = value
    except (TypeError, ValueError):
        raise _fail("image_shapes", "a pair (height, width)", value) from None
    size(pipe, "image_shapes height", h)
    size(pipe, "image_shapes width", w)


def _scale(name):
    return lambda pipe, value, args: number(name, value, 0, MAX_GUIDANCE,
                                            hint="the reference uses 4.0 for text and 1.0-2.0 for the image")


def _renorm_type(pipe, value, args):
    from .sampling.guidance import RENORM_TYPES
    choice("cfg_renorm_type", value, RENORM_TYPES)


def _solver(pipe, value, args):
    from .sampling.solvers import SOLVERS
    choice("solver", value, tuple(SOLVERS))


def _schedule(pipe, value, args):
    from .sampling.schedules import SCHEDULES
    choice("schedule", value, tuple(SCHEDULES))


def _cache(pipe, value, args):
    from .sampling.taylorseer import resolve_cache
    try:
        resolve_cache(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"{e}; e.g. cache='taylorseer' or cache=dict(first_enhance=5, fresh_threshold=3, "
                         "max_order=6)") from None


def _drafter(pipe, value, args):
    from .speculative.api import DRAFTER_NAMES
    choice("drafter", value, DRAFTER_NAMES)


# argument name -> rule(pipe, value, all arguments); an entry point's arguments missing here are not checked
RULES = {
    "image": lambda pipe, v, a: image("image", v) if a["_entry"] == "edit" else images("image", v),
    "question": lambda pipe, v, a: text("question", v, allow_empty=True),
    "prompt": lambda pipe, v, a: text("prompt", v),
    "inputs": _inputs,
    "max_new_tokens": lambda pipe, v, a: _tokens(pipe, "max_new_tokens", v),
    "max_think_tokens": lambda pipe, v, a: _tokens(pipe, "max_think_tokens", v),
    "max_think_token_n": lambda pipe, v, a: integer("max_think_token_n", v, 2,
                                                    pipe.config.llm.max_position_embeddings,
                                                    hint="it counts the start token, so 2 allows one token"),
    "do_sample": lambda pipe, v, a: flag("do_sample", v),
    "think": lambda pipe, v, a: flag("think", v),
    "batch_cfg": lambda pipe, v, a: flag("batch_cfg", v),
    "understanding_output": lambda pipe, v, a: flag("understanding_output", v),
    "temperature": _temperature("temperature"),
    "text_temperature": _temperature("text_temperature"),
    "seed": _seed,
    "drafter": _drafter,
    "num_draft_tokens": _optional(lambda pipe, v, a: integer("num_draft_tokens", v, 0, MAX_DRAFT_TOKENS,
                                                             hint="0 or None picks the adaptive default")),
    "callback": _callable,
    "height": lambda pipe, v, a: size(pipe, "height", v),
    "width": lambda pipe, v, a: size(pipe, "width", v),
    "image_shapes": _image_shapes,
    "num_timesteps": lambda pipe, v, a: integer("num_timesteps", v, 2, MAX_TIMESTEPS,
                                                hint="n grid points give n - 1 steps; the reference uses 50"),
    "timestep_shift": lambda pipe, v, a: number("timestep_shift", v, 0, MAX_SHIFT, lo_open=True,
                                                hint="the reference uses 3.0"),
    "cfg_text_scale": _scale("cfg_text_scale"),
    "cfg_img_scale": _scale("cfg_img_scale"),
    "cfg_interval": _interval,
    "cfg_renorm_type": _renorm_type,
    "cfg_renorm_min": lambda pipe, v, a: number("cfg_renorm_min", v, 0, 1, hint="the reference uses 0.0"),
    "schedule": _schedule,
    "solver": _solver,
    "timesteps": _timesteps,
    "distilled": lambda pipe, v, a: None if v is None else flag("distilled", v),
    "init_noise": lambda pipe, v, a: tensor("init_noise", v),
    "vae_noise": lambda pipe, v, a: tensor("vae_noise", v, allow_list=True),
    "trace": lambda pipe, v, a: _dict_or_none("trace", v),
    "cache": _cache,
    "enable_taylorseer": lambda pipe, v, a: flag("enable_taylorseer", v),
}


def check(pipe, entry: str, args: dict) -> None:
    """Validate the arguments of ``pipe.<entry>(...)`` (its ``locals()`` at entry); raises ``InputError``."""
    args = dict(args, _entry=entry)
    for name, value in args.items():
        rule = RULES.get(name)
        if rule is not None:
            rule(pipe, value, args)
    if entry == "answer" and not images("image", args["image"]) and not args["question"].strip():
        raise InputError("answer() needs a question or an image; pass question='...' and/or image=PIL image")
