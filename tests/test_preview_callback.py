"""The denoised estimate handed to step callbacks that ask for it (latent previews, ``sampling.preview``):
x0 = x_t - t v on every sampler path, unpacked by the pipeline, nothing computed for other callbacks."""
import pytest
import torch

from hyperbagel_core import image as im
from hyperbagel_core.distill import DistilledExpert
from hyperbagel_core.sampling import preview
from hyperbagel_core.sampling.solvers import SOLVERS, solve
from hyperbagel_core.sampling.schedules import teacher_timesteps

SIZE = dict(height=32, width=48)


class Recorder:
    """A preview callback: records (step, total, denoised or None)."""
    wants_denoised = True

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def __call__(self, step, total, denoised=None):
        self.calls.append((step, total, None if denoised is None else denoised.clone()))
        if step == self.stop_at:
            raise KeyboardInterrupt("stop")


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_every_solver_hands_over_x0_of_its_last_evaluation(method):
    """On a straight flow (constant v = eps - x0) every evaluation's x - t v is x0 itself; steps are all reported,
    also across a multistep restart."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 64, generator=g), torch.randn(6, 64, generator=g)
    rec = Recorder()
    ts = teacher_timesteps(6, 3.0)
    out = solve(lambda x, t: eps - x0, eps.clone(), ts, method, callback=rec, restart_at=[2])
    assert [c[:2] for c in rec.calls] == [(k, 5) for k in range(1, 6)]
    for _, _, d in rec.calls:
        torch.testing.assert_close(d, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_plain_callbacks_get_two_arguments_and_nothing_is_computed(monkeypatch):
    def boom(*a):
        raise AssertionError("x0 computed for a callback that did not ask")

    monkeypatch.setattr(preview, "denoised", boom)
    calls = []
    fn = lambda x, t: x  # noqa: E731
    wrapped, cb = preview.tap(fn, calls.append)
    assert wrapped is fn and cb == calls.append  # untouched: no wrapper, no reference kept
    for method in SOLVERS:
        solve(fn, torch.ones(2, 4), teacher_timesteps(4, 1.0), method, callback=lambda s, n: calls.append((s, n)))
    assert calls and all(len(c) == 2 for c in calls)
    assert preview.unpacking(calls.append, None) == calls.append
    assert not preview.wants_denoised(type("C", (), {"wants_denoised": "yes"})())  # only True asks


def _paths(pipe):
    """(name, kwargs, expert) for every sampler path of the pipeline."""
    yield "teacher euler", dict(schedule="teacher", num_timesteps=5), None
    for solver in ("heun", "unipc", "dpmpp_2m"):
        # cfg_interval starts mid-grid: the multistep solvers restart there
        yield f"training-free {solver}", dict(schedule="teacher", num_timesteps=5, solver=solver,
                                              cfg_interval=(0.0, 0.6)), None
    yield "distilled", dict(schedule="hyper-6nfe"), DistilledExpert.from_model(pipe.model, schedule="hyper-6nfe")


def test_every_pipeline_path_previews_each_step_without_changing_the_result(tiny_pipe):
    pipe = tiny_pipe
    for name, kw, expert in _paths(pipe):
        pipe.distilled_expert = expert
        try:
            plain = pipe.generate("a red circle", seed=1, callback=lambda s, n: None, **SIZE, **kw)
            rec = Recorder()
            res = pipe.generate("a red circle", seed=1, callback=rec, **SIZE, **kw)
        finally:
            pipe.distilled_expert = None
        steps = res.stats["steps"]
        assert [c[:2] for c in rec.calls] == [(k, steps) for k in range(1, steps + 1)], name
        assert torch.equal(res.latent, plain.latent), name  # the tap reads, never changes, the sampler's state
        for _, _, d in rec.calls:
            assert d.shape == res.latent.shape == (1, 16, 4, 6) and d.dtype == torch.float32, name
        # the last step ends at t = 0: for Euler its x0 estimate IS the result
        if name in ("teacher euler", "distilled"):
            torch.testing.assert_close(rec.calls[-1][2], res.latent, atol=1e-5, rtol=0)
        else:
            assert (rec.calls[-1][2] - res.latent).abs().mean() < 0.5 * res.latent.abs().mean(), name


def test_teacher_x0_is_x_minus_t_v_of_the_step(tiny_pipe):
    """The teacher's Euler trace: the reported estimate of step k is x_k - t_k v_k (spec 9's variables)."""
    rec, trace = Recorder(), {}
    res = tiny_pipe.generate("a red circle", seed=2, num_timesteps=4, callback=rec, trace=trace, **SIZE)
    assert len(rec.calls) == 3
    for k, (_, _, d) in enumerate(rec.calls):
        tokens = trace["x_steps"][k] - float(trace["timesteps"][k]) * trace["v_steps"][k]
        torch.testing.assert_close(d, im.unpack_latent(tokens, 2, 3, 16, 2)[None], atol=1e-6, rtol=0)
    assert d.shape == res.latent.shape


def test_thinking_rounds_call_the_preview_callback_with_two_arguments_and_it_may_interrupt(tiny_pipe):
    rec = Recorder()
    tiny_pipe.generate("a red circle", seed=0, num_timesteps=3, think=True, max_think_tokens=3, callback=rec, **SIZE)
    decode = [c for c in rec.calls if c[2] is None]
    assert decode and all(c[1] == 3 for c in decode)
    assert [c[:2] for c in rec.calls if c[2] is not None] == [(1, 2), (2, 2)]
    with pytest.raises(KeyboardInterrupt):
        tiny_pipe.generate("a red circle", seed=0, num_timesteps=5, callback=Recorder(stop_at=2), **SIZE)
    again = Recorder()
    tiny_pipe.generate("a red circle", seed=0, num_timesteps=3, callback=again, **SIZE)  # still usable
    assert len(again.calls) == 2 and again.calls[-1][2].shape == (1, 16, 4, 6)
