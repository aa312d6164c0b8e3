"""TaylorSeer (issue 20): the official schedule and arithmetic, per-branch counters in batched CFG, every sampler
path, and no state between calls (the official code leaves its flags on the decoder layers)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from hyperbagel_core.errors import InputError
from hyperbagel_core.generation import CFGSettings, teacher_sample
from hyperbagel_core.memory import estimate_run_memory
from hyperbagel_core.pipeline import BagelPipeline
from hyperbagel_core.sampling.taylorseer import BranchCache, TaylorSeerSettings, TaylorSeerState, resolve_cache

IMG = Image.new("RGB", (1024, 16), (10, 200, 30))  # VAE-resizes to itself: 64 x 1 latents, a cheap edit
SMALL = dict(height=32, width=48, num_timesteps=12, seed=3)


def full_steps(n: int, settings=TaylorSeerSettings()) -> list[int]:
    c, out = BranchCache(settings), []
    for k in range(n):
        if c.begin():
            out.append(k)
        c.end()
    return out


def test_official_schedule():
    # spec 12 [verified]: full at 0,1,2,3,4,7,10 of 11 evaluations; 19 of 49 (main branch); 17 of 41
    assert full_steps(11) == [0, 1, 2, 3, 4, 7, 10]
    assert len(full_steps(49)) == 19 and len(full_steps(41)) == 17
    assert full_steps(8, TaylorSeerSettings(2, 1, 6)) == list(range(8))          # interval 1: all full
    assert full_steps(9, TaylorSeerSettings(1, 4, 2)) == [0, 4, 8]


def test_factors_orders_and_prediction():
    """One more order per full step after warm-up, capped at max_order; exact on a feature linear in the step;
    the derivatives use the distance between the last two full steps."""
    s = TaylorSeerSettings(5, 3, 2)
    c = BranchCache(s)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    orders = []
    for k in range(14):
        if c.begin():
            c.store(a + b * k)
            orders.append(len(c.factors))
        else:
            torch.testing.assert_close(c.predict(), a + b * k)
        c.end()
    assert orders == [1, 1, 1, 1, 2, 3, 3, 3]          # full at 0-4, 7, 10, 13; derivatives from step 4 on
    torch.testing.assert_close(c.factors[1], b)
    assert c.factors[2].abs().max() < 1e-5
    c0 = BranchCache(TaylorSeerSettings(2, 3, 0))      # order 0: the last full output is reused
    for k in range(3):
        if c0.begin():
            c0.store(torch.full((2,), float(k)))
        else:
            assert torch.equal(c0.predict(), torch.full((2,), 1.0))
        c0.end()


def test_settings_and_bad_values():
    assert resolve_cache(None) is None and resolve_cache("off") is None
    assert resolve_cache("taylorseer") == TaylorSeerSettings(5, 3, 6)
    assert resolve_cache({"max_order": 2}) == TaylorSeerSettings(5, 3, 2)
    assert resolve_cache("adaptive") == TaylorSeerSettings(change_threshold=0.1)
    assert resolve_cache("adaptive").label == "adaptive" and resolve_cache("taylorseer").label == "taylorseer"
    for bad in ("teacache", {"order": 2}, {"fresh_threshold": 0}, {"first_enhance": 2.5}, 3,
                {"change_threshold": -1.0}, {"change_threshold": float("nan")}):
        with pytest.raises(ValueError):
            resolve_cache(bad)
    from hyperbagel_core.__main__ import _cache_arg, build_parser
    cli = lambda *a: _cache_arg(build_parser().parse_args(["generate", "x", *a]))  # noqa: E731
    assert cli() is None and cli("--cache", "taylorseer") == "taylorseer"
    assert cli("--cache-order", "2") == {"max_order": 2}
    assert cli("--cache", "adaptive", "--cache-warmup", "3") == {"first_enhance": 3, "change_threshold": 0.1}


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)


def test_all_full_equals_no_cache(pipe):
    """With one full step every step the cache path (decoder stack, then final norm and llm2vae on the latent rows)
    gives the plain path's velocities, batched and sequential."""
    c = pipe.build_contexts(["a blue square"])
    noise = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    cfg = CFGSettings(4.0, 1.0, (0.4, 1.0), "global", 0.0)
    plain = teacher_sample(pipe.model, c.gen, c.cfg_text, c.cfg_img, 2, 3, noise, cfg, 10)
    for batch in (True, False):
        st = TaylorSeerState(TaylorSeerSettings(1, 1, 6))
        x = teacher_sample(pipe.model, c.gen, c.cfg_text, c.cfg_img, 2, 3, noise, cfg, 10, batch_cfg=batch, cache=st)
        torch.testing.assert_close(x, plain, atol=1e-5, rtol=1e-5)
        assert st.stats()["predicted"] == 0


@pytest.mark.parametrize("interval", [(0.0, 0.6), (0.0, 1.0)])
def test_batched_branches_with_their_own_counters(pipe, interval):
    """Outside the interval an uncond branch is not run and its counter stands still: with guidance starting late
    the branches of one batched forward are at different steps (some rows computed, others predicted). Batched
    equals sequential, and each branch's counts follow its own evaluations."""
    c = pipe.build_contexts([IMG, "make it red"], generator=torch.Generator().manual_seed(0))
    noise = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    cfg = CFGSettings(4.0, 2.0, interval, "text_channel", 0.0)
    out, states = {}, {}
    for batch in (True, False):
        st = states[batch] = TaylorSeerState(TaylorSeerSettings())
        out[batch] = teacher_sample(pipe.model, c.gen, c.cfg_text, c.cfg_img, 1, 64, noise, cfg, 16,
                                    batch_cfg=batch, cache=st)
    torch.testing.assert_close(out[True], out[False], atol=2e-5, rtol=1e-5)
    from hyperbagel_core.sampling.schedules import teacher_timesteps
    guided = sum(interval[0] < t <= interval[1] for t in teacher_timesteps(16, 3.0)[:-1].tolist())
    br = states[True].branches
    assert br["main"].step == 15 and br["cfg_text"].step == br["cfg_img"].step == guided
    for b in br.values():
        assert b.computed == len(full_steps(b.step)) and b.computed + b.predicted == b.step
    if interval[1] < 1:   # main runs alone first: later batches mix a full row with predicted ones
        assert states[True].passes > len(full_steps(15))


def test_every_solver_takes_the_cache(pipe):
    """A step is one evaluation of a branch: Heun's predictor and corrector are two. Guidance on throughout,
    so both branches run every evaluation and each follows the official schedule over them."""
    for solver in ("heun", "unipc", "dpmpp_2m"):
        s = pipe.generate("a red fox", solver=solver, cache="taylorseer", **dict(SMALL, cfg_interval=(0.0, 1.0))).stats
        n = s["evaluations"]
        assert n == (21 if solver == "heun" else 11)
        assert (s["computed"], s["predicted"], s["passes"]) == (2 * len(full_steps(n)), 2 * (n - len(full_steps(n))),
                                                                len(full_steps(n)))


def test_custom_grid_edit_and_distilled_expert(pipe, tmp_path):
    from hyperbagel_core.distill import DistilledExpert
    res = pipe.edit(IMG, "make it red", schedule="custom", timesteps=[1.0, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1],
                    timestep_shift=1.0, cache={"first_enhance": 2, "fresh_threshold": 2, "max_order": 1})
    assert res.stats["cache"].startswith("taylorseer(") and res.stats["predicted"] == 3 * 3
    DistilledExpert.from_model(pipe.model).save(tmp_path / "e.safetensors")
    pipe.load_distilled_expert(tmp_path / "e.safetensors")
    try:
        d = pipe.generate("a red fox", height=32, width=32, schedule="hyper-6nfe", cache="taylorseer")
    finally:
        pipe.unload_distilled_expert()
    assert (d.stats["computed"], d.stats["predicted"], d.stats["passes"]) == (5, 1, 5)


def test_adaptive_decides_per_branch_from_the_input_change(pipe):
    """Beyond the official: after the warm-up a branch computes when the input's change since its last full
    step reaches the threshold (a huge one: only the warm-up; a tiny one: every step); CFG stays on (both
    branches are evaluated, each from its own factors)."""
    kw = dict(SMALL, cfg_interval=(0.0, 1.0))
    never = pipe.generate("a fox", cache={"change_threshold": 100.0}, **kw).stats
    always = pipe.generate("a fox", cache={"change_threshold": 1e-6}, **kw).stats
    assert (never["computed"], never["predicted"]) == (2 * 5, 2 * 6)
    assert (always["computed"], always["predicted"]) == (2 * 11, 0)
    st = TaylorSeerState(TaylorSeerSettings(first_enhance=1, change_threshold=0.5))
    a, b = st.branch("main"), st.branch("cfg_text")
    full = []
    for k in range(5):                         # the input grows by 20 % per evaluation; cfg_text sits out after 0
        st.observe(torch.full((3, 2), 1.2 ** k))
        full.append(a.begin())
        if k == 0:
            assert b.begin()
            b.end()
        a.end()
    assert full == [True, False, False, True, False]
    assert a.change == pytest.approx(0.2) and b.change == pytest.approx(0.8)
    assert b.begin() and not a.begin()         # the branch that sat out saw the input move: it computes


def _outputs(p: BagelPipeline) -> dict:
    return dict(edit=p.edit(IMG, "make it red", num_timesteps=8, seed=1).latent,
                gen=p.generate("a cat", **dict(SMALL, num_timesteps=8)).latent,
                answer=p.answer(IMG, "what is it?", max_new_tokens=6).token_ids)


def _module_state(model) -> dict:
    return {name: sorted(vars(m)) for name, m in model.named_modules()}


def test_no_state_between_calls_and_after_an_interrupt(tiny_ckpt):
    """Fails on the official behaviour (its flags stay on the layers and the next prefill or generation runs the
    TaylorSeer path on stale state): after a TaylorSeer edit, and after an interrupted TaylorSeer run, plain
    edit / generate / answer equal a fresh pipeline's outputs exactly, and no module gained an attribute."""
    fresh = _outputs(BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32))
    p = BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    attrs = _module_state(p.modules)
    ts = p.edit(IMG, "make it red", num_timesteps=8, seed=1, cache="taylorseer")
    assert ts.stats["predicted"] > 0 and not torch.equal(ts.latent, fresh["edit"])

    def stop(step, total):
        if step == 6:     # after a predicted step (5), before the next full one
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        p.generate("a cat", cache="taylorseer", callback=stop, **SMALL)
    after = _outputs(p)
    assert torch.equal(after["edit"], fresh["edit"]) and torch.equal(after["gen"], fresh["gen"])
    assert after["answer"] == fresh["answer"]
    assert _module_state(p.modules) == attrs
    again = p.edit(IMG, "make it red", num_timesteps=8, seed=1, cache="taylorseer")
    assert torch.equal(again.latent, ts.latent)


def test_memory_estimate_counts_the_cache(pipe):
    cfg = pipe.config
    off = estimate_run_memory(cfg, "generate", height=64, width=1024)
    on = estimate_run_memory(cfg, "generate", height=64, width=1024, cache=TaylorSeerSettings())
    tensor = 4 * 64 * cfg.llm.hidden_size * 2      # latent tokens x hidden in bf16 (the estimate's default)
    assert on.feature_cache == tensor * (7 * 3 + 2) and on.total == off.total + on.feature_cache
    res = pipe.edit(IMG, "make it red", num_timesteps=16, cache="taylorseer")
    assert 0 < res.stats["cache_peak_bytes"] <= 64 * cfg.llm.hidden_size * 4 * 7 * 3   # fp32 pipeline
    assert pipe.memory_required("edit", height=16, width=1024, cache="taylorseer") > \
        pipe.memory_required("edit", height=16, width=1024)
    with pytest.raises(InputError, match="cache"):
        pipe.generate("a cat", cache="fast", **SMALL)
