"""Edit pairs in every distillation stage (the CFG-free editor's training): the JSONL is checked line by line,
the teacher's edit trajectory is the pipeline's own edit, and stage 1, TSCD, DMDO and the 1-NFE stage train on
edits beside prompts, report each task apart and write files the pipeline edits with."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hyperbagel_core.image import pack_latent
from hyperbagel_core.pipeline import BagelPipeline
from hyperbagel_core.training import adversarial, dmdo, stage1_cfg, tscd
from hyperbagel_core.training.data import read_edit_pairs
from hyperbagel_core.training.student import Student, train_keys
from hyperbagel_core.training.teacher import Teacher

PROMPTS = ["a red circle", "a blue square on a table"]


def _image(path, seed):
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    d = tmp_path_factory.mktemp("edits")
    for i in range(3):
        _image(d / f"src{i}.png", i)
    lines = [{"image": "src0.png", "instruction": "make the sky yellow"},
             {"image": "src1.png", "instruction": "add a hat"}]
    (d / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "held.jsonl").write_text(json.dumps({"image": str(d / "src2.png"), "instruction": "turn it into night"}))
    return d


def _args(ckpt, out, edits, *extra, prompts=PROMPTS):
    a = ["--model", str(ckpt), "--out", str(out), "--size", "64", "64", "--threads", "1", "--eval-noises", "1",
         "--edit-pairs", str(edits / "train.jsonl"), "--eval-edit-pairs", str(edits / "held.jsonl"),
         "--eval-prompt", "a green bird in the park"]
    for p in prompts:
        a += ["--prompt", p]
    return a + list(extra)


def _pipe(ckpt, expert):
    pipe = BagelPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    pipe.load_distilled_expert(expert)
    return pipe


def test_edit_pairs_file_is_checked_line_by_line(edits, tmp_path):
    pairs = read_edit_pairs(edits / "train.jsonl")
    assert [p.instruction for p in pairs] == ["make the sky yellow", "add a hat"]
    assert pairs[0].image == edits / "src0.png"          # relative to the JSONL's folder
    good = json.dumps({"image": str(edits / "src0.png"), "instruction": "ok"})
    bad = tmp_path / "bad.jsonl"
    for text, needle in [('{"image": "x.png"', r"bad\.jsonl:1: not JSON"),
                         (good + "\n" + json.dumps({"image": str(edits / "src0.png")}),
                          r'bad\.jsonl:2: .*non-empty "instruction"'),
                         (json.dumps({"image": "missing.png", "instruction": "x"}),
                          r"bad\.jsonl:1: cannot read image .*missing\.png"),
                         ("\n\n", "has no edit pairs")]:
        bad.write_text(text)
        with pytest.raises(SystemExit, match=needle):
            read_edit_pairs(bad)
    with pytest.raises(SystemExit, match="does not exist"):
        read_edit_pairs(tmp_path / "nope.jsonl")


def test_training_edits_needs_held_out_edits(tiny_ckpt, edits, tmp_path):
    argv = [a for a in _args(tiny_ckpt, tmp_path / "x.safetensors", edits, "--steps", "1")]
    i = argv.index("--eval-edit-pairs")
    with pytest.raises(SystemExit, match="--eval-edit-pairs"):
        tscd.main(argv[:i] + argv[i + 2:])


def test_teacher_edit_reference_is_the_pipelines_edit(tiny_pipe, edits):
    """The training target of an edit is exactly what ``BagelPipeline.edit`` computes (shift 3, dual CFG over
    (0, 1), text-channel renorm; 10 steps here, 50 in training): same contexts, same noise, sequential branches."""
    teacher = Teacher(tiny_pipe, (64, 64), num_timesteps=10)
    pair = read_edit_pairs(edits / "train.jsonl")[0]
    it = teacher.item(pair, torch.Generator().manual_seed(3), 4.0, 1.5)
    assert it.task == "edit" and it.scales == (4.0, 1.5) and it.image == pair.image
    ref = teacher.reference(it)
    res = tiny_pipe.edit(Image.open(pair.image).convert("RGB"), pair.instruction, seed=0, init_noise=it.noise,
                         cfg_text_scale=4.0, cfg_img_scale=1.5, batch_cfg=False, num_timesteps=10)
    want = pack_latent(res.latent, tiny_pipe.config.latent_patch_size)
    assert want.shape == ref.shape
    assert torch.allclose(want.float(), ref, rtol=1e-5, atol=1e-5), (want - ref).abs().max()
    assert teacher.passes_at(it, 0.2) == 3            # text and image CFG on over (0, 1): three passes
    teacher.EDIT_CONTEXTS = 1                          # edit contexts are bounded (their image KV is large)
    other = read_edit_pairs(edits / "train.jsonl")[1]
    teacher.contexts(other)
    assert other in teacher._ctx_cache and pair not in teacher._ctx_cache
    t2i = teacher.item("a red circle", torch.Generator().manual_seed(3), 4.0)
    assert t2i.task == "t2i" and teacher.passes_at(t2i, 0.2) == 1 and teacher.passes_at(t2i, 0.6) == 2


def test_tscd_pool_mixes_tasks_with_their_scales(tiny_pipe, edits):
    teacher = Teacher(tiny_pipe, (64, 64), num_timesteps=4)    # a short teacher path: only the draws matter
    st = Student.fresh(tiny_pipe.model, train_keys(tiny_pipe.model, "all"), nfe=6)
    conds = PROMPTS + read_edit_pairs(edits / "train.jsonl")
    job = tscd.TSCD(tiny_pipe, teacher, st, conds, segments=(6,), pool=6, img_scale_range=(1.2, 2.0))
    tasks = {it.task for it in job.items}
    assert tasks == {"t2i", "edit"}
    for n, it in enumerate(job.items):
        assert (1.2 <= it.s_img <= 2.0) if it.task == "edit" else it.s_img == 1.0
        scales, _ = job.loss_fn((n, 0, 1))
        assert scales == it.scales


@pytest.fixture(scope="module")
def six_edit(tiny_ckpt, edits, tmp_path_factory):
    out = tmp_path_factory.mktemp("six-edit") / "six.safetensors"
    rep = tscd.main(_args(tiny_ckpt, out, edits, "--steps", "4", "--pool", "3", "--lr", "1e-3", "--batch", "2",
                          "--eval-every", "4", "--segments", "6"))
    return out, rep


def test_tscd_on_edits_reports_each_task_and_edits_in_six_steps(six_edit, tiny_ckpt, edits):
    out, rep = six_edit
    assert set(rep["by_task"]) == {"t2i", "edit"}
    for r in rep["by_task"].values():
        assert np.isfinite(r["student"]) and r["training_free"]
        assert all(k.split("@")[0].endswith("-6pass") for k in r["training_free"])
    pipe = _pipe(tiny_ckpt, out)
    src = Image.open(edits / "src2.png").convert("RGB")
    res = pipe.edit(src, "turn it into night", schedule="hyper-6nfe", cfg_img_scale=1.5)
    assert res.stats["steps"] == 6 and res.image.size == (512, 512)   # the official VAE resize: short side 512


def test_dmdo_and_one_step_stage_take_edit_pairs(six_edit, tiny_ckpt, edits, tmp_path):
    """Edits only in training (every draw an edit), both tasks held out."""
    rep = dmdo.main(_args(tiny_ckpt, tmp_path / "dmdo.safetensors", edits, "--init", str(six_edit[0]),
                          "--steps", "2", "--fake-warmup", "1", "--eval-every", "2", prompts=()))
    assert len(rep["history"]["loss"]) == 2 and np.isfinite(rep["history"]["metric"][-1][1])
    rep = adversarial.main(_args(tiny_ckpt, tmp_path / "one.safetensors", edits, "--init", str(six_edit[0]),
                                 "--steps", "1", "--eval-every", "1", prompts=()))
    assert set(rep["by_task"]) == {"t2i", "edit"} and all(r["euler"] for r in rep["by_task"].values())
    pipe = _pipe(tiny_ckpt, tmp_path / "one.safetensors")
    assert pipe.edit(Image.open(edits / "src2.png").convert("RGB"), "x", schedule="hyper-1nfe").stats["steps"] == 1


def test_stage1_cli_takes_edit_pairs(tiny_ckpt, edits, tmp_path):
    out = tmp_path / "cfg.safetensors"
    stage1_cfg.main(["--model", str(tiny_ckpt), "--out", str(out), "--size", "64", "64", "--threads", "1",
                     "--steps", "3", "--edit-pairs", str(edits / "train.jsonl")])
    pipe = _pipe(tiny_ckpt, out)
    res = pipe.edit(Image.open(edits / "src0.png").convert("RGB"), "make the sky yellow", num_timesteps=4)
    assert res.stats["distilled"] and res.stats["steps"] == 3
