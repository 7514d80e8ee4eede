"""Run-directory facts, shared by every executor: where a run lives, which runs are
complete, and who is training one now (its lease).

``<out>/runs/<run_id>/`` holds a run's spec, record, checkpoints, logs, ``progress.json`` (the
training loop's live numbers) and, while a process trains it, ``lease.json``. Its checkpoints
(``ckpt/``) are bench.checkpoint's.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from bench.checkpoint import latest_checkpoint, verify_manifest
from bench.config import RunSpec
from bench.errors import UserError
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
    """Before anything starts: every run about to resume has a readable record (or none) and
    an intact latest checkpoint (sizes against its manifest; the full hashes are checked when
    the run loads it). UserError naming the file otherwise."""
    for s in specs:
        rd = run_dir(out, s)
        if (rd / "result.json").exists():
            try:
                read_record(rd / "result.json")
            except UserError as e:
                raise UserError(f"{e}; delete it to rerun the run") from None
        ck = latest_checkpoint(rd)
        if ck is not None:
            verify_manifest(ck, full=False)


# ----------------------------------------------------------------------------- leases
LEASE = "lease.json"
HEARTBEAT_S = 10.0   # the holder rewrites its lease this often
STALE_S = 60.0       # a lease not refreshed for this long is stale, wherever its holder runs


def _holder_id() -> dict:
    e = os.environ
    job = None
    if e.get("SLURM_JOB_ID"):
        job = e["SLURM_JOB_ID"]
        if e.get("SLURM_ARRAY_JOB_ID"):
            job = f"{e['SLURM_ARRAY_JOB_ID']}_{e.get('SLURM_ARRAY_TASK_ID', '')}"
    elif e.get("SUBMITIT_LOCAL_JOB_ID"):
        job = f"local-{e['SUBMITIT_LOCAL_JOB_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job}


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie (PID 1 may reap a killed process slowly)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_lease(rd: Path) -> dict | None:
    """The lease of a run directory (None: no lease, or an unreadable one)."""
    return _read_lease_file(Path(rd) / LEASE)


def _read_lease_file(path: Path) -> dict | None:
    try:
        lease = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return lease if isinstance(lease, dict) and isinstance(lease.get("token"), str) else None


def lease_state(lease: dict | None, stale_s: float = STALE_S) -> str:
    """'free' (none), 'stale' (its holder is dead or silent), or 'held'."""
    if lease is None:
        return "free"
    beat = lease.get("heartbeat")
    if not isinstance(beat, (int, float)) or time.time() - beat > stale_s:
        return "stale"
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int) \
            and not _pid_alive(lease["pid"]):
        return "stale"  # same host, the process is gone (SIGKILL, OOM): no need to wait
    return "held"


def describe_lease(lease: dict) -> str:
    job = f", job {lease['job_id']}" if lease.get("job_id") else ""
    age = time.time() - lease.get("heartbeat", 0)
    return f"{lease.get('host')} pid {lease.get('pid')}{job}, heartbeat {age:.0f} s ago"


class Lease:
    """Exclusive right to train one run directory, for one process anywhere.

    Taken atomically (``O_CREAT | O_EXCL`` on ``lease.json``, which NFSv3+ and Lustre honour);
    the holder refreshes ``heartbeat`` every HEARTBEAT_S seconds from a thread (atomic rewrite,
    only the holder writes) and removes the file when done. A stale lease (no heartbeat for
    STALE_S, or its process gone on this host) is taken over by renaming it aside — a rename
    only one taker can win — and checking the renamed file is the stale one it judged; a fresh
    lease moved aside by a slow taker is put back (``os.link``, which fails if another was
    created meanwhile)."""

    def __init__(self, rd: Path, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
        self.rd, self.path = Path(rd), Path(rd) / LEASE
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.info = {**_holder_id(), "token": uuid.uuid4().hex}
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None  # the stale lease this one replaced

    def _body(self) -> bytes:
        return json.dumps({**self.info, "heartbeat": time.time()}).encode()

    def _create(self) -> bool:
        self.rd.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._body())
            f.flush()
            os.fsync(f.fileno())
        return True

    def try_acquire(self) -> bool:
        if self.held:
            return True
        if not self._create():
            cur = read_lease(self.rd)
            if cur is None and self.path.exists():  # unreadable: being written, or debris
                try:
                    if time.time() - self.path.stat().st_mtime < self.stale_s:
                        return False
                except OSError:
                    return False
                cur = {"token": None}
            elif lease_state(cur, self.stale_s) == "held":
                return False
            aside = self.rd / f".{LEASE}.stale-{self.info['token']}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return self.try_acquire()  # released meanwhile: try again from the top
            moved = _read_lease_file(aside) or {"token": None}
            if moved.get("token") != cur.get("token"):  # we moved someone's fresh lease: put it back
                try:
                    os.link(aside, self.path)
                except OSError:
                    pass
                aside.unlink(missing_ok=True)
                return False
            aside.unlink(missing_ok=True)
            self.took_over = cur
            if not self._create():
                return False
        self.held = True
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease-{self.rd.name}")
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            cur = read_lease(self.rd)
            if cur is None or cur.get("token") != self.info["token"]:
                return  # taken over (we were judged stale): never overwrite the new holder
            tmp = self.rd / f".{LEASE}.{self.info['token']}.tmp"
            try:
                tmp.write_bytes(self._body())
                os.replace(tmp, self.path)
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        cur = read_lease(self.rd)
        if cur is not None and cur.get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def holders(out: Path, specs: list[RunSpec]) -> dict[str, dict]:
    """{run_id: lease} of the runs another live process is training now."""
    out_ = {}
    for s in specs:
        lease = read_lease(run_dir(out, s))
        if lease_state(lease) == "held":
            out_[s.run_id] = lease
    return out_
