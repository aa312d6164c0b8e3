"""The bad-input matrix of the core API (issue 12): one test per row.

Every refused input must raise the project's error (``InputError`` / ``CheckpointError``) whose message says
what is wrong and what to do; every accepted odd input must give a sane result. After each row the loaded
pipeline must still give exactly its reference outputs (same process, same inputs and kernels: bitwise).
The rows' outcomes fill the table of docs/RELIABILITY.md (``tests/reliability_table.py``).
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hyperbagel_core.distill import DistilledExpert
from hyperbagel_core.errors import CheckpointError, HyperbagelError, InputError
from hyperbagel_core.image import pil_to_rgb
from hyperbagel_core.pipeline import BagelPipeline
from hyperbagel_core.speculative import DraftHead, save_draft_head
from hyperbagel_core.testing import make_tiny_checkpoint
from tests import reliability_table

NAN, INF = float("nan"), float("inf")
GEN = dict(height=32, width=32, num_timesteps=3, seed=1)
RECORDED: dict = {}


@dataclass
class Row:
    group: str
    input: str
    call: Callable            # call(env) -> result; raises for a refused input
    what: str = ""            # regex: the message says what is wrong ...
    todo: str = ""            # regex: ... and what to do; both empty = the input is accepted
    error: type = InputError
    accepted: str = ""        # accepted rows: what happens (the doc's outcome column)
    check: Callable | None = None   # accepted rows: check(env, result)
    full: bool = False        # re-check every task afterwards (rows that touch files, heads, experts)


class Env:
    """A pipeline with a draft head and a distilled expert loaded, reference outputs, and bad files."""

    def __init__(self, ckpt: Path, tmp: Path):
        self.tmp, self.ckpt = tmp, ckpt
        self.pipe = BagelPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
        other = BagelPipeline.from_pretrained(make_tiny_checkpoint(tmp / "other", seed=1), dtype=torch.float32)
        self.head = save_draft_head(DraftHead.from_target(self.pipe.model, zero_init=False, seed=1),
                                    tmp / "head", self.pipe.model)
        self.other_head = save_draft_head(DraftHead.from_target(other.model, zero_init=False, seed=1),
                                          tmp / "other_head", other.model)
        self.expert = tmp / "expert.safetensors"
        _perturbed(DistilledExpert.from_model(self.pipe.model)).save(self.expert)
        self.other_expert = tmp / "other_expert.safetensors"
        DistilledExpert.from_model(other.model).save(self.other_expert)
        self.pipe.load_draft_head(self.head)
        self.pipe.load_distilled_expert(self.expert)
        self.img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
        self.ref = self.outputs()

    def outputs(self) -> dict:
        """Answer, speculative answer, generate and distilled generate, small (an edit works at >= 512 px and
        costs seconds on CPU; the edit rows check that path)."""
        p = self.pipe
        return dict(
            answer=p.answer(None, "hi there", max_new_tokens=4).token_ids,
            spec=p.answer(None, "hi there, how are you", max_new_tokens=4, drafter="draft_head").token_ids,
            gen=p.generate("a red fox", distilled=False, **GEN).latent,
            fast=p.generate("a red fox", height=32, width=32, schedule="hyper-1nfe", seed=2).latent)

    def folder(self, name: str) -> Path:
        """A copy of the tiny checkpoint (files linked) to break one file of."""
        d = self.tmp / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        for f in self.ckpt.iterdir():
            os.symlink(f, d / f.name)
        return d


def _perturbed(e: DistilledExpert) -> DistilledExpert:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in list(e.tensors.values()) + list(e.guidance.parameters()):
            t.add_(0.02 * torch.randn(t.shape, generator=g))
    return e


@pytest.fixture(scope="module")
def env(tiny_ckpt, tmp_path_factory):
    return Env(tiny_ckpt, tmp_path_factory.mktemp("bad-inputs"))


def _same(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def still_works(env: Env, full: bool) -> None:
    """The loaded model gives its reference outputs (every task after rows that touch heads/experts)."""
    p = env.pipe
    assert p.answer(None, "hi there", max_new_tokens=4).token_ids == env.ref["answer"]
    if full:
        got = env.outputs()
        bad = [k for k in got if not _same(got[k], env.ref[k])]
        assert not bad, f"outputs changed after the bad input: {bad}"


# -------------------------------------------------------------------------------- checkpoint folders

def _truncate(env, name):
    d = env.folder("truncated")
    data = (env.ckpt / name).read_bytes()
    (d / name).unlink()
    (d / name).write_bytes(data[: len(data) // 2])
    return BagelPipeline.from_pretrained(d)


def _rewrite_ema(env, name, edit):
    d = env.folder(name)
    sd = load_file(str(env.ckpt / "ema.safetensors"))
    (d / "ema.safetensors").unlink()
    save_file(edit(sd), str(d / "ema.safetensors"))
    return BagelPipeline.from_pretrained(d)


def _wrong_dtype(sd):
    sd["vae2llm.weight"] = torch.zeros(sd["vae2llm.weight"].shape, dtype=torch.int32)
    return sd


def _wrong_shape(sd):
    sd["llm2vae.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    return sd


def _pickle_instead(env, name, as_name):
    d = env.folder(name)
    (d / "ema.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, d / as_name)
    return BagelPipeline.from_pretrained(d)


def _empty_folder(env):
    d = env.tmp / "empty"
    d.mkdir(exist_ok=True)
    return BagelPipeline.from_pretrained(d)


def _quantized_of_another_model(env):
    """A pre-quantized folder whose ema.safetensors was quantized from another base model (seed 1)."""
    from hyperbagel_core.loading import quantize_folder
    mixed, other = env.tmp / "q-mixed", env.tmp / "q-other"
    if not mixed.exists():
        quantize_folder(env.ckpt, mixed, "int8")
        quantize_folder(env.tmp / "other", other, "int8")
        shutil.copy(other / "ema.safetensors", mixed / "ema.safetensors")
    return BagelPipeline.from_pretrained(mixed)


CKPT = "checkpoint folder"
ROWS = [
    Row(CKPT, "folder missing", lambda e: BagelPipeline.from_pretrained(e.tmp / "nowhere"),
        r"not a folder", r"point to the BAGEL-7B-MoT checkpoint folder", CheckpointError),
    Row(CKPT, "folder empty", _empty_folder, r"missing llm_config\.json", r"an official BAGEL folder has",
        CheckpointError),
    Row(CKPT, "ema.safetensors truncated", lambda e: _truncate(e, "ema.safetensors"), r"truncated",
        r"re-download", CheckpointError),
    Row(CKPT, "ae.safetensors truncated", lambda e: _truncate(e, "ae.safetensors"), r"truncated",
        r"re-download", CheckpointError),
    Row(CKPT, "a tensor of the wrong dtype (int32)", lambda e: _rewrite_ema(e, "dtype", _wrong_dtype),
        r"not floating point \(vae2llm\.weight: I32\)", r"re-download", CheckpointError),
    Row(CKPT, "a tensor of the wrong shape", lambda e: _rewrite_ema(e, "shape", _wrong_shape),
        r"wrong shapes \(1\): llm2vae\.weight", r"re-download", CheckpointError),
    Row(CKPT, "keys of another model", lambda e: _rewrite_ema(
        e, "keys", lambda sd: {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}),
        r"holds a Stable Diffusion / SDXL UNet", r"mixes files of different models.*re-download",
        CheckpointError),
    Row(CKPT, "ema.bin (pickle) instead of ema.safetensors", lambda e: _pickle_instead(e, "bin", "ema.bin"),
        r"missing ema\.safetensors; found ema\.bin", r"download the release's \.safetensors", CheckpointError),
    Row(CKPT, "a torch.save pickle named ema.safetensors",
        lambda e: _pickle_instead(e, "renamed", "ema.safetensors"), r"PyTorch pickle",
        r"use the \.safetensors file of the release, or convert it", CheckpointError),
    Row(CKPT, "pre-quantized (int8) folder whose weights belong to another base model", _quantized_of_another_model,
        r"quantized from base model .* the files beside it belong to another model",
        r"quantize this model's bf16 folder again", CheckpointError),
]

# -------------------------------------------------------------------------------- other on-disk formats

def _single_alone(env, name, sidecar=False):
    """The tiny checkpoint as one file in <tmp>/<name>/models/bagel with FLUX's ae beside it, nothing else."""
    from hyperbagel_core.testing import make_single_file
    d = env.tmp / name / "models" / "bagel"
    if d.parent.parent.exists():
        shutil.rmtree(d.parent.parent)
    f = make_single_file(env.ckpt, d / "t.safetensors", sidecar=sidecar)
    shutil.copyfile(env.ckpt / "ae.safetensors", d / "ae.safetensors")
    return f


def _sidecar_of_another_file(env):
    import json
    f = _single_alone(env, "sidecar", sidecar=True)
    sidecar = f.with_name(f.name + ".comfyui-bagel.json")
    record = json.loads(sidecar.read_text())
    record["checkpoint_size"] += 4096   # the size of the file it was written for
    sidecar.write_text(json.dumps(record))
    return BagelPipeline.from_pretrained(f)


def _partial_fine_tune(env):
    d = env.folder("partial")
    (d / "ema.safetensors").unlink()
    sd = load_file(str(env.ckpt / "ema.safetensors"))
    save_file({k: v for k, v in sd.items() if "moe_gen" in k}, str(d / "model_bf16.safetensors"))
    return BagelPipeline.from_pretrained(d)


def _df11_here(env):
    from hyperbagel_core.testing import make_df11_style_folder
    d = env.tmp / "df11"
    if not d.exists():
        make_df11_style_folder(env.ckpt, d)
    return BagelPipeline.from_pretrained(d, device="cpu")


FMT = "on-disk formats"
ROWS += [
    Row(FMT, "a FLUX ae.safetensors picked as the BAGEL checkpoint",
        lambda e: BagelPipeline.from_pretrained(e.ckpt / "ae.safetensors"), r"holds a FLUX autoencoder",
        r"models/vae and connect core 'Load VAE'", CheckpointError),
    Row(FMT, "single file, no tokenizer beside it or in any BAGEL folder",
        lambda e: BagelPipeline.from_pretrained(_single_alone(e, "alone")), r"no tokenizer found",
        r"put the BAGEL-7B-MoT tokenizer files .* beside it", CheckpointError),
    Row(FMT, "single file whose sidecar was written for another file", _sidecar_of_another_file,
        r"made for a file of \d+ bytes", r"re-download the file or re-create the sidecar", CheckpointError),
    Row(FMT, "fine-tune folder holding only its trained tensors", _partial_fine_tune, r"partial checkpoint",
        r"fill the rest from the base model's ema\.safetensors", CheckpointError),
    Row(FMT, "DFloat11 folder where the dfloat11 package / a CUDA GPU is missing", _df11_here,
        r"DFloat11-compressed BAGEL folder", r"dfloat11\[cuda12\].* weight_dtype int8, fp8_e4m3fn or nf4",
        CheckpointError),
]

# -------------------------------------------------------------------------------- attachments

ATT = "draft head / distilled expert"


def _keeps_head(e):
    before = e.pipe.draft_head
    try:
        e.pipe.load_draft_head(e.other_head)
    finally:
        assert e.pipe.draft_head is before, "a failed load dropped the loaded draft head"


def _keeps_expert(path_of):
    def call(e):
        before = (e.pipe.distilled_expert, e.pipe.modules.distilled_expert)
        try:
            e.pipe.load_distilled_expert(path_of(e))
        finally:
            assert (e.pipe.distilled_expert, e.pipe.modules.distilled_expert) == before, \
                "a failed load dropped the loaded distilled expert"
    return call


def _truncated_expert(e):
    p = e.tmp / "truncated_expert.safetensors"
    data = e.expert.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    return p


def _pickled_expert(e):
    p = e.tmp / "expert.pt"
    torch.save({"gen.vae2llm.weight": torch.zeros(2)}, p)
    return p


ROWS += [
    Row(ATT, "draft head made for another base model", _keeps_head, r"fingerprint",
        r"strict_fingerprint=False|the target it was made for|train", CheckpointError, full=True),
    Row(ATT, "distilled expert made for another base model", _keeps_expert(lambda e: e.other_expert),
        r"fingerprint .* but the loaded model's fingerprint", r"load the BAGEL weights this expert was distilled",
        CheckpointError, full=True),
    Row(ATT, "distilled expert file truncated", _keeps_expert(_truncated_expert), r"truncated",
        r"re-download", CheckpointError, full=True),
    Row(ATT, "distilled expert as a .pt pickle", _keeps_expert(_pickled_expert), r"PyTorch pickle",
        r"convert it with safetensors", CheckpointError, full=True),
    Row(ATT, "distilled expert file missing", _keeps_expert(lambda e: e.tmp / "none.safetensors"),
        r"not found", r"check the path", CheckpointError, full=True),
]

# -------------------------------------------------------------------------------- images

IMG = "image"


def _answer_img(img):
    return lambda e: e.pipe.answer(img(e) if callable(img) else img, "what is it?", max_new_tokens=3)


def _same_as(convert):
    """Accepted: the model sees exactly the explicitly converted 8-bit RGB image."""
    def check(e, res, img):
        assert np.array_equal(np.asarray(pil_to_rgb(img)), np.asarray(convert(img)))
    return check


def _img16():
    return Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16))


def _check_16bit(e, res, img):
    rgb = np.asarray(pil_to_rgb(img))
    want = np.rint(np.asarray(img, dtype=np.float64) / 257).astype(np.uint8)
    assert (rgb == want[..., None]).all() and rgb.min() == 0 and 200 < rgb.max() < 255  # scaled, not clipped


def _rgba():
    a = np.zeros((40, 40, 4), np.uint8)
    a[..., 0], a[:20, :, 3] = 200, 255       # bottom half transparent
    return Image.fromarray(a, "RGBA")


def _check_rgba(e, res, img):
    rgb = np.asarray(pil_to_rgb(img))
    assert (rgb[30, 5] == 255).all() and tuple(rgb[5, 5]) == (200, 0, 0)   # transparent -> white


IMAGE_ROWS = [
    ("greyscale (L)", lambda: Image.new("L", (64, 48), 90), "answered as the RGB image (grey in all channels)",
     _same_as(lambda i: i.convert("RGB"))),
    ("RGBA with transparent pixels", _rgba, "transparent pixels go onto white, then answered", _check_rgba),
    ("palette (P)", lambda: Image.new("RGB", (64, 48), (10, 200, 30)).convert("P"), "answered as its RGB colours",
     _same_as(lambda i: i.convert("RGB"))),
    ("16-bit greyscale (I;16)", _img16, "scaled to 8 bits (v / 257), not clipped to white", _check_16bit),
    ("32-bit integer (I, 16-bit samples)", lambda: _img16().convert("I"), "read as 16-bit samples, scaled",
     _same_as(lambda i: pil_to_rgb(_img16()))),
    ("CMYK", lambda: Image.new("CMYK", (64, 48), (0, 200, 100, 0)), "converted to RGB by PIL, then answered",
     _same_as(lambda i: i.convert("RGB"))),
    ("1x1 pixel", lambda: Image.new("RGB", (1, 1), (255, 0, 0)), "upscaled by the reference rule (to 512x512)",
     None),
    ("10000x10000", lambda: Image.new("L", (10000, 10000), 77),
     "downscaled by the reference rule (to 1024x1024); no refusal", None),
    ("batch of mixed sizes (list)", lambda: [Image.new("RGB", (64, 48), 9), Image.new("RGB", (30, 200), 200)],
     "answered about both images, each at its own size", None),
]
for name, make, what, check in IMAGE_ROWS:
    ROWS.append(Row(IMG, name, (lambda mk: lambda e: e.pipe.answer(mk(), "what is it?", max_new_tokens=3))(make),
                    accepted=what, check=(lambda mk, ck: None if ck is None else
                                          lambda e, res: ck(e, res, mk()))(make, check)))
ROWS += [
    Row(IMG, "0x0 image", _answer_img(lambda e: Image.new("RGB", (0, 0))), r"has no pixels", r"pass a non-empty"),
    Row(IMG, "a path string as image (answer)", lambda e: e.pipe.answer("photo.png", "what is it?"),
        r"must be a PIL image, got 'photo\.png' \(a str\)", r"PIL\.Image\.open\(path\)"),
    Row(IMG, "a pathlib.Path as image (edit)", lambda e: e.pipe.edit(Path("photo.png"), "make it green"),
        r"must be a PIL image, got 'photo\.png' \(a PosixPath\)", r"PIL\.Image\.open\(path\)"),
    Row(IMG, "a float tensor with NaN pixels", _answer_img(lambda e: torch.full((3, 8, 8), NAN)),
        r"must be a PIL image, got a Tensor", r"convert it"),
    Row(IMG, "a numpy array", _answer_img(lambda e: np.zeros((8, 8, 3), np.uint8)),
        r"must be a PIL image, got a ndarray", r"PIL\.Image\.fromarray"),
    Row(IMG, "premultiplied mode La", _answer_img(lambda e: Image.new("La", (8, 8))),
        r"mode 'La' cannot be converted", r"convert the image to RGB"),
    Row(IMG, "list with a path in it", _answer_img(lambda e: [e.img, "b.png"]), r"image\[1\] must be a PIL image",
        r"PIL\.Image\.open"),
    Row(IMG, "edit of a 16-bit image", lambda e: e.pipe.edit(_img16(), "make it green", num_timesteps=2),
        accepted="edited (input scaled to 8 bits first)"),
]

# -------------------------------------------------------------------------------- prompts

TXT = "prompt / question"
LONG = "a b " * 25_000      # 100k characters
ROWS += [
    Row(TXT, "generate prompt ''", lambda e: e.pipe.generate("", **GEN), r"prompt is empty", r"type a prompt"),
    Row(TXT, "generate prompt whitespace", lambda e: e.pipe.generate(" \n\t ", **GEN), r"prompt is empty",
        r"type a prompt"),
    Row(TXT, "generate prompt None", lambda e: e.pipe.generate(None, **GEN), r"prompt must be a str, got None",
        r"type a prompt"),
    Row(TXT, "edit prompt ''", lambda e: e.pipe.edit(e.img, ""), r"prompt is empty", r"type a prompt"),
    Row(TXT, "answer question None", lambda e: e.pipe.answer(e.img, None), r"question must be a str, got None",
        r"pass '' for no text"),
    Row(TXT, "answer question '' and no image", lambda e: e.pipe.answer(None, ""),
        r"needs a question or an image", r"pass question="),
    Row(TXT, "answer question '' with an image", lambda e: e.pipe.answer(e.img, "", max_new_tokens=3),
        accepted="answered (captions the image)"),
    Row(TXT, "100k-character prompt", lambda e: e.pipe.generate(LONG, **GEN),
        r"the text is \d+ tokens \(100000 characters\), more than the model's context of 32768", r"shorten it"),
    Row(TXT, "100k-character question", lambda e: e.pipe.answer(None, LONG, max_new_tokens=3),
        r"more than the model's context", r"shorten it"),
    Row(TXT, "lone surrogate in the prompt", lambda e: e.pipe.generate("a fox \ud800", **GEN),
        r"'\\ud800' at character 6, an unpaired surrogate", r"remove it, or decode the source"),
    Row(TXT, "lone surrogate in the question", lambda e: e.pipe.answer(None, "\udcff?"),
        r"unpaired surrogate", r"remove it"),
    Row(TXT, "lone surrogate in interleave text", lambda e: e.pipe.interleave(["x\ud83d"]),
        r"inputs\[0\] contains", r"remove it"),
    Row(TXT, "NUL, emoji, right-to-left and combining characters",
        lambda e: e.pipe.answer(None, "a\x00b \U0001F98A \u05e9\u05dc\u05d5\u05dd e\u0301", max_new_tokens=3),
        accepted="answered (valid Unicode is tokenised as is)"),
    Row(TXT, "interleave inputs []", lambda e: e.pipe.interleave([]), r"inputs must be a non-empty list",
        r"e\.g\. \['a red fox'\]"),
    Row(TXT, "interleave input of another type", lambda e: e.pipe.interleave(["a", 5]),
        r"inputs\[1\] must be a str or a PIL image, got 5", r"e\.g\."),
]

# -------------------------------------------------------------------------------- sizes

SIZE = "size"
for label, h in (("not a multiple of 16", 40), ("zero", 0), ("negative", -32), ("beyond the latent table", 1040),
                 ("None", None), ("inf", INF), ("NaN", NAN), ("fractional", 32.5), ("a string", "32"),
                 ("a bool", True)):
    todo = {40: r"use 32 or 48", 1040: r"generate smaller and upscale"}.get(h, r"a multiple of 16 in \[16, 1024\]")
    ROWS.append(Row(SIZE, f"generate height {label} ({h!r})",
                    (lambda v: lambda e: e.pipe.generate("a fox", **dict(GEN, height=v)))(h),
                    r"height must be a whole number of pixels", todo))
ROWS += [
    Row(SIZE, "generate width 16 (smallest)", lambda e: e.pipe.generate("a fox", **dict(GEN, width=16)),
        accepted="generated (one latent patch per row)"),
    Row(SIZE, "interleave image_shapes (0, 32)", lambda e: e.pipe.interleave(["a fox"], image_shapes=(0, 32)),
        r"image_shapes height must be", r"multiple of 16"),
    Row(SIZE, "interleave image_shapes 'big'", lambda e: e.pipe.interleave(["a fox"], image_shapes="big"),
        r"image_shapes must be a pair \(height, width\)", r"pair"),
]

# -------------------------------------------------------------------------------- numbers

NUM = "number"
NUMERIC = {
    "generate": dict(seed=[-1, 2 ** 64, 1.5, NAN, None], num_timesteps=[1, 0, 2.5, INF, 10 ** 6],
                     timestep_shift=[NAN, INF, 0, -1.0], cfg_text_scale=[NAN, INF, -1.0, 1e9],
                     cfg_img_scale=[NAN, -INF], cfg_renorm_min=[NAN, -0.1, 2.0],
                     cfg_interval=[(NAN, 1.0), (0.8, 0.2), (0.0, 2.0), "x", (0.1,)],
                     max_think_tokens=[0, 1.5, INF], text_temperature=[NAN, -1.0]),
    "answer": dict(max_new_tokens=[0, -1, 3.5, INF, NAN, 10 ** 9, True], temperature=[NAN, INF, -1.0],
                   seed=[NAN, -1], num_draft_tokens=[-1, 1000, 2.5]),
    "edit": dict(cfg_img_scale=[NAN, INF], cfg_text_scale=[-0.5], seed=[INF]),
    "interleave": dict(max_think_token_n=[1, NAN], cfg_text_scale=[NAN], timestep_shift=[INF], seed=[None]),
}
ARGS = {"generate": lambda e: ("a fox",), "answer": lambda e: (None, "hi"), "edit": lambda e: (e.img, "green"),
        "interleave": lambda e: (["a fox"],)}
BASE = {"generate": dict(GEN), "answer": dict(max_new_tokens=3), "edit": dict(num_timesteps=2), "interleave": {}}
for entry, table in NUMERIC.items():
    for arg, values in table.items():
        for v in values:
            kw = dict(BASE[entry], **{arg: v})
            ROWS.append(Row(NUM, f"{entry} {arg}={v!r}",
                            (lambda en, k: lambda e: getattr(e.pipe, en)(*ARGS[en](e), **k))(entry, kw),
                            re.escape(arg) + r".* must be", r"(finite|integer|two finite|in \[|>)"))
ROWS += [
    Row(NUM, "answer temperature=0 with do_sample", lambda e: e.pipe.answer(None, "hi", do_sample=True,
                                                                            temperature=0.0),
        r"temperature must be a finite number > 0", r"do_sample=False for greedy"),
    Row(NUM, "answer do_sample='yes'", lambda e: e.pipe.answer(None, "hi", do_sample="yes"),
        r"do_sample must be True or False", r"got 'yes'"),
    Row(NUM, "generate think=None", lambda e: e.pipe.generate("a fox", think=None, **GEN),
        r"think must be True or False", r"got None"),
    Row(NUM, "generate distilled='yes'", lambda e: e.pipe.generate("a fox", distilled="yes", **GEN),
        r"distilled must be True or False", r"got 'yes'"),
    Row(NUM, "answer drafter='medusa'", lambda e: e.pipe.answer(None, "hi", drafter="medusa"),
        r"unknown drafter 'medusa'", r"choose one of 'none', 'prompt_lookup', 'draft_head'"),
    Row(NUM, "generate schedule='lightning'", lambda e: e.pipe.generate("a fox", schedule="lightning", **GEN),
        r"unknown schedule 'lightning'", r"choose one of"),
    Row(NUM, "generate solver='rk4'", lambda e: e.pipe.generate("a fox", solver="rk4", **GEN),
        r"unknown solver 'rk4'", r"choose one of"),
    Row(NUM, "generate cache='teacache'", lambda e: e.pipe.generate("a fox", cache="teacache", **GEN),
        r"cache must be 'off', 'taylorseer'", r"e\.g\. cache='taylorseer'"),
    Row(NUM, "edit cache={'fresh_threshold': 0}", lambda e: e.pipe.edit(e.img, "green", cache={"fresh_threshold": 0}),
        r"fresh_threshold must be an integer in \[1, 1000\], got 0", r"e\.g\. cache='taylorseer'"),
    Row(NUM, "generate cfg_renorm_type='l2'", lambda e: e.pipe.generate("a fox", cfg_renorm_type="l2", **GEN),
        r"unknown cfg_renorm_type 'l2'", r"choose one of 'global'"),
    Row(NUM, "generate custom timesteps with NaN",
        lambda e: e.pipe.generate("a fox", schedule="custom", timesteps=[1.0, NAN, 0.0], **GEN),
        r"timesteps\[1\] must be a finite number in \[0, 1\]", r"from 1 \(noise\) down to 0"),
    Row(NUM, "generate init_noise with NaN", lambda e: e.pipe.generate("a fox", init_noise=torch.full((4, 64), NAN),
                                                                       **GEN),
        r"init_noise contains NaN or inf", r"pass finite numbers"),
    Row(NUM, "edit vae_noise with inf", lambda e: e.pipe.edit(e.img, "green", vae_noise=torch.full((4,), INF)),
        r"vae_noise contains NaN or inf", r"pass finite numbers"),
    Row(NUM, "answer callback=5", lambda e: e.pipe.answer(None, "hi", callback=5),
        r"callback must be a callable", r"or None"),
    Row(NUM, "generate cfg_text_scale=100 (edge)", lambda e: e.pipe.generate("a fox", cfg_text_scale=100.0, **GEN),
        accepted="generated (finite latent)", check=lambda e, r: torch.isfinite(r.latent).all()),
    Row(NUM, "generate distilled, cfg_text_scale=9 (outside the trained 1-5)",
        lambda e: e.pipe.generate("a fox", height=32, width=32, schedule="hyper-6nfe", cfg_text_scale=9.0),
        accepted="generated with the scale clamped to 5 (ScaleOutOfRangeWarning)"),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.group}: {r.input}" for r in ROWS])
def test_bad_input(env, row):
    if row.what:
        outcome = reliability_table.refused(row, lambda: row.call(env), HyperbagelError)
    else:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = row.call(env)
        if row.check is not None:
            row.check(env, res)
        if getattr(res, "latent", None) is not None:
            assert torch.isfinite(res.latent).all()
        outcome = "accepted: " + row.accepted
    RECORDED[row.group + row.input] = (row.group, reliability_table.normalise(row.input),
                                       reliability_table.normalise(outcome, [env.tmp]))
    still_works(env, row.full)


def test_after_the_matrix_every_task_is_unchanged(env):
    """After all rows: every task gives its reference output, nothing is left swapped or non-finite."""
    still_works(env, full=True)
    assert not getattr(env.pipe.model, "_hb_swapped", False)
    assert all(torch.isfinite(p).all() for p in env.pipe.modules.parameters())


def test_reliability_doc_is_current():
    """docs/RELIABILITY.md's core table lists every row run here with its exact outcome."""
    if not RECORDED:
        pytest.skip("no rows ran in this session")
    stale = reliability_table.check("core", RECORDED)
    assert not stale, "docs/RELIABILITY.md is out of date (HYPERBAGEL_WRITE_RELIABILITY=1 rewrites it):\n" + \
        "\n".join(stale[:10])
