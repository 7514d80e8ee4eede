"""Executors: where run processes start. The harness code inside a run is identical.

- ``debug``: in this process, one run after another.
- ``local`` (default): each run in its own subprocess through submitit's LocalExecutor, at most
  ``launch.parallel`` at a time, each with ``launch.threads`` torch threads.
- ``slurm``: submitit job arrays (see ``tdbench submit``).

The run records are the truth: a job that dies without writing its record (SIGKILL, OOM) is
recorded here as failed with its log tail; one failed run never stops the others.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from bench.config import RunSpec, Suite
from bench.errors import UserError
from bench.records import read_record, record_status, write_json
from bench.runner import execute, now


def run_dir(out: Path, spec: RunSpec) -> Path:
    return Path(out) / "runs" / spec.run_id


def plan(specs: list[RunSpec], out: Path) -> tuple[list[RunSpec], list[RunSpec]]:
    """Split into (to run, already complete)."""
    todo, done = [], []
    for s in specs:
        (done if record_status(run_dir(out, s)) == "complete" else todo).append(s)
    return todo, done


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _record_crash(rd: Path, spec: RunSpec, error: str, log_tail: str) -> None:
    """A job ended without a final record: write a failed one (keeping what it wrote)."""
    try:
        rec = read_record(rd / "result.json")
        if rec["status"] in ("complete", "failed"):
            return
    except UserError:
        rec = {"run_id": spec.run_id, "label": spec.label, "method": spec.method, "size": spec.size,
               "seed": spec.seed, "spec": spec.model_dump(mode="json")}
    write_json(rd / "result.json", {**rec, "status": "failed", "error": error, "log_tail": log_tail,
                                    "finished": now()})


def run_local(specs: list[RunSpec], out: Path, suite: Suite, progress) -> dict[str, str]:
    import submitit

    cores = _cores()
    parallel = suite.launch.parallel or max(1, min(len(specs), cores))
    threads = suite.launch.threads or max(1, cores // parallel)
    ex = submitit.LocalExecutor(folder=str(Path(out) / ".submitit" / "%j"))
    ex.update_parameters(timeout_min=suite.launch.timeout_min)
    queue, running, status = list(specs), {}, {}
    while queue or running:
        while queue and len(running) < parallel:
            s = queue.pop(0)
            running[s.run_id] = (s, ex.submit(execute, s.model_dump(mode="json"), str(run_dir(out, s)), threads))
        time.sleep(0.5)
        for rid, (s, job) in list(running.items()):
            if not job.done():
                continue
            del running[rid]
            rd = run_dir(out, s)
            try:
                status[rid] = job.result()
            except Exception as e:  # noqa: BLE001 - the subprocess died (killed, OOM, timeout)
                tail = ""
                try:
                    tail = "\n".join((job.stderr() or "").splitlines()[-20:])
                except Exception:  # noqa: BLE001
                    pass
                _record_crash(rd, s, f"job {job.job_id} ended abnormally: {str(e).splitlines()[-1][:300]}", tail)
                status[rid] = "failed"
            progress(s, status[rid])
    return status


def run_debug(specs: list[RunSpec], out: Path, suite: Suite, progress) -> dict[str, str]:
    status = {}
    for s in specs:
        status[s.run_id] = execute(s.model_dump(mode="json"), run_dir(out, s), suite.launch.threads)
        progress(s, status[s.run_id])
    return status


EXECUTORS = {"local": run_local, "debug": run_debug}


def run_suite(suite: Suite, specs: list[RunSpec], out: Path, executor: str) -> dict[str, str]:
    todo, done = plan(specs, out)
    print(f"{suite.name}: {len(specs)} runs, {len(done)} complete, {len(todo)} to run "
          f"({executor} executor) -> {out}", file=sys.stderr)
    n = [len(done)]

    def progress(spec, st):
        n[0] += 1
        print(f"[{n[0]}/{len(specs)}] {spec.label} {spec.size} seed={spec.seed}: {st}", file=sys.stderr)

    if not todo:
        return {s.run_id: "complete" for s in done}
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor}: use 'tdbench submit' for slurm, or one of {sorted(EXECUTORS)}")
    status = EXECUTORS[executor](todo, out, suite, progress)
    status.update({s.run_id: "complete" for s in done})
    return status
