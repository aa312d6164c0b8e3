"""The entry the pipeline calls: pick a drafter by name and decode (keeps pipeline.py edits small)."""
from __future__ import annotations

from ..model.static_decode import StaticTextDecoder
from .decode import DEFAULT_DRAFT_TOKENS, speculative_generate
from .drafters import DraftHeadDrafter
from .prompt_lookup import PromptLookupDrafter

try:
    from ..errors import InputError
except ImportError:  # pragma: no cover
    InputError = ValueError

DRAFTER_NAMES = ("none", "prompt_lookup", "draft_head")


def context_text_ids(ctx) -> list[int]:
    """Token ids of the text blocks prefilled into ``ctx`` (core Context.layout), in order."""
    out: list[int] = []
    for entry in getattr(ctx, "layout", []):
        if entry and entry[0] == "text":
            out += list(entry[3])
    return out


def make_drafter(name: str, head=None, prompt_ids: list[int] | None = None, static_capacity: int = 0,
                 compiler=None):
    """``static_capacity`` > 0: the draft head gets a fixed cache of that many slots and a graphed chain step
    (compiled with ``compiler`` when given)."""
    if name == "none":
        return None
    if name == "prompt_lookup":
        return PromptLookupDrafter(prompt_ids)
    if name == "draft_head":
        if head is None:
            raise InputError("drafter 'draft_head' needs a draft head: load one with "
                             "BagelPipeline.load_draft_head(path) (or from_pretrained(..., draft_head=path)), "
                             "or use drafter='prompt_lookup'")
        return DraftHeadDrafter(head, capacity=static_capacity, static=True, compiler=compiler) \
            if static_capacity else DraftHeadDrafter(head)
    raise InputError(f"unknown drafter {name!r}; choose one of {DRAFTER_NAMES}")


def decode_with_drafter(model, ctx, name: str, head=None, *, bos_id: int, eos_id: int, max_new_tokens: int,
                        do_sample: bool = False, temperature: float = 1.0, generator=None, callback=None,
                        num_draft_tokens: int | None = None, compiler=None) -> tuple[list[int], dict]:
    """Speculative decoding on ``ctx`` (extended in place; pass a fork) with ``model`` a BagelModel or its
    ``StaticTextDecoder`` (``compiler``: the regions the draft head's fixed-shape steps run through).
    Returns (ids, stats)."""
    prompt = context_text_ids(ctx)
    k = num_draft_tokens or DEFAULT_DRAFT_TOKENS
    # with the target graphed, graph the draft chain too: its cache covers the answer plus one chain
    static = max_new_tokens + k + 2 if isinstance(model, StaticTextDecoder) else 0
    drafter = make_drafter(name, head, prompt, static, compiler)
    res = speculative_generate(model, ctx, drafter, bos_id=bos_id, eos_id=eos_id, max_new_tokens=max_new_tokens,
                               do_sample=do_sample, temperature=temperature, generator=generator,
                               callback=callback, num_draft_tokens=num_draft_tokens or None, prompt_ids=prompt)
    return res.ids, dict(res.stats, drafter=name)
