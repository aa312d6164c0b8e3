"""The bad-input tables of docs/RELIABILITY.md, filled from the tests so that they cannot drift.

The bad-input tests record each row's outcome (the exact message, or what an accepted input does);
the last test of each file compares the recorded rows with the doc's table between that section's markers.
``HYPERBAGEL_WRITE_RELIABILITY=1`` rewrites the section instead (run the full file, then review the diff).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md"
WRITE = os.environ.get("HYPERBAGEL_WRITE_RELIABILITY") == "1"


def normalise(message: str, tmp_dirs=()) -> str:
    """Stable text: temporary folders become ``<tmp>``; newlines and pipes cannot break the table."""
    for d in sorted((str(d) for d in tmp_dirs), key=len, reverse=True):
        message = message.replace(d, "<tmp>")
    message = re.sub(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/[^/\s]+", "<tmp>", message)
    return message.replace("\n", " ").replace("|", "\\|")


def _markers(section: str) -> tuple[str, str]:
    return f"<!-- bad-inputs:{section}:start -->", f"<!-- bad-inputs:{section}:end -->"


def render(rows: dict) -> str:
    """rows: id -> (group, input, outcome) in test order."""
    lines = ["| group | input | outcome (exact message) |", "|---|---|---|"]
    lines += [f"| {g} | {i} | {o} |" for g, i, o in rows.values()]
    return "\n".join(lines)


def doc_rows(section: str) -> dict:
    """(group, input) -> outcome as written in the doc's section."""
    start, end = _markers(section)
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    if start not in text:
        return {}
    body = text.split(start, 1)[1].split(end, 1)[0]
    out = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 3:
            out[(cells[0], cells[1])] = cells[2]
    return out


def write(section: str, rows: dict) -> None:
    start, end = _markers(section)
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    DOC.write_text(f"{head}{start}\n{render(rows)}\n{end}{tail}", encoding="utf-8")


def _shape(message: str | None) -> str | None:
    """The message with numbers and hex digests masked: byte counts of the tiny files and fingerprints follow
    the installed safetensors/tokenizers, the wording is what the doc promises."""
    return None if message is None else re.sub(r"\b[0-9a-f]*\d[0-9a-f]*\b", "#", message)


def check(section: str, rows: dict) -> list[str]:
    """Rows recorded in this run whose doc entry is missing or differs in wording (empty = the doc is current)."""
    if WRITE:
        write(section, rows)
        return []
    written = doc_rows(section)
    return [f"{g} / {i}: test says {o!r}, doc says {written.get((g, i))!r}"
            for g, i, o in rows.values() if _shape(written.get((g, i))) != _shape(o)]


def refused(row, call, base=Exception) -> str:
    """Run a bad-input row that must be refused: the error is ``row.error``, says what is wrong (``row.what``)
    and what to do (``row.todo``); returns the outcome line for the table."""
    import pytest
    with pytest.raises(base) as info:
        call()
    msg = str(info.value)
    assert isinstance(info.value, row.error), f"{type(info.value).__name__}: {msg}"
    assert re.search(row.what, msg), f"does not say what is wrong: {msg}"
    assert re.search(row.todo, msg), f"does not say what to do: {msg}"
    return f"{type(info.value).__name__}: {msg}"
