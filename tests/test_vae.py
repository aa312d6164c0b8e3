"""FLUX VAE against the golden reference (tiny checkpoint, fp32 CPU).

Run from the repo root: ``python -m pytest tests/test_vae.py``.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from hyperbagel_core.config import FLUX_AE_DEFAULTS
from hyperbagel_core.image import image_to_tensor, pack_latent, to_uint8, vae_transform
from hyperbagel_core.model.vae import FluxVAE

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "golden"
TINY = GOLDEN / "tiny-bagel"

pytestmark = pytest.mark.skipif(
    not (TINY / "ae.safetensors").exists(),
    reason=f"golden set not found at {GOLDEN} (needs shared/golden/tiny-bagel/ae.safetensors)",
)


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def vae():
    """Build on meta (as the loader does), then assign the converted official weights."""
    cfg = json.loads((TINY / "ae_config.json").read_text())
    with torch.device("meta"):
        model = FluxVAE.from_config(cfg)
    model.load_official_state_dict(_load(TINY / "ae.safetensors"), assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def vae_case():
    return _load(GOLDEN / "cases" / "vae.safetensors")


@pytest.fixture(scope="module")
def tolerances():
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["name"] == "vae")
    return {o["name"]: o["tolerance"] for o in case["outputs"]}


def assert_close(name, actual, ref, tol):
    """Apply one manifest tolerance rule and report the worst violation."""
    assert tuple(actual.shape) == tuple(ref.shape), f"{name}: shape {tuple(actual.shape)} vs {tuple(ref.shape)}"
    if tol.get("exact"):
        assert torch.equal(actual, ref), f"{name}: not bit-identical"
    elif "max_abs_diff" in tol:
        diff = (actual.to(torch.int32) - ref.to(torch.int32)).abs()
        frac = (diff > 0).float().mean().item()
        assert diff.max().item() <= tol["max_abs_diff"], f"{name}: max uint8 diff {diff.max().item()}"
        assert frac <= tol["max_fraction_differing"], f"{name}: {frac:.4%} of values differ"
    else:
        actual, ref = actual.float(), ref.float()
        excess = (actual - ref).abs() - (tol["atol"] + tol["rtol"] * ref.abs())
        assert excess.max().item() <= 0, (
            f"{name}: max |a-b| {(actual - ref).abs().max().item():.3g} exceeds "
            f"atol {tol['atol']} + rtol {tol['rtol']}*|ref|")


DEFAULT_TOL = {"atol": 1e-4, "rtol": 1e-4}
IMAGES = {"shapes": "shapes_64x64.png", "gradient": "gradient_96x80.png"}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_vae_golden_case(vae, vae_case, tolerances, name):
    from PIL import Image

    pixels = image_to_tensor(Image.open(GOLDEN / "images" / IMAGES[name]))[None]
    noise = vae_case[f"{name}/posterior_noise"]
    with torch.no_grad():
        outputs = {
            "input": pixels,
            "moments": vae.encode_moments(pixels),
            "latent_mean": vae.encode(pixels, sample=False),
            "latent_sample": vae.encode(pixels, noise=noise),
            "decoded": vae.decode(vae_case[f"{name}/latent_mean"]),
        }
    outputs["decoded_u8"] = to_uint8(outputs["decoded"])
    for key, value in outputs.items():
        full = f"{name}/{key}"
        assert_close(full, value, vae_case[full], tolerances[full])


def test_edit_input_encode_sampled(vae):
    """Editing path: VAE-resized 512x512 input, posterior *sampled* with the injected noise."""
    from PIL import Image

    case = _load(GOLDEN / "cases" / "edit.safetensors")
    pixels = vae_transform(Image.open(GOLDEN / "images" / "shapes_64x64.png"))[None]
    with torch.no_grad():
        moments = vae.encode_moments(pixels)
        latent = vae.encode(pixels, noise=case["input/vae_posterior_noise"])
    assert_close("input/vae_moments", moments, case["input/vae_moments"], DEFAULT_TOL)
    assert_close("input/vae_latent", latent, case["input/vae_latent"], DEFAULT_TOL)


@pytest.mark.parametrize("case_name", ["t2i", "t2i_nocfg_2step"])
def test_decode_generated_latent(vae, case_name):
    """Decode of the sampler's final latent (non-square for t2i_nocfg_2step) and the uint8 image."""
    case = _load(GOLDEN / "cases" / f"{case_name}.safetensors")
    assert torch.equal(pack_latent(case["gen/final_latent"]), case["gen/final_latent_tokens"])
    with torch.no_grad():
        decoded = vae.decode(case["gen/final_latent"])
    assert_close("gen/decoded", decoded, case["gen/decoded"], DEFAULT_TOL)
    assert_close("gen/image_u8", to_uint8(decoded), case["gen/image_u8"],
                 {"max_abs_diff": 1, "max_fraction_differing": 0.01})


def test_generator_draw_is_reproducible(vae, vae_case):
    x = vae_case["shapes/input"]
    with torch.no_grad():
        a = vae.encode(x, generator=torch.Generator().manual_seed(7))
        b = vae.encode(x, generator=torch.Generator().manual_seed(7))
        eps = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(7))
        c = vae.encode(x, noise=eps)
        mean = vae.encode(x, sample=False)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, mean)


def _official_flux_shapes(cfg):
    """Official FLUX AutoEncoder key -> shape, written from the spec (1.6, 6.2)."""
    ch, mult, nres, z = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["z_channels"]
    shapes = {}

    def conv(name, cout, cin, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(side, c):
        resnet(f"{side}.mid.block_1", c, c), resnet(f"{side}.mid.block_2", c, c)
        norm(f"{side}.mid.attn_1.norm", c)
        for leaf in ("q", "k", "v", "proj_out"):
            conv(f"{side}.mid.attn_1.{leaf}", c, c, 1)

    conv("encoder.conv_in", ch, cfg["in_channels"], 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nres):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    mid("encoder", cin)
    norm("encoder.norm_out", cin), conv("encoder.conv_out", 2 * z, cin, 3)

    cin = ch * mult[-1]
    conv("decoder.conv_in", cin, z, 3)
    mid("decoder", cin)
    for i in reversed(range(len(mult))):
        for j in range(nres + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cfg["out_ch"], cin, 3)
    return shapes


def test_official_key_names_cover_tiny_checkpoint():
    cfg = json.loads((TINY / "ae_config.json").read_text())
    sd = _load(TINY / "ae.safetensors")
    assert {k: tuple(v.shape) for k, v in sd.items()} == _official_flux_shapes(cfg)


def test_full_flux_config_converts_strictly():
    """The release config (ch 128, ch_mult 1,2,4,4, nin_shortcuts) builds on meta and maps 1:1."""
    with torch.device("meta"):
        model = FluxVAE.from_config({})
        sd = {k: torch.empty(s) for k, s in _official_flux_shapes(FLUX_AE_DEFAULTS).items()}
    assert any("nin_shortcut" in k for k in sd)
    converted = FluxVAE.convert_official_state_dict(sd)
    model.check_state_dict(converted)  # raises on any mismatch
    assert len(converted) == len(model.state_dict())


def test_strict_check_lists_every_problem(vae):
    sd = dict(_load(TINY / "ae.safetensors"))
    del sd["decoder.conv_out.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["encoder.conv_in.weight"] = torch.zeros(32, 3, 1, 1)
    with pytest.raises(ValueError) as err:
        vae.check_state_dict(FluxVAE.convert_official_state_dict(sd))
    msg = str(err.value)
    assert re.search(r"missing keys \(1\):.*decoder\.conv_out\.bias", msg)
    assert re.search(r"unexpected keys \(1\):.*encoder\.extra\.weight", msg)
    assert re.search(r"shape mismatches \(1\):.*conv_in\.weight", msg)
