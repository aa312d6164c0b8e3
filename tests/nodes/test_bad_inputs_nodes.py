"""The bad-input matrix of the node adapters (issue 12): one test per row, under the ComfyUI stub with the
real core on a tiny checkpoint.

Every refused input must raise a ``ValueError`` (the adapters' ``NodeInputError`` or the core's
``InputError``) or ``FileNotFoundError`` whose message says what is wrong and what to do; afterwards the loaded
BAGEL_MODEL must still give its reference outputs (bitwise: same process, inputs and kernels). Node inputs are
built from each schema's defaults, so widgets added later keep these rows valid. The outcomes fill the nodes
table of docs/RELIABILITY.md.
"""
from __future__ import annotations

import asyncio
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import comfy_stub

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests import reliability_table  # noqa: E402

NAN, INF = float("nan"), float("inf")
RECORDED: dict = {}
SMALL = dict(width=16, height=16, schedule="custom", custom_timesteps="1.0, 0.5", batch_size=1)


@dataclass
class Row:
    group: str
    input: str
    call: Callable            # call(env)
    what: str = ""
    todo: str = ""
    error: tuple = (ValueError,)
    accepted: str = ""


class Env:
    def __init__(self, tmp: Path, ckpt: Path):
        models = tmp / "models"
        (models / "bagel").mkdir(parents=True)
        os.symlink(ckpt, models / "bagel" / "tiny")
        for sub in ("draft_heads", "distilled"):
            (models / "bagel" / sub).mkdir()
        self.tmp = tmp
        comfy_stub.install(str(models))
        for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
            sys.modules.pop(name)
        self.ext = importlib.import_module("nodes.extension")
        self.runtime = importlib.import_module("nodes.runtime")
        self.paths = importlib.import_module("nodes.paths")
        asyncio.run(self.ext.comfy_entrypoint())
        self.model = self.node(self.ext.BagelModelLoader, checkpoint="tiny", dtype="fp32")
        self.ref = self.outputs()

    @staticmethod
    def node(cls, **over):
        """``cls.execute`` with every required input at its schema default (combos: first option) but ``over``."""
        kw = {}
        for i in cls.define_schema().inputs:
            if not i.optional:
                kw[i.id] = i.default if i.default is not None else (i.options or [None])[0]
        kw.update(over)
        out = cls.execute(**kw)
        return out.args[0] if cls.__name__ == "BagelModelLoader" else out

    def sample(self, **over):
        return self.node(self.ext.BagelFewStepSampler, model=self.model, **dict(SMALL, **over))

    def vqa(self, **over):
        return self.node(self.ext.BagelSpeculativeVQA, model=self.model, **dict(
            dict(question="what is it?", max_new_tokens=3, drafter="none"), **over))

    def edit(self, **over):
        return self.node(self.ext.BagelCFGFreeEditor, model=self.model, **dict(
            dict(image=torch.rand(1, 32, 32, 3), schedule="custom", custom_timesteps="1.0"), **over))

    def apply_head(self, name):
        return self.node(self.ext.BagelApplyDraftHead, model=self.model, draft_head=name)

    def apply_expert(self, name):
        return self.node(self.ext.BagelApplyDistilledExpert, model=self.model, distilled_expert=name)

    def load(self, **over):
        return self.node(self.ext.BagelModelLoader, **dict(dict(checkpoint="tiny", dtype="fp32"), **over))

    def outputs(self) -> dict:
        return dict(image=self.sample().args[0], answer=self.vqa().args[0])


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_ckpt):
    e = Env(tmp_path_factory.mktemp("nodes-bad"), tiny_ckpt)
    yield e
    comfy_stub.uninstall()


def still_works(env: Env) -> None:
    got = env.outputs()
    assert torch.equal(got["image"], env.ref["image"]) and got["answer"] == env.ref["answer"]


PATH, IMG, TXT, NUM = "model name", "image", "text", "number"
OUTSIDE, TODO_PICK = r"points outside the model folders", r"pick a name from the list"
ROWS = [
    Row(PATH, "checkpoint '../../etc/passwd'", lambda e: e.load(checkpoint="../../etc/passwd"), OUTSIDE, TODO_PICK),
    Row(PATH, "checkpoint '/etc'", lambda e: e.load(checkpoint="/etc"), OUTSIDE, TODO_PICK),
    Row(PATH, "checkpoint 'tiny/../../../etc'", lambda e: e.load(checkpoint="tiny/../../../etc"), OUTSIDE,
        TODO_PICK),
    Row(PATH, "checkpoint '..\\\\..\\\\Windows'", lambda e: e.load(checkpoint="..\\..\\Windows"), OUTSIDE,
        TODO_PICK),
    Row(PATH, "checkpoint with a NUL byte", lambda e: e.load(checkpoint="tiny\x00/x"), r"is not a model name",
        r"pick one from the list"),
    Row(PATH, "checkpoint that does not exist", lambda e: e.load(checkpoint="nothing-here"), r"not found in",
        r"Put the BAGEL-7B-MoT folder .* there and press 'Refresh'", (FileNotFoundError,)),
    Row(PATH, "draft_head '../../etc/passwd'", lambda e: e.apply_head("../../etc/passwd"),
        r"draft_head .* points outside", TODO_PICK),
    Row(PATH, "distilled_expert '/etc/passwd'", lambda e: e.apply_expert("/etc/passwd"),
        r"distilled_expert .* points outside", TODO_PICK),
    Row(PATH, "distilled_expert 'x/../../../../etc/passwd'",
        lambda e: e.apply_expert("x/../../../../etc/passwd"), r"points outside", TODO_PICK),
    Row(PATH, "distilled_expert that does not exist", lambda e: e.apply_expert("gone.safetensors"),
        r"not found in the bagel_distilled folders", r"press 'Refresh', pick another file", (FileNotFoundError,)),
    Row(IMG, "IMAGE with NaN pixels", lambda e: e.vqa(image=torch.full((1, 16, 16, 3), NAN)),
        r"contains NaN or inf", r"feed a finite image"),
    Row(IMG, "IMAGE with +inf pixels (editor)", lambda e: e.edit(image=torch.full((1, 16, 16, 3), INF)),
        r"contains NaN or inf", r"feed a finite image"),
    Row(IMG, "IMAGE of dtype uint8", lambda e: e.vqa(image=torch.zeros(1, 16, 16, 3, dtype=torch.uint8)),
        r"expected IMAGE values as floats in 0\.\.1, got torch\.uint8", r"convert with image\.float\(\) / 255"),
    Row(IMG, "a list of IMAGEs of mixed sizes", lambda e: e.vqa(image=[torch.rand(1, 16, 16, 3),
                                                                     torch.rand(1, 8, 24, 3)]),
        r"expected an IMAGE tensor, got list", r"Connect an IMAGE output"),
    Row(IMG, "empty IMAGE batch", lambda e: e.vqa(image=torch.zeros(0, 16, 16, 3)), r"the image batch is empty",
        r"\(0, 16, 16, 3\)"),
    Row(IMG, "a MASK [B, H, W] connected as IMAGE", lambda e: e.edit(image=torch.rand(2, 16, 16)),
        r"expected an IMAGE of shape \[B, H, W, C\]", r"Is a MASK or LATENT connected by mistake"),
    Row(IMG, "5-channel IMAGE", lambda e: e.vqa(image=torch.rand(1, 8, 8, 5)), r"C in \(1, 3, 4\)",
        r"MASK or LATENT"),
    Row(IMG, "greyscale IMAGE (C = 1)", lambda e: e.vqa(image=torch.rand(1, 8, 8, 1)),
        accepted="answered (channel repeated to RGB)"),
    Row(IMG, "RGBA IMAGE (C = 4)", lambda e: e.vqa(image=torch.rand(1, 8, 8, 4)), accepted="answered (alpha dropped)"),
    Row(IMG, "1x1 IMAGE", lambda e: e.vqa(image=torch.rand(1, 1, 1, 3)),
        accepted="answered (upscaled by the reference rule)"),
    Row(IMG, "IMAGE values outside 0..1 (-0.2..1.3)", lambda e: e.vqa(image=torch.linspace(-0.2, 1.3, 192)
                                                                       .reshape(1, 8, 8, 3)),
        accepted="answered (values clamped to 0..1)"),
    Row(TXT, "prompt ''", lambda e: e.sample(prompt=""), r"prompt is empty", r"type a prompt"),
    Row(TXT, "prompt whitespace", lambda e: e.sample(prompt="  \n "), r"prompt is empty", r"type a prompt"),
    Row(TXT, "prompt None", lambda e: e.sample(prompt=None), r"prompt must be text, got NoneType",
        r"connect a STRING"),
    Row(TXT, "prompt of 100k characters", lambda e: e.sample(prompt="a b " * 25_000),
        r"\d+ tokens \(100000 characters\), more than the model's context", r"shorten it"),
    Row(TXT, "prompt with a lone surrogate", lambda e: e.sample(prompt="fox \udc80"), r"unpaired surrogate",
        r"delete that character"),
    Row(TXT, "question with a lone surrogate", lambda e: e.vqa(question="\ud800?"), r"unpaired surrogate",
        r"delete that character"),
    Row(TXT, "instruction ''", lambda e: e.edit(instruction=""), r"instruction is empty", r"type an instruction"),
    Row(TXT, "custom_timesteps 'nan'", lambda e: e.sample(custom_timesteps="nan"), r"'nan' is not a number",
        r"write e\.g\."),
    Row(TXT, "custom_timesteps '0.5, 0.9'", lambda e: e.sample(custom_timesteps="0.5, 0.9"),
        r"strictly decreasing", r"from noise to 0"),
    Row(TXT, "custom_timesteps '1, x'", lambda e: e.sample(custom_timesteps="1, x"), r"'x' is not a number",
        r"write e\.g\."),
]
for label, v in (("60", 60), ("0", 0), ("-16", -16), ("NaN", NAN), ("None", None), ("inf", INF),
                 ("1040 (beyond the latent table)", 1040)):
    todo = {60: r"use 48 or 64", 0: r"below the minimum 16", -16: r"below the minimum 16",
            1040: r"lower it \(and upscale afterwards"}.get(v, r"must be an integer")
    ROWS.append(Row(NUM, f"width {label}", (lambda x: lambda e: e.sample(width=x))(v), r"width", todo))
for name, values, call in (
        ("seed", [-1, 2 ** 64, NAN], "sample"), ("batch_size", [0, NAN, 2.5], "sample"),
        ("shift", [NAN, 0.0, INF], "sample"), ("text_guidance", [NAN, INF, -1.0], "sample"),
        ("cfg_interval_start", [NAN, 2.0], "sample"), ("max_new_tokens", [0, NAN], "vqa"),
        ("k", [-1, NAN], "vqa"), ("temperature", [NAN, -1.0, INF], "vqa"), ("image_guidance", [NAN], "edit")):
    for v in values:
        ROWS.append(Row(NUM, f"{call} {name}={v!r}", (lambda c, n, x: lambda e: getattr(e, c)(**{n: x}))(call, name, v),
                        r"(seed|batch size|shift|cfg_text_scale|cfg_interval|max_new_tokens|num_draft_tokens|"
                        r"temperature|cfg_img_scale)", r"(must be|in 0\.\.|>=|integer)"))
ROWS += [
    Row(NUM, "steps=NaN with a fixed-grid schedule", lambda e: e.sample(schedule="hyper-1nfe", steps=NAN),
        accepted="generated (steps is not used by this schedule)"),
    Row(NUM, "steps=NaN with training-free", lambda e: e.sample(schedule="training-free", steps=NAN),
        r"steps must be an integer in 1\.\.200", r"got nan"),
    Row(NUM, "sampler schedule 'lightning'", lambda e: e.sample(schedule="lightning"), r"unknown schedule",
        r"choose one of"),
    Row(NUM, "VQA drafter 'medusa'", lambda e: e.vqa(drafter="medusa"), r"unknown drafter", r"choose one of"),
    Row(NUM, "loader dtype 'int8'", lambda e: e.load(dtype="int8"), r"unknown dtype 'int8'", r"choose one of"),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.group}: {r.input}" for r in ROWS])
def test_bad_node_input(env, row):
    if row.what:
        outcome = reliability_table.refused(row, lambda: row.call(env), Exception)
    else:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row.call(env)
        outcome = "accepted: " + row.accepted
    RECORDED[row.group + row.input] = (row.group, reliability_table.normalise(row.input),
                                       reliability_table.normalise(outcome, [env.tmp]))
    still_works(env)


def test_patcher_size_counts_the_distilled_expert(env, tmp_path):
    """ComfyUI's ModelPatcher size (state-dict bytes) grows by exactly the expert's bytes: the replacement
    weights are parameters of ``pipe.modules``, not invisible buffers (13 GB at the 7B size)."""
    from hyperbagel_core.distill import DistilledExpert
    from hyperbagel_core.pipeline import BagelPipeline
    import comfy.model_patcher

    pipe = env.model.pipe
    DistilledExpert.from_model(pipe.model).save(tmp_path / "e.safetensors")
    cpu = torch.device("cpu")
    fresh = BagelPipeline.from_pretrained(pipe.path, dtype=torch.float32)
    before = comfy.model_patcher.ModelPatcher(fresh.modules, cpu, cpu).model_size()
    fresh.load_distilled_expert(tmp_path / "e.safetensors")
    after = comfy.model_patcher.ModelPatcher(fresh.modules, cpu, cpu).model_size()
    replaced = sum(t.numel() * t.element_size() for t in fresh.distilled_expert.tensors.values())
    assert replaced > after - replaced - before >= 0    # the replacements dominate the embedders
    assert after - before == fresh.distilled_expert.nbytes()


def test_reliability_doc_is_current():
    if not RECORDED:
        pytest.skip("no rows ran in this session")
    stale = reliability_table.check("nodes", RECORDED)
    assert not stale, "docs/RELIABILITY.md is out of date (HYPERBAGEL_WRITE_RELIABILITY=1 rewrites it):\n" + \
        "\n".join(stale[:10])
