"""The teacher's CFG branches in ONE forward (per-branch attention, batched linears) equal the sequential passes."""
import pytest
import torch
from PIL import Image

from hyperbagel_core.generation import CFGSettings, guided_velocity, solver_sample
from hyperbagel_core.pipeline import BagelPipeline
from hyperbagel_core.sampling.schedules import teacher_timesteps

IMG = Image.new("RGB", (1024, 16), (10, 200, 30))  # VAE-resizes to itself: 64x1 latents


@pytest.fixture(scope="module")
def pipes(tiny_ckpt):
    return {dt: BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=dt)
            for dt in (torch.float32, torch.bfloat16)}


def _contexts(pipe):
    return {"t2i": pipe.build_contexts(["a blue square on a red table"]),
            "edit": pipe.build_contexts([IMG, "make it red"], generator=torch.Generator().manual_seed(0))}


def count_forwards(model):
    calls = []
    lm = model.language_model
    real = lm.forward

    def spy(x, *a, **k):
        calls.append(x.shape[0])
        return real(x, *a, **k)

    lm.forward = spy
    return calls, lambda: delattr(lm, "forward")


def test_batched_rows_equal_individual_passes(pipes):
    pipe = pipes[torch.float32]
    m = pipe.model
    for task, c in _contexts(pipe).items():
        ctxs = [c.gen, c.cfg_text, c.cfg_img]
        assert len({x.kv_len for x in ctxs}) > 1  # branches really have different caches
        h, w = (1, 64) if task == "edit" else (2, 3)
        x = torch.randn(h * w, 64)
        extra = 0.1 * torch.randn(m.config.llm.hidden_size)
        for te in (None, extra):
            calls, undo = count_forwards(m)
            try:
                vb = m.velocity_batched(ctxs, x, 0.6, h, w, te)
            finally:
                undo()
            assert calls == [3]  # one forward with a batch of 3
            # tolerance, not bitwise: a batch of 3 (padded keys) and a batch of 1 take other kernel blockings
            for i, ctx in enumerate(ctxs):
                torch.testing.assert_close(vb[i], m.velocity(ctx, x, 0.6, h, w, te), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_guided_velocity_batched_equals_sequential(pipes, renorm):
    pipe = pipes[torch.float32]
    for task, c in _contexts(pipe).items():
        h, w = (1, 64) if task == "edit" else (2, 3)
        x = torch.randn(h * w, 64)
        cfg = CFGSettings(4.0, 1.5 if task == "edit" else 1.0, (0.0, 1.0), renorm, 0.0)
        args = (pipe.model, c.gen, c.cfg_text, c.cfg_img, x, 0.7, h, w, cfg)  # batch shapes differ: tolerance
        torch.testing.assert_close(guided_velocity(*args, batch_cfg=True), guided_velocity(*args, batch_cfg=False),
                                   atol=5e-5, rtol=1e-4)


def _runs(pipe):
    return (
        lambda **k: pipe.generate("a blue square", height=32, width=48, num_timesteps=4, cfg_interval=(0.0, 1.0),
                                  seed=2, **k),
        lambda **k: pipe.edit(IMG, "make it red", num_timesteps=3, cfg_img_scale=1.5, seed=2, **k),
        lambda **k: pipe.generate("a blue square", height=32, width=48, num_timesteps=5, solver="unipc", seed=2, **k),
    )


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_end_to_end_t2i_edit_and_solver_fp32(pipes):
    for fn in _runs(pipes[torch.float32]):
        seq, bat = fn(batch_cfg=False), fn(batch_cfg=True)  # batch shapes differ: last-bit noise, accumulated
        torch.testing.assert_close(bat.latent, seq.latent, atol=1e-4, rtol=1e-4)


def test_end_to_end_bf16_batched_is_as_accurate_as_sequential(pipes):
    """In bf16 the two orders round differently; batched must stay as close to fp32 as sequential is."""
    for ref_fn, fn in zip(_runs(pipes[torch.float32]), _runs(pipes[torch.bfloat16])):
        ref = ref_fn(batch_cfg=False).latent
        seq, bat = fn(batch_cfg=False).latent, fn(batch_cfg=True).latent
        assert rel(bat, seq) < 0.05
        assert rel(bat, ref) <= 1.25 * rel(seq, ref) + 1e-3, (rel(bat, ref), rel(seq, ref))


def test_batched_edit_is_one_forward_per_step(pipes):
    pipe = pipes[torch.float32]
    c = _contexts(pipe)["edit"]
    calls, undo = count_forwards(pipe.model)
    cfg = CFGSettings(4.0, 1.5, (0.4, 1.0), "text_channel", 0.0)
    ts = teacher_timesteps(6, 3.0)
    try:
        solver_sample(pipe.model, c.gen, c.cfg_text, c.cfg_img, 1, 64, torch.randn(64, 64), cfg, ts, "euler")
    finally:
        undo()
    active = [0.4 < t <= 1.0 for t in ts[:-1].tolist()]
    assert calls == [3 if a else 1 for a in active]
