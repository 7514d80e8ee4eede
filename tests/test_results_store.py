"""The results store at scale (issue 27, point 5): what made ``tdbench leaderboard`` fast over
10,000 records must not weaken what the index and the records guarantee.

- ``index.json`` is sealed as a whole (one sha256 over its runs' bytes): an edit that keeps
  its layout is caught as surely as one that does not; each entry is still tied to its record's
  sealed sha256 and (mtime, size), so an entry copied onto another run, or a record edited
  behind the index's back with its mtime restored, is read again (and reported when corrupt).
- A warm scan (index up to date) returns exactly what a cold one (every record read) does,
  without reading a record.
- A plot whose inputs did not change is not drawn again (no matplotlib); one whose data changed is.
- ``tdbench leaderboard`` registers only its own command group: no pydantic at start-up.

The records here are written directly (``write_record``): no training, so every test is fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.index import INDEX, scan
from bench.index import _scan_part as _real_scan_part
from bench.records import write_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(run_id: str, seed: int, ppl: float, curve_shift: float = 0.0) -> dict:
    return {"run_id": run_id, "label": "MDLM", "method": "mdlm", "size": "tiny", "seed": seed,
            "status": "complete", "spec": {"seed": seed},
            "metrics": [{"dataset": "austen", "metric": "ppl", "value": ppl, "ci_low": ppl - 1, "ci_high": ppl + 1,
                         "bound": True, "protocol_id": "p1"}],
            "protocol": {"confidence": 0.95, "id": "p1", "preset": "custom"},
            "train": {"params": 1000, "steps": 10, "loss_curve": [5.0 - 0.1 * i + curve_shift for i in range(10)]}}


@pytest.fixture
def store(tmp_path):
    """Three complete records with distinct ppl values; index built by one cold scan."""
    for i, ppl in enumerate((100.0, 200.0, 300.0)):
        write_record(tmp_path / "runs" / f"r{i}" / "result.json", _record(f"r{i}", i, ppl))
    scan(tmp_path)
    assert (tmp_path / INDEX).is_file()
    return tmp_path


def _ppl(out) -> dict:
    runs, problems = scan(out)
    return {k: r["metrics"][0]["value"] for k, r in runs.items()}, problems


def test_warm_scan_equals_cold_scan_and_reads_no_record(store, monkeypatch):
    (store / INDEX).unlink()
    cold, problems = scan(store)
    assert not problems and set(cold) == {"r0", "r1", "r2"}
    import bench.index

    def no_read(raw, path):
        raise AssertionError(f"a warm scan parsed {path}")

    monkeypatch.setattr(bench.index, "check_record", no_read)
    warm, problems = scan(store)
    assert not problems and warm == cold     # exactly: the index holds the summaries as parsed


_SCAN_CALLS: list[int] = []


def _counting_scan_part(dirs, old):
    """bench.index._scan_part, counting the records it is given in this process (a spawned
    helper imports this module afresh: its calls land in its own copy of the list)."""
    _SCAN_CALLS.append(len(dirs))
    return _real_scan_part(dirs, old)


def test_a_cold_scan_shared_with_a_second_process_equals_one_process(tmp_path, monkeypatch):
    """With PARALLEL_MIN lowered to 8, a cold scan of 24 records (two of them corrupt, one in each
    half) parses the second half in a spawned process: the same runs, summaries and problems, in
    the same order, as the scan of one process; the index it writes is what one process writes.
    A helper that cannot be used (its pool refuses to start) leaves the scan to this process."""
    import bench.index

    for i in range(24):
        write_record(tmp_path / "runs" / f"r{i:02d}" / "result.json", _record(f"r{i:02d}", i, 100.0 + i))
    for torn in ("r03", "r20"):
        p = tmp_path / "runs" / torn / "result.json"
        p.write_bytes(p.read_bytes()[:-40])
    one, p1 = scan(tmp_path, write=True)
    index_one = (tmp_path / INDEX).read_bytes()
    (tmp_path / INDEX).unlink()

    calls = _SCAN_CALLS
    calls.clear()
    monkeypatch.setattr(bench.index, "PARALLEL_MIN", 8)
    monkeypatch.setattr(bench.index, "_scan_part", _counting_scan_part)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    two, p2 = scan(tmp_path, write=True)
    assert calls == [12], calls            # this process parsed 12; the spawned one the other 12
    assert two == one and list(two) == list(one) and p2 == p1 and len(p1) == 2
    assert "r03" in p1[0] and "r20" in p1[1]
    assert (tmp_path / INDEX).read_bytes() == index_one

    real_check = bench.index.check_record

    def no_read(raw, path):   # a warm scan reuses the index (no helper): it parses only the torn two
        if "r03" in str(path) or "r20" in str(path):
            return real_check(raw, path)
        raise AssertionError(f"a warm scan parsed {path}")

    monkeypatch.setattr(bench.index, "check_record", no_read)
    calls.clear()
    warm, pw = scan(tmp_path, write=True)
    assert calls == [24] and warm == one and pw == p1
    monkeypatch.undo()
    monkeypatch.setattr(bench.index, "PARALLEL_MIN", 8)
    monkeypatch.setattr(bench.index, "_scan_part", _counting_scan_part)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)

    (tmp_path / INDEX).unlink()
    calls.clear()

    class Refused:
        def __init__(self, *a, **k):
            raise OSError("no processes")

    import concurrent.futures
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Refused)
    three, p3 = scan(tmp_path, write=True)
    assert calls == [24] and three == one and p3 == p1


def test_an_in_place_edit_of_the_index_is_caught(store):
    """The sharper edit: same layout, one number changed in the bytes (200 → 201)."""
    raw = (store / INDEX).read_bytes()
    assert raw.count(b'"value":200.0') == 1
    (store / INDEX).write_bytes(raw.replace(b'"value":200.0', b'"value":201.0'))
    vals, problems = _ppl(store)
    assert not problems and vals == {"r0": 100.0, "r1": 200.0, "r2": 300.0}
    assert b'"value":201.0' not in (store / INDEX).read_bytes()     # rebuilt from the records


def test_an_entry_copied_onto_another_run_is_not_used(store):
    """r2's summary under r1's key and size, the index resealed correctly: r1's record is sealed
    with another sha256, so it is read again."""
    from bench.index import seal

    runs = json.loads((store / INDEX).read_bytes()[len('{"format":6,"sha256":"') + 64 + len('","runs":'):-1])
    runs["r1"] = {**runs["r2"], "key": runs["r1"]["key"]}
    (store / INDEX).write_text(seal(runs))
    vals, problems = _ppl(store)
    assert not problems and vals["r1"] == 200.0


def test_a_record_edited_behind_the_index_is_reported(store):
    """A value and the seal rewritten in place (same size), the mtime restored: the (mtime, size)
    key matches, the seal does not match the entry's sha256, so the record is read again, and
    its content hash says it was edited."""
    p = store / "runs" / "r1" / "result.json"
    st = p.stat()
    raw = p.read_bytes()
    assert raw.count(b'"value": 200.0') == 1 and raw.endswith(b'"}\n')
    forged = raw.replace(b'"value": 200.0', b'"value": 100.0')[:-67] + b"0" * 64 + b'"}\n'
    p.write_bytes(forged)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    vals, problems = _ppl(store)
    assert "r1" not in vals and len(problems) == 1 and "r1" in problems[0] and "content hash" in problems[0]


def test_a_torn_record_is_reported(store):
    p = store / "runs" / "r0" / "result.json"
    p.write_bytes(p.read_bytes()[:-40])
    vals, problems = _ppl(store)
    assert set(vals) == {"r1", "r2"} and len(problems) == 1 and "corrupt run record" in problems[0]


def test_an_unchanged_plot_is_not_drawn_again_and_a_changed_one_is(store, monkeypatch):
    import bench.plots as plots

    runs, _ = scan(store)
    png = store / "training.png"
    assert plots.training_curves(list(runs.values()), png) == png
    first = png.read_bytes()
    drawn = []
    real = plots.pyplot
    monkeypatch.setattr(plots, "pyplot", lambda: drawn.append(1) or real())
    plots.training_curves(list(runs.values()), png)
    assert not drawn and png.read_bytes() == first          # same inputs: not drawn, not touched
    write_record(store / "runs" / "r1" / "result.json", _record("r1", 1, 200.0, curve_shift=0.5))
    runs, _ = scan(store)
    plots.training_curves(list(runs.values()), png)
    assert drawn and png.read_bytes() != first              # one loss curve changed: drawn again


def test_leaderboard_starts_without_pydantic(store):
    code = ("import sys; from bench.cli import main; rc = main(['leaderboard', sys.argv[1], '--format', 'csv']); "
            "print('pydantic' in sys.modules, 'bench.config' in sys.modules, rc)")
    r = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False False 0"


def test_every_command_is_registered_by_the_group_that_names_it():
    """bench.cli.GROUPS (which module a command line loads) against the full parser."""
    import argparse
    import importlib

    from bench.cli import GROUPS, MODULES, parser

    owner = {}
    for name in MODULES:
        p = argparse.ArgumentParser()
        sub = p.add_subparsers(dest="cmd")
        importlib.import_module(f"bench.cli.{name}").register(sub)
        owner.update(dict.fromkeys(sub.choices, name))
    full = parser()._subparsers._group_actions[0].choices
    assert set(owner) == set(full) and GROUPS == owner
