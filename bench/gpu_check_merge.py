"""Merge the steps of ``bench/gpu_check.sh`` into ``gpu_check.json`` and ``gpu_check.md`` (one table), and pack
every step's files into ``gpu_check_steps.tar.gz``: the results folder of a device run keeps three files
(the device tool returns at most 8, 16 MiB each).

Every step left ``NAME.status.json`` (status ok | failed | timeout | skipped | missing, seconds, arguments) and,
when it ran, ``NAME.json``. A step's JSON may carry ``summary``: rows {figure, value, target, verdict} for the
table; otherwise its ``checks`` lines are shown; ``skipped``: the reason the step could not run here (its exit
status 3). The gpu_check.sh calls this after every step, so a run cut short still leaves its results.

    python3 bench/gpu_check_merge.py STEPS_DIR [OUT_DIR] [--quiet]     # OUT_DIR defaults to STEPS_DIR
"""
from __future__ import annotations

import datetime
import io
import json
import sys
import tarfile
from pathlib import Path

LOG_CAP = 2 << 20          # bytes of each log kept in the archive (its end)
ARCHIVE_CAP = 15 << 20     # the device tool returns files up to 16 MiB


def load(steps_dir: Path) -> dict:
    steps = {}
    for st in sorted(steps_dir.glob("*.status.json"), key=lambda p: p.stat().st_mtime):
        status = json.loads(st.read_text())
        res_path = steps_dir / f"{status['name']}.json"
        result = None
        if res_path.exists():
            try:
                result = json.loads(res_path.read_text())
            except json.JSONDecodeError as e:       # a step killed while writing
                status["note"] = f"{res_path.name} unreadable ({e})"
        if isinstance(result, dict) and result.get("skipped"):
            status["note"] = result["skipped"]
        steps[status["name"]] = dict(status, result=result)
    return steps


def rows(name: str, step: dict) -> list[tuple]:
    res = step.get("result") or {}
    if res.get("summary"):
        return [(name, r["figure"], r.get("value", ""), r.get("target", ""), r.get("verdict", ""))
                for r in res["summary"]]
    if isinstance(res.get("checks"), list):
        return [(name, line, "", "", "") for line in res["checks"]]
    return []


def cell(x) -> str:
    return str(x).replace("|", "/").replace("\n", " ")


def markdown(steps: dict, meta: dict) -> str:
    out = [f"# GPU check {meta['date']}", "", f"device: {meta.get('device') or 'see the step logs'}", "",
           "| step | status | seconds | limit s | script and arguments |", "|---|---|---|---|---|"]
    for name, s in steps.items():
        note = f" ({cell(s['note'])})" if s.get("note") else ""
        out.append(f"| {name} | {s['status']}{note} | {s['seconds']} | {s['limit_s']} | "
                   f"`{cell(s['script'])} {cell(s['args'])}` |")
    out += ["", "| step | figure | value | target | verdict |", "|---|---|---|---|---|"]
    for name, s in steps.items():
        out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows(name, s)]
    return "\n".join(out) + "\n"


def pack(steps_dir: Path, archive: Path) -> list[str]:
    """Every file under ``steps_dir`` into ``archive`` (logs: their last LOG_CAP bytes); the largest files are
    left out while the archive is over ARCHIVE_CAP. Returns what was left out."""
    files = sorted((p for p in steps_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    left_out: list[str] = []
    while True:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for p in files:
                data = p.read_bytes()
                if p.suffix in (".log", ".txt") and len(data) > LOG_CAP:
                    data = b"[... cut by gpu_check_merge ...]\n" + data[-LOG_CAP:]
                info = tarfile.TarInfo(str(p.relative_to(steps_dir)))
                info.size, info.mtime = len(data), int(p.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))
        if buf.tell() <= ARCHIVE_CAP or not files:
            break
        left_out.append(str(files.pop().relative_to(steps_dir)))
    archive.write_bytes(buf.getvalue())
    return left_out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet = "--quiet" in argv
    paths = [a for a in argv if a != "--quiet"]
    steps_dir = Path(paths[0])
    out = Path(paths[1]) if len(paths) > 1 else steps_dir
    out.mkdir(parents=True, exist_ok=True)
    steps = load(steps_dir)
    devices = set()
    for s in steps.values():
        res = s.get("result") or {}
        meta = res.get("meta") if isinstance(res.get("meta"), dict) else res
        dev = meta.get("device_name") or meta.get("device") if isinstance(meta, dict) else None
        if isinstance(dev, str) and dev.strip() and dev not in ("cuda", "cpu"):
            devices.add(dev)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=", ".join(sorted(devices)) or None,
                statuses={n: s["status"] for n, s in steps.items()})
    if out != steps_dir:
        meta["archive_left_out"] = pack(steps_dir, out / "gpu_check_steps.tar.gz")
    (out / "gpu_check.json").write_text(json.dumps(dict(meta=meta, steps=steps), indent=1))
    md = markdown(steps, meta)
    (out / "gpu_check.md").write_text(md)
    if not quiet:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
