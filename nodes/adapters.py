"""Conversions and validation between ComfyUI values and the hyperbagel core API.

Pure functions only: this module never imports ComfyUI (nor ``hyperbagel_core``), so it is testable on its
own. ComfyUI conventions used here:

* ``IMAGE`` is a float tensor ``[B, H, W, C]`` in 0..1, C = 3 (an alpha channel is dropped).
* ``LATENT`` is ``{"samples": [B, 16, H/8, W/8]}`` holding *raw* FLUX-autoencoder latents, which is what
  core's ``VAEDecode`` expects; BAGEL keeps latents normalised as ``(z - shift) * scale``.
* Seeds are unsigned 64-bit; image ``i`` of a batch uses ``seed + i`` (wrapping).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
SIZE_STEP = 16
FLUX_SCALE_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159


class NodeInputError(ValueError):
    """A node input cannot be used; the message says what to change."""


# ----------------------------------------------------------------------------------------- images

def check_image_batch(image: Any, name: str = "image") -> torch.Tensor:
    """Validate a ComfyUI IMAGE and return it as float32 ``[B, H, W, 3]`` in 0..1 (alpha dropped)."""
    if not isinstance(image, torch.Tensor):
        raise NodeInputError(f"{name}: expected an IMAGE tensor, got {type(image).__name__}. "
                             "Connect an IMAGE output (e.g. Load Image) to this input.")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise NodeInputError(f"{name}: expected an IMAGE of shape [B, H, W, C] with C in (1, 3, 4), "
                             f"got {tuple(image.shape)}. Is a MASK or LATENT connected by mistake?")
    if image.shape[0] == 0 or image.shape[1] < 1 or image.shape[2] < 1:
        raise NodeInputError(f"{name}: the image batch is empty ({tuple(image.shape)}).")
    if not image.is_floating_point():
        raise NodeInputError(f"{name}: expected IMAGE values as floats in 0..1, got {image.dtype}; the node "
                             "feeding it is not producing a ComfyUI IMAGE (convert with image.float() / 255).")
    image = image.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(image).all():
        raise NodeInputError(f"{name}: the image contains NaN or inf values; check the node that produced it "
                             "(e.g. a VAE decode in fp16 that overflowed) and feed a finite image.")
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, -1, 3)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    return image.clamp(0.0, 1.0)


def image_to_pils(image: Any, name: str = "image") -> list[Image.Image]:
    """ComfyUI IMAGE ``[B, H, W, C]`` float 0..1 -> list of B RGB PIL images (rounded to uint8)."""
    batch = check_image_batch(image, name)
    arrays = (batch * 255.0).round().to(torch.uint8).numpy()
    return [Image.fromarray(a, mode="RGB") for a in arrays]


def pil_to_image(pil: Image.Image) -> torch.Tensor:
    """One PIL image -> ComfyUI IMAGE ``[1, H, W, 3]`` float32 0..1."""
    return u8_to_image(np.asarray(pil.convert("RGB")))


def u8_to_image(array: Any) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` (numpy or tensor) -> ComfyUI IMAGE ``[1, H, W, 3]`` float32 0..1."""
    t = torch.from_numpy(np.array(array, copy=True)) if not isinstance(array, torch.Tensor) else array
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {t.dtype} {tuple(t.shape)}")
    return (t.to(torch.float32) / 255.0).unsqueeze(0).contiguous()


def result_to_image(result: Any) -> torch.Tensor:
    """An ``ImageResult`` of the core (``image_u8`` or ``image``) -> IMAGE ``[1, H, W, 3]``."""
    u8 = getattr(result, "image_u8", None)
    if u8 is not None:
        return u8_to_image(u8)
    return pil_to_image(result.image)


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``[1, H, W, 3]`` images into one batch; all must share H and W."""
    sizes = {tuple(i.shape[1:3]) for i in images}
    if len(sizes) != 1:
        raise NodeInputError(f"cannot batch images of different sizes {sorted(sizes)}; "
                             "process them one at a time or resize them to one size first.")
    return torch.cat(list(images), dim=0)


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize an IMAGE batch to ``height x width`` (bicubic, clamped to 0..1)."""
    if tuple(image.shape[1:3]) == (height, width):
        return image
    x = image.permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False,
                                        antialias=True)
    return x.permute(0, 2, 3, 1).clamp(0.0, 1.0).contiguous()


# ----------------------------------------------------------------------------------------- latents

def bagel_latent_to_comfy(latent: torch.Tensor, scale_factor: float = FLUX_SCALE_FACTOR,
                          shift_factor: float = FLUX_SHIFT_FACTOR) -> dict:
    """BAGEL-normalised latent ``[B, 16, h, w]`` -> ComfyUI LATENT with raw FLUX-AE values."""
    if latent.ndim == 3:
        latent = latent.unsqueeze(0)
    if latent.ndim != 4:
        raise ValueError(f"expected a latent [B, C, h, w], got {tuple(latent.shape)}")
    raw = latent.detach().to(device="cpu", dtype=torch.float32) / scale_factor + shift_factor
    return {"samples": raw.contiguous()}


def bagel_latent_to_format(latent: torch.Tensor, scale_factor: float, shift_factor: float, latent_format):
    """A BAGEL-normalised latent in a ComfyUI latent format's model space (what its previewers take).

    BAGEL normalises as ``(z - shift) * scale`` exactly like ``latent_format.process_in``; with the same factors
    (FLUX's 0.3611 / 0.1159) the latent is returned as it is, on its device.
    """
    if (scale_factor, shift_factor) == (latent_format.scale_factor, latent_format.shift_factor):
        return latent
    return latent_format.process_in(latent / scale_factor + shift_factor)


def concat_latents(latents: Sequence[dict]) -> dict:
    return {"samples": torch.cat([lat["samples"] for lat in latents], dim=0)}


# ----------------------------------------------------------------------------------------- seeds

def batch_seeds(seed: int, count: int) -> list[int]:
    """Seeds for a batch: ``seed, seed + 1, ...`` wrapped to unsigned 64 bits."""
    seed = check_seed(seed)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise NodeInputError(f"batch size must be a whole number >= 1, got {count!r}.")
    return [(seed + i) & MAX_SEED for i in range(int(count))]


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise NodeInputError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise NodeInputError(f"seed must be in 0..{MAX_SEED}, got {seed}")
    return seed


# ----------------------------------------------------------------------------------------- validation

def check_text(text: Any, name: str) -> str:
    if not isinstance(text, str):
        raise NodeInputError(f"{name} must be text, got {type(text).__name__}; connect a STRING to it.")
    if not text.strip():
        raise NodeInputError(f"{name} is empty: type {'an' if name[0] in 'aeiou' else 'a'} {name} or connect a "
                             "STRING to it.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise NodeInputError(f"{name} contains {text[e.start]!r} at character {e.start}, an unpaired surrogate that "
                             "is not valid Unicode text; delete that character.") from None
    return text


def check_size(width: int, height: int, max_side: int | None = None, min_side: int = SIZE_STEP) -> tuple[int, int]:
    """Width and height must be multiples of 16 within [min_side, max_side]; returns ``(width, height)``."""
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise NodeInputError(f"{name} must be an integer, got {v!r}")
        if v % SIZE_STEP:
            lo, hi = v // SIZE_STEP * SIZE_STEP, -(-v // SIZE_STEP) * SIZE_STEP
            raise NodeInputError(f"{name}={v} is not a multiple of {SIZE_STEP}; use {lo} or {hi}.")
        if v < min_side:
            raise NodeInputError(f"{name}={v} is below the minimum {min_side}.")
        if max_side is not None and v > max_side:
            raise NodeInputError(f"{name}={v} exceeds {max_side}, the largest size this checkpoint's latent "
                                 f"position table covers; lower it (and upscale afterwards, e.g. with ImageScale).")
    return int(width), int(height)


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_timesteps(text: str) -> list[float]:
    """Parse a custom grid like ``"1.0, 0.75, 0.5, 0.25"`` (commas, spaces or newlines).

    The grid runs from noise (1) towards data (0), strictly decreasing, values in [0, 1]; a final 0 is
    appended when missing. Returns the full grid (network passes = ``len - 1``).
    """
    if not isinstance(text, str) or not text.strip():
        raise NodeInputError("custom_timesteps is empty: give decreasing times in [0, 1] such as "
                             "'1.0, 0.75, 0.5, 0.25' (a final 0 is added for you).")
    parts = [p for p in re.split(r"[\s,;]+", text.strip()) if p]
    values: list[float] = []
    for p in parts:
        if not _NUMBER.fullmatch(p):
            raise NodeInputError(f"custom_timesteps: {p!r} is not a number; write e.g. '1.0, 0.5, 0.25'.")
        values.append(float(p))
    if any(not math.isfinite(v) or v < 0 or v > 1 for v in values):
        raise NodeInputError(f"custom_timesteps must lie in [0, 1] (1 = pure noise), got {values}.")
    if values[-1] != 0.0:
        values.append(0.0)
    if any(b >= a for a, b in zip(values, values[1:])):
        raise NodeInputError(f"custom_timesteps must be strictly decreasing from noise to 0, got {values}.")
    if len(values) < 2:
        raise NodeInputError("custom_timesteps needs at least one step, e.g. '1.0'.")
    return values


# ----------------------------------------------------------------------------------------- schedules

SCHEDULE_CHOICES = ["auto", "training-free", "teacher-50", "hyper-6nfe", "hyper-6nfe-shift3", "hyper-1nfe", "custom"]
SOLVER_CHOICES = ["unipc", "dpmpp_2m", "heun", "euler"]
DISTILLED_SCHEDULES = ("hyper-6nfe", "hyper-6nfe-shift3", "hyper-1nfe")
RENORM_CHOICES = ["global", "channel", "text_channel"]
MAX_SIDE = 1024   # BAGEL-7B-MoT: 64 latent positions per side x 16 px


@dataclass(frozen=True)
class SchedulePlan:
    """What the node asks the core for: keyword arguments plus facts for the UI."""
    kwargs: dict
    label: str
    steps: int            # denoising steps (network evaluations per branch)
    wants_distilled: bool  # a Hyper-Bagel grid: meant for a distilled expert


def plan_schedule(schedule: str, steps: int = 8, shift: float = 3.0, solver: str = "unipc",
                  custom_timesteps: str = "", expert_grid: tuple | None = None) -> SchedulePlan:
    """Map the node's schedule widgets to ``pipe.generate/edit`` keyword arguments.

    * ``auto``: the applied distilled expert's own grid (``expert_grid`` = its file's ``(schedule, timesteps)``),
      else ``training-free``. So applying an expert is the one switch from stock to few-step.
    * ``training-free``: ``steps`` steps of a higher-order flow solver over the shifted teacher grid.
    * ``teacher-50``: BAGEL's reference sampler, 50 grid points (49 Euler steps).
    * ``hyper-6nfe`` / ``hyper-6nfe-shift3`` / ``hyper-1nfe``: the fixed Hyper-Bagel grids (uniform k/6,
      shift-3 reading, one Euler step), meant for a distilled expert.
    * ``custom``: user timesteps (``custom_timesteps``), shift applied on top when it is not 1.
    """
    if schedule not in SCHEDULE_CHOICES:
        raise NodeInputError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULE_CHOICES)}.")
    if not (isinstance(shift, (int, float)) and shift > 0 and math.isfinite(shift)):
        raise NodeInputError(f"shift must be a positive number, got {shift!r}.")
    if schedule == "auto" and expert_grid is not None:
        name, grid = expert_grid
        if name in DISTILLED_SCHEDULES:
            plan = plan_schedule(name)
            return SchedulePlan(plan.kwargs, f"auto: {plan.label}, the expert's grid", plan.steps, True)
        grid = [float(t) for t in grid]
        if len(grid) < 2:
            raise NodeInputError(f"the distilled expert names no usable grid ({name!r}, {grid}); pick a schedule "
                                 "other than 'auto'.")
        return SchedulePlan({"schedule": "custom", "timesteps": grid, "timestep_shift": 1.0},
                            f"auto: the expert's grid ({len(grid) - 1} steps)", len(grid) - 1, True)
    if schedule in DISTILLED_SCHEDULES:
        n = 1 if schedule == "hyper-1nfe" else 6
        return SchedulePlan({"schedule": schedule}, f"{schedule} ({n} step{'s' if n > 1 else ''})", n, True)
    if schedule == "teacher-50":
        return SchedulePlan({"schedule": "teacher", "num_timesteps": 50, "timestep_shift": float(shift)},
                            "teacher, 49 Euler steps", 49, False)
    if schedule == "custom":
        grid = parse_timesteps(custom_timesteps)
        return SchedulePlan({"schedule": "custom", "timesteps": grid, "timestep_shift": float(shift)},
                            f"custom ({len(grid) - 1} steps)", len(grid) - 1, False)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= 200:
        raise NodeInputError(f"steps must be an integer in 1..200, got {steps!r}.")
    if solver not in SOLVER_CHOICES:
        raise NodeInputError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVER_CHOICES)}.")
    prefix = "auto: " if schedule == "auto" else ""
    return SchedulePlan({"schedule": "teacher", "solver": solver, "num_timesteps": int(steps) + 1,
                         "timestep_shift": float(shift)},
                        f"{prefix}training-free {solver}, {int(steps)} steps", int(steps), False)


def check_guidance(interval_start: float, interval_end: float, renorm_type: str, renorm_min: float) -> tuple:
    """CFG interval and renorm widgets -> ``(cfg_interval, cfg_renorm_type, cfg_renorm_min)`` for the core."""
    if not 0.0 <= interval_start < interval_end <= 1.0:
        raise NodeInputError(f"cfg_interval_start ({interval_start}) must be below cfg_interval_end ({interval_end}), "
                             "both in [0, 1]: guidance applies while start <= t <= end (t = 1 is noise).")
    if renorm_type not in RENORM_CHOICES:
        raise NodeInputError(f"unknown cfg_renorm_type {renorm_type!r}; choose one of {', '.join(RENORM_CHOICES)}.")
    if not 0.0 <= renorm_min <= 1.0:
        raise NodeInputError(f"cfg_renorm_min must be in [0, 1], got {renorm_min}.")
    return (float(interval_start), float(interval_end)), renorm_type, float(renorm_min)


# ----------------------------------------------------------------------------------------- feature cache

CACHE_CHOICES = ["off", "taylorseer", "adaptive", "custom"]


def plan_cache(cache: str, warmup: int = 5, interval: int = 3, order: int = 6) -> dict:
    """The cache widgets -> ``pipe.generate/edit`` keyword arguments (none when off).

    ``taylorseer``: the official TaylorSeer feature cache; ``adaptive``: the same predictions, full steps decided
    per CFG branch by how much the model input changed (beyond the official); ``custom``: TaylorSeer with the
    node's warm-up steps (``first_enhance``), full-step interval (``fresh_threshold``) and order (``max_order``).
    """
    if cache not in CACHE_CHOICES:
        raise NodeInputError(f"unknown cache {cache!r}; choose one of {', '.join(CACHE_CHOICES)}.")
    if cache == "off":
        return {}
    if cache in ("taylorseer", "adaptive"):
        return {"cache": cache}
    values = {}
    for name, key, v, lo in (("cache_warmup", "first_enhance", warmup, 1), ("cache_interval", "fresh_threshold",
                             interval, 1), ("cache_order", "max_order", order, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= 200:
            raise NodeInputError(f"{name} must be an integer in {lo}..200, got {v!r}.")
        values[key] = int(v)
    return {"cache": values}


# ----------------------------------------------------------------------------------------- dtypes

DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


FP16_WARNING = ("fp16 risks overflow: Qwen2's activations can exceed fp16's range (65504) and turn into "
                "inf/NaN (black or noise images, garbage text); prefer 'auto' or 'bf16'")


def resolve_dtypes(choice: str, bf16_native: bool) -> tuple[torch.dtype, torch.dtype, str | None]:
    """``(weight dtype, compute dtype, warning)`` for the loader's dtype choice.

    ``auto`` never computes in fp16: bf16 where the device has native bf16 arithmetic (CUDA compute
    capability >= 8.0, CPUs), else bf16 weights (the checkpoint's own dtype, half the memory of fp32)
    computed in fp32, which ComfyUI's ``manual_cast`` layers do by casting each weight as it is used.
    ``bf16`` follows the same rule. ``fp16`` and ``fp32`` are taken as asked; fp16 comes with a warning.
    """
    if choice not in ("auto", *_DTYPES):
        raise NodeInputError(f"unknown dtype {choice!r}; choose one of {', '.join(DTYPE_CHOICES)}.")
    if choice in ("auto", "bf16"):
        return torch.bfloat16, torch.bfloat16 if bf16_native else torch.float32, None
    dtype = _DTYPES[choice]
    return dtype, dtype, FP16_WARNING if dtype == torch.float16 else None


# ----------------------------------------------------------------------------------------- checkpoints

CHECKPOINT_MARKERS = ("llm_config.json", "vit_config.json")
NONE_CHOICE = "none"


def checkpoint_dirs(relative_files: Iterable[str]) -> list[str]:
    """Checkpoint folders (relative, '/'-separated) among a recursive file listing of ``models/bagel``.

    A folder counts when it holds ``llm_config.json``; files directly in the root are ignored.
    """
    found = set()
    for f in relative_files:
        parts = f.replace("\\", "/").split("/")
        if len(parts) >= 2 and parts[-1] == CHECKPOINT_MARKERS[0]:
            found.add("/".join(parts[:-1]))
    return sorted(found)


SINGLE_FILE_EXTS = (".safetensors", ".sft")
ATTACHMENT_FOLDERS = ("draft_heads", "distilled")   # sub-folders of a bagel folder listed by their own nodes


def checkpoint_entries(relative_files: Iterable[str]) -> list[str]:
    """Every loadable entry of a recursive ``models/bagel`` listing: checkpoint folders (``checkpoint_dirs``) and
    single ``.safetensors`` files outside them; what sits under draft_heads/ and distilled/ is left to their
    nodes. Which files are BAGEL is checked at load time (a file of another model gets a clear error then)."""
    files = [f.replace("\\", "/") for f in relative_files]
    folders = [d for d in checkpoint_dirs(files) if d.split("/")[0] not in ATTACHMENT_FOLDERS]
    inside = tuple(d + "/" for d in folders)
    singles = [f for f in files if f.lower().endswith(SINGLE_FILE_EXTS) and not f.startswith(inside)
               and f.split("/")[0] not in ATTACHMENT_FOLDERS]
    return sorted(set(folders) | set(singles))


def files_with_ext(relative_files: Iterable[str], exts: Sequence[str] = (".safetensors",),
                   under: str | None = None) -> list[str]:
    out = []
    for f in relative_files:
        g = f.replace("\\", "/")
        if under is not None and not g.startswith(under.rstrip("/") + "/"):
            continue
        if g.lower().endswith(tuple(exts)):
            out.append(g)
    return sorted(out)


# ----------------------------------------------------------------------------------------- progress

class StepProgress:
    """Turns per-item ``callback(step, total)`` calls into one overall fraction for a batch.

    ``report(value, total)`` receives absolute progress in units of ``steps``; ``check()`` is called first on
    every step (ComfyUI's interrupt check goes there). With ``preview`` (a latent -> preview image function),
    ``callback`` asks the core for the denoised estimate (``wants_denoised``, see ``sampling.preview``) and a
    denoising step reports ``report(value, total, preview(denoised))``; without it nothing is asked for.
    """

    def __init__(self, items: int, report, check=None, preview=None) -> None:
        self.items = max(1, int(items))
        self.report = report
        self.check = check
        self.preview = preview
        self.item = 0
        self.calls = 0
        if preview is not None:
            self.callback = self._previewing_callback()

    def start_item(self, index: int) -> None:
        self.item = index

    def callback(self, step: int, total: int) -> None:
        self._step(step, total, None)

    def _previewing_callback(self):
        def callback(step: int, total: int, denoised=None) -> None:
            self._step(step, total, denoised)

        callback.wants_denoised = True
        return callback

    def _step(self, step: int, total: int, denoised) -> None:
        self.calls += 1
        if self.check is not None:
            self.check()
        total = max(1, int(total))
        step = min(max(0, int(step)), total)
        value = (self.item * total + step, self.items * total)
        if denoised is None:
            self.report(*value)
        else:
            self.report(*value, self.preview(denoised))


# ----------------------------------------------------------------------------------------- stats

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_stats(stats: dict | None, keys: Sequence[str] | None = None) -> str:
    """One line ``key: value · key: value`` for the node's UI text."""
    if not stats:
        return ""
    items = [(k, stats[k]) for k in (keys or stats) if k in stats and isinstance(stats[k], (int, float, str, bool))]
    return " · ".join(f"{k}: {_fmt(v)}" for k, v in items)


def jsonable_stats(stats: dict | None) -> dict:
    """Keep only JSON-friendly scalars (for the ``bagel_stats`` UI payload the web extension reads)."""
    out = {}
    for k, v in (stats or {}).items():
        if isinstance(v, bool) or isinstance(v, (int, str)):
            out[str(k)] = v
        elif isinstance(v, float):
            out[str(k)] = v if math.isfinite(v) else None
        elif isinstance(v, (np.integer, np.floating)):
            out[str(k)] = v.item()
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[str(k)] = v.item()
    return out


def join_answers(answers: Sequence[str]) -> str:
    """One answer per image: a single answer stays as is; several get ``[image i]`` headers."""
    if len(answers) == 1:
        return answers[0]
    return "\n\n".join(f"[image {i + 1}]\n{a}" for i, a in enumerate(answers))


def merge_stats(per_item: Sequence[dict]) -> dict:
    """Sum counts and time over a batch; recompute rates from the sums."""
    if len(per_item) == 1:
        return dict(per_item[0])
    out: dict = {"images": len(per_item)}
    for key in ("new_tokens", "tokens", "rounds", "nfe", "passes", "computed", "predicted", "drafted", "accepted",
                "seconds"):
        vals = [s[key] for s in per_item if isinstance(s.get(key), (int, float)) and not isinstance(s.get(key), bool)]
        if vals:
            out[key] = sum(vals)
    toks = out.get("new_tokens", out.get("tokens"))
    if toks is not None and out.get("seconds"):
        out["tokens_per_s"] = toks / out["seconds"]
    if out.get("rounds") and toks is not None:
        out["tau"] = toks / out["rounds"]
    for key in ("drafter", "k", "schedule", "solver", "cfg", "distilled", "cache"):
        if key in per_item[0]:
            out[key] = per_item[0][key]
    return out
