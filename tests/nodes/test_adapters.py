"""Adapter logic without ComfyUI: IMAGE layout, latents, seeds, validation, schedules, stats."""
import math

import numpy as np
import pytest
import torch

from nodes import adapters as A


def test_image_roundtrip_layout_and_range():
    img = torch.rand(2, 24, 40, 3)
    pils = A.image_to_pils(img)
    assert len(pils) == 2 and pils[0].size == (40, 24) and pils[0].mode == "RGB"
    back = A.stack_images([A.pil_to_image(p) for p in pils])
    assert back.shape == (2, 24, 40, 3) and back.dtype == torch.float32
    assert 0.0 <= back.min() and back.max() <= 1.0
    assert torch.allclose(back, img, atol=0.5 / 255 + 1e-6)


def test_image_accepts_hwc_alpha_and_gray_and_clamps():
    rgba = torch.rand(16, 8, 4) * 1.5 - 0.2
    b = A.check_image_batch(rgba)
    assert b.shape == (1, 16, 8, 3) and b.min() >= 0 and b.max() <= 1
    assert A.check_image_batch(torch.rand(1, 4, 4, 1)).shape == (1, 4, 4, 3)
    assert A.check_image_batch(torch.rand(1, 4, 4, 3, dtype=torch.float16)).dtype == torch.float32


@pytest.mark.parametrize("bad", [torch.rand(1, 3, 8, 8, 2), torch.rand(2, 8, 8), torch.rand(0, 8, 8, 3), "x",
                                 {"samples": torch.zeros(1, 16, 2, 2)}])
def test_image_rejects_non_images(bad):
    with pytest.raises(A.NodeInputError):
        A.check_image_batch(bad)


def test_u8_result_conversion():
    u8 = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    img = A.u8_to_image(u8)
    assert img.shape == (1, 2, 3, 3) and img[0, 0, 0, 2].item() == pytest.approx(2 / 255)
    with pytest.raises(ValueError):
        A.u8_to_image(np.zeros((2, 3, 3), dtype=np.float32))


def test_stack_rejects_mixed_sizes():
    with pytest.raises(A.NodeInputError, match="different sizes"):
        A.stack_images([torch.zeros(1, 4, 4, 3), torch.zeros(1, 8, 4, 3)])


def test_resize_to_original_size():
    img = torch.rand(2, 32, 48, 3)
    out = A.resize_image(img, 30, 50)
    assert out.shape == (2, 30, 50, 3) and out.min() >= 0 and out.max() <= 1
    assert A.resize_image(img, 32, 48) is img


def test_latent_is_raw_flux_space():
    z = torch.randn(1, 16, 4, 6)
    lat = A.bagel_latent_to_comfy(z, 0.5, 0.1)
    assert set(lat) == {"samples"} and lat["samples"].shape == (1, 16, 4, 6)
    assert torch.allclose(lat["samples"], z / 0.5 + 0.1)
    assert A.concat_latents([lat, lat])["samples"].shape == (2, 16, 4, 6)


def test_batch_seeds_wrap_and_validate():
    assert A.batch_seeds(5, 3) == [5, 6, 7]
    assert A.batch_seeds(A.MAX_SEED, 2) == [A.MAX_SEED, 0]
    for bad in (-1, A.MAX_SEED + 1, 1.5, True, "3"):
        with pytest.raises(A.NodeInputError):
            A.batch_seeds(bad, 1)


def test_check_size_messages():
    assert A.check_size(512, 256, max_side=1024) == (512, 256)
    with pytest.raises(A.NodeInputError, match="use 496 or 512"):
        A.check_size(500, 256)
    with pytest.raises(A.NodeInputError, match="exceeds 1024"):
        A.check_size(1040, 256, max_side=1024)
    with pytest.raises(A.NodeInputError):
        A.check_size(0, 256)


def test_check_text():
    assert A.check_text("hi", "prompt") == "hi"
    for bad in ("", "   ", None, 3):
        with pytest.raises(A.NodeInputError):
            A.check_text(bad, "prompt")


def test_parse_timesteps():
    assert A.parse_timesteps("1.0, 0.75 0.5;0.25") == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert A.parse_timesteps("1\n0") == [1.0, 0.0]
    for bad in ("", "1, 0.5, 0.7", "1.2, 0.5", "a, b", "0.5, 0.5", "0"):
        with pytest.raises(A.NodeInputError):
            A.parse_timesteps(bad)


def test_plan_schedule_maps_every_choice():
    p = A.plan_schedule("hyper-6nfe")
    assert p.kwargs == {"schedule": "hyper-6nfe"} and p.steps == 6 and p.wants_distilled
    assert A.plan_schedule("hyper-1nfe").steps == 1
    assert A.plan_schedule("hyper-6nfe-shift3").kwargs == {"schedule": "hyper-6nfe-shift3"}
    t = A.plan_schedule("teacher-50", shift=3.0)
    assert t.kwargs == {"schedule": "teacher", "num_timesteps": 50, "timestep_shift": 3.0} and t.steps == 49
    tf = A.plan_schedule("training-free", steps=8, solver="heun", shift=2.0)
    assert tf.kwargs == {"schedule": "teacher", "solver": "heun", "num_timesteps": 9, "timestep_shift": 2.0}
    c = A.plan_schedule("custom", custom_timesteps="1, 0.5")
    assert c.kwargs["timesteps"] == [1.0, 0.5, 0.0] and c.steps == 2 and not c.wants_distilled
    for name in A.SCHEDULE_CHOICES:
        A.plan_schedule(name, custom_timesteps="1, 0.5")


@pytest.mark.parametrize("kw", [dict(schedule="nope"), dict(schedule="training-free", steps=0),
                                dict(schedule="training-free", solver="rk4"), dict(schedule="teacher-50", shift=0),
                                dict(schedule="custom", custom_timesteps="")])
def test_plan_schedule_errors(kw):
    with pytest.raises(A.NodeInputError):
        A.plan_schedule(**kw)


def test_resolve_dtypes_never_computes_in_fp16_unasked():
    bf, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    assert A.resolve_dtypes("auto", True) == (bf, bf, None)          # Ampere+, CPU
    assert A.resolve_dtypes("auto", False) == (bf, f32, None)        # pre-Ampere: bf16 weights, fp32 math
    assert A.resolve_dtypes("bf16", False) == (bf, f32, None)
    assert A.resolve_dtypes("fp32", False) == (f32, f32, None)
    w, c, warning = A.resolve_dtypes("fp16", True)
    assert (w, c) == (f16, f16) and "overflow" in warning and "65504" in warning and "inf/NaN" in warning
    with pytest.raises(A.NodeInputError):
        A.resolve_dtypes("int8", True)


def test_checkpoint_listing():
    files = ["BAGEL-7B-MoT/llm_config.json", "BAGEL-7B-MoT/ema.safetensors", "sub/tiny/llm_config.json",
             "llm_config.json", "draft_heads/h.safetensors", "draft_heads/h.json"]
    assert A.checkpoint_dirs(files) == ["BAGEL-7B-MoT", "sub/tiny"]
    assert A.files_with_ext(files, under="draft_heads") == ["draft_heads/h.safetensors"]
    # the loader's list: folders and single files outside them; attachments and a folder's own files are not entries
    files += ["bagel-7b-mot.safetensors", "bagel-7b-mot.safetensors.comfyui-bagel.json", "RecA/model_bf16.safetensors",
              "DF11/llm_config.json", "DF11/vae/ae.safetensors", "distilled/d.safetensors", "x.sft", "notes.txt"]
    assert A.checkpoint_entries(files) == ["BAGEL-7B-MoT", "DF11", "RecA/model_bf16.safetensors",
                                           "bagel-7b-mot.safetensors", "sub/tiny", "x.sft"]


def test_step_progress_batches_and_checks_first():
    seen, order = [], []
    p = A.StepProgress(2, lambda v, t: (order.append("report"), seen.append((v, t))), lambda: order.append("check"))
    p.start_item(0)
    p.callback(3, 6)
    p.start_item(1)
    p.callback(6, 6)
    p.callback(9, 6)  # clamped
    assert seen == [(3, 12), (12, 12), (12, 12)] and order[:2] == ["check", "report"]

    def boom():
        raise KeyboardInterrupt
    q = A.StepProgress(1, lambda v, t: seen.append("never"), boom)
    with pytest.raises(KeyboardInterrupt):
        q.callback(1, 2)
    assert seen[-1] != "never"


def test_step_progress_with_a_preview_asks_for_the_estimate_and_checks_first():
    seen, order = [], []
    p = A.StepProgress(1, lambda v, t, img=None: (order.append("report"), seen.append((v, t, img))),
                       lambda: order.append("check"), preview=lambda x: (order.append("preview"), x.sum().item())[1])
    assert p.callback.wants_denoised is True
    assert getattr(A.StepProgress(1, print).callback, "wants_denoised", False) is False  # no preview: nothing asked
    p.callback(1, 2)  # a text decoding round: no estimate, no preview
    p.callback(2, 2, denoised=torch.ones(1, 16, 2, 2))
    assert seen == [(1, 2, None), (2, 2, 64.0)] and order == ["check", "report", "check", "preview", "report"]


def test_bagel_latent_in_a_formats_space():
    class Flux:
        scale_factor, shift_factor = A.FLUX_SCALE_FACTOR, A.FLUX_SHIFT_FACTOR

        def process_in(self, z):
            return (z - self.shift_factor) * self.scale_factor
    x = torch.randn(1, 16, 3, 5)
    assert A.bagel_latent_to_format(x, 0.3611, 0.1159, Flux()) is x  # BAGEL's normalisation is FLUX's
    raw = A.bagel_latent_to_comfy(x, 0.5, 0.25)["samples"]
    torch.testing.assert_close(A.bagel_latent_to_format(x, 0.5, 0.25, Flux()), Flux().process_in(raw))


def test_stats_helpers():
    s = {"new_tokens": 10, "rounds": 4, "seconds": 0.5, "drafter": "prompt_lookup", "ids": [1, 2], "x": float("nan")}
    line = A.format_stats(s, ("drafter", "new_tokens", "seconds", "missing"))
    assert line == "drafter: prompt_lookup · new_tokens: 10 · seconds: 0.5"
    j = A.jsonable_stats(dict(s, t=torch.tensor(2.0), n=np.int64(3)))
    assert "ids" not in j and j["x"] is None and j["t"] == 2.0 and j["n"] == 3
    m = A.merge_stats([s, dict(s, new_tokens=6, rounds=4, seconds=1.5)])
    assert m["images"] == 2 and m["new_tokens"] == 16 and m["tau"] == 2 and math.isclose(m["tokens_per_s"], 8)
    assert A.merge_stats([s]) == s
    assert A.join_answers(["a"]) == "a"
    assert A.join_answers(["a", "b"]) == "[image 1]\na\n\n[image 2]\nb"


def test_adapters_module_is_comfy_free():
    import re
    src = open(A.__file__, encoding="utf-8").read()
    assert not re.search(r"^\s*(import|from)\s+(comfy|comfy_api|folder_paths|hyperbagel_core)\b", src, re.M)


def test_plan_cache_widgets():
    assert A.plan_cache("off", 1, 1, 0) == {}
    assert A.plan_cache("taylorseer", 9, 9, 9) == {"cache": "taylorseer"}   # the official settings
    assert A.plan_cache("adaptive", 9, 9, 9) == {"cache": "adaptive"}
    assert A.plan_cache("custom", 4, 2, 3) == {"cache": {"first_enhance": 4, "fresh_threshold": 2, "max_order": 3}}
    with pytest.raises(A.NodeInputError, match="choose one of off, taylorseer, adaptive, custom"):
        A.plan_cache("teacache")
    with pytest.raises(A.NodeInputError, match="cache_interval must be an integer in 1..200"):
        A.plan_cache("custom", 5, 0, 6)
    merged = A.merge_stats([dict(nfe=8, passes=6, computed=10, predicted=6, cache="taylorseer")] * 2)
    assert (merged["computed"], merged["predicted"], merged["passes"], merged["cache"]) == (20, 12, 12, "taylorseer")
