"""A terminal progress bar for the core's ``callback(step, total)`` (command line and bench scripts).

tqdm (installed with transformers) draws it with rate and ETA on stderr. A new bar starts when ``total``
changes, e.g. from thinking tokens to denoising steps within one call.
"""
from __future__ import annotations

from tqdm.auto import tqdm


class ProgressBar:
    """``callback(step, total)`` -> a tqdm bar labelled ``label``; use as a context manager (closes the bar)."""

    def __init__(self, label: str, unit: str = "step", disable: bool = False):
        self.label, self.unit, self.disable = label, unit, disable
        self.bar = None

    def __call__(self, step: int, total: int) -> None:
        if self.bar is None or self.bar.total != total:
            self.close()
            self.bar = tqdm(total=total, desc=self.label, unit=self.unit, dynamic_ncols=True, disable=self.disable)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
