"""Every on-disk format hyperbagel loads (docs/loading.md), built from the golden tiny checkpoint, gives the
official golden outputs; what cannot be loaded is refused with what it is and what to do.

The layouts sit in a ComfyUI-like tree (``ComfyUI/models/bagel``, ``models/vae``, ``custom_nodes``) so that the
search for what a single file lacks runs as it does for users.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperbagel_core import conformance, formats
from hyperbagel_core.errors import CheckpointError
from hyperbagel_core.pipeline import BagelPipeline
from hyperbagel_core.testing import make_df11_style_folder, make_single_file, single_file_metadata

# every golden case but the 512x512 edit (12 s on 2 cores; the same kernels as t2i on another input)
CASES = ["vqa", "t2i", "t2i_nocfg_2step", "vae", "vit"]
TOKENIZER = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tree(golden_dir, tmp_path_factory) -> Path:
    """ComfyUI/models/bagel/tiny-bagel (the golden folder) and the FLUX ae in ComfyUI/models/vae."""
    root = tmp_path_factory.mktemp("formats") / "ComfyUI"
    shutil.copytree(golden_dir / "tiny-bagel", root / "models" / "bagel" / "tiny-bagel")
    (root / "models" / "vae").mkdir(parents=True)
    shutil.copyfile(golden_dir / "tiny-bagel" / "ae.safetensors", root / "models" / "vae" / "ae.safetensors")
    return root


def _golden(golden_dir, tmp_path, model, cases=CASES):
    report = conformance.run(golden_dir, tmp_path / "out", check=True, cases=cases, model=model)
    assert set(report) == set(cases)
    assert not any(report.values()), report


def _load(path, **kw):
    return BagelPipeline.from_pretrained(path, dtype=torch.float32, **kw)


# ----------------------------------------------------------------------------- single file with metadata

def test_single_file_with_metadata_gives_the_golden_outputs(tree, golden_dir, tmp_path):
    """models/bagel/x.safetensors alone: configs from its header, the tokenizer lent by the BAGEL folder beside
    it (same fingerprint), FLUX's ae from models/vae."""
    f = make_single_file(tree / "models" / "bagel" / "tiny-bagel", tree / "models" / "bagel" / "tiny.safetensors")
    ckpt = formats.resolve(f)
    assert ckpt.layout == "single_file" and ckpt.metadata["variant"] == "tiny-bagel"
    assert "comfyui_bagel metadata" in ckpt.sources["configs"]
    assert "tiny-bagel" in ckpt.sources["tokenizer"] and ckpt.vae == tree / "models" / "vae" / "ae.safetensors"
    assert ckpt.config.vae["ch"] == 32 and ckpt.config.vae["ch_mult"] == [1, 1, 1, 1]   # read off the ae's shapes
    _golden(golden_dir, tmp_path, f)


# ------------------------------------------------------------------------------ single file with sidecar

def test_single_file_with_sidecar_gives_the_golden_outputs_and_the_sidecar_is_bound(tree, golden_dir, tmp_path):
    """A sidecar (the file left byte for byte), the tokenizer in a 'tokenizer' folder beside the file, ae beside."""
    d = tmp_path / "ComfyUI" / "models" / "bagel" / "mine"
    f = make_single_file(golden_dir / "tiny-bagel", d / "tiny.safetensors", sidecar=True)
    (d / "tokenizer").mkdir()
    for n in TOKENIZER:
        shutil.copyfile(golden_dir / "tiny-bagel" / n, d / "tokenizer" / n)
    shutil.copyfile(golden_dir / "tiny-bagel" / "ae.safetensors", d / "ae.safetensors")
    assert (golden_dir / "tiny-bagel" / "ema.safetensors").read_bytes() == f.read_bytes()
    ckpt = formats.resolve(f)
    assert "sidecar" in ckpt.sources["metadata"] and ckpt.sources["tokenizer"].startswith(str(d / "tokenizer"))
    _golden(golden_dir, tmp_path, f, ["vqa", "t2i_nocfg_2step"])

    sidecar = d / "tiny.safetensors.comfyui-bagel.json"
    record = json.loads(sidecar.read_text())
    data = bytearray(f.read_bytes())
    data[-1] ^= 1                       # same size, another file
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"SHA-256 .* not tiny\.safetensors's: the sidecar belongs to another"):
        formats.resolve(f)
    record["checkpoint_size"] += 1
    sidecar.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"made for a file of \d+ bytes.*belongs to another file"):
        formats.resolve(f)


# ------------------------------------------------------------------------------ official-layout fine-tunes

def test_fine_tune_folder_gives_the_golden_outputs(golden_dir, tmp_path):
    """Zebra-CoT / BAGEL-RecA name their weights model_bf16.safetensors; a training pickle beside is never read."""
    d = tmp_path / "bagel" / "Fine-Tune"
    shutil.copytree(golden_dir / "tiny-bagel", d, ignore=shutil.ignore_patterns("ema.safetensors"))
    shutil.copyfile(golden_dir / "tiny-bagel" / "ema.safetensors", d / "model_bf16.safetensors")
    (d / "data_status.pt").write_bytes(b"\x80\x04not read")
    ckpt = formats.resolve(d)
    assert ckpt.layout == "folder" and ckpt.weights.name == "model_bf16.safetensors"
    assert "fine-tune" in ckpt.sources["weights"]
    _golden(golden_dir, tmp_path, d, ["vqa", "t2i_nocfg_2step"])


@pytest.mark.parametrize("edit, reason", [
    (lambda sd: {k: v for k, v in sd.items() if "moe_gen" in k or k.startswith(("llm2vae", "time_embedder"))},
     r"holds \d+ of the model's \d+ tensors .* partial checkpoint .*merge_safetensors"),
    (lambda sd: {**sd, "language_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
     r"unmerged LoRA tensors .* merge the LoRA"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith(("vit_model.", "connector.", "vit_pos_embed."))},
     r"no ViT .* generation-only"),
])
def test_incompatible_fine_tunes_are_refused_with_the_reason(golden_dir, tmp_path, edit, reason):
    d = tmp_path / "ft"
    shutil.copytree(golden_dir / "tiny-bagel", d, ignore=shutil.ignore_patterns("ema.safetensors"))
    save_file(edit(load_file(str(golden_dir / "tiny-bagel" / "ema.safetensors"))), str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: cannot be loaded as BAGEL: .*{reason}"):
        _load(d)


# ------------------------------------------------------------------------------------------- DFloat11

def test_dfloat11_folder_is_recognised_and_refused_clearly_without_the_package_on_cpu(golden_dir, tmp_path):
    d = make_df11_style_folder(golden_dir / "tiny-bagel", tmp_path / "BAGEL-DF11")
    ckpt = formats.resolve(d)
    assert ckpt.layout == "df11" and ckpt.vae == d / "vae" / "ae.safetensors"
    with pytest.raises(CheckpointError) as e:
        BagelPipeline.from_pretrained(d, device="cpu")
    msg = str(e.value)
    assert "DFloat11-compressed BAGEL folder" in msg and ("dfloat11[cuda12]" in msg or "CUDA GPUs only" in msg)
    assert re.search(r"weight_dtype int8, fp8_e4m3fn or nf4", msg), msg
    # a DF11 folder without some weight is diagnosed before the package is asked for
    sd = load_file(str(d / "model.safetensors"))
    del sd["connector.fc1.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"DFloat11 files do not hold this model's weights .*connector\.fc1\.bias"):
        BagelPipeline.from_pretrained(d, device="cpu")


# ---------------------------------------------------------------------------------- files of other models

def _vae_sd(z):
    return {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, z, 3, 3),
            **{f"decoder.up.{i}.block.0.conv1.weight": torch.zeros(1) for i in range(4)}}


@pytest.mark.parametrize("tensors, meta, what", [
    (lambda g: load_file(str(g / "tiny-bagel" / "ae.safetensors")), None, r"a FLUX autoencoder .* core 'Load VAE'"),
    (lambda g: _vae_sd(4), None, r"an image autoencoder \(VAE\) with 4 latent channels"),
    (lambda g: {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)}, None, r"a Stable Diffusion / SDXL UNet"),
    (lambda g: {"double_blocks.0.img_attn.qkv.weight": torch.zeros(4)}, None, r"a FLUX diffusion model"),
    (lambda g: {"model.embed_tokens.weight": torch.zeros(4, 2), "model.layers.0.self_attn.q_proj.weight":
                torch.zeros(2, 2)}, None, r"a transformers language model \(Qwen2/LLaMA layout\), not BAGEL"),
    (lambda g: {"fc.weight": torch.zeros(2)}, {"format": "hyperbagel-draft-head"}, r"a hyperbagel draft head .*draft_heads"),
    (lambda g: {"language_model.model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(2)}, None, r"LoRA adapter"),
    (lambda g: {"language_model.model.layers.0.encoded_exponent": torch.zeros(2, dtype=torch.uint8)}, None,
     r"DFloat11-compressed weights, not BAGEL: keep the whole DFloat11 folder"),
    (lambda g: {"some.weight": torch.zeros(2)}, None, r"an unknown model \(first tensors: some\.weight\)"),
])
def test_a_file_of_another_model_is_refused_with_what_it_is(golden_dir, tmp_path, tensors, meta, what):
    f = tmp_path / "models" / "bagel" / "x.safetensors"
    f.parent.mkdir(parents=True)
    save_file(tensors(golden_dir), str(f), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"x\.safetensors: this file holds {what}"):
        _load(f)


def test_a_vae_of_another_kind_is_refused(golden_dir, tmp_path):
    f = make_single_file(golden_dir / "tiny-bagel", tmp_path / "bagel" / "t.safetensors")
    save_file(_vae_sd(4), str(tmp_path / "bagel" / "ae.safetensors"))
    with pytest.raises(CheckpointError, match=r"ae\.safetensors: not the FLUX autoencoder BAGEL uses "
                                              r"\(an image autoencoder \(VAE\) with 4 latent"):
        formats.resolve(f)


# ---------------------------------------------------------------------------------------------- tokenizer

def _alone(golden_dir, root, record_edit=None) -> Path:
    """A single file with metadata in root/ComfyUI/models/bagel, its ae in models/vae, no BAGEL folder."""
    bagel = root / "ComfyUI" / "models" / "bagel"
    f = make_single_file(golden_dir / "tiny-bagel", bagel / "t.safetensors")
    if record_edit is not None:
        record = single_file_metadata(golden_dir / "tiny-bagel")
        record_edit(record)
        save_file(load_file(str(f)), str(f), metadata={"comfyui_bagel": json.dumps(record)})
    (root / "ComfyUI" / "models" / "vae").mkdir(parents=True)
    shutil.copyfile(golden_dir / "tiny-bagel" / "ae.safetensors", root / "ComfyUI" / "models" / "vae" / "ae.safetensors")
    return f


def test_no_tokenizer_anywhere_says_which_files_and_where(golden_dir, tmp_path):
    f = _alone(golden_dir, tmp_path)
    with pytest.raises(CheckpointError) as e:
        formats.resolve(f)
    msg = str(e.value)
    assert "never downloads" in msg and all(n in msg for n in TOKENIZER) and "ByteDance-Seed/BAGEL-7B-MoT" in msg
    assert str(f.parent) in msg and "'tokenizer' folder" in msg


def test_the_other_packs_bundled_tokenizer_is_used_when_its_fingerprint_matches(golden_dir, tmp_path):
    f = _alone(golden_dir, tmp_path)
    bundled = tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-BAGEL" / "modeling" / "qwen2" / "tokenizer"
    bundled.mkdir(parents=True)
    for n in TOKENIZER:
        shutil.copyfile(golden_dir / "tiny-bagel" / n, bundled / n)
    ckpt = formats.resolve(f)
    assert "bundled with the ComfyUI-BAGEL pack" in ckpt.sources["tokenizer"]
    # one changed byte in its tokenizer_config.json: another fingerprint, so it is skipped (and said so)
    (bundled / "tokenizer_config.json").write_text((bundled / "tokenizer_config.json").read_text() + " ")
    with pytest.raises(CheckpointError, match=r"no tokenizer found .* skipped: .*not the ones t\.safetensors was made with"):
        formats.resolve(f)


def test_a_tokenizer_beside_the_file_must_match_what_the_file_records(golden_dir, tmp_path):
    f = _alone(golden_dir, tmp_path, lambda r: r["special_token_ids"].update({"<|im_start|>": 7}))
    for n in TOKENIZER:
        shutil.copyfile(golden_dir / "tiny-bagel" / n, f.parent / n)
    with pytest.raises(CheckpointError, match=r"special-token ids \{'<\|im_start\|>': \(1051, 7\)\}"):
        formats.resolve(f)
    f = _alone(golden_dir, tmp_path / "b", lambda r: r.update(tokenizer_fingerprint="0" * 64))
    for n in TOKENIZER:
        shutil.copyfile(golden_dir / "tiny-bagel" / n, f.parent / n)
    with pytest.raises(CheckpointError, match=r"not the ones t\.safetensors was made with .* use the tokenizer files"):
        formats.resolve(f)
    with pytest.raises(CheckpointError, match=r"extra tokens"):
        formats.resolve(_alone(golden_dir, tmp_path / "c", lambda r: r.update(additional_special_tokens=["<x>"])))


# ------------------------------------------------------------------------------ single file without configs

def test_a_file_without_configs_uses_the_release_configs_checked_against_its_shapes(golden_dir, tmp_path):
    from hyperbagel_core.model.bagel import BagelModel
    with torch.device("meta"):
        release = {k: (tuple(v.shape), "BF16") for k, v in BagelModel(formats.release_config()).state_dict().items()}
    assert len(release) == 1223   # spec 1.1: the release's key count
    formats.check_bagel_weights(Path("x"), release, formats.release_config(), "release")   # accepted
    d = tmp_path / "bagel"
    d.mkdir()
    shutil.copyfile(golden_dir / "tiny-bagel" / "ema.safetensors", d / "plain.safetensors")
    with pytest.raises(CheckpointError, match=r"shapes differ from BAGEL-7B-MoT's configs .* carries no configs .* "
                                              r"add the sidecar or the two config files"):
        formats.resolve(d / "plain.safetensors")
    for n in ("llm_config.json", "vit_config.json", *TOKENIZER):   # configs beside the file: read from there
        shutil.copyfile(golden_dir / "tiny-bagel" / n, d / n)
    shutil.copyfile(golden_dir / "tiny-bagel" / "ae.safetensors", d / "ae.safetensors")
    assert "beside plain.safetensors" in formats.resolve(d / "plain.safetensors").sources["configs"]


# ------------------------------------------------------------------------------------ the VAE from elsewhere

def test_a_vae_given_as_weights_loads_exactly(golden_dir, tmp_path, tree):
    """ComfyUI's core VAE hands its weights under the official names: the VAE loaded from them is the file's."""
    ref = _load(tree / "models" / "bagel" / "tiny-bagel").vae.state_dict()
    f = make_single_file(golden_dir / "tiny-bagel", tmp_path / "bagel" / "t.safetensors")
    with pytest.raises(CheckpointError, match=r"missing ae\.safetensors.* models/vae.* core 'Load VAE'"):
        formats.resolve(f, tokenizer=golden_dir / "tiny-bagel")
    weights = load_file(str(golden_dir / "tiny-bagel" / "ae.safetensors"))
    pipe = _load(f, tokenizer=golden_dir / "tiny-bagel", vae=weights)
    got = pipe.vae.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    for v in weights.values():   # copied: core keeps moving and patching its own
        v.add_(1)
    assert all(torch.equal(pipe.vae.state_dict()[k], ref[k]) for k in ref)
