"""Image transforms, ViT patchify and latent packing (spec 5.1, 5.2, 6.1, 6.3, 9.6).

Run from the repo root: ``python -m pytest tests/test_image.py``.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hyperbagel_core.image import (
    VAE_RESIZE,
    VIT_RESIZE,
    image_to_tensor,
    latent_position_ids,
    pack_latent,
    patchify_vit,
    pil_to_rgb,
    resize_image,
    resize_size,
    to_uint8,
    unpack_latent,
    vae_resize,
    vit_resize,
    vit_transform,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "golden"
needs_golden = pytest.mark.skipif(not (GOLDEN / "manifest.json").exists(),
                                  reason=f"golden set not found at {GOLDEN}")


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("size,vae_size,vit_size", [
    ((300, 200), (768, 512), (770, 518)),
    ((1000, 1000), (992, 992), None),
    ((4000, 3000), (1024, 768), None),
    ((1920, 1080), (1024, 576), None),
    ((2000, 500), (1024, 256), None),   # max-side clamp wins over the min side
    ((96, 80), (608, 512), (602, 518)),
    ((64, 64), (512, 512), (518, 518)),
])
def test_resize_examples(size, vae_size, vit_size):
    assert resize_size(*size, *VAE_RESIZE) == vae_size
    if vit_size is not None:
        assert resize_size(*vae_size, *VIT_RESIZE) == vit_size


def test_resize_direct_vit_and_bankers_rounding():
    assert resize_size(300, 200, *VIT_RESIZE) == (336, 224)
    assert resize_size(96, 80, *VIT_RESIZE) == (266, 224)
    # 62.5 -> 62 and 52.5 -> 52 under round-half-to-even (stride 1 isolates the first rounding).
    assert resize_size(125, 105, 62.5, 1, 1) == (62, 52)
    # stride snapping rounds half to even too: 8*2.5=20 -> round(2.5)=2 -> 16.
    assert resize_size(600, 520, 10_000, 1, 8) == (600, 520)
    assert resize_size(20, 600, 10_000, 1, 8) == (16, 600)


def test_resize_max_pixels_reapplied():
    # 1024x1024 exceeds 1,000,000 pixels: scaled by max_pixels/(W*H) then re-snapped.
    w, h = resize_size(1024, 1024, 1024, 512, 16, max_pixels=1_000_000)
    assert (w, h) == (976, 976)


def test_resize_image_returns_copy_when_unchanged():
    img = Image.new("RGB", (512, 512), (1, 2, 3))
    out = resize_image(img, *VAE_RESIZE)
    assert out is not img and out.size == img.size and out.tobytes() == img.tobytes()


def test_pil_to_rgb_white_background():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert pil_to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    rgba.putpixel((1, 1), (10, 20, 30, 255))
    assert pil_to_rgb(rgba).getpixel((1, 1)) == (10, 20, 30)
    assert pil_to_rgb(Image.new("L", (2, 2), 7)).mode == "RGB"


def test_image_to_tensor_formula():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(np.stack([arr, arr[::-1], arr.T], axis=-1))
    x = image_to_tensor(img)
    ref = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and torch.equal(x, ref)


def _same_png(img, name):
    ref = np.asarray(Image.open(GOLDEN / "cases" / name).convert("RGB"))
    got = np.asarray(img)
    assert got.shape == ref.shape, f"{name}: {got.shape} vs {ref.shape}"
    assert (got == ref).all(), f"{name}: {(got != ref).sum()} values differ"


@needs_golden
@pytest.mark.parametrize("src,prefix", [("gradient_96x80.png", "vqa"), ("shapes_64x64.png", "edit")])
def test_double_resize_matches_golden_pngs(src, prefix):
    raw = Image.open(GOLDEN / "images" / src)
    vae_img = vae_resize(raw)
    _same_png(vae_img, f"{prefix}_input_vae_resized.png")
    vit_img = vit_resize(vae_img)
    _same_png(vit_img, f"{prefix}_input_vit_resized.png")
    assert torch.equal(vit_transform(vae_img), image_to_tensor(vit_img))


@needs_golden
def test_vit_case_tokens_and_ids():
    raw = Image.open(GOLDEN / "images" / "gradient_96x80.png")
    _same_png(vit_resize(raw), "vit_input_resized.png")
    pixels = vit_transform(raw)  # the vit case applies the ViT transform to the raw image
    case = _load(GOLDEN / "cases" / "vit.safetensors")
    tokens, ids = patchify_vit(pixels)
    ref = case["vit/packed_vit_tokens"]
    assert tokens.shape == ref.shape
    assert ((tokens - ref).abs() <= 1e-4 + 1e-4 * ref.abs()).all()
    assert torch.equal(ids, case["vit/position_ids"])


@needs_golden
@pytest.mark.parametrize("case_name,src", [("vqa", "gradient_96x80.png"), ("edit", "shapes_64x64.png")])
def test_vit_ids_of_double_resized_inputs(case_name, src):
    case = _load(GOLDEN / "cases" / f"{case_name}.safetensors")
    ref = next(v for k, v in case.items() if k.endswith("packed_vit_position_ids"))
    _, ids = patchify_vit(vit_transform(vae_resize(Image.open(GOLDEN / "images" / src))))
    assert torch.equal(ids, ref)


def test_patchify_order_formula():
    pixels = torch.randn(3, 28, 42)
    tokens, ids = patchify_vit(pixels)
    assert tokens.shape == (6, 588)
    assert ids.tolist() == [0, 1, 2, 70, 71, 72]
    row, col, p, q, c = 1, 2, 5, 9, 2
    assert tokens[row * 3 + col, (p * 14 + q) * 3 + c] == pixels[c, row * 14 + p, col * 14 + q]


def test_patchify_rejects_too_many_patches():
    with pytest.raises(ValueError, match="70 patches per side"):
        patchify_vit(torch.zeros(3, 14, 14 * 71))


def test_pack_order_formula_and_round_trip():
    lat = torch.randn(16, 6, 10)
    tokens = pack_latent(lat)
    h, w = 3, 5
    assert tokens.shape == (h * w, 64)
    for i, j, p, q, c in [(0, 0, 0, 0, 0), (2, 4, 1, 1, 15), (1, 3, 0, 1, 7), (2, 0, 1, 0, 3)]:
        assert tokens[i * w + j, (p * 2 + q) * 16 + c] == lat[c, 2 * i + p, 2 * j + q]
    assert torch.equal(unpack_latent(tokens, h, w), lat)
    assert torch.equal(pack_latent(lat[None]), tokens)


def test_pack_crops_odd_latent():
    lat = torch.randn(16, 7, 5)
    assert torch.equal(pack_latent(lat), pack_latent(lat[:, :6, :4]))


@needs_golden
@pytest.mark.parametrize("case_name,h,w", [("t2i", 4, 4), ("t2i_nocfg_2step", 3, 5), ("edit", 32, 32)])
def test_latent_packing_matches_golden(case_name, h, w):
    case = _load(GOLDEN / "cases" / f"{case_name}.safetensors")
    tokens, latent = case["gen/final_latent_tokens"], case["gen/final_latent"]
    assert torch.equal(pack_latent(latent), tokens)
    assert torch.equal(unpack_latent(tokens, h, w), latent[0])
    ref_ids = next(v for k, v in case.items() if k.endswith("packed_vae_position_ids"))
    assert torch.equal(latent_position_ids(h, w), ref_ids)


def test_latent_position_ids_and_range():
    assert latent_position_ids(2, 3).tolist() == [0, 1, 2, 64, 65, 66]
    assert latent_position_ids(64, 64)[-1].item() == 64 * 64 - 1
    with pytest.raises(ValueError, match="max_latent_size 64"):
        latent_position_ids(65, 10)
    with pytest.raises(ValueError, match="max_latent_size"):
        latent_position_ids(10, 65)


def test_to_uint8_truncates():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).reshape(1, 3, 1, 2)
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 2, 3)
    # 0.0 -> 0.5*255 = 127.5 -> 127 (truncation, not rounding)
    assert u.reshape(-1).tolist() == [0, 127, 255, 0, 254, 255]
