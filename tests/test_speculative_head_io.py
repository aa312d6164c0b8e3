"""Draft-head structure (zero-init, skips, initialisation from the target) and the on-disk format:
round trip, refusal of files for another target, of corrupt files, of files that are no draft head."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from hyperbagel_core.errors import CheckpointError
from hyperbagel_core.speculative import (DraftHead, DraftHeadConfig, DraftHeadDrafter, default_feature_layers,
                                         load_draft_head, save_draft_head)
from tests.speculative_helpers import TINY, decode, tiny_target


@pytest.fixture(scope="module")
def target():
    return tiny_target(seed=1)


def test_default_feature_layers():
    assert default_feature_layers(28) == (2, 14, 25)
    assert default_feature_layers(6) == (2, 3, 3)
    assert default_feature_layers(2) == (1, 1, 0)
    with pytest.raises(ValueError, match="num_meta_queries"):
        DraftHeadConfig.for_target(TINY, num_meta_queries=2)


def test_zero_init_and_initialisation_from_target(target):
    head = DraftHead.from_target(target)
    c, lm = head.config, target.language_model
    assert (c.num_meta_queries, c.num_draft_layers, c.use_dec) == (3, 2, True)
    for w in (head.fc1.weight, head.fc2.weight, head.ca.o_proj.weight, head.dec.self_attn.o_proj.weight,
              head.dec.mlp.down_proj.weight):
        assert torch.count_nonzero(w) == 0
    for i, layer in enumerate(head.layers):      # the target's last N layers
        src = lm.model.layers[TINY.num_hidden_layers - 2 + i].state_dict()
        assert all(torch.equal(v, src[k]) for k, v in layer.state_dict().items())
    assert not any(k.startswith(("lm_head", "norm", "embed")) for k in head.state_dict())   # shared, not stored
    feats = torch.randn(5, TINY.num_hidden_layers, TINY.hidden_size, dtype=torch.float64)
    # at init: CA adds nothing, so fc1 sees exactly EAGLE-3's three-level feature; Dec is the identity
    assert torch.count_nonzero(head.ca(feats)) == 0
    x, skip = head.aggregate(feats)
    assert torch.count_nonzero(x) == 0 and torch.equal(skip, feats[:, 3])
    F = head.features(feats, head.new_cache(), rope0=0)
    assert torch.equal(F, feats[:, 3])             # Dec(0) = 0, plus the high-level skip
    assert torch.count_nonzero(head.draft_input(F, torch.arange(5))) == 0


def test_eagle3_configuration(target):
    head = DraftHead.from_target(target, "eagle3")
    assert head.ca is None and head.dec is None and len(head.layers) == 1
    assert head.fc1.weight.shape == (TINY.hidden_size, 3 * TINY.hidden_size)
    assert torch.count_nonzero(head.fc1.weight) > 0      # no zero-init in plain EAGLE-3


@pytest.mark.parametrize("kind,share", [("hyper-bagel", True), ("eagle3", False)])
def test_round_trip(target, tmp_path, kind, share):
    head = DraftHead.from_target(target, kind, zero_init=False, seed=2, share_lm_head=share)
    path = save_draft_head(head, tmp_path / "h", target)
    assert path.name == "h.safetensors" and path.with_suffix(".json").exists()
    back = load_draft_head(path, target)
    assert back.config == head.config
    sd, sd2 = head.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    a, _ = decode(target, [1, 2], DraftHeadDrafter(head), eos_id=-1, max_new_tokens=12, adaptive=False)
    b, _ = decode(target, [1, 2], DraftHeadDrafter(back), eos_id=-1, max_new_tokens=12, adaptive=False)
    assert a.stats["accepted"] == b.stats["accepted"] and a.ids == b.ids


@pytest.mark.parametrize("field,value", [("hidden_size", 48), ("vocab_size", 29), ("num_hidden_layers", 5)])
def test_refuses_other_target_shapes(target, tmp_path, field, value):
    path = save_draft_head(DraftHead.from_target(target), tmp_path / "h.safetensors", target)
    other = tiny_target(seed=1, shape=dataclasses.replace(TINY, **{field: value}))
    with pytest.raises(CheckpointError, match=f"different target.*{field}: file"):
        load_draft_head(path, other)


def test_refuses_same_shapes_other_weights(target, tmp_path):
    path = save_draft_head(DraftHead.from_target(target), tmp_path / "h.safetensors", target)
    other = tiny_target(seed=99)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_draft_head(path, other)
    assert load_draft_head(path, other, strict_fingerprint=False) is not None


def test_fingerprint_ignores_fp32_bf16_load(target):
    from hyperbagel_core.speculative import target_fingerprint
    m = tiny_target(seed=3, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.bfloat16().float())
    assert target_fingerprint(m) == target_fingerprint(m.to(torch.bfloat16))


def test_refuses_corrupt_files(target, tmp_path):
    path = save_draft_head(DraftHead.from_target(target), tmp_path / "h.safetensors", target)
    raw = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_draft_head(bad, target)
    flipped = bytearray(raw)
    flipped[-20] ^= 0x40                          # one bit of tensor data
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        load_draft_head(bad, target)
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_draft_head(bad, target)
    with pytest.raises(CheckpointError, match="not found"):
        load_draft_head(tmp_path / "missing.safetensors", target)


def test_refuses_foreign_or_inconsistent_files(target, tmp_path):
    foreign = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a hyperbagel draft head"):
        load_draft_head(foreign, target)
    path = save_draft_head(DraftHead.from_target(target), tmp_path / "h.safetensors", target)
    twin = json.loads(path.with_suffix(".json").read_text())
    twin["target"]["vocab_size"] = 1
    path.with_suffix(".json").write_text(json.dumps(twin))
    with pytest.raises(CheckpointError, match="disagrees"):
        load_draft_head(path, target)


def test_draft_vocabulary_selection_and_head(target, tmp_path):
    from hyperbagel_core.speculative.draft_head import select_draft_vocab
    counts = torch.tensor([0, 5, 2, 5, 9, 0, 1, 2])
    assert select_draft_vocab(counts, 3).tolist() == [1, 3, 4]            # ties to the lower id
    assert select_draft_vocab(counts, 3, always=[7]).tolist() == [1, 4, 7]
    vocab = [0, 2, 3, 5, 8, 13, 21]
    head = DraftHead.from_target(target, zero_init=False, seed=2, draft_vocab=vocab)
    assert head.config.draft_vocab_size == 7 and head.d2t.tolist() == vocab
    assert torch.equal(head.lm_head.weight, target.language_model.lm_head.weight[vocab])   # its rows
    g = torch.randn(4, TINY.hidden_size, dtype=torch.float64)
    assert head.logits(g).shape == (4, 7)
    assert set(head.to_target(head.logits(g).argmax(-1)).tolist()) <= set(vocab)
    q = torch.softmax(head.logits(g), -1)
    full = head.target_probs(q)
    assert full.shape == (4, TINY.vocab_size) and torch.equal(full[:, vocab], q) and full.sum(-1).allclose(
        torch.ones(4, dtype=torch.float64))
    path = save_draft_head(head, tmp_path / "r", target)
    back = load_draft_head(path, target)
    assert back.config == head.config and torch.equal(back.d2t, head.d2t)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        DraftHeadConfig.for_target(TINY, draft_vocab_size=TINY.vocab_size + 1)


def _rewrite(path, tensors=None, **meta_changes):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta, old = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    save_file(tensors if tensors is not None else old, str(path), metadata=meta)
    path.with_suffix(".json").unlink(missing_ok=True)


def test_format_versions(target, tmp_path):
    """Format 1 (before the draft vocabulary) reads losslessly as a full-vocabulary head; unknown versions and
    a broken d2t are refused with what to do."""
    head = DraftHead.from_target(target, zero_init=False, seed=2)
    path = save_draft_head(head, tmp_path / "v1", target)
    cfg = json.loads(path.with_suffix(".json").read_text())["config"]
    del cfg["draft_vocab_size"]
    _rewrite(path, version="1", config=json.dumps(cfg))
    old = load_draft_head(path, target)
    assert old.config == head.config and old.config.draft_vocab_size == 0
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), head.state_dict().values()))
    _rewrite(path, version="3")
    with pytest.raises(CheckpointError, match="version '3'.*update hyperbagel"):
        load_draft_head(path, target)
    reduced = DraftHead.from_target(target, seed=2, draft_vocab=[1, 2, 3])
    path = save_draft_head(reduced, tmp_path / "bad", target)
    sd = {k: v.contiguous() for k, v in reduced.state_dict().items()}
    sd["d2t"] = torch.tensor([1, 1, 3])
    from hyperbagel_core.speculative.draft_io import _tensor_hash
    _rewrite(path, sd, sha256=_tensor_hash(sd))
    with pytest.raises(CheckpointError, match="d2t must be 3 distinct"):
        load_draft_head(path, target)
