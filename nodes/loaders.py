"""BAGEL Model Loader: a checkpoint folder from models/bagel -> BAGEL_MODEL (ModelPatcher-backed)."""
from __future__ import annotations

from comfy_api.latest import io

from . import paths, runtime
from .adapters import DTYPE_CHOICES

BagelModelType = io.Custom("BAGEL_MODEL")


class BagelModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperBagelModelLoader",
            display_name="BAGEL Model Loader (Hyper-Bagel)",
            category="BAGEL/loaders",
            description="Loads a BAGEL-7B-MoT checkpoint folder from models/bagel. ComfyUI's model manager moves "
                        "it between GPU and CPU like any other model. Nothing is ever downloaded.",
            inputs=[
                io.Combo.Input("checkpoint", options=paths.checkpoint_choices(),
                               tooltip="A folder in models/bagel holding llm_config.json, vit_config.json, "
                                       "ema.safetensors, ae.safetensors and the tokenizer files."),
                io.Combo.Input("dtype", options=DTYPE_CHOICES, default="auto",
                               tooltip="Weight dtype. auto = bf16 where supported, else fp16, else fp32 (CPU)."),
                io.Combo.Input("attention", options=runtime.attention_backends(), default="sdpa",
                               tooltip="Attention kernel. sdpa works everywhere; flash_attn is listed only when "
                                       "the optional flash-attn package is installed."),
                io.Combo.Input("draft_head", options=paths.draft_head_choices(), default="none",
                               tooltip="Optional speculative-decoding draft head (models/bagel/draft_heads) for "
                                       "faster answers. Output is identical with or without it."),
                io.Combo.Input("distilled_expert", options=paths.distilled_choices(), default="none",
                               tooltip="Optional distilled few-step generation expert (models/bagel/distilled), "
                                       "needed by the hyper-6nfe / hyper-1nfe schedules for full quality."),
                io.Combo.Input("memory", options=runtime.MEMORY_MODES, default="auto",
                               tooltip="auto: ComfyUI loads what fits and streams the rest. gpu_full: keep every "
                                       "weight on the GPU. offload_after_run: move the weights back to the CPU "
                                       "after each run to leave VRAM for other models."),
                io.Combo.Input("weight_dtype", options=runtime.weight_dtype_choices(), default="default",
                               tooltip="How the linear layers are stored. default: in dtype. fp8_e4m3fn / int8: "
                                       "about 16 GB, per-channel scales. fp8_e4m3fn_fast: fp8 matmuls on RTX 40xx+ "
                                       "GPUs. nf4: 4-bit, about 8.7 GB. auto: the fastest that fits the free "
                                       "VRAM (see the log). A pre-quantized folder loads in its own mode."),
            ],
            outputs=[BagelModelType.Output(display_name="model", tooltip="The loaded BAGEL model.")],
        )

    @classmethod
    def execute(cls, checkpoint, dtype, attention, draft_head, distilled_expert, memory,
                weight_dtype="default") -> io.NodeOutput:
        folder = paths.resolve_checkpoint(checkpoint)
        model = runtime.load_bagel(folder, dtype, attention, memory,
                                   paths.resolve_file("bagel_draft_heads", draft_head),
                                   paths.resolve_file("bagel_distilled", distilled_expert), weight_dtype)
        return io.NodeOutput(model)
