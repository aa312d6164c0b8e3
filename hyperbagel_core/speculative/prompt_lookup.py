"""Training-free drafter: n-gram lookup over the prompt's text ids and the tokens generated so far.

The history is ``prompt_ids + [<|im_start|>] + generated``. To propose k tokens, take the longest
suffix n-gram (``max_ngram`` down to ``min_ngram``) that occurred earlier in the history and copy the
(up to k) tokens that followed its most recent earlier occurrence. An incremental index maps every
n-gram to the position right after its latest occurrence, so a lookup costs O(max_ngram) and an append
O(max_ngram). A match close to the end is extended periodically (the text is looping). No weights, no target features: stock BAGEL users get a speedup on answers that quote the
question, OCR text, lists, code, or repeat themselves.
"""
from __future__ import annotations


class PromptLookupDrafter:
    needs_hidden = False
    step_cost = round_cost = 0.0       # a dictionary lookup: only the extra verified tokens cost

    def __init__(self, prompt_ids: list[int] | None = None, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.default_prompt = list(prompt_ids or [])
        self.reset(0)

    def reset(self, rope: int, prompt_ids: list[int] | None = None) -> None:
        self.history: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self._extend(self.default_prompt if prompt_ids is None else list(prompt_ids))
        self.pending: int | None = None      # next token: known, not yet part of the history

    def _extend(self, tokens: list[int]) -> None:
        h = self.history
        for t in tokens:
            i = len(h)                        # t is at position i; register n-grams ending at i-1
            for n in range(self.min_ngram, self.max_ngram + 1):
                if i - n >= 0:
                    self.index[tuple(h[i - n:i])] = i
            h.append(t)

    def observe(self, tokens, layer_hidden, next_token: int) -> None:
        self._extend(list(tokens))
        self.pending = next_token

    def lookup(self, k: int) -> list[int]:
        """Up to k tokens continuing history + [pending] by the most recent matching n-gram."""
        h = self.history + ([] if self.pending is None else [self.pending])
        for n in range(min(self.max_ngram, len(h)), self.min_ngram - 1, -1):
            key = tuple(h[len(h) - n:])
            start = self.index.get(key)
            if start is not None:
                # copy what followed; past the end of the history, the match keeps repeating with
                # period len(h) - start (a loop the model is in)
                period = len(h) - start
                return [h[start + (j % period)] for j in range(k)]
        return []

    def propose(self, k: int, do_sample: bool = False, temperature: float = 1.0, generator=None):
        return self.lookup(k), None
