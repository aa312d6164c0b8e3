import pytest
import torch

from hyperbagel_core.sampling.schedules import teacher_timesteps
from hyperbagel_core.sampling.solvers import SOLVERS, count_evaluations, evaluations_for, grid_for_budget, solve


def gaussian_problem(channels=64, seed=0):
    """Data x0 ~ N(m, diag(s^2)): the exact flow velocity and the exact ODE endpoint are known in closed form."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(channels, generator=g)
    s = torch.rand(channels, generator=g) * 0.5 + 0.5

    def velocity(x, t):
        a = 1 - t
        var = a * a * s * s + t * t
        d = x - a * m
        return t / var * d - (m + a * s * s / var * d)

    x1 = torch.randn(16, channels, generator=g)
    return velocity, x1, m + s * x1


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", list(SOLVERS))
def test_constant_velocity_is_integrated_exactly(method):
    v = torch.randn(4, 64)
    x1 = torch.randn(4, 64)
    grid, opts = grid_for_budget(method, 6, 3.0)
    out = solve(lambda x, t: v, x1, grid, method, **opts)
    assert torch.allclose(out, x1 - v, atol=1e-4)


@pytest.mark.parametrize("method", list(SOLVERS))
@pytest.mark.parametrize("budget", [2, 7, 8, 12])
def test_budget_is_spent_exactly(method, budget):
    f, calls = count_evaluations(lambda x, t: -x)
    grid, opts = grid_for_budget(method, budget, 3.0)
    steps = []
    solve(f, torch.randn(2, 8), grid, method, callback=lambda k, n: steps.append((k, n)), **opts)
    assert calls[0] == budget
    assert evaluations_for(method, grid.numel() - 1, **opts) == budget
    assert steps[-1][0] == steps[-1][1] == grid.numel() - 1


@pytest.mark.parametrize("budget", [8, 10, 12])
def test_higher_order_solvers_beat_euler_on_a_known_flow(budget):
    velocity, x1, exact = gaussian_problem()
    errs = {}
    for method in SOLVERS:
        grid, opts = grid_for_budget(method, budget, 3.0)
        errs[method] = rel_err(solve(velocity, x1, grid, method, **opts), exact)
    for method in ("heun", "unipc", "dpmpp_2m"):
        assert errs[method] < 0.9 * errs["euler"], errs


def test_multistep_network_sees_the_exact_grid_times():
    seen = []
    v = torch.randn(3, 8)

    def f(x, t):
        seen.append(t)
        return v + 0 * x

    grid = teacher_timesteps(5, 3.0)
    for method in ("unipc", "dpmpp_2m"):
        seen.clear()
        solve(f, torch.zeros(3, 8), grid, method)
        assert seen == [float(t) for t in grid[:-1]]


def test_euler_solver_matches_teacher_update():
    velocity, x1, _ = gaussian_problem(seed=1)
    grid = teacher_timesteps(11, 3.0)
    x = x1.clone()
    for k in range(10):
        x = x - velocity(x, float(grid[k])) * (grid[k] - grid[k + 1])
    assert torch.equal(solve(velocity, x1, grid, "euler"), x)


def test_bad_solver_arguments():
    with pytest.raises(ValueError, match="valid solvers"):
        solve(lambda x, t: x, torch.zeros(1, 4), teacher_timesteps(3, 1.0), "rk45")
    with pytest.raises(ValueError):
        solve(lambda x, t: x, torch.zeros(1, 4), torch.tensor([1.0, 0.5]), "euler")
    with pytest.raises(ValueError):
        grid_for_budget("heun", 1)
    with pytest.raises(ValueError):
        grid_for_budget("euler", 0)


# -- on a tiny BAGEL checkpoint: the teacher's guided ODE ------------------------------------------------------------
@pytest.fixture(scope="module")
def guided(tiny_ckpt):
    from hyperbagel_core.generation import CFGSettings, guided_velocity
    from hyperbagel_core.pipeline import BagelPipeline

    pipe = BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    ctxs = pipe.build_contexts(["a red circle and a blue square"])
    cfg = CFGSettings(4.0, 1.0, (0.0, 1.0), "global", 0.0)
    h = w = 4

    def velocity(x, t):
        return guided_velocity(pipe.model, ctxs.gen, ctxs.cfg_text, ctxs.cfg_img, x, t, h, w, cfg)

    noise = torch.randn(h * w, 64, generator=torch.Generator().manual_seed(0))
    reference = solve(velocity, noise, teacher_timesteps(201, 3.0), "euler")  # 200 Euler steps
    return velocity, noise, reference


@pytest.mark.parametrize("budget", [8, 10, 12])
def test_multistep_solvers_beat_euler_on_tiny_bagel(guided, budget):
    """At 8-12 guided evaluations UniPC / DPM-Solver++(2M) land measurably closer to the 200-step reference."""
    velocity, noise, reference = guided
    errs = {}
    for method in ("euler", "unipc", "dpmpp_2m"):
        grid, opts = grid_for_budget(method, budget, 3.0)
        f, calls = count_evaluations(velocity)
        errs[method] = rel_err(solve(f, noise, grid, method, **opts), reference)
        assert calls[0] == budget
    assert errs["unipc"] < 0.75 * errs["euler"], errs
    assert errs["dpmpp_2m"] < 0.75 * errs["euler"], errs
