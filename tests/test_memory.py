"""The working-memory estimate: grows with what costs memory, bounds the caches a real run allocates, and
gives a plausible figure for BAGEL-7B."""
import torch
from PIL import Image

from hyperbagel_core.config import BagelConfig, LLMConfig, ViTConfig
from hyperbagel_core.memory import estimate_run_memory

BAGEL_7B = BagelConfig(LLMConfig(3584, 18944, 28, 28, 4, 152064), ViTConfig(1152, 4304, 26, 16))
GIB = 2 ** 30


def test_monotone_in_size_branches_and_tokens():
    for task in ("generate", "edit", "answer"):
        small, big = (estimate_run_memory(BAGEL_7B, task, height=s, width=s).total for s in (512, 1024))
        assert small < big, task
    one, three = (estimate_run_memory(BAGEL_7B, "generate", cfg_branches=b).total for b in (1, 3))
    assert one < three
    short, long = (estimate_run_memory(BAGEL_7B, "answer", max_new_tokens=n).total for n in (64, 4096))
    assert short < long
    assert (estimate_run_memory(BAGEL_7B, "generate", dtype=torch.float32).llm
            > estimate_run_memory(BAGEL_7B, "generate", dtype=torch.bfloat16).llm)


def test_bagel_7b_at_1024_is_a_few_gib():
    est = estimate_run_memory(BAGEL_7B, "generate")
    assert 2 * GIB < est.total < 16 * GIB, est      # fp32 VAE decode at 1024^2 dominates
    assert est.vae > est.llm > est.kv


def _cache_bytes(contexts) -> int:
    seen = {}
    for c in contexts:
        for t in c._store.k + c._store.v:
            if t is not None:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_bounds_the_caches_of_a_real_edit(tiny_pipe):
    pipe = tiny_pipe
    img = Image.new("RGB", (80, 48), (30, 140, 200))
    ctxs = pipe.build_contexts([img, "make it green"], generator=torch.Generator().manual_seed(0))
    used = _cache_bytes([ctxs.gen, ctxs.cfg_text, ctxs.cfg_img])
    est = estimate_run_memory(pipe.config, "edit", height=48, width=80, dtype=torch.float32, text_tokens=32)
    assert used <= est.kv < 4 * used, (used, est.kv)
    assert pipe.memory_required("edit", height=48, width=80) >= est.total
