"""BAGEL loaders: a checkpoint folder from models/bagel -> HYPERBAGEL_MODEL (ModelPatcher-backed), and the
checkpoint's own FLUX autoencoder (``ae.safetensors``) as a core VAE."""
from __future__ import annotations

from comfy_api.latest import io

from . import paths, runtime
from .adapters import DTYPE_CHOICES

BagelModelType = io.Custom(runtime.MODEL_TYPE)

CHECKPOINT_TOOLTIP = ("A folder in models/bagel (or a 'bagel:' path of extra_model_paths.yaml) holding "
                      "llm_config.json, vit_config.json, ema.safetensors, ae.safetensors and the tokenizer files "
                      "(also a fine-tune in that layout, or a DFloat11 folder), or a single-file BAGEL .safetensors "
                      "(the ComfyUI-BAGEL format). A single file borrows its tokenizer from a BAGEL folder beside it "
                      "and FLUX's ae.safetensors from models/vae (docs/loading.md).")


class BagelModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperBagelModelLoader",
            display_name="BAGEL Model Loader (Hyper-Bagel)",
            category="BAGEL/loaders",
            description="Loads BAGEL-7B-MoT from models/bagel: the official folder, a fine-tune in its layout, a "
                        "DFloat11 folder, or a single-file .safetensors with core 'Load VAE' for FLUX's ae (about "
                        "29 GB; it is built in CPU RAM first, then ComfyUI's model manager moves it between GPU and "
                        "CPU like any other model). Add a draft head or a distilled expert with the apply nodes: no "
                        "reload. Nothing is ever downloaded.",
            inputs=[
                io.Combo.Input("checkpoint", options=paths.checkpoint_choices(), tooltip=CHECKPOINT_TOOLTIP),
                io.Combo.Input("dtype", options=DTYPE_CHOICES, default="auto",
                               tooltip="Weight dtype. auto = bf16 (computed in fp32 on GPUs without native bf16); "
                                       "fp16 risks overflow; fp32 doubles the memory."),
                io.Combo.Input("attention", options=runtime.attention_backends(), default="sdpa",
                               tooltip="Attention kernel. sdpa works everywhere; flash_attn is listed only when "
                                       "the optional flash-attn package is installed."),
                io.Combo.Input("memory", options=runtime.MEMORY_MODES, default="auto",
                               tooltip="auto: ComfyUI loads what fits and streams the rest. gpu_full: keep every "
                                       "weight on the GPU. offload_after_run: move the weights back to the CPU "
                                       "after each run to leave VRAM for other models. multi_gpu: split the model "
                                       "over all GPUs (whole layers; needs accelerate); it stays placed, ComfyUI "
                                       "does not move it."),
                io.Combo.Input("weight_dtype", options=runtime.weight_dtype_choices(), default="default",
                               tooltip="How the linear layers are stored. default: in dtype. fp8_e4m3fn / int8: "
                                       "about 16 GB (int8 is closer to bf16). fp8_e4m3fn_fast: fp8 matmuls on "
                                       "RTX 40xx+ GPUs. nf4: 4-bit, about 8.7 GB. auto: the fastest that fits the free "
                                       "VRAM (see the log). A pre-quantized folder loads in its own mode."),
                io.Combo.Input("compile", options=runtime.compile_choices(), default="none",
                               tooltip="torch.compile, like core TorchCompileModel: decode = the text decoding "
                                       "step (answers, thinking, speculative drafting), all = also the image "
                                       "denoising passes. The first run compiles (seconds to minutes, see the "
                                       "log); later runs reuse it, and inductor caches it on disk across "
                                       "restarts. Needs Triton on the GPU; anything that cannot compile runs as "
                                       "before. Weights ComfyUI streams (low VRAM) stay uncompiled."),
                io.String.Input("max_memory", default="", optional=True,
                                tooltip="multi_gpu only: memory per device for the weights, e.g. "
                                        "'0=20GiB, 1=24GiB, cpu=48GiB' (what does not fit the GPUs goes to CPU RAM "
                                        "and is copied in per layer). Empty: the GPUs' free memory."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: the FLUX autoencoder from core 'Load VAE' (ae.safetensors), used as "
                                     "BAGEL's VAE. Unconnected: the checkpoint's own ae.safetensors, or for a single "
                                     "file the one beside it or in models/vae."),
            ],
            outputs=[BagelModelType.Output(display_name="model", tooltip="The loaded BAGEL model.")],
        )

    @classmethod
    def execute(cls, checkpoint, dtype, attention, memory, weight_dtype="default", compile="none", max_memory="",
                vae=None) -> io.NodeOutput:
        path = paths.resolve_checkpoint(checkpoint)
        return io.NodeOutput(runtime.load_bagel(path, dtype, attention, memory, weight_dtype, compile,
                                                max_memory or "", vae=vae))


class BagelVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperBagelVAELoader",
            display_name="BAGEL VAE Loader (FLUX ae, Hyper-Bagel)",
            category="BAGEL/loaders",
            description="Loads the FLUX autoencoder of a BAGEL checkpoint (the folder's ae.safetensors; for a "
                        "single file the ae.safetensors beside it or in models/vae) as a core VAE, the same object "
                        "core 'Load VAE' makes from that file. Use it with core VAE Decode / VAE Encode on the LATENT "
                        "outputs of the BAGEL sampler and editor.",
            inputs=[io.Combo.Input("checkpoint", options=paths.checkpoint_choices(), tooltip=CHECKPOINT_TOOLTIP)],
            outputs=[io.Vae.Output(display_name="vae", tooltip="The checkpoint's FLUX autoencoder.")],
        )

    @classmethod
    def execute(cls, checkpoint) -> io.NodeOutput:
        return io.NodeOutput(runtime.load_flux_vae(paths.resolve_checkpoint(checkpoint)))
