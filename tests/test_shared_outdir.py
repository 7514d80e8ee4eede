"""A results directory shared by several people (issue 24, point 8).

- ``index.json`` is derived from the records and keyed by each record's sealed sha256: editing
  only the index cannot change a leaderboard value.
- Records, leaderboards, progress, samples (every file written atomically) honour the umask
  (``mkstemp`` alone creates 0600, which a second user sharing the directory cannot read).
- Local runs are stopped when ``tdbench run`` ends on any exception, not only on Ctrl-C."""
from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_suite, write_suite

from bench.cli import main


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    """One tiny MDLM run with samples, run under umask 002 (a group-shared directory)."""
    tmp = tmp_path_factory.mktemp("shared")
    suite = tiny_suite(methods=[{"method": "mdlm"}], baseline=None)
    suite["eval"] = {**suite["eval"], "samples": 2}
    old = os.umask(0o002)
    try:
        assert main(["run", str(write_suite(tmp / "s.yaml", suite)), "--out", str(tmp / "out")]) == 0
    finally:
        os.umask(old)
    return tmp / "out"


def test_files_written_into_a_results_directory_honour_the_umask(shared_out):
    rd = next((shared_out / "runs").iterdir())
    files = [rd / "result.json", rd / "spec.json", rd / "progress.json", rd / "samples.jsonl",
             shared_out / "index.json", shared_out / "leaderboard.csv", shared_out / "leaderboard.md",
             shared_out / "training.png"]
    ckpt = max((rd / "ckpt").glob("step_*"))   # a second user must be able to resume the run
    files += [f for f in ckpt.iterdir() if f.is_file()]
    modes = {str(p.relative_to(shared_out)): oct(_mode(p)) for p in files}
    assert all(m == oct(0o664) for m in modes.values()), modes


def test_atomic_write_follows_the_current_umask(tmp_path):
    from bench.records import atomic_write_text, write_record

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        write_record(tmp_path / "result.json", {"status": "running", "spec": {}})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o640 and _mode(tmp_path / "result.json") == 0o640


def _ppl_values(out: Path) -> list[float]:
    assert main(["leaderboard", str(out), "--format", "csv"]) == 0
    t = pd.read_csv(out / "leaderboard.csv")
    return sorted(t[t.metric == "ppl"]["value"].tolist())


def test_editing_only_the_index_cannot_change_a_leaderboard_value(shared_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(shared_out, out)
    want = _ppl_values(out)
    rec = json.loads(next((out / "runs").glob("*/result.json")).read_text())
    idx = json.loads((out / "index.json").read_text())
    (entry,) = idx["runs"].values()
    edited = False
    for m in entry["rec"]["metrics"]:
        if m["metric"] == "ppl":
            m["value"] = m["value"] / 3      # a "better" number typed into the index by hand
            edited = True
    assert edited
    (out / "index.json").write_text(json.dumps(idx))
    assert _ppl_values(out) == want
    assert rec["sha256"] in json.dumps(entry)   # the entry is tied to its record's sealed hash
    # and the index is rebuilt from the record (the edit does not survive)
    again = json.loads((out / "index.json").read_text())
    assert [m["value"] for m in next(iter(again["runs"].values()))["rec"]["metrics"]] == \
        [m["value"] for m in rec["metrics"]]


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_local_jobs_are_stopped_when_any_exception_ends_the_run(tmp_path, monkeypatch, sigint_ignored):
    """An exception other than Ctrl-C/SIGTERM while local jobs run (here: in the executor's
    polling loop) stops the jobs it started; before, they went on, detached, with their leases.
    ``sigint_ignored``: ``tdbench run`` started in the background by a non-interactive shell
    inherits SIGINT ignored, and so do its children; the jobs must stop all the same."""
    import signal

    import submitit

    from bench import launch
    from bench.suite import load_suite

    suite, specs = load_suite(write_suite(tmp_path / "s.yaml", tiny_suite(methods=[{"method": "mdlm"}],
                                                                          baseline=None)))
    # each job just sleeps (a lambda: submitit pickles it by value into the child)
    monkeypatch.setattr(launch, "execute", lambda *a: __import__("time").sleep(120))
    old_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint_ignored else None  # the jobs inherit it
    jobs = []
    real_submit = submitit.LocalExecutor.submit

    def submit(self, *a, **k):
        jobs.append(real_submit(self, *a, **k))
        return jobs[-1]

    monkeypatch.setattr(submitit.LocalExecutor, "submit", submit)

    class Clock:   # the loop's first poll fails (a stand-in for any error: an NFS hiccup, a bug)
        monotonic = staticmethod(time.monotonic)
        calls = 0

        @classmethod
        def sleep(cls, s):
            cls.calls += 1
            if cls.calls == 1:
                time.sleep(1.0)   # the job is up
                assert jobs and not any(j.done() for j in jobs), "a job ended before the failure: nothing to stop"
                raise RuntimeError("injected failure while the local jobs run")
            time.sleep(s)

    monkeypatch.setattr(launch, "time", Clock)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            launch.run_local(specs, tmp_path / "out", suite, lambda *a: None)
        assert jobs
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(j.done() for j in jobs):
            time.sleep(0.2)
        alive = [j.job_id for j in jobs if not j.done()]
        assert not alive, f"local jobs still running after the exception: {alive}"
    finally:
        if sigint_ignored:
            signal.signal(signal.SIGINT, old_sigint)
        for j in jobs:
            if not j.done():
                j.cancel(check=False)
