"""BAGEL Few-Step Sampler: prompt -> IMAGE + LATENT with Hyper-Bagel / training-free / teacher schedules."""
from __future__ import annotations

import logging
import time
import warnings

from comfy_api.latest import io

from . import adapters as A
from . import runtime
from .loaders import BagelModelType

log = logging.getLogger("hyperbagel")
STAT_KEYS = ("schedule", "nfe", "passes", "cfg", "cache", "computed", "predicted", "seconds")


SCHEDULE_TOOLTIP = (
    "auto: the applied distilled expert's own grid (e.g. 6 steps), else training-free. training-free: a "
    "higher-order solver in 'steps' steps on stock BAGEL. teacher-50: BAGEL's reference sampler (49 steps). "
    "hyper-6nfe / hyper-6nfe-shift3 / hyper-1nfe: Hyper-Bagel's fixed grids, meant for a distilled expert. "
    "custom: your own timesteps. With a distilled expert applied every schedule takes one pass per step.")


def schedule_inputs(default_schedule: str = "auto") -> list:
    """The schedule widgets shared by the sampler and the editor (same order in both)."""
    return [
        io.Combo.Input("schedule", options=A.SCHEDULE_CHOICES, default=default_schedule, tooltip=SCHEDULE_TOOLTIP),
        io.Int.Input("steps", default=8, min=1, max=200,
                     tooltip="Steps of the training-free schedule (and of 'auto' without a distilled expert)."),
        io.Combo.Input("solver", options=A.SOLVER_CHOICES, default="unipc",
                       tooltip="Flow-matching solver of the training-free schedule (unipc: closest to the "
                               "50-step teacher in few steps)."),
        io.String.Input("custom_timesteps", default="1.0, 0.75, 0.5, 0.25",
                        tooltip="For schedule=custom: decreasing times in [0, 1], 1 = noise; a final 0 is added."),
        io.Float.Input("shift", default=3.0, min=0.1, max=20.0, step=0.1,
                       tooltip="Timestep shift t' = s t / (1 + (s - 1) t) for teacher-50, training-free and custom."),
    ]


def guidance_inputs(interval: tuple, renorm: str) -> list:
    """CFG interval and renorm widgets (teacher-style CFG only; a distilled expert takes the scales as inputs)."""
    return [
        io.Float.Input("cfg_interval_start", default=interval[0], min=0.0, max=1.0, step=0.05,
                       tooltip="CFG applies for t in [start, end] (t = 1 is noise). Stock model only."),
        io.Float.Input("cfg_interval_end", default=interval[1], min=0.0, max=1.0, step=0.05,
                       tooltip="End of the CFG interval (1 = from the first step). Stock model only."),
        io.Combo.Input("cfg_renorm_type", options=A.RENORM_CHOICES, default=renorm,
                       tooltip="How the guided velocity's norm is capped: global (text-to-image default), channel, "
                               "text_channel (editing default). Stock model only."),
        io.Float.Input("cfg_renorm_min", default=0.0, min=0.0, max=1.0, step=0.05,
                       tooltip="Lower bound of the renorm factor (0 = BAGEL's default). Stock model only."),
    ]


def cache_inputs() -> list:
    """The feature-cache widgets shared by the sampler and the editor (last, so older workflows keep their order)."""
    return [
        io.Combo.Input("cache", options=A.CACHE_CHOICES, default="off",
                       tooltip="taylorseer: BAGEL's official training-free TaylorSeer cache; after 5 warm-up steps "
                               "it computes one step in 3 and predicts the others per CFG branch (faster, slightly "
                               "different image). adaptive: the same predictions, computing a step when the input "
                               "has changed enough (beyond the official). custom: TaylorSeer with the three "
                               "settings below. off: exact."),
        io.Int.Input("cache_warmup", default=5, min=1, max=200,
                     tooltip="cache=custom: first steps always computed (official 5)."),
        io.Int.Input("cache_interval", default=3, min=1, max=200,
                     tooltip="cache=custom: after warm-up one computed step every N (official 3; 1 = all computed)."),
        io.Int.Input("cache_order", default=6, min=0, max=200,
                     tooltip="cache=custom: order of the Taylor prediction (official 6; 0 reuses the last step)."),
    ]


THINK_TOOLTIP = ("Let BAGEL write a plan before drawing (slower). The plan comes out of the 'thinking' output and "
                 "is shown in the node's text box.")


def run_images(bagel, method: str, plan: A.SchedulePlan, items: list, seeds: list[int], **kwargs):
    """Call ``pipe.generate``/``pipe.edit`` once per item with progress + interrupt checks.

    Returns ``(results, stats)``; the model is released (per memory mode) even on error or interrupt.
    """
    kwargs = dict(kwargs, **distilled_flag(plan, bagel))
    progress = runtime.make_progress(len(items), plan.steps, preview=runtime.latent_previewer(bagel))
    pipe = bagel.prepare(method, **run_shape(method, items, kwargs))
    results, stats, notes = [], [], set()
    try:
        fn = getattr(pipe, method)
        for i, item in enumerate(items):
            progress.start_item(i)
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = runtime.call_core(fn, *item, seed=seeds[i], callback=progress.callback, **plan.kwargs,
                                        **kwargs)
            notes.update(str(w.message) for w in caught)
            s = dict(getattr(res, "stats", None) or {})
            s.setdefault("seconds", time.perf_counter() - t0)
            s.update(pass_counts(plan, s, edit=method == "edit"))
            s["schedule"] = plan.label
            stats.append(s)
            results.append(res)
    finally:
        bagel.release()
    merged = A.merge_stats(stats)
    if plan.wants_distilled and not bagel.distilled_expert:
        notes.add(f"no distilled expert applied: '{plan.label}' runs stock BAGEL with CFG on a grid made for a "
                  "distilled expert (expect a rough image); apply one with 'BAGEL Apply Distilled Expert' or "
                  "use schedule auto / training-free")
    if notes:
        merged["warning"] = "; ".join(sorted(notes))
        log.warning("hyperbagel: %s", merged["warning"])
    return results, merged


def run_shape(method: str, items: list, kwargs: dict) -> dict:
    """What ``prepare`` sizes the working memory by: the batch's largest image and the run's flags."""
    if method == "edit":
        width, height = max((item[0].size for item in items), key=lambda s: s[0] * s[1])
    else:
        width, height = kwargs["width"], kwargs["height"]
    shape = dict(height=height, width=width, think=bool(kwargs.get("think")))
    for key in ("distilled", "cache"):
        if key in kwargs:
            shape[key] = kwargs[key]
    return shape


def distilled_flag(plan: A.SchedulePlan, bagel) -> dict:
    """An applied distilled expert is used on every schedule (one pass per step, scales as model inputs); without
    one the stock model runs with CFG. Bypassing the apply node is how to get the stock teacher back."""
    return {"distilled": bagel.distilled_expert is not None}


def pass_counts(plan: A.SchedulePlan, stats: dict, edit: bool) -> dict:
    """NFE (guided velocity evaluations) and network passes for the speed badge, unless the core said."""
    steps = stats.get("steps", plan.steps)
    solver = stats.get("solver", plan.kwargs.get("solver", "euler"))
    nfe = 2 * steps - 1 if solver == "heun" and steps > 1 else steps
    out = {"nfe": stats.get("nfe", stats.get("evaluations", nfe))}
    if stats.get("distilled"):
        out["cfg"] = "folded (distilled)"
        out["passes"] = stats.get("passes", nfe)
    else:
        out["cfg"] = f"{3 if edit else 2} branches batched"
        out["passes"] = stats.get("passes", nfe)
    return out


def image_ui(stats: dict, kind: str, thinking: str = "") -> dict:
    line = A.format_stats(stats, STAT_KEYS)
    text = line + (f"\n{stats['warning']}" if stats.get("warning") else "") + (f"\n\n{thinking}" if thinking else "")
    return {"text": [text], "bagel_stats": [dict(A.jsonable_stats(stats), kind=kind, summary=line)]}


class BagelFewStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperBagelFewStepSampler",
            display_name="BAGEL Few-Step Sampler (Hyper-Bagel)",
            category="BAGEL/generation",
            description="Text to image with BAGEL: a few training-free solver steps on stock BAGEL (default), "
                        "1-6 network passes with a distilled expert applied, or the 50-step teacher. Outputs the "
                        "image and its latent (raw FLUX-AE latent: decode it with core VAE Decode and the "
                        "'BAGEL VAE Loader'). Settings, warnings and the thinking text are shown on the node.",
            inputs=[
                BagelModelType.Input("model", tooltip="From 'BAGEL Model Loader (Hyper-Bagel)' or an apply node."),
                io.String.Input("prompt", multiline=True, default="A photo of a red fox in fresh snow.",
                                tooltip="What to draw. Convert to an input to feed it from another node."),
                io.Int.Input("width", default=1024, min=16, max=A.MAX_SIDE, step=16,
                             tooltip="Multiple of 16, at most 1024 (BAGEL-7B-MoT's latent position table)."),
                io.Int.Input("height", default=1024, min=16, max=A.MAX_SIDE, step=16,
                             tooltip="Multiple of 16, at most 1024 (BAGEL-7B-MoT's latent position table)."),
                *schedule_inputs("auto"),
                io.Float.Input("text_guidance", default=4.0, min=0.0, max=10.0, step=0.1,
                               tooltip="Text guidance scale. Stock model: classifier-free guidance. Distilled "
                                       "expert: a conditioning input (trained on 1-5)."),
                *guidance_inputs((0.4, 1.0), "global"),
                io.Int.Input("seed", default=0, min=0, max=A.MAX_SEED, control_after_generate=True,
                             tooltip="Noise seed; image i of the batch uses seed + i."),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Images to generate (seed, seed+1, ...)."),
                io.Boolean.Input("think", default=False, tooltip=THINK_TOOLTIP),
                *cache_inputs(),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Latent.Output(display_name="latent"),
                     io.String.Output(display_name="thinking", tooltip="The plan BAGEL wrote when think is on.")],
        )

    @classmethod
    def execute(cls, model, prompt, width, height, schedule, steps, solver, custom_timesteps, shift,
                text_guidance, cfg_interval_start, cfg_interval_end, cfg_renorm_type, cfg_renorm_min, seed,
                batch_size, think, cache="off", cache_warmup=5, cache_interval=3, cache_order=6) -> io.NodeOutput:
        bagel = runtime.check_model(model)
        A.check_text(prompt, "prompt")
        A.check_size(width, height, max_side=max_side(bagel))
        plan = A.plan_schedule(schedule, steps, shift, solver, custom_timesteps, bagel.expert_grid())
        interval, renorm, renorm_min = A.check_guidance(cfg_interval_start, cfg_interval_end, cfg_renorm_type,
                                                        cfg_renorm_min)
        seeds = A.batch_seeds(seed, batch_size)
        results, stats = run_images(bagel, "generate", plan, [(prompt,)] * batch_size, seeds,
                                    height=height, width=width, cfg_text_scale=text_guidance, cfg_interval=interval,
                                    cfg_renorm_type=renorm, cfg_renorm_min=renorm_min, think=think,
                                    **A.plan_cache(cache, cache_warmup, cache_interval, cache_order))
        images = A.stack_images([A.result_to_image(r) for r in results])
        latent = A.concat_latents([latent_of(bagel, r) for r in results])
        thinking = "\n\n".join(r.thinking for r in results if getattr(r, "thinking", None))
        return io.NodeOutput(images, latent, thinking, ui=image_ui(stats, "sampler", thinking))


def max_side(bagel) -> int | None:
    cfg = getattr(bagel.pipe, "config", None)
    size = getattr(cfg, "max_latent_size", None)
    down = getattr(cfg, "latent_downsample", None)
    if isinstance(size, int) and isinstance(down, int):
        return size * down
    return None


def latent_of(bagel, result) -> dict:
    cfg = getattr(bagel.pipe, "config", None)
    vae = getattr(cfg, "vae", None) or {}
    return A.bagel_latent_to_comfy(result.latent, vae.get("scale_factor", A.FLUX_SCALE_FACTOR),
                                   vae.get("shift_factor", A.FLUX_SHIFT_FACTOR))
