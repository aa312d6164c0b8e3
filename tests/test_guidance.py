"""Dual CFG with renorm (spec 9.5): formulas, nesting of image guidance, dtypes of the reference path."""
import pytest
import torch

from hyperbagel_core.sampling.guidance import cfg_active, cfg_combine


def _v(seed, dtype=torch.float32):
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_interval_open_low_closed_high():
    assert cfg_active(1.0, (0.4, 1.0)) and not cfg_active(0.4, (0.4, 1.0)) and cfg_active(0.41, (0.4, 1.0))
    assert not cfg_active(0.0, (0.0, 1.0))


def test_no_text_guidance_means_no_guidance():
    c, t, i = _v(0), _v(1), _v(2)
    assert cfg_combine(c, t, i, 1.0, 2.0, "global") is c


@pytest.mark.parametrize("kind", ["global", "channel"])
def test_global_and_channel(kind):
    c, t, i = _v(0), _v(1), _v(2)
    g = t + 4.0 * (c - t)
    g = i + 1.5 * (g - i)
    if kind == "global":
        s = (c.norm() / (g.norm() + 1e-8)).clamp(0.3, 1)
    else:
        s = (c.norm(dim=-1, keepdim=True) / (g.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.3, 1)
    torch.testing.assert_close(cfg_combine(c, t, i, 4.0, 1.5, kind, 0.3), g * s)


def test_text_channel_does_not_renorm_the_image_term():
    c, t, i = _v(0), _v(1), _v(2)
    g = t + 4.0 * (c - t)
    g = g * (c.norm(dim=-1, keepdim=True) / (g.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.0, 1)
    torch.testing.assert_close(cfg_combine(c, t, i, 4.0, 2.0, "text_channel"), i + 2.0 * (g - i))


def test_reference_dtypes():
    c, t = _v(0, torch.bfloat16), _v(1, torch.bfloat16)
    assert cfg_combine(c, t, None, 4.0, 1.0, "global").dtype == torch.bfloat16
    assert cfg_combine(c, t, None, 4.0, 1.0, "channel").dtype == torch.float32
    assert cfg_combine(c, t, None, 4.0, 1.0, "text_channel").dtype == torch.float32


def test_renorm_only_shrinks_and_unknown_type_raises():
    c, t = _v(0), _v(1)
    assert cfg_combine(c, t, None, 4.0, 1.0, "global", 1.0).norm() <= (t + 4 * (c - t)).norm() + 1e-6
    with pytest.raises(ValueError, match="local"):
        cfg_combine(c, t, None, 4.0, 1.0, "local")
