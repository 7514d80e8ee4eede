"""Run-directory facts, shared by every executor: where a run lives, which runs are
complete, and who is training one now (its lease).

``<out>/runs/<run_id>/`` holds a run's spec, record, checkpoints, logs, ``progress.json`` (the
training loop's live numbers) and, while a process trains it, ``lease.json`` (bench.lease). Its
checkpoints (``ckpt/``) are bench.checkpoint's.
"""
from __future__ import annotations

import os
from pathlib import Path

from bench.checkpoint import checkpoint_roots, first_intact
from bench.config import RunSpec
from bench.errors import UserError
from bench.lease import lease_state, read_lease
from bench.records import read_record, record_status


def run_dir(out: Path, spec: RunSpec) -> Path:
    """``<out>/runs/<run_id>``; UserError if the run id is not one plain path component, i.e.
    the directory would not lie directly inside ``<out>/runs`` (suite validation already
    refuses such names: this is the last line of defence for specs built any other way)."""
    rid = spec.run_id
    runs = os.path.abspath(os.path.join(out, "runs"))
    rd = os.path.abspath(os.path.join(runs, rid))
    if "\0" in rid or rid.strip(".") == "" or os.path.dirname(rd) != runs or os.path.basename(rd) != rid:
        raise UserError(f"run id {rid[:200]!r}: its directory would lie outside {runs}")
    return Path(out) / "runs" / rid


def plan(specs: list[RunSpec], out: Path) -> tuple[list[RunSpec], list[RunSpec]]:
    """Split into (to run, already complete)."""
    todo, done = [], []
    for s in specs:
        (done if record_status(run_dir(out, s)) == "complete" else todo).append(s)
    return todo, done


PROGRESS = "progress.json"  # written by the training loop (bench.train), read by bench.live


def check_run_dirs(out: Path, specs: list[RunSpec]) -> None:
    """Before anything starts: every run about to resume has a readable record (or none) and,
    if it has checkpoints, an intact one (sizes against its manifest; the full hashes are
    checked when the run loads it; a damaged newest one is skipped then, with a line in the
    log). UserError naming the file otherwise."""
    for s in specs:
        rd = run_dir(out, s)
        if (rd / "result.json").exists():
            try:
                read_record(rd / "result.json")
            except UserError as e:
                raise UserError(f"{e}; delete it to rerun the run") from None
        first_intact(checkpoint_roots(rd), full=False)


# ----------------------------------------------------------------------------- leases
def holders(out: Path, specs: list[RunSpec]) -> dict[str, dict]:
    """{run_id: lease} of the runs another live process is training now."""
    out_ = {}
    for s in specs:
        lease = read_lease(run_dir(out, s))
        if lease_state(lease) == "held":
            out_[s.run_id] = lease
    return out_
