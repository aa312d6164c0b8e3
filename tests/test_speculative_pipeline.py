"""BagelPipeline.answer routes drafter= / num_draft_tokens= into speculative decoding; draft heads load
through load_draft_head / from_pretrained(draft_head=...)."""
import pytest
import torch
from PIL import Image

from hyperbagel_core.errors import CheckpointError, InputError
from hyperbagel_core.pipeline import BagelPipeline
from hyperbagel_core.speculative import DraftHead, save_draft_head
from tests.speculative_helpers import one_thread, tiny_target

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def pipe64(tiny_ckpt):
    return BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float64)


def test_answer_with_every_drafter_equals_plain(pipe64, tmp_path):
    path = save_draft_head(DraftHead.from_target(pipe64.model, zero_init=False, seed=1), tmp_path / "h", pipe64.model)
    pipe64.load_draft_head(path)
    img = Image.new("RGB", (64, 48), (120, 30, 200))
    for image, q in ((None, "what is the colour of the sky"), (img, "describe it")):
        ref = pipe64.answer(image, q, max_new_tokens=20)
        for drafter in ("prompt_lookup", "draft_head"):
            for k in ((None, 1, 10) if image is None else (4,)):
                got = pipe64.answer(image, q, max_new_tokens=20, drafter=drafter, num_draft_tokens=k)
                assert got.token_ids == ref.token_ids and got.text == ref.text
                s = got.stats
                assert s["drafter"] == drafter and s["new_tokens"] == len(ref.token_ids)
                assert {"rounds", "tau", "acceptance_rate", "tokens_per_s"} <= set(s)
    pipe64.unload_draft_head()
    with pytest.raises(InputError, match="needs a draft head"):
        pipe64.answer(None, "hi", max_new_tokens=4, drafter="draft_head")
    with pytest.raises(InputError, match="unknown drafter"):
        pipe64.answer(None, "hi", max_new_tokens=4, drafter="medusa")


def test_sampling_with_drafter_runs(pipe64):
    a = pipe64.answer(None, "tell me", max_new_tokens=12, do_sample=True, temperature=0.7, seed=3,
                      drafter="prompt_lookup", num_draft_tokens=4)
    b = pipe64.answer(None, "tell me", max_new_tokens=12, do_sample=True, temperature=0.7, seed=3,
                      drafter="prompt_lookup", num_draft_tokens=4)
    assert a.token_ids == b.token_ids          # seeded: reproducible


def test_from_pretrained_draft_head_and_refusal(tiny_ckpt, pipe64, tmp_path):
    good = save_draft_head(DraftHead.from_target(pipe64.model), tmp_path / "good", pipe64.model)
    p = BagelPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, draft_head=good)
    assert p.draft_head is not None and "draft_head" in dict(p.modules.named_children())
    other = tiny_target()
    wrong = save_draft_head(DraftHead.from_target(other), tmp_path / "wrong", other)
    with pytest.raises(CheckpointError, match="different target"):
        pipe64.load_draft_head(wrong)
