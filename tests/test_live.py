"""The live view reads only the run directories: states, step/total, loss, tokens/s and ETA
come from result.json / progress.json / lease.json, for any executor; plain lines off a TTY."""
from __future__ import annotations

import io
import json
import time

from conftest import specs_of, tiny_suite, write_suite

from bench import live
from bench.lease import Lease
from bench.records import write_record
from bench.runner import record_header


def test_rows_from_run_directories(tmp_path):
    specs = specs_of(tiny_suite(seeds=[0, 1]), tmp_path)  # 4 runs: mdlm, ar × 2 seeds
    out = tmp_path / "out"
    running, stopped, done, pending = specs
    rd = out / "runs" / running.run_id
    write_record(rd / "result.json", {**record_header(running), "status": "running"})
    (rd / "progress.json").write_text(json.dumps({"phase": "train", "step": 30, "total": 120, "loss": 4.25,
                                                  "tokens_per_s": 5000.0, "eta_s": 90.0, "updated": time.time()}))
    lease = Lease(rd)
    assert lease.try_acquire()
    rs = out / "runs" / stopped.run_id  # a record says running, but nobody holds it: interrupted
    write_record(rs / "result.json", {**record_header(stopped), "status": "running"})
    (rs / "progress.json").write_text(json.dumps({"phase": "train", "step": 7, "total": 120}))
    write_record(out / "runs" / done.run_id / "result.json", {**record_header(done), "status": "complete",
                                                                "metrics": []})
    try:
        rows = {r.run_id: r for r in live.rows(out, specs)}
    finally:
        lease.release()
    r = rows[running.run_id]
    assert (r.state, r.step, r.total, r.loss, r.tok_s, r.eta_s) == ("running", 30, 120, 4.25, 5000.0, 90.0)
    assert r.where.startswith(lease.info["host"]) and str(lease.info["pid"]) in r.where
    assert rows[stopped.run_id].state == "stopped" and rows[stopped.run_id].step == 7
    assert rows[done.run_id].state == "completed"
    assert rows[pending.run_id].state == "pending" and rows[pending.run_id].total == pending.train.steps
    tot = live.totals(list(rows.values()))
    assert "1 running" in tot and "1 completed" in tot and "5,000 tokens/s" in tot and "1:30" in tot
    from rich.console import Console
    con = Console(file=io.StringIO(), width=160, record=True)
    con.print(live.table(list(rows.values())))
    text = con.export_text()
    assert "30/120" in text and "4.250" in text and "5,000" in text and "1:30" in text and "stopped" in text


def test_plain_events_while_a_suite_runs(tmp_path):
    from bench.launch import run_suite
    from bench.suite import load_suite

    suite = tiny_suite(methods=[{"method": "mdlm"}], baseline=None)
    suite["train"].update(steps=150, ckpt_every=150)
    s, specs = load_suite(write_suite(tmp_path / "s.yaml", suite))
    stream = io.StringIO()
    import bench.live as lv

    orig = lv.Monitor.__init__

    def init(self, *a, **k):
        orig(self, *a, **{**k, "live": False, "stream": stream, "interval_s": 0.2})

    lv.Monitor.__init__ = init
    try:
        assert run_suite(s, specs, tmp_path / "out", "debug") == {specs[0].run_id: "complete"}
    finally:
        lv.Monitor.__init__ = orig
    lines = stream.getvalue().splitlines()
    name = f"{specs[0].label} {specs[0].size} seed={specs[0].seed}"
    assert any(ln.startswith(f"{name}: running, step ") and "/150" in ln and "tok/s" in ln for ln in lines), lines
    assert lines[-1] == f"[1/1] {name}: complete", lines


def test_event_log_lines():
    stream = io.StringIO()
    ev = live.EventLog(stream)
    r = live.Row("r1", "MDLM", "tiny", 0, "pending", total=100)
    ev.update([r])
    r.state, r.step, r.phase, r.loss = "running", 10, "train", 5.0
    ev.update([r])
    r.step = 20  # same quarter: no line
    ev.update([r])
    r.step = 60
    ev.update([r])
    r.phase, r.step = "eval", 100
    ev.update([r])
    r.state = "completed"
    ev.update([r])  # the launcher reports ends itself
    assert stream.getvalue().splitlines() == ["MDLM tiny seed=0: running, step 10/100, loss 5.000",
                                              "MDLM tiny seed=0: running, step 60/100, loss 5.000",
                                              "MDLM tiny seed=0: evaluating"]


def test_status_watch_follows_until_every_run_is_over(tmp_path):
    """--watch on a suite another process is running: it returns once the run's record is final."""
    import threading

    spec = specs_of(tiny_suite(methods=[{"method": "mdlm"}], baseline=None), tmp_path)[0]
    out = tmp_path / "out"
    rd = out / "runs" / spec.run_id
    write_record(rd / "result.json", {**record_header(spec), "status": "running"})
    (rd / "progress.json").write_text(json.dumps({"phase": "train", "step": 3, "total": 12}))
    holder = Lease(rd)
    assert holder.try_acquire()

    def finish():
        time.sleep(1.0)
        write_record(rd / "result.json", {**record_header(spec), "status": "complete", "metrics": []})
        holder.release()

    threading.Thread(target=finish).start()
    stream = io.StringIO()
    rows = live.watch(out, interval_s=0.2, live=False, stream=stream)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("MDLM tiny seed=0: running, step 3/12") and lines[-1] == "1 completed", lines
    assert [r.state for r in rows] == ["completed"]
