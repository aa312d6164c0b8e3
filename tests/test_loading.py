"""Checkpoint folders that are missing files, truncated, of the wrong shape or not safetensors fail with one
clear message naming the file; nothing is unpickled."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperbagel_core.errors import CheckpointError
from hyperbagel_core.pipeline import BagelPipeline
from hyperbagel_core.tensor_io import read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tiny_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def _load(folder):
    return BagelPipeline.from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("name", ["ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json"])
def test_missing_file(folder, name):
    (folder / name).unlink()
    with pytest.raises(CheckpointError, match=re.escape(name)):
        _load(folder)


def test_missing_tokenizer(folder):
    for f in ("vocab.json", "merges.txt", "tokenizer.json"):
        (folder / f).unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        _load(folder)


@pytest.mark.parametrize("name", ["ema.safetensors", "ae.safetensors"])
def test_truncated(folder, name):
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}.*truncated.*re-download"):
        _load(folder)


def test_not_safetensors(folder):
    import pickle
    (folder / "ema.safetensors").write_bytes(pickle.dumps({"weights": list(range(1000))}))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors.*not a valid safetensors"):
        _load(folder)
    (folder / "ema.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"ema\.safetensors.*not JSON"):
        _load(folder)


def test_wrong_shape_and_missing_key(folder):
    sd = load_file(str(folder / "ema.safetensors"))
    sd["llm2vae.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    del sd["connector.fc1.bias"]
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(folder / "ema.safetensors"))
    with pytest.raises(CheckpointError) as e:
        _load(folder)
    msg = str(e.value)
    assert "ema.safetensors" in msg and "llm2vae.weight" in msg and "connector.fc1.bias" in msg
    assert "extra.weight" in msg and "wrong shapes" in msg and "missing" in msg and "unexpected" in msg


def test_config_from_another_model(folder):
    cfg = json.loads((folder / "llm_config.json").read_text())
    cfg["hidden_size"] = 96
    (folder / "llm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="ema.safetensors.*wrong shapes"):
        _load(folder)


def test_vae_of_another_config(folder):
    cfg = json.loads((folder / "ae_config.json").read_text())
    cfg["ch"] = 64
    (folder / "ae_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="ae.safetensors"):
        _load(folder)


def test_broken_json(folder):
    (folder / "vit_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="vit_config.json.*not valid JSON"):
        _load(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        _load(tmp_path / "nope")


def test_header_reader_never_reads_data(tiny_ckpt):
    header = read_safetensors_header(tiny_ckpt / "ema.safetensors")
    assert header["llm2vae.weight"][1] == "BF16"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_choice(tiny_ckpt, dtype):
    pipe = BagelPipeline.from_pretrained(tiny_ckpt, dtype=dtype)
    assert pipe.dtype == dtype and all(p.dtype == dtype for p in pipe.model.parameters())
    assert all(p.device.type == "cpu" for p in pipe.modules.parameters())
    assert next(pipe.vae.parameters()).dtype == torch.float32


def test_no_pickle_loading_anywhere():
    bad = []
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts) or path.name == "test_loading.py":
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"torch\.load\(|pickle\.load|import pickle|weights_only=False", text):
            bad.append(str(path.relative_to(ROOT)))
    assert not bad, bad
