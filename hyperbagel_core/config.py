"""Configuration dataclasses read from an official BAGEL checkpoint folder.

The official loaders override a few JSON fields (spec 1.2-1.4); those overrides live here so that every
caller gets the same model whatever the JSON says.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Spec 6.2: the official FLUX.1 AutoEncoderParams (used when a folder has no ae_config.json).
FLUX_AE_DEFAULTS: dict = {
    "resolution": 256,
    "in_channels": 3,
    "downsample": 8,
    "ch": 128,
    "out_ch": 3,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "z_channels": 16,
    "scale_factor": 0.3611,
    "shift_factor": 0.1159,
}


@dataclass(frozen=True)
class LLMConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, d: dict) -> "LLMConfig":
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"llm_config.json: hidden_act {d['hidden_act']!r} is not supported (BAGEL uses silu)")
        if d.get("rope_scaling"):
            raise ValueError("llm_config.json: rope_scaling is not supported by BAGEL; set it to null")
        return cls(**{k: d[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "vocab_size")},
                   rope_theta=float(d.get("rope_theta", 1e6)), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                   max_position_embeddings=int(d.get("max_position_embeddings", 32768)))


@dataclass(frozen=True)
class ViTConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int          # layers actually built: the JSON value minus one (vit_select_layer = -2)
    num_attention_heads: int
    patch_size: int = 14
    image_size: int = 980
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, d: dict) -> "ViTConfig":
        act = d.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"vit_config.json: hidden_act {act!r} is not supported (SigLIP uses gelu_pytorch_tanh)")
        return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   num_hidden_layers=d["num_hidden_layers"] - 1, num_attention_heads=d["num_attention_heads"],
                   patch_size=d.get("patch_size", 14), image_size=d.get("image_size", 980),
                   layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)), num_channels=d.get("num_channels", 3))


@dataclass(frozen=True)
class BagelConfig:
    """Everything needed to build the model; the constants are hard-coded by the official loaders."""
    llm: LLMConfig
    vit: ViTConfig
    vae: dict = field(default_factory=lambda: dict(FLUX_AE_DEFAULTS))
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70

    @property
    def latent_channels(self) -> int:
        return self.vae["z_channels"]

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size ** 2 * self.latent_channels

    @property
    def latent_downsample(self) -> int:
        return self.vae["downsample"] * self.latent_patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "BagelConfig":
        folder = Path(folder)
        llm = LLMConfig.from_json(_read_json(folder / "llm_config.json"))
        vit = ViTConfig.from_json(_read_json(folder / "vit_config.json"))
        vae = dict(FLUX_AE_DEFAULTS)
        if (folder / "ae_config.json").exists():
            vae.update(_read_json(folder / "ae_config.json"))
        return cls(llm=llm, vit=vit, vae=vae)


def _read_json(path: Path) -> dict:
    from .errors import CheckpointError
    if not path.exists():
        raise CheckpointError(f"{path}: file is missing; an official BAGEL folder has llm_config.json, "
                              "vit_config.json, ema.safetensors, ae.safetensors and the tokenizer files")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-download this file") from e
