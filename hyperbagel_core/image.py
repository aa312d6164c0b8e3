"""Image preprocessing / post-processing and token packing (spec 5.1, 5.2, 6.1, 6.3, 9.6).

Everything here reproduces the reference path bit for bit: PIL bicubic resizing with Python's
round-half-to-even, the double (VAE then ViT) resize of every input image, the fp32
normalisation ``(u8/255 - 0.5)/0.5``, the (p, q, c) channel-fastest patch order, flattened
position ids, and the truncating uint8 cast of decoded images.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import InputError

__all__ = [
    "VAE_RESIZE", "VIT_RESIZE", "MAX_PIXELS", "VIT_PATCH", "VIT_MAX_PER_SIDE", "LATENT_PATCH",
    "MAX_LATENT_SIZE", "pil_to_rgb", "resize_size", "resize_image", "vae_resize", "vit_resize",
    "image_to_tensor", "vae_transform", "vit_transform", "patchify_vit", "vit_position_ids",
    "pack_latent", "unpack_latent", "latent_position_ids", "to_uint8", "to_pil",
]

# (max_size, min_size, stride) of the two ImageTransforms hard-coded by the official loaders.
VAE_RESIZE = (1024, 512, 16)
VIT_RESIZE = (980, 224, 14)
MAX_PIXELS = 14 * 14 * 9 * 1024  # 1,806,336
VIT_PATCH = 14
VIT_MAX_PER_SIDE = 70
LATENT_PATCH = 2
MAX_LATENT_SIZE = 64


ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of ``img``; transparent pixels go onto white (not black) as in the reference.

    Beyond the reference (which handles RGBA and palette transparency only): every mode with an alpha band
    goes onto white too, and 16-bit greyscale (``I;16*``, and ``I``, which Pillow uses for 16-bit PNG/TIFF
    samples) is scaled to 8 bits (``round(v / 257)``) where PIL's own conversion would clip it to 255 (white).
    """
    if img.mode.startswith("I"):
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257).astype(np.uint8), "L")
    if img.mode in ALPHA_MODES or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.split()[3])
        return canvas
    try:
        return img.convert("RGB")
    except ValueError as e:  # a mode PIL cannot convert (e.g. premultiplied "La")
        raise InputError(f"image mode {img.mode!r} cannot be converted to RGB ({e}); convert the image to RGB "
                         "or RGBA first") from None


def _apply_scale(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    """Scale then snap each side to a multiple of ``stride`` (banker's rounding twice)."""
    w, h = round(width * scale), round(height * scale)
    return max(stride, int(round(w / stride)) * stride), max(stride, int(round(h / stride)) * stride)


def resize_size(width: int, height: int, max_size: int, min_size: int, stride: int,
                max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Target (W', H') of the reference resize rule (spec 5.1.3), including both re-applications.

    The max-side clamp runs last, so the min-side constraint can end up violated (2000x500 -> 1024x256).
    """
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    w, h = _apply_scale(width, height, scale, stride)
    if w * h > max_pixels:
        w, h = _apply_scale(w, h, max_pixels / (w * h), stride)
    if max(w, h) > max_size:
        w, h = _apply_scale(w, h, max_size / max(w, h), stride)
    return w, h


def resize_image(img: Image.Image, max_size: int, min_size: int, stride: int,
                 max_pixels: int = MAX_PIXELS) -> Image.Image:
    """PIL bicubic resize to ``resize_size``; a copy when the size is already right."""
    size = resize_size(img.width, img.height, max_size, min_size, stride, max_pixels)
    if size == img.size:
        return img.copy()
    return img.resize(size, Image.BICUBIC)


def vae_resize(img: Image.Image) -> Image.Image:
    """What the inferencer applies to every input image first (also before the ViT resize)."""
    return resize_image(pil_to_rgb(img), *VAE_RESIZE)


def vit_resize(img: Image.Image) -> Image.Image:
    """The ViT transform's resize (stride 14)."""
    return resize_image(pil_to_rgb(img), *VIT_RESIZE)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """float32 [3, H, W] in [-1, 1], computed as (u8/255 - 0.5)/0.5 in that order (bit-exact)."""
    arr = np.asarray(pil_to_rgb(img), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return x.sub(0.5).div(0.5)


def vae_transform(img: Image.Image) -> torch.Tensor:
    """VAE input tensor [3, H, W] (resize with stride 16, normalise)."""
    return image_to_tensor(vae_resize(img))


def vit_transform(img: Image.Image) -> torch.Tensor:
    """ViT input tensor [3, H, W] (resize with stride 14, normalise).

    The inferencer calls this on the already VAE-resized image; apply ``vae_resize`` first for that.
    """
    return image_to_tensor(vit_resize(img))


def _grid_ids(rows: int, cols: int, row_stride: int) -> torch.Tensor:
    """Flattened ids row*row_stride + col in raster order."""
    r = torch.arange(rows, dtype=torch.long).unsqueeze(1)
    c = torch.arange(cols, dtype=torch.long).unsqueeze(0)
    return (r * row_stride + c).reshape(-1)


def vit_position_ids(rows: int, cols: int, max_per_side: int = VIT_MAX_PER_SIDE) -> torch.Tensor:
    """ViT ids row*70 + col; ids past 70 per side would alias another row, so refuse them."""
    if rows > max_per_side or cols > max_per_side:
        raise ValueError(f"ViT patch grid {rows}x{cols} exceeds {max_per_side} patches per side; "
                         f"resize the image with vit_transform (max {max_per_side * VIT_PATCH} px)")
    return _grid_ids(rows, cols, max_per_side)


def patchify_vit(pixels: torch.Tensor, patch: int = VIT_PATCH,
                 max_per_side: int = VIT_MAX_PER_SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, H, W] -> (tokens [n, 3*p*p] ordered (p, q, c) channel fastest, position ids [n])."""
    c, height, width = pixels.shape
    if height % patch or width % patch:
        raise ValueError(f"image size {width}x{height} is not a multiple of the patch size {patch}")
    rows, cols = height // patch, width // patch
    ids = vit_position_ids(rows, cols, max_per_side)
    tokens = pixels.reshape(c, rows, patch, cols, patch).permute(1, 3, 2, 4, 0)
    return tokens.reshape(rows * cols, patch * patch * c), ids


def pack_latent(latent: torch.Tensor, patch: int = LATENT_PATCH) -> torch.Tensor:
    """[z, 2h, 2w] (or [1, z, 2h, 2w]) -> [h*w, 4z]; raster tokens, (p, q, c) channel fastest."""
    if latent.dim() == 4:
        if latent.shape[0] != 1:
            raise ValueError(f"pack_latent takes one latent, got batch {latent.shape[0]}")
        latent = latent[0]
    z, hh, ww = latent.shape
    h, w = hh // patch, ww // patch
    x = latent[:, : h * patch, : w * patch].reshape(z, h, patch, w, patch)
    return x.permute(1, 3, 2, 4, 0).reshape(h * w, patch * patch * z)


def unpack_latent(tokens: torch.Tensor, h: int, w: int, z: int = 16,
                  patch: int = LATENT_PATCH) -> torch.Tensor:
    """Exact inverse of ``pack_latent``: [h*w, 4z] -> [z, 2h, 2w]."""
    if tokens.shape != (h * w, patch * patch * z):
        raise ValueError(f"expected latent tokens of shape {(h * w, patch * patch * z)}, "
                         f"got {tuple(tokens.shape)}")
    x = tokens.reshape(h, w, patch, patch, z).permute(4, 0, 2, 1, 3)
    return x.reshape(z, h * patch, w * patch)


def latent_position_ids(h: int, w: int, max_latent_size: int = MAX_LATENT_SIZE) -> torch.Tensor:
    """Latent ids row*64 + col; a wider grid would silently alias ids, so refuse it."""
    if h > max_latent_size or w > max_latent_size:
        raise ValueError(f"latent grid {h}x{w} exceeds max_latent_size {max_latent_size} per side "
                         f"(images are limited to {max_latent_size * 16}x{max_latent_size * 16} px)")
    return _grid_ids(h, w, max_latent_size)


def to_uint8(decoded: torch.Tensor) -> torch.Tensor:
    """[1,3,H,W] or [3,H,W] in [-1,1] -> uint8 [H,W,3]; truncates like the reference (no rounding)."""
    if decoded.dim() == 4:
        if decoded.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one image, got batch {decoded.shape[0]}")
        decoded = decoded[0]
    x = (decoded.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1)
    return (x.permute(1, 2, 0) * 255).to(torch.uint8)


def to_pil(decoded: torch.Tensor) -> Image.Image:
    """Decoded tensor -> PIL RGB image via ``to_uint8``."""
    return Image.fromarray(to_uint8(decoded).numpy())
