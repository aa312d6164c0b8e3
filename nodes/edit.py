"""BAGEL CFG-Free Editor: IMAGE + instruction -> edited IMAGE (+ LATENT)."""
from __future__ import annotations

from comfy_api.latest import io

from . import adapters as A
from . import runtime
from .generate import THINK_TOOLTIP, cache_inputs, guidance_inputs, image_ui, latent_of, run_images, schedule_inputs
from .loaders import BagelModelType


class BagelCFGFreeEditor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperBagelCFGFreeEditor",
            display_name="BAGEL CFG-Free Editor (Hyper-Bagel)",
            category="BAGEL/editing",
            description="Edits an image from an instruction. With a distilled expert applied each step is one "
                        "network pass (guidance scales are inputs of the model, no CFG branches); on stock BAGEL the "
                        "three CFG branches of a step run as one batched pass. Each image of a batch is edited on "
                        "its own. Settings, warnings and the thinking text are shown on the node.",
            inputs=[
                BagelModelType.Input("model", tooltip="From 'BAGEL Model Loader (Hyper-Bagel)' or an apply node."),
                io.Image.Input("image", tooltip="Image(s) to edit; BAGEL works at up to 1024 px on the long side."),
                io.String.Input("instruction", multiline=True, default="Make it a watercolor painting.",
                                tooltip="What to change."),
                *schedule_inputs("auto"),
                io.Float.Input("text_guidance", default=4.0, min=0.0, max=10.0, step=0.1,
                               tooltip="How strongly to follow the instruction (distilled expert: trained on 1-5)."),
                io.Float.Input("image_guidance", default=2.0, min=0.0, max=10.0, step=0.05,
                               tooltip="How strongly to keep the input image (distilled expert: trained on 1-2.5)."),
                *guidance_inputs((0.0, 1.0), "text_channel"),
                io.Int.Input("seed", default=0, min=0, max=A.MAX_SEED, control_after_generate=True,
                             tooltip="Noise seed; image i of the batch uses seed + i."),
                io.Boolean.Input("original_size", default=True,
                                 tooltip="Resize the result back to the input's size (BAGEL edits at its own "
                                         "working resolution, 512-1024 px)."),
                io.Boolean.Input("think", default=False, tooltip=THINK_TOOLTIP.replace("drawing", "editing")),
                *cache_inputs(),
            ],
            outputs=[io.Image.Output(display_name="image"),
                     io.Latent.Output(display_name="latent", tooltip="At BAGEL's working resolution."),
                     io.String.Output(display_name="thinking", tooltip="The plan BAGEL wrote when think is on.")],
        )

    @classmethod
    def execute(cls, model, image, instruction, schedule, steps, solver, custom_timesteps, shift, text_guidance,
                image_guidance, cfg_interval_start, cfg_interval_end, cfg_renorm_type, cfg_renorm_min, seed,
                original_size, think, cache="off", cache_warmup=5, cache_interval=3, cache_order=6) -> io.NodeOutput:
        bagel = runtime.check_model(model)
        A.check_text(instruction, "instruction")
        batch = A.check_image_batch(image)
        pils = A.image_to_pils(batch)
        plan = A.plan_schedule(schedule, steps, shift, solver, custom_timesteps, bagel.expert_grid())
        interval, renorm, renorm_min = A.check_guidance(cfg_interval_start, cfg_interval_end, cfg_renorm_type,
                                                        cfg_renorm_min)
        seeds = A.batch_seeds(seed, len(pils))
        results, stats = run_images(bagel, "edit", plan, [(p, instruction) for p in pils], seeds,
                                    cfg_text_scale=text_guidance, cfg_img_scale=image_guidance, cfg_interval=interval,
                                    cfg_renorm_type=renorm, cfg_renorm_min=renorm_min, think=think,
                                    **A.plan_cache(cache, cache_warmup, cache_interval, cache_order))
        images = [A.result_to_image(r) for r in results]
        if original_size:
            images = [A.resize_image(i, batch.shape[1], batch.shape[2]) for i in images]
        thinking = "\n\n".join(r.thinking for r in results if getattr(r, "thinking", None))
        return io.NodeOutput(A.stack_images(images), A.concat_latents([latent_of(bagel, r) for r in results]),
                             thinking, ui=image_ui(stats, "editor", thinking))
