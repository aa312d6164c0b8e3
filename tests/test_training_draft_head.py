"""Draft-head trainer: loss decreases on a tiny target; the training forward (TTT unroll) computes what
chain drafting computes at inference; the CLI smoke run writes a loadable head."""
import json

import pytest
import torch

from hyperbagel_core.speculative import DraftHead, DraftHeadDrafter
from hyperbagel_core.training.draft_head import TrainConfig, main, regenerate, train_draft_head, unrolled_logits
from hyperbagel_core.speculative import speculative_generate
from tests.speculative_helpers import BOS, one_thread, tiny_target

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def _contexts(model, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ctx = model.new_context()
        model.prefill_text(ctx, torch.randint(1, model.config.llm.vocab_size, (5,), generator=g))
        out.append(ctx)
    return out


def test_training_forward_equals_chain_drafting():
    model = tiny_target(seed=4)
    head = DraftHead.from_target(model, zero_init=False, seed=1)
    s = regenerate(model, _contexts(model, 1), BOS, -1, 12)[0]
    outs = unrolled_logits(head, s["feats"], s["tokens"], s["rope0"], unroll=3)
    toks = s["tokens"].tolist()
    for root in (0, 3, 7):
        d = DraftHeadDrafter(head)
        d.reset(s["rope0"])
        d.observe([BOS] + toks[:root], s["feats"][: root + 1], toks[root])
        d._catch_up()
        g, c = d.last_g, d.cache
        assert torch.allclose(head.logits(g)[0], outs[0][root], atol=1e-9)
        for j in (1, 2):     # teacher-forced chain: the draft's own feature, the true next token
            z = head.draft_input(g, torch.tensor([toks[root + j]]))
            g = head.run_layers(z, c, c.real_len + j - 1, d.rope + j)
            assert torch.allclose(head.logits(g)[0], outs[j][root + j], atol=1e-9), (root, j)


@pytest.mark.parametrize("kind", ["hyper-bagel", "eagle3"])
def test_trainer_loss_decreases_and_acceptance_improves(kind):
    model = tiny_target(seed=4)
    ctxs = _contexts(model, 6)
    samples = regenerate(model, ctxs, BOS, -1, 16)
    head = DraftHead.from_target(model, kind, seed=0)
    hist = train_draft_head(head, samples, TrainConfig(steps=80, lr=3e-3, unroll=2))
    assert sum(hist[-10:]) / 10 < 0.7 * sum(hist[:10]) / 10
    kw = dict(bos_id=BOS, eos_id=-1, max_new_tokens=16)
    ref = speculative_generate(model, ctxs[0].fork(), None, **kw)
    fresh = speculative_generate(model, ctxs[0].fork(), DraftHeadDrafter(DraftHead.from_target(model, kind)),
                                 num_draft_tokens=4, adaptive=False, **kw)
    got = speculative_generate(model, ctxs[0].fork(), DraftHeadDrafter(head), num_draft_tokens=4,
                               adaptive=False, **kw)
    assert got.ids == fresh.ids == ref.ids       # trained or not, the output is the target's
    assert got.stats["acceptance_rate"] > fresh.stats["acceptance_rate"]   # on a training prompt


def test_cli_tiny_smoke(tmp_path, capsys):
    """The recipe with a reduced draft vocabulary (issue 21): the 40 most frequent answer tokens, the stop
    token among them, saved with the head."""
    out = tmp_path / "head.safetensors"
    assert main(["--tiny", "--out", str(out), "--steps", "12", "--tiny-prompts", "3", "--draft-vocab", "40"])[
        "steps"] == 12
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["steps"] == 12 and rec["draft_vocab"] == 40 and out.exists() and out.with_suffix(".json").exists()
    twin = json.loads(out.with_suffix(".json").read_text())
    assert twin["version"] == "2" and twin["config"]["draft_vocab_size"] == 40


def test_draft_loss_over_a_draft_vocabulary():
    from hyperbagel_core.training.draft_head import draft_loss
    g = torch.Generator().manual_seed(0)
    target = torch.randn(6, 11, generator=g, dtype=torch.float64)
    full = torch.randn(6, 11, generator=g, dtype=torch.float64)
    assert torch.allclose(draft_loss(full, target, 0.1, torch.arange(11)), draft_loss(full, target, 0.1))
    d2t = torch.tensor([0, 3, 4, 7])
    draft = full[:, d2t]
    # KL against the target renormalised over d2t; CE only where the target's argmax is in d2t
    logp = torch.log_softmax(target[:, d2t], -1)
    logq = torch.log_softmax(draft, -1)
    lab = target.argmax(-1)
    inside = torch.isin(lab, d2t)
    pos = torch.searchsorted(d2t, lab.clamp(max=d2t.max()))
    ce = torch.where(inside, -logq.gather(1, pos[:, None])[:, 0], torch.zeros(6, dtype=torch.float64))
    want = ((logp.exp() * (logp - logq)).sum(-1) + 0.1 * ce).mean()
    assert torch.allclose(draft_loss(draft, target, 0.1, d2t).double(), want, atol=1e-6)   # (computed in fp32)


def test_cli_on_a_tiny_checkpoint(tiny_ckpt, tmp_path, capsys):
    from PIL import Image

    from hyperbagel_core.pipeline import BagelPipeline
    img = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(img)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"question": "what colour is it?", "image": str(img)}) + "\n"
                    + json.dumps({"question": "name three animals"}) + "\n")
    out = tmp_path / "bagel_head.safetensors"
    assert main(["--model", str(tiny_ckpt), "--data", str(data), "--out", str(out), "--steps", "4",
                 "--max-new-tokens", "6", "--dtype", "fp32"])["steps"] == 4
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4
    pipe = BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", draft_head=out)
    ref = pipe.answer(None, "name three animals", max_new_tokens=8)
    got = pipe.answer(None, "name three animals", max_new_tokens=8, drafter="draft_head", num_draft_tokens=3)
    assert got.token_ids == ref.token_ids
