"""FLUX.1 autoencoder used by BAGEL (spec 6.2), built on diffusers' ``AutoencoderKL``.

Decision: diffusers, not a hand-written module. ``AutoencoderKL`` configured for FLUX
(block_out_channels = ch * ch_mult, layers_per_block = num_res_blocks, latent_channels =
z_channels, no quant/post-quant convs, 32 norm groups, eps 1e-6, right/bottom zero pad before
the stride-2 conv, nearest x2 upsampling, single-head mid attention with scale 1/sqrt(C)) is the
same network as the official FLUX ``AutoEncoder``. On the golden ``vae`` case (tiny checkpoint,
fp32 CPU) it reproduces ``moments``, ``latent_mean``, ``latent_sample`` and ``decoded`` within
|a-b| <= 1e-4 + 1e-4*|ref| (tests/test_vae.py): measured worst |a-b| is 3.9e-6 on the moments
and 3.1e-6 on the decoded image (at most 4 % of the tolerance); on the edit case's 512x512
input the moments differ by at most 2.6e-5 (19 % of the tolerance, |ref| up to 8). That is the
fp32 summation-order noise floor the golden README measures (1.2e-5 .. 2.6e-5). The library is
numerically faithful, so we use it rather than maintaining a second copy of the network.

Injected ops: diffusers builds its own ``nn.Conv2d``/``nn.GroupNorm``/``nn.Linear`` layers, so
``from_config`` re-classes them as the ``ops`` layers afterwards (``ops.adopt_ops``: same tensors, same
forward). A model manager that streams weights layer by layer (ComfyUI's partial loading) then streams the
VAE's layers too instead of leaving them on the offload device while the input goes to the GPU.
Inputs go to ``compute_device`` (set by the pipeline), not to where a weight happens to be.

On CUDA, fp32 convolutions may run in TF32 (``torch.backends.cudnn.allow_tf32`` defaults to
True), which moves results by about 1e-3; the reference path runs the VAE in fp32 on CPU (spec 14.12).

Weights on disk use the official FLUX names (``encoder.down.{i}.block.{j}...``); use
``FluxVAE.convert_official_state_dict`` to rename them to this module's keys (``model.*``,
diffusers names) and ``FluxVAE.check_state_dict`` for a strict, one-message key/shape check.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..config import FLUX_AE_DEFAULTS
from ..ops import adopt_ops
from ..tensor_io import aligned

__all__ = ["FluxVAE"]

_PREFIX = "model."

# Official resnet / attention leaf names -> diffusers leaf names.
_RESNET_LEAF = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                "nin_shortcut": "conv_shortcut"}
_ATTN_LEAF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_LINEAR = {"to_q", "to_k", "to_v", "to_out.0"}


def _diffusers_kwargs(cfg: dict) -> dict:
    """Map AutoEncoderParams fields to AutoencoderKL constructor arguments."""
    levels = len(cfg["ch_mult"])
    if 2 ** (levels - 1) != cfg.get("downsample", 2 ** (levels - 1)):
        raise ValueError(f"VAE config: downsample {cfg['downsample']} does not match "
                         f"{levels} levels of ch_mult {cfg['ch_mult']}")
    return dict(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_ch"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg["ch"] * m for m in cfg["ch_mult"]),
        layers_per_block=cfg["num_res_blocks"],
        act_fn="silu",
        latent_channels=cfg["z_channels"],
        norm_num_groups=32,
        sample_size=cfg["resolution"],
        scaling_factor=cfg["scale_factor"],
        shift_factor=cfg["shift_factor"],
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def _convert_resnet_or_attn(rest: str) -> str:
    """Rename the part after a mid block / level prefix (resnet or attention leaves)."""
    head, _, tail = rest.partition(".")
    if head in _ATTN_LEAF:
        return f"{_ATTN_LEAF[head]}.{tail}"
    if head in _RESNET_LEAF:
        return f"{_RESNET_LEAF[head]}.{tail}"
    raise KeyError(rest)


def _convert_key(key: str, levels: int) -> str:
    """Official FLUX key -> diffusers AutoencoderKL key (without the module prefix)."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise KeyError(key)
    simple = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
    head, _, tail = rest.partition(".")
    if head in simple:
        return f"{side}.{simple[head]}.{tail}"
    m = re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(.+)", rest)
    if m:
        part = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}[m.group(1)]
        return f"{side}.mid_block.{part}.{_convert_resnet_or_attn(m.group(2))}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)", rest)
    if m and (m.group(1) == "down") == (side == "encoder"):
        level = int(m.group(2))
        # The official decoder stores up[i] for level i but runs level levels-1 first;
        # diffusers stores its up_blocks in execution order.
        idx = level if side == "encoder" else levels - 1 - level
        blocks = "down_blocks" if side == "encoder" else "up_blocks"
        if m.group(4) is not None:
            return f"{side}.{blocks}.{idx}.resnets.{m.group(4)}.{_convert_resnet_or_attn(m.group(5))}"
        sampler = "downsamplers" if m.group(3) == "downsample" else "upsamplers"
        return f"{side}.{blocks}.{idx}.{sampler}.0.{m.group(5)}"
    raise KeyError(key)


def _to_official_key(key: str, levels: int) -> str:
    """Inverse of ``_convert_key``: diffusers key (without the module prefix) -> official FLUX key."""
    side, _, rest = key.partition(".")
    leaf = {v: k for k, v in {**_RESNET_LEAF, **_ATTN_LEAF}.items()}
    simple = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
    head, _, tail = rest.partition(".")
    if head in simple:
        return f"{side}.{simple[head]}.{tail}"
    m = re.fullmatch(r"mid_block\.(resnets\.0|resnets\.1|attentions\.0)\.(to_out\.0|[a-z_0-9]+)\.(.+)", rest)
    if m:
        part = {"resnets.0": "block_1", "resnets.1": "block_2", "attentions.0": "attn_1"}[m.group(1)]
        return f"{side}.mid.{part}.{leaf[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)\.([a-z_0-9]+)|(down|up)samplers\.0\.conv)\.(.+)",
                     rest)
    if not m:
        raise KeyError(key)
    level = int(m.group(2)) if m.group(1) == "down" else levels - 1 - int(m.group(2))
    if m.group(4) is not None:
        return f"{side}.{m.group(1)}.{level}.block.{m.group(4)}.{leaf[m.group(5)]}.{m.group(7)}"
    return f"{side}.{m.group(1)}.{level}.{m.group(6)}sample.conv.{m.group(7)}"


class FluxVAE(nn.Module):
    """FLUX autoencoder with BAGEL's latent normalisation (scale/shift) around it."""

    compute_device: torch.device | None = None  # where inputs go; None: the first conv's device

    def __init__(self, config: dict, ops=None):
        super().__init__()
        from diffusers import AutoencoderKL  # deferred: importing diffusers is slow

        self.config = dict(config)
        self.z_channels = int(config["z_channels"])
        self.levels = len(config["ch_mult"])
        self.scale_factor = float(config["scale_factor"])
        self.shift_factor = float(config["shift_factor"])
        self.model = adopt_ops(AutoencoderKL(**_diffusers_kwargs(config)), ops)

    @classmethod
    def from_config(cls, vae_config: dict | None = None, ops=None) -> "FluxVAE":
        """Build from ae_config.json fields (missing fields fall back to FLUX defaults).

        ``ops``: the layer namespace diffusers' layers are re-classed to (see the module docstring).
        Works under ``with torch.device("meta"):``.
        """
        cfg = dict(FLUX_AE_DEFAULTS)
        cfg.update(vae_config or {})
        return cls(cfg, ops)

    # ----------------------------------------------------------------- weights
    @classmethod
    def convert_official_state_dict(cls, sd: dict, levels: int | None = None) -> dict:
        """Rename official FLUX keys to this module's keys; reshape 1x1 attention convs to linear.

        ``levels`` (len(ch_mult)) is inferred from the decoder keys when not given. Keys that
        are not official VAE names are kept unchanged (prefixed) so the strict check reports them.
        """
        if levels is None:
            ups = [int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
            levels = max(ups) + 1 if ups else len(FLUX_AE_DEFAULTS["ch_mult"])
        out = {}
        for key, value in sd.items():
            try:
                new = _convert_key(key, levels)
            except KeyError:
                out[_PREFIX + key] = value
                continue
            if ".attentions." in new and value.dim() == 4 \
                    and any(new.endswith(f".{n}.weight") for n in _ATTN_LINEAR):
                value = value.reshape(value.shape[0], value.shape[1])
            out[_PREFIX + new] = value
        return out

    def official_state_dict(self) -> dict:
        """This module's weights under the official FLUX names (what ``ae.safetensors`` holds)."""
        out = {}
        for key, value in self.state_dict().items():
            name = _to_official_key(key[len(_PREFIX):], self.levels)
            if name.endswith((".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")) and value.dim() == 2:
                value = value[:, :, None, None]
            out[name] = value
        return out

    def check_state_dict(self, sd: dict) -> None:
        """Raise ValueError listing every missing/unexpected key and shape mismatch (strict load)."""
        expected = self.state_dict()
        missing = sorted(k for k in expected if k not in sd)
        unexpected = sorted(k for k in sd if k not in expected)
        shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                        for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape))
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
            if shapes:
                parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes)}")
            raise ValueError("VAE state dict does not match the FLUX autoencoder config "
                             f"(ch_mult {self.config['ch_mult']}, ch {self.config['ch']}): "
                             + " | ".join(parts))

    def load_official_state_dict(self, sd: dict, assign: bool = False) -> None:
        """Convert, strictly check, and load an official-name state dict.

        With ``assign`` the given tensors become the weights, so file-backed ones are first moved to aligned
        storage (``tensor_io.aligned``: misaligned weights change the CPU kernels' results in the last bits).
        """
        converted = self.convert_official_state_dict(sd, self.levels)
        self.check_state_dict(converted)
        if assign:
            converted = {k: aligned(v) for k, v in converted.items()}
        self.load_state_dict(converted, strict=True, assign=assign)

    # ----------------------------------------------------------------- math
    def _place(self, x: torch.Tensor) -> torch.Tensor:
        """Move an input to the compute device in the weights' dtype (a streamed weight may sit elsewhere)."""
        p = self.model.encoder.conv_in.weight
        return x.to(device=self.compute_device or p.device, dtype=p.dtype)

    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw encoder output [mean | logvar], [B, 2z, H/8, W/8], for pixels in [-1, 1]."""
        return self.model.encoder(self._place(pixels))

    def encode(self, pixels: torch.Tensor, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None, sample: bool = True,
               moments: torch.Tensor | None = None) -> torch.Tensor:
        """BAGEL-normalised latent scale*(mean + std*eps - shift); BAGEL samples for context images.
        ``moments``: ``encode_moments(pixels)`` when the caller already has them (no second encoder pass)."""
        mean, logvar = (self.encode_moments(pixels) if moments is None else moments).chunk(2, dim=1)
        z = mean
        if sample:
            eps = noise if noise is not None else self._draw_noise(mean, generator)
            z = mean + torch.exp(0.5 * logvar) * eps.to(device=mean.device, dtype=mean.dtype)
        return self.scale_factor * (z - self.shift_factor)

    @staticmethod
    def _draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """N(0,1) in fp32 on the generator's device (reproducible across VAE devices), then moved."""
        device = generator.device if generator is not None else like.device
        eps = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
        return eps.to(device=like.device, dtype=like.dtype)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Pixels in about [-1, 1]: decoder(latent/scale + shift)."""
        z = self._place(latent) / self.scale_factor + self.shift_factor
        return self.model.decoder(z)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean (handy for smoke tests)."""
        return self.decode(self.encode(pixels, sample=False))
