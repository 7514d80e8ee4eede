"""Run-directory facts, shared by every executor: where a run lives and which runs are complete.

``<out>/runs/<run_id>/`` holds a run's spec, record, checkpoints and logs (see bench.runner).
"""
from __future__ import annotations

from pathlib import Path

from bench.config import RunSpec
from bench.records import record_status


def run_dir(out: Path, spec: RunSpec) -> Path:
    return Path(out) / "runs" / spec.run_id


def plan(specs: list[RunSpec], out: Path) -> tuple[list[RunSpec], list[RunSpec]]:
    """Split into (to run, already complete)."""
    todo, done = [], []
    for s in specs:
        (done if record_status(run_dir(out, s)) == "complete" else todo).append(s)
    return todo, done
