"""A process that lost its lease stops writing (issue 24, point 2).

- a stalled holder (SIGSTOP past the stale time: a Slurm suspend, an NFS hang) is taken over;
  when it wakes it publishes no checkpoint and never writes over the complete record the new
  holder left — neither by finishing nor by failing;
- one missing read of the lease (a taker's rename-aside step, an NFS glitch) does not end the
  heartbeat; failing heartbeat writes make the holder consider the lease lost;
- staleness is judged on the reader's own clock (the heartbeat not changing for stale_s), so a
  holder whose clock is behind is not taken over while it beats; a lease naming this host but
  another PID namespace is not judged by a PID of this one;
- staging directories carry the writer's token.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, complete_record, specs_of, tiny_suite

from bench.lease import LEASE, Lease, lease_state, read_lease

FAST = {"TDBENCH_LEASE_STALE_S": "2", "TDBENCH_LEASE_HEARTBEAT_S": "0.25"}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **FAST}


# A holder that stalls (SIGSTOP) right after publishing checkpoint K; in mode "crash" it fails
# as soon as it wakes up.
STALLING = """
import json, os, signal, sys
import bench.checkpoint as C
from bench.runner import execute
publish, MODE, K = C.publish, sys.argv[3], int(sys.argv[4])
stalled = []
def publish_then_stall(root, step, *a, **k):
    publish(root, step, *a, **k)
    if step == K and not stalled:
        stalled.append(1)
        os.kill(os.getpid(), signal.SIGSTOP)
        if MODE == "crash":
            raise RuntimeError("crashed after the stall")
C.publish = publish_then_stall
print("result:", execute(json.loads(sys.argv[1]), sys.argv[2], 1), flush=True)
"""

# The other process: waits for the run while it is held, then trains it (from the checkpoint)
TAKER = """
import json, sys, time
from bench.runner import execute
while (r := execute(json.loads(sys.argv[1]), sys.argv[2], 1)) == "held":
    time.sleep(0.2)
print("result:", r, flush=True)
"""


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _snapshot(rd: Path) -> dict:
    """Every file under the run directory but its log and progress: name -> bytes."""
    return {str(p.relative_to(rd)): p.read_bytes() for p in sorted(rd.rglob("*"))
            if p.is_file() and p.name not in ("log.txt", "progress.json")}


@pytest.mark.parametrize("mode", ["continue", "crash"])
def test_stalled_holder_taken_over_publishes_nothing_and_keeps_the_complete_record(tmp_path, mode):
    suite = tiny_suite(train={"steps": 40, "batch_size": 8, "lr": 3e-3, "warmup": 2, "ckpt_every": 10})
    spec = specs_of(suite, tmp_path)[0]
    spec_json = json.dumps(spec.model_dump(mode="json"))
    rd = tmp_path / "out" / "runs" / spec.run_id
    a = subprocess.Popen([sys.executable, "-c", STALLING, spec_json, str(rd), mode, "10"], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while _state(a.pid) != "T":
            assert a.poll() is None and time.time() - t0 < 180, "the holder never reached its stall"
            time.sleep(0.05)
        b = subprocess.run([sys.executable, "-c", TAKER, spec_json, str(rd)], env=_env(), capture_output=True,
                           text=True, timeout=400)
        assert b.returncode == 0 and "result: complete" in b.stdout, b.stderr[-3000:]
        rec = complete_record(rd)
        assert rec["train"]["resumed_from_step"] == 10, "the taker resumed from the stalled holder's checkpoint"
        before = _snapshot(rd)
        a.send_signal(signal.SIGCONT)
        out, err = a.communicate(timeout=300)
    finally:
        a.kill()
    after = _snapshot(rd)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the holder that lost its lease wrote after waking up: {changed}\n{err[-3000:]}"
    assert complete_record(rd)["sha256"] == rec["sha256"]
    assert not list(rd.rglob(".tmp_step_*")), "its staging directory is left behind"
    assert "result: held" in out, out + err[-3000:]
    assert "lease lost" in (rd / "log.txt").read_text()


def test_heartbeat_survives_a_missing_read(tmp_path):
    """A taker's rename-aside step (or an NFS hiccup) hides lease.json for a moment: the holder
    goes on beating once it is back, so nobody can take it over later while it works."""
    rd = tmp_path / "run"
    a = Lease(rd, stale_s=5.0, heartbeat_s=0.1)
    assert a.try_acquire()
    aside = rd / ".aside"
    os.rename(rd / LEASE, aside)
    time.sleep(0.35)
    os.link(aside, rd / LEASE)   # a slow taker saw a fresh lease and put it back
    aside.unlink()
    b0 = read_lease(rd)["heartbeat"]
    time.sleep(0.6)
    assert read_lease(rd)["heartbeat"] != b0, "the heartbeat stopped after one missing read"
    a.release()


def test_failing_heartbeat_writes_lose_the_lease(tmp_path, monkeypatch):
    rd = tmp_path / "run"
    a = Lease(rd, stale_s=1.0, heartbeat_s=0.1)
    assert a.try_acquire()
    a.check()   # held: no error
    real = os.replace

    def failing(src, dst, *args, **kw):
        if Path(dst).name == LEASE:
            raise OSError(5, "Input/output error")
        return real(src, dst, *args, **kw)

    monkeypatch.setattr(os, "replace", failing)
    time.sleep(1.0)
    from bench.lease import LeaseLost

    assert a.lost, "repeated heartbeat write failures went unnoticed"
    with pytest.raises(LeaseLost, match="heartbeat"):
        a.check()
    monkeypatch.setattr(os, "replace", real)
    a.release()


def test_staleness_is_judged_on_the_readers_clock(tmp_path):
    """A remote holder whose clock is an hour behind ours, beating: held. One whose clock is
    an hour ahead and silent: stale once the reader has watched it unchanged for stale_s."""
    rd = tmp_path / "run"
    rd.mkdir()
    lease = {"host": "node-elsewhere", "pid": 1, "job_id": "1", "token": "behind", "heartbeat": time.time() - 3600}
    (rd / LEASE).write_text(json.dumps(lease))
    assert lease_state(read_lease(rd), stale_s=1.0) == "held", "a beating holder with a slow clock was judged stale"
    assert not Lease(rd, stale_s=1.0).try_acquire()
    for i in range(6):   # it beats (its heartbeat value changes), on its own clock
        time.sleep(0.25)
        (rd / LEASE).write_text(json.dumps({**lease, "heartbeat": lease["heartbeat"] + i + 1}))
        assert lease_state(read_lease(rd), stale_s=1.0) == "held"
    assert not Lease(rd, stale_s=1.0).try_acquire()
    ahead = {**lease, "token": "ahead", "heartbeat": time.time() + 3600}
    (rd / LEASE).write_text(json.dumps(ahead))
    assert lease_state(read_lease(rd), stale_s=1.0) == "held"
    time.sleep(1.2)
    assert lease_state(read_lease(rd), stale_s=1.0) == "stale", "a silent holder with a fast clock is never stale"
    mine = Lease(rd, stale_s=1.0)
    assert mine.try_acquire() and mine.took_over["token"] == "ahead"
    mine.release()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_same_hostname_other_pid_namespace_is_not_judged_by_our_pids(tmp_path):
    """A container on another machine (or in another PID namespace here) with our host name:
    its PID means nothing here, so a fresh lease of it is held, not taken over."""
    rd = tmp_path / "run"
    rd.mkdir()
    lease = {"host": socket.gethostname(), "pid": _dead_pid(), "job_id": None, "token": "other-ns",
             "heartbeat": time.time(), "pidns": "pid:[1]", "boot_id": "00000000-0000-0000-0000-000000000000"}
    (rd / LEASE).write_text(json.dumps(lease))
    assert lease_state(read_lease(rd)) == "held"
    assert not Lease(rd).try_acquire(), "a live holder in another PID namespace was taken over"


def test_staging_names_carry_the_writers_token(tmp_path):
    from bench.checkpoint import staging

    a, b = staging(tmp_path, 10, "aaaa"), staging(tmp_path, 10, "bbbb")
    assert a != b and a.name == ".tmp_step_0000010.aaaa"
