import pytest
import torch

from hyperbagel_core.sampling.schedules import (
    FIXED_GRIDS,
    SCHEDULES,
    CustomSchedule,
    TeacherSchedule,
    get_schedule,
    shift_timesteps,
    teacher_timesteps,
    uniform_timesteps,
)


def _formula(n, s):
    return [s * (1 - k / (n - 1)) / (1 + (s - 1) * (1 - k / (n - 1))) for k in range(n)]


def test_teacher_golden_values():
    t = teacher_timesteps(50, 3.0)
    assert t.dtype == torch.float32 and t.shape == (50,)
    assert t[0] == 1.0 and t[-1] == 0.0
    expect_head = [1.0, 0.99310, 0.98601]
    expect_tail = [0.16364, 0.11321, 0.05882, 0.0]
    assert torch.allclose(t[:3], torch.tensor(expect_head), atol=1e-5)
    assert torch.allclose(t[-4:], torch.tensor(expect_tail), atol=1e-5)
    dt = t[:-1] - t[1:]
    assert abs(dt[0].item() - 0.0068966) < 1e-6
    assert abs(dt[48].item() - 0.0588235) < 1e-6


def test_teacher_grid_is_fp32_linspace_then_shift_bitwise():
    lin = torch.linspace(1, 0, 50, dtype=torch.float32)
    assert torch.equal(teacher_timesteps(50, 3.0), 3.0 * lin / (1 + 2.0 * lin))
    assert torch.equal(teacher_timesteps(24, 1.0), torch.linspace(1, 0, 24, dtype=torch.float32))


@pytest.mark.parametrize("n,s", [(50, 3.0), (24, 1.0), (7, 3.0), (7, 1.0), (2, 5.0), (13, 0.5)])
def test_teacher_matches_formula(n, s):
    sched = TeacherSchedule(n, s)
    ref = torch.tensor(_formula(n, s), dtype=torch.float64)
    assert sched.nfe == n - 1
    assert torch.allclose(sched.timesteps.double(), ref, atol=2e-7)
    assert torch.allclose(sched.step_sizes.double(), ref[:-1] - ref[1:], atol=4e-7)
    assert (sched.step_sizes > 0).all()
    assert torch.allclose(sched.step_sizes.sum(), torch.tensor(1.0))


def test_shift_fixes_endpoints_and_is_monotone():
    t = torch.linspace(0, 1, 101)
    for s in (0.5, 1.0, 3.0, 7.0):
        u = shift_timesteps(t, s)
        assert u[0] == 0 and u[-1] == 1 and (u[1:] > u[:-1]).all()
    assert torch.equal(shift_timesteps(t, 1.0), t)


def test_hyper_6nfe_uniform_reading():
    s = get_schedule("hyper-6nfe")
    assert s.nfe == 6
    ref = torch.tensor([1 - k / 6 for k in range(7)])
    assert torch.allclose(s.timesteps, ref, atol=1e-7)
    assert torch.allclose(s.step_sizes, torch.full((6,), 1 / 6), atol=1e-7)
    assert torch.equal(uniform_timesteps(6), s.timesteps)


def test_hyper_6nfe_shift3_reading():
    s = get_schedule("hyper-6nfe-shift3")
    assert s.nfe == 6
    ref = torch.tensor([1.0, 0.9375, 6 / 7, 0.75, 0.6, 0.375, 0.0])
    assert torch.allclose(s.timesteps, ref, atol=1e-6)
    dts = torch.tensor([0.0625, 0.9375 - 6 / 7, 6 / 7 - 0.75, 0.15, 0.225, 0.375])
    assert torch.allclose(s.step_sizes, dts, atol=1e-6)


def test_hyper_1nfe_is_single_unit_step():
    s = get_schedule("hyper-1nfe")
    assert s.nfe == 1 and s.timesteps.tolist() == [1.0, 0.0] and s.step_sizes.tolist() == [1.0]
    x1, v = torch.randn(8, 64), torch.randn(8, 64)
    assert torch.equal(s.step(v, x1), x1 - v)


def test_fixed_grids_ignore_teacher_options():
    for name in FIXED_GRIDS:
        a = get_schedule(name, num_timesteps=50, shift=3.0)
        b = get_schedule(name)
        assert torch.equal(a.timesteps, b.timesteps)


def test_custom_schedule_appends_zero_and_validates():
    s = get_schedule("custom", timesteps=[1.0, 0.75, 0.5, 0.25])
    assert s.timesteps.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and s.nfe == 4
    assert torch.allclose(s.step_sizes, torch.full((4,), 0.25))
    assert CustomSchedule([1.0, 0.5, 0.0]).nfe == 2
    shifted = CustomSchedule([1.0, 0.5], shift=3.0)
    assert torch.allclose(shifted.timesteps, torch.tensor([1.0, 0.75, 0.0]))
    for bad in ([0.5, 0.9], [1.2, 0.5], [1.0, 1.0, 0.5], [], [float("nan"), 0.1]):
        with pytest.raises(ValueError):
            get_schedule("custom", timesteps=bad)
    with pytest.raises(ValueError, match="custom"):
        get_schedule("custom")
    with pytest.raises(ValueError, match="fixed grid"):
        get_schedule("hyper-6nfe", timesteps=[1.0, 0.5])


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_schedule("turbo")
    for name in SCHEDULES:
        assert name in str(e.value)
    assert set(SCHEDULES) == {"teacher", "hyper-6nfe", "hyper-6nfe-shift3", "hyper-1nfe", "custom"}


def test_bad_teacher_arguments():
    for n, s in ((1, 3.0), (0, 3.0), (2.5, 3.0), (10, 0.0), (10, -1.0)):
        with pytest.raises(ValueError):
            teacher_timesteps(n, s)


def test_euler_step_matches_closed_form_and_reference_dtypes():
    # constant velocity: Euler is exact, x_0 = x_1 - v
    s = TeacherSchedule(10, 3.0)
    x = torch.randn(4, 64)
    v = torch.randn(4, 64)
    y = x.clone()
    for _ in range(s.nfe):
        y = s.step(v, y)
    assert s.step_index == 9
    assert torch.allclose(y, x - v, atol=1e-5)
    with pytest.raises(IndexError):
        s.step(v, y)
    s.set_timesteps()
    assert s.step_index == 0
    # bf16 velocity: the product is rounded to bf16, the subtraction happens in fp32
    vb = v.bfloat16()
    dt = s.timesteps[0] - s.timesteps[1]
    out = s.step(vb, x)
    assert out.dtype == torch.float32
    assert torch.equal(out, x - (vb * dt))
    assert torch.equal(s.step(vb, x, step_index=0), out) and s.step_index == 1
