"""Merge the steps of ``bench/gpu_check.sh`` into ``gpu_check.json`` and ``gpu_check.md`` (one table).

Every step left ``NAME.status.json`` (status ok | failed | timeout | skipped | missing, seconds, arguments) and,
when it ran, ``NAME.json``. A step's JSON may carry ``summary``: rows {figure, value, target, verdict} for the
table; otherwise its ``checks`` lines are shown; a step without either is listed with its status only.

    python3 bench/gpu_check_merge.py OUT_DIR
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path


def load(out: Path) -> dict:
    steps = {}
    for st in sorted(out.glob("*.status.json"), key=lambda p: p.stat().st_mtime):
        status = json.loads(st.read_text())
        res_path = out / f"{status['name']}.json"
        result = None
        if res_path.exists():
            try:
                result = json.loads(res_path.read_text())
            except json.JSONDecodeError as e:       # a step killed while writing
                status["note"] = f"{res_path.name} unreadable ({e})"
        steps[status["name"]] = dict(status, result=result)
    return steps


def rows(name: str, step: dict) -> list[tuple]:
    res = step.get("result") or {}
    if res.get("summary"):
        return [(name, r["figure"], r.get("value", ""), r.get("target", ""), r.get("verdict", ""))
                for r in res["summary"]]
    if res.get("checks"):
        return [(name, line, "", "", "") for line in res["checks"]]
    return []


def markdown(steps: dict, meta: dict) -> str:
    out = [f"# GPU check {meta['date']}", "", f"device: {meta.get('device') or 'see the step logs'}", "",
           "| step | status | seconds | limit s | script and arguments |", "|---|---|---|---|---|"]
    for name, s in steps.items():
        note = f" ({s['note']})" if s.get("note") else ""
        out.append(f"| {name} | {s['status']}{note} | {s['seconds']} | {s['limit_s']} | "
                   f"`{s['script']} {s['args']}` |")
    out += ["", "| step | figure | value | target | verdict |", "|---|---|---|---|---|"]
    for name, s in steps.items():
        out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows(name, s)]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0])
    steps = load(out)
    devices = {((s.get("result") or {}).get("meta") or {}).get("device") for s in steps.values()} - {None}
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=", ".join(sorted(devices)) or None,
                statuses={n: s["status"] for n, s in steps.items()})
    (out / "gpu_check.json").write_text(json.dumps(dict(meta=meta, steps=steps), indent=1))
    md = markdown(steps, meta)
    (out / "gpu_check.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
