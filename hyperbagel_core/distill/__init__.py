"""CFG-distilled generation expert (Hyper-Bagel stage 1): guidance-scale embedders, file format, loader,
prefill/denoise weight swap. The trainers live in ``hyperbagel_core.training``."""
from .embedders import IMG_SCALE_RANGE, TEXT_SCALE_RANGE, GuidanceEmbedding, ScaleOutOfRangeWarning, clamp_scale
from .expert import (
    FORMAT,
    FORMAT_VERSION,
    DistillConfig,
    DistilledExpert,
    base_fingerprint,
    gen_expert_keys,
    is_gen_expert_key,
    load_distilled_expert,
    read_distilled_file,
    swap_parameters,
)

__all__ = [
    "IMG_SCALE_RANGE", "TEXT_SCALE_RANGE", "GuidanceEmbedding", "ScaleOutOfRangeWarning", "clamp_scale",
    "FORMAT", "FORMAT_VERSION", "DistillConfig", "DistilledExpert", "base_fingerprint", "gen_expert_keys",
    "is_gen_expert_key", "load_distilled_expert", "read_distilled_file", "swap_parameters",
]
