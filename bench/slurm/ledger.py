"""The ledger ``<out>/.slurm/jobs.jsonl``: which job runs which run, and what was cancelled.

``.slurm/`` also holds submitit's job pickles (unpickled by the jobs they start), so it is
private to the user who submits (0700, bench.records.private_dir)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from bench.records import private_dir

LEDGER = "jobs.jsonl"


# ----------------------------------------------------------------------------- ledger
def slurm_dir(out: Path) -> Path:
    return Path(out) / ".slurm"


def read_ledger(out: Path) -> tuple[dict[str, dict], set[str]]:
    """({run_id: its latest submission entry}, {cancelled job ids})."""
    runs, cancelled = {}, set()
    p = slurm_dir(out) / LEDGER
    try:
        text = p.read_text() if p.is_file() else ""
    except OSError:  # another user's private .slurm/: their jobs are not ours to list
        return runs, cancelled
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the run records are the truth anyway
        if "cancelled" in e:
            cancelled.update(e["cancelled"])
            continue
        for rid, r in e.get("runs", {}).items():
            runs[rid] = {**r, "array_job_id": e["array_job_id"], "submitted": e.get("submitted"),
                         "profile": e.get("profile")}
    return runs, cancelled


def append_ledger(out: Path, entry: dict) -> None:
    p = private_dir(slurm_dir(out)) / LEDGER
    with open(p, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
