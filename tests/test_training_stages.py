"""The few-step stages on a tiny checkpoint (CPU): each CLI trains, resumes, writes a file that loads through
BagelPipeline; 2 gloo processes follow the 1-process loss curve (DDP, and FSDP2 with --shard full, which
also resumes and holds half the masters per rank); activation checkpointing changes no gradient."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from hyperbagel_core.pipeline import BagelPipeline
from hyperbagel_core.training import adversarial, dmdo, tscd
from hyperbagel_core.training.distributed import Dist, init_distributed, make_optimizer
from hyperbagel_core.training.evaluation import latent_mse
from hyperbagel_core.training.loop import accumulate, lr_at, optimizer_step, step_rng
from hyperbagel_core.training.student import (EMA, Student, _Cast, frozen, student_pass, student_sample, train_keys,
                                              velocity_with_grad)
from hyperbagel_core.training.teacher import HELD_OUT_DOMAIN, REFERENCE_DOMAIN, Teacher, index_of

PROMPTS = ["a red circle", "a blue square on a table", "a cat sits on the mat", "a house under the stars"]
HELD = ["a green bird in the park"]


def _args(ckpt, out, *extra):
    a = ["--model", str(ckpt), "--out", str(out), "--size", "64", "64", "--threads", "1", "--eval-noises", "1"]
    for p in PROMPTS:
        a += ["--prompt", p]
    for p in HELD:
        a += ["--eval-prompt", p]
    return a + list(extra)


@pytest.fixture(scope="module")
def six(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("tscd") / "six.safetensors"
    rep = tscd.main(_args(tiny_ckpt, out, "--steps", "16", "--pool", "4", "--lr", "1e-3", "--batch", "2",
                          "--eval-every", "16", "--segments", "12,6"))
    return out, rep


def test_tscd_trains_a_6nfe_expert_that_loads(six, tiny_ckpt):
    out, rep = six
    m = rep["history"]["metric"]
    assert m[-1][1] < m[0][1], m                       # held-out error vs the 50-step teacher falls
    assert set(rep["training_free"]) >= {"unipc-6pass@shift1", "euler-6pass@shift3"}
    assert set(rep["training_free_evaluations"]) >= {"unipc-6eval@shift1", "heun-6eval@shift1"}
    pipe = BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    pipe.load_distilled_expert(out)
    cfg = pipe.distilled_expert.config
    assert cfg.schedule == "hyper-6nfe" and cfg.nfe == 6 and "tscd" in cfg.stages
    res = pipe.generate("a red circle", height=64, width=64, schedule="hyper-6nfe", cfg_text_scale=4.0)
    assert res.stats["distilled"] and res.stats["steps"] == 6


def test_resume_continues_the_same_curve(tiny_ckpt, tmp_path):
    common = ("--steps", "6", "--pool", "3", "--lr", "1e-3", "--eval-every", "0", "--segments", "6",
              "--save-every", "2")
    full = tscd.main(_args(tiny_ckpt, tmp_path / "a.safetensors", *common))["history"]["loss"]
    tscd.main(_args(tiny_ckpt, tmp_path / "b.safetensors", *common, "--stop-after", "3"))
    assert not (tmp_path / "b.safetensors").exists() and (tmp_path / "b.safetensors.state" / "state.json").exists()
    resumed = tscd.main(_args(tiny_ckpt, tmp_path / "b.safetensors", *common))["history"]["loss"]
    assert len(resumed) == 6
    assert torch.allclose(torch.tensor(resumed), torch.tensor(full), rtol=1e-5, atol=1e-8), (resumed, full)


def _tensors(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def test_ema_resumes_bit_for_bit_is_what_is_exported_and_decay_0_is_the_plain_run(tiny_ckpt, tmp_path):
    common = ("--steps", "6", "--pool", "3", "--lr", "1e-3", "--eval-every", "0", "--segments", "6",
              "--save-every", "2")
    tscd.main(_args(tiny_ckpt, tmp_path / "ema.safetensors", *common, "--ema", "0.5"))
    tscd.main(_args(tiny_ckpt, tmp_path / "cut.safetensors", *common, "--ema", "0.5", "--stop-after", "3"))
    with pytest.raises(SystemExit, match="--ema"):   # resuming without the EMA would silently drop it
        tscd.main(_args(tiny_ckpt, tmp_path / "cut.safetensors", *common))
    with pytest.raises(SystemExit, match="--ema 0.5"):
        tscd.main(_args(tiny_ckpt, tmp_path / "cut.safetensors", *common, "--ema", "0.9"))
    tscd.main(_args(tiny_ckpt, tmp_path / "cut.safetensors", *common, "--ema", "0.5"))
    state, cut = (_tensors(tmp_path / f"{n}.safetensors.state" / "tensors.safetensors") for n in ("ema", "cut"))
    assert state.keys() == cut.keys() and any(k.startswith("module.ema.") for k in state)
    assert all(torch.equal(state[k], cut[k]) for k in state)       # killed + resumed: the same state, bit for bit
    # the written expert holds the EMA weights, not the last masters
    out = _tensors(tmp_path / "ema.safetensors")
    shadow = {k[len("module.ema."):].replace(":", "."): v for k, v in state.items() if k.startswith("module.ema.")}
    masters = {k[len("module.student."):]: v for k, v in state.items() if k.startswith("module.student.")}
    def file_key(n):   # master.layer0.p.language_model__model__... -> gen.language_model.model...
        return n if n.startswith("guidance.") else "gen." + n.split(".p.", 1)[1].replace("__", ".")
    names = {n: file_key(n) for n in shadow if n != "decay"}
    assert set(names.values()) == set(out) and len(out) > 10
    assert all(torch.equal(out[k], shadow[n]) for n, k in names.items())
    assert not all(torch.equal(out[k], masters[n]) for n, k in names.items())
    assert torch.equal(_tensors(tmp_path / "cut.safetensors")[next(iter(names.values()))],
                       out[next(iter(names.values()))])
    # decay 0: the EMA is the last masters, so the file is the plain run's file
    tscd.main(_args(tiny_ckpt, tmp_path / "plain.safetensors", *common))
    tscd.main(_args(tiny_ckpt, tmp_path / "zero.safetensors", *common, "--ema", "0"))
    plain, zero = _tensors(tmp_path / "plain.safetensors"), _tensors(tmp_path / "zero.safetensors")
    assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain)


def test_ema_applied_swaps_in_and_back_exactly():
    lin = torch.nn.Linear(3, 2)
    ema = EMA(lin, 0.9)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    trained = {k: v.clone() for k, v in lin.state_dict().items()}
    assert torch.allclose(ema.pairs(lin)[0][1], before["weight"] + 0.1)
    with ema.applied(lin):
        assert torch.allclose(lin.weight, before["weight"] + 0.1) and torch.allclose(lin.bias, before["bias"])
    assert all(torch.equal(lin.state_dict()[k], trained[k]) for k in trained)
    with pytest.raises(ValueError, match="decay"):
        EMA(lin, 1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, argv, out_json):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rep = tscd.main(argv + ["--distributed"])
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(rep["history"]["loss"], f)
    import torch.distributed as dist
    dist.destroy_process_group()


# with an EMA of the masters: equal on every DDP rank, one shard per rank under FSDP2, gathered for the file
DIST = ("--steps", "5", "--pool", "4", "--lr", "1e-3", "--batch", "2", "--eval-every", "0", "--segments", "6",
        "--ema", "0.7")


@pytest.fixture(scope="module")
def one_process_curve(tiny_ckpt, tmp_path_factory):
    """The 1-process loss curve and written expert (the EMA weights)."""
    out = tmp_path_factory.mktemp("one") / "one.safetensors"
    return tscd.main(_args(tiny_ckpt, out, *DIST))["history"]["loss"], _tensors(out)


def _close_files(got, want, rtol):
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=rtol, atol=1e-7), k


def test_two_gloo_processes_follow_the_one_process_curve(tiny_ckpt, tmp_path, one_process_curve):
    one, one_file = one_process_curve
    out_json = tmp_path / "two.json"
    mp.start_processes(_rank, args=(2, _free_port(), _args(tiny_ckpt, tmp_path / "two.safetensors", *DIST),
                                    str(out_json)), nprocs=2, join=True, start_method="spawn")
    two = json.loads(out_json.read_text())
    # same global batch, gradients averaged by DDP: equal up to float summation order
    assert torch.allclose(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-7), (two, one)
    _close_files(_tensors(tmp_path / "two.safetensors"), one_file, 1e-4)
    BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32).load_distilled_expert(
        tmp_path / "two.safetensors")


def _sharded_rank(rank, world, port, ckpt, tmp, out_json):
    """Under FSDP2 (``--shard full``): a whole run, a run stopped after 2 steps, that run resumed; rank 0 also
    copies the stopped state for a 1-process resume (the file does not depend on how it was sharded)."""
    import shutil
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    flags = [*DIST, "--distributed", "--shard", "full", "--checkpointing"]   # layers' casts made just in time
    full = tscd.main(_args(ckpt, f"{tmp}/full.safetensors", *flags))
    tscd.main(_args(ckpt, f"{tmp}/cut.safetensors", *flags, "--stop-after", "2"))
    if rank == 0:
        shutil.copytree(f"{tmp}/cut.safetensors.state", f"{tmp}/cut1.safetensors.state")
    dist.barrier()
    resumed = tscd.main(_args(ckpt, f"{tmp}/cut.safetensors", *flags))
    gathered = _gathered_units_in_backward(ckpt)
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump({"full": full["history"]["loss"], "shards": full["shards"],
                       "resumed": resumed["history"]["loss"], "gathered": gathered}, f)
    dist.destroy_process_group()


def _gathered_units_in_backward(ckpt) -> dict:
    """Under ``--shard full --checkpointing``: how many of the student's FSDP2 units are gathered (unsharded)
    whenever backward reaches one of its casts (FSDP2's private per-unit state, torch 2.13; update here if
    torch renames it), and how many cast tensors are alive whenever forward makes one."""
    import random
    import weakref
    pipe = BagelPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    model, dist_ = pipe.model, init_distributed(True, "full")
    st = Student.fresh(model, train_keys(model, "all"), nfe=6, stages=())
    job = tscd.TSCD(pipe, Teacher(pipe, (64, 64)), st, ["a red circle"], segments=(6,), pool=1)
    dist_.wrap(st)
    seen, alive, casts, forward, backward = [], [], weakref.WeakSet(), _Cast.forward, _Cast.backward

    def counting_backward(ctx, grad):
        seen.append(sum(u._get_fsdp_state()._fsdp_param_group.is_unsharded for u in st.shard_units()))
        return backward(ctx, grad)

    def counting_forward(ctx, anchor, master, dtype):
        out = forward(ctx, anchor, master, dtype)
        casts.add(out)
        alive.append(len(casts))
        return out
    _Cast.backward, _Cast.forward = staticmethod(counting_backward), staticmethod(counting_forward)
    try:
        with frozen(model):
            accumulate(st, model, [job.loss_fn(job.draw(random.Random(0), 0))], dist_, dist_.world, True)
    finally:
        _Cast.backward, _Cast.forward = staticmethod(backward), staticmethod(forward)
    return {"gathered": seen, "alive": alive, "unit_sizes": {n: len(u.keys) for n, u in st.master.items()}}


def test_fsdp2_full_sharding_follows_the_curve_holds_half_and_resumes(tiny_ckpt, tmp_path, one_process_curve):
    out_json = tmp_path / "sharded.json"
    mp.start_processes(_sharded_rank, args=(2, _free_port(), str(tiny_ckpt), str(tmp_path), str(out_json)),
                       nprocs=2, join=True, start_method="spawn")
    got = json.loads(out_json.read_text())
    one, one_file = torch.tensor(one_process_curve[0]), one_process_curve[1]
    # same global batch, gradients reduce-scattered as a mean; the clipping norm sums shards in another order
    assert torch.allclose(torch.tensor(got["full"]), one, rtol=1e-4, atol=1e-7), (got["full"], one)
    assert torch.allclose(torch.tensor(got["resumed"]), torch.tensor(got["full"]), rtol=1e-5, atol=1e-8)
    # a sharded run's state resumes in one process too: the same file format
    single = tscd.main(_args(tiny_ckpt, tmp_path / "cut1.safetensors", *DIST))["history"]["loss"]
    assert torch.allclose(torch.tensor(single), one, rtol=1e-4, atol=1e-7), (single, one)
    ranks, total = got["shards"]["ranks"], got["shards"]["master_bytes_total"]
    assert sum(r["master_bytes"] for r in ranks) == total
    assert all(0.45 * total <= r["master_bytes"] <= 0.55 * total for r in ranks), (ranks, total)
    assert all(r["optimizer_bytes"] == 2 * r["master_bytes"] for r in ranks), ranks   # AdamW m, v: sharded
    # a layer's unit is re-sharded once backward has passed it (without _Cast's anchor all 3 stay gathered)
    g = got["gathered"]
    assert g["gathered"] and max(g["gathered"]) == 1, g
    # and forward holds one layer's casts at a time (+ the rest's), not all layers' (the recomputation remakes them)
    sizes = g["unit_sizes"]
    layer = max(n for u, n in sizes.items() if u != "rest")
    assert len(sizes) >= 3 and max(g["alive"]) <= sizes.get("rest", 0) + layer, g
    _close_files(_tensors(tmp_path / "full.safetensors"), one_file, 1e-4)    # the EMA, gathered from the shards
    full, cut = _tensors(tmp_path / "full.safetensors"), _tensors(tmp_path / "cut.safetensors")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    for name in ("full", "cut"):
        BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32).load_distilled_expert(
            tmp_path / f"{name}.safetensors")


def test_shard_flags_need_processes_and_an_even_batch():
    with pytest.raises(SystemExit, match="--distributed"):
        init_distributed(False, "full")
    with pytest.raises(ValueError, match="--batch 4"):
        Dist(0, 2, True, "full").share([1, 2, 3, 4, 5])
    assert Dist(1, 2, True, "full").share([1, 2, 3, 4]) == [2, 4]


def test_evaluation_noise_domains_are_not_training_seeds():
    steps = torch.arange(1_000_000, dtype=torch.int64)
    for seed in range(4):
        drawn = (seed * 1_000_003 + steps * 7919 + 17) % 2 ** 62 % 2 ** 32   # step_rng's seed, as torch keeps it
        assert int(step_rng(seed, 12345)[1].initial_seed()) % 2 ** 32 == int(drawn[12345])
        domains = torch.tensor([(seed + d) % 2 ** 32 for d in (HELD_OUT_DOMAIN, REFERENCE_DOMAIN)])
        assert not torch.isin(drawn, domains).any()


def test_dmdo_on_top_of_tscd(six, tiny_ckpt, tmp_path):
    out = tmp_path / "dmdo.safetensors"
    rep = dmdo.main(_args(tiny_ckpt, out, "--init", str(six[0]), "--steps", "3", "--fake-warmup", "1",
                          "--fake-updates", "1", "--lr", "1e-5", "--eval-every", "3", "--fake-init", "base"))
    assert len(rep["evals"]) == 2 and all(e["frechet"] >= 0 and e["frechet_paired"] >= 0 for e in rep["evals"])
    assert rep["floor"] > 0            # the teacher against itself on disjoint noises: an unpaired distance
    pipe = BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    pipe.load_distilled_expert(out)
    assert pipe.distilled_expert.config.stages[-2:] == ("tscd", "dmdo")


REWARD = '''
import torch
def brightness(images, prompts):
    assert images.dim() == 4 and images.shape[1] == 3 and len(prompts) == images.shape[0]
    assert images.requires_grad
    return images.mean(dim=(1, 2, 3)) * 10
'''


def test_one_nfe_stage_with_reward(six, tiny_ckpt, tmp_path):
    rfile = tmp_path / "my_reward.py"
    rfile.write_text(REWARD)
    out = tmp_path / "one.safetensors"
    rep = adversarial.main(_args(tiny_ckpt, out, "--init", str(six[0]), "--steps", "3", "--eval-every", "3",
                                 "--lr", "1e-4", "--reward", f"{rfile}:brightness"))
    assert {"euler-1eval@shift1", "euler-2eval@shift1"} <= set(rep["euler"])
    pipe = BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    pipe.load_distilled_expert(out)
    cfg = pipe.distilled_expert.config
    assert cfg.schedule == "hyper-1nfe" and cfg.nfe == 1 and cfg.stages[-2:] == ("adp", "refl")
    assert pipe.generate("a red circle", height=64, width=64, schedule="hyper-1nfe").stats["steps"] == 1
    with pytest.raises(SystemExit, match="module:function"):
        adversarial.load_reward("no_colon_here")


def test_activation_checkpointing_and_fp32_masters(tiny_pipe):
    model = tiny_pipe.model
    teacher = Teacher(tiny_pipe, (64, 64))
    it = teacher.item("a red circle", torch.Generator().manual_seed(0), 3.0)
    grads = []
    for ck in (False, True):
        st = Student.fresh(model, train_keys(model, "all"))
        with frozen(model), student_pass(st, model, it.s_txt, checkpointing=ck) as extra:
            v = velocity_with_grad(model, it.ctxs.gen, it.noise, 0.7, it.h, it.w, extra)
            v.square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in st.named_parameters() if p.grad is not None})
        assert all(p.dtype == torch.float32 for p in st.parameters())
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5), k
    # installs nest and restore the very same Parameter objects
    before = dict(model.named_parameters())
    assert all(before[k] is p for k, p in model.named_parameters())


def test_small_updates_survive_in_fp32_masters():
    """The reason for fp32 masters: a bf16 weight does not move by lr * update when that is below half an ulp."""
    w = torch.ones(4, dtype=torch.bfloat16)
    assert torch.equal(w + 1e-4, w)
    master = torch.ones(4)
    for _ in range(100):
        master += 1e-4
    assert master.to(torch.bfloat16)[0] > 1


def test_tscd_fits_one_item_to_the_reference(tiny_pipe):
    """Sanity of target and optimisation: the student's segment-end targets are the 50-step teacher's own
    final latent, and on ONE prompt + noise its 6-NFE sample converges to that latent."""
    import random
    model = tiny_pipe.model
    teacher = Teacher(tiny_pipe, (64, 64))
    st = Student.fresh(model, train_keys(model, "all"), nfe=6, stages=())
    job = tscd.TSCD(tiny_pipe, teacher, st, ["a red circle"], segments=(6,), pool=1, scale_range=(1.0, 1.0))
    it, end = job.items[0], job.trajs[0][-1]
    assert torch.equal(end, teacher.reference(it))
    rng = random.Random(0)
    starts = {index_of(job.fine, b) for b in job.bounds[0][:-1].tolist()}
    assert all(job.draw(rng, 0)[1] in starts for _ in range(20))   # default: the points the sampler evaluates
    before = latent_mse(student_sample(st, model, it, job.grid), end)
    opt = make_optimizer(st.parameters(), 1e-3, Dist())
    for i in range(120):
        with frozen(model):
            accumulate(st, model, [job.loss_fn(job.draw(rng, 0)) for _ in range(4)], Dist(), 4)
        optimizer_step(opt, st.parameters(), lr=lr_at(1e-3, i, 120, 6))
    after = latent_mse(student_sample(st, model, it, job.grid), end)
    assert after < 0.02 * before, (before, after)


def test_training_free_budgets_count_network_passes(tiny_ckpt):
    """The paper's NFE counts every CFG branch (100 NFE = 50 steps x 2): a solver matched to the 6-NFE student
    gets 6 network passes, so fewer guided evaluations where CFG runs two branches."""
    pipe = BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    teacher = Teacher(pipe, size=(64, 64))
    gen = torch.Generator().manual_seed(0)
    guided, plain = teacher.item("a red circle", gen, 4.0), teacher.item("a red circle", gen, 1.0)
    assert teacher.passes_at(guided, 0.9) == 2 and teacher.passes_at(guided, 0.2) == 1
    assert teacher.passes_at(plain, 0.9) == 1
    for method in ("euler", "heun", "unipc"):
        _, _, evals, passes = teacher.solver_grid(guided, method, 6, 3.0, unit="passes")
        assert passes <= 6 and evals < 6, (method, evals, passes)
        _, _, evals, passes = teacher.solver_grid(guided, method, 6, 3.0)
        assert evals == 6 and passes > 6, (method, evals, passes)
        assert teacher.solver_grid(plain, method, 6, 3.0, unit="passes")[2:] == (6, 6)


def test_tscd_pool_keeps_only_reachable_times_with_the_same_targets(tiny_pipe):
    """At start weight 1 the pool stores the segment boundaries only; their latents are those of the full path."""
    model, teacher = tiny_pipe.model, Teacher(tiny_pipe, (64, 64))
    st = Student.fresh(model, train_keys(model, "all"), nfe=6, stages=())
    starts, inside = (tscd.TSCD(tiny_pipe, teacher, st, ["a red circle"], segments=(12, 6), pool=1, start_weight=w)
                      for w in (1.0, 0.5))
    assert starts.fine.numel() == 13 and inside.fine.numel() > 50
    for t, x in zip(starts.fine.tolist(), starts.trajs[0]):
        assert torch.equal(x, inside.trajs[0][index_of(inside.fine, t)]), t
