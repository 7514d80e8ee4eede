"""Leases: who is training a run directory now (``<run>/lease.json``), for one process anywhere.

The rules (docs/running.md, "One results directory, many users"):

- **Taken atomically**: ``O_CREAT | O_EXCL`` on ``lease.json`` (honoured by NFSv3+ and Lustre).
  The lease carries a random ``token``; the holder keeps it, and only the process whose token
  is in the file may write to the run directory.
- **Heartbeat**: the holder rewrites the file every ``heartbeat_s`` seconds (a thread; ``seq``
  and ``heartbeat`` change each time). A missing or unreadable read is retried at the next beat
  (a taker's rename-aside step, an NFS hiccup); another token in the file, or failures for half
  of ``stale_s``, mean the lease is lost: :attr:`Lease.lost`, and :meth:`Lease.check` raises
  :class:`LeaseLost`. The writer calls ``check`` before every checkpoint publish and every
  record it writes, and stops writing when it fails.
- **Staleness is judged by the reader, on its own monotonic clock**: a lease is stale when the
  reader has watched its heartbeat not change for ``stale_s`` (never by comparing the holder's
  wall-clock timestamp with the reader's clock), or at once when its holder is a dead process
  of this very machine and PID namespace (same boot id and ``/proc/self/ns/pid``, and the same
  process start time, so a reused PID is not taken for the holder).
- **Takeover**: rename the stale lease aside (one taker wins), check the moved file is the very
  lease judged stale (same token and heartbeat), else put it back; then create a new one.

``TDBENCH_LEASE_STALE_S`` and ``TDBENCH_LEASE_HEARTBEAT_S`` override the defaults (tests and
the fault-injection benchmark use seconds instead of a minute).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from bench.records import JSON_ERRORS

LEASE = "lease.json"
HEARTBEAT_S = 10.0   # the holder rewrites its lease this often
STALE_S = 60.0       # a lease whose heartbeat has not changed for this long is stale


class LeaseLost(Exception):
    """This process no longer holds the run directory's lease: it must stop writing there."""


def default_stale_s() -> float:
    return float(os.environ.get("TDBENCH_LEASE_STALE_S") or STALE_S)


def default_heartbeat_s() -> float:
    return float(os.environ.get("TDBENCH_LEASE_HEARTBEAT_S") or HEARTBEAT_S)


# ----------------------------------------------------------------------------- who holds it
def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first, start time at
    index 19; [] when unparseable); None when there is no such process (or no /proc)."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[1].split() if ")" in stat else []
    return fields if len(fields) > 19 else []


def _start_time(pid: int | str) -> str | None:
    """A process's start time (clock ticks since boot): with the PID, names one process."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def _namespace() -> dict:
    """What makes a PID meaningful: this machine's boot and this PID namespace."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    return {"boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def holder_id() -> dict:
    e = os.environ
    job = None
    if e.get("SLURM_JOB_ID"):
        job = e["SLURM_JOB_ID"]
        if e.get("SLURM_ARRAY_JOB_ID"):
            job = f"{e['SLURM_ARRAY_JOB_ID']}_{e.get('SLURM_ARRAY_TASK_ID', '')}"
    elif e.get("SUBMITIT_LOCAL_JOB_ID"):
        job = f"local-{e['SUBMITIT_LOCAL_JOB_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job, **_namespace(),
            "started": _start_time("self")}


def _here(lease: dict) -> bool:
    """The lease's PID is one of this machine's and PID namespace (the host name alone is not
    enough: containers and other machines can share it)."""
    ns = _namespace()
    return lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int) \
        and ns["boot_id"] is not None and ns["pidns"] is not None \
        and lease.get("boot_id") == ns["boot_id"] and lease.get("pidns") == ns["pidns"]


def _process_state(lease: dict) -> str:
    """'dead', 'stopped', 'running', or 'unknown' (not a process of this machine and namespace)."""
    if not _here(lease):
        return "unknown"
    fields = _stat_fields(lease["pid"])
    if fields is None:
        return "dead"
    if not fields:
        return "unknown"
    if fields[0] in ("Z", "X") or (lease.get("started") and fields[19] != lease["started"]):
        return "dead"   # a zombie (PID 1 may reap slowly), or the PID reused by another process
    return "stopped" if fields[0] in ("T", "t") else "running"


# ----------------------------------------------------------------------------- reading
def read_lease(rd: Path) -> dict | None:
    """The lease of a run directory (None: no lease, or an unreadable one)."""
    return _read_lease_file(Path(rd) / LEASE)


def _read_lease_file(path: Path) -> dict | None:
    try:
        lease = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, *JSON_ERRORS):   # deep nesting, huge ints too: unreadable
        return None
    return lease if isinstance(lease, dict) and isinstance(lease.get("token"), str) else None


def beat_of(lease: dict):
    return lease.get("token"), repr(lease.get("heartbeat")), repr(lease.get("seq"))


_SEEN: dict[str, tuple[tuple, float]] = {}   # token -> (heartbeat last seen, when it was first seen so)


def unchanged_for(lease: dict) -> float:
    """Seconds, on this process's monotonic clock, since it first saw ``lease``'s heartbeat as
    it is now (0 when it is new to it)."""
    beat, now = beat_of(lease), time.monotonic()
    seen = _SEEN.get(beat[0])
    if seen is None or seen[0] != beat:
        _SEEN[beat[0]] = (beat, now)
        return 0.0
    return now - seen[1]


def lease_state(lease: dict | None, stale_s: float | None = None) -> str:
    """'free' (none), 'stale' (its holder is dead or silent), or 'held'. Silent: this reader
    has watched its heartbeat not change for ``stale_s`` (a reader that has just started
    watches first; the launcher and the live view keep watching)."""
    if lease is None:
        return "free"
    stale = default_stale_s() if stale_s is None else stale_s
    if _process_state(lease) == "dead":
        return "stale"   # same machine and PID namespace, the process is gone (SIGKILL, OOM)
    return "stale" if unchanged_for(lease) > stale else "held"


def describe_lease(lease: dict) -> str:
    job = f", job {lease['job_id']}" if lease.get("job_id") else ""
    seen = _SEEN.get(lease.get("token"))
    age = time.monotonic() - seen[1] if seen and seen[0] == beat_of(lease) else 0.0
    return f"{lease.get('host')} pid {lease.get('pid')}{job}, heartbeat {age:.0f} s ago"


def _unreadable_state(path: Path, stale: float) -> str:
    """An unreadable lease.json (being written, or debris): 'free' when gone, else judged like
    a lease whose heartbeat is its file's identity and size and mtime."""
    try:
        st = path.stat()
    except OSError:
        return "free"
    return "stale" if unchanged_for({"token": f"?{path}", "heartbeat": (st.st_ino, st.st_size, st.st_mtime_ns)}) \
        > stale else "held"


# ----------------------------------------------------------------------------- holding
class Lease:
    """Exclusive right to train one run directory, for one process anywhere (module docstring)."""

    def __init__(self, rd: Path, stale_s: float | None = None, heartbeat_s: float | None = None):
        self.rd, self.path = Path(rd), Path(rd) / LEASE
        self.stale_s = default_stale_s() if stale_s is None else stale_s
        self.heartbeat_s = default_heartbeat_s() if heartbeat_s is None else heartbeat_s
        self.info = {**holder_id(), "token": uuid.uuid4().hex}
        self.held = False
        self.lost: str | None = None   # why the lease was lost (None: not lost)
        self.seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None  # the stale lease this one replaced

    @property
    def token(self) -> str:
        return self.info["token"]

    def _body(self) -> bytes:
        self.seq += 1
        return json.dumps({**self.info, "heartbeat": time.time(), "seq": self.seq}).encode()

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

    def try_acquire(self, watch_s: float = 0.0) -> bool:
        """Take the lease if it is free or stale. ``watch_s`` > 0: a lease that looks held but
        whose holder is not a running process of this machine is watched for up to that long
        (its heartbeat changing: held; not changing for ``stale_s``: taken over)."""
        if self.held:
            return True
        deadline, first = time.monotonic() + watch_s, None
        for _ in range(1000):
            if self._create():
                break
            cur = _read_lease_file(self.path)
            state = lease_state(cur, self.stale_s) if cur is not None else _unreadable_state(self.path, self.stale_s)
            if state == "free":
                continue   # released meanwhile: try again
            if state == "stale":
                taken = self._take_over(cur)
                if taken is None:
                    continue
                if not taken:
                    return False
                break
            first = first or (cur and beat_of(cur))
            if cur is not None and (beat_of(cur) != first or _process_state(cur) == "running"):
                return False   # it beats, or its process runs here: held
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.5, self.heartbeat_s / 2, max(self.stale_s / 8, 0.01)))
        else:
            return False
        self.held, self.lost = True, None
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease-{self.rd.name}")
        self._thread.start()
        return True

    def _take_over(self, cur: dict | None) -> bool | None:
        """Move the stale lease aside and create ours: True, False (someone else was faster, or
        the holder beat meanwhile), None (it was released meanwhile: start again)."""
        try:
            before = self.path.stat()
        except FileNotFoundError:
            return None
        aside = self.rd / f".{LEASE}.stale-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        moved = _read_lease_file(aside)
        same = beat_of(moved) == beat_of(cur) if cur is not None and moved is not None else \
            cur is None and moved is None and aside.stat().st_ino == before.st_ino
        if not same:   # we moved a fresh lease (a new holder's, or a beat since we judged): put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        self.took_over = cur or {"token": None}
        return self._create()

    def _beat(self) -> None:
        misses, limit = 0, max(2, int(self.stale_s / 2 / self.heartbeat_s))
        while not self._stop.wait(self.heartbeat_s):
            cur = _read_lease_file(self.path)
            if cur is not None and cur.get("token") != self.token:
                self.lost = f"taken over by {cur.get('host')} pid {cur.get('pid')} (we were judged stale)"
                return   # never overwrite the new holder
            ok = False
            if cur is not None:
                tmp = self.rd / f".{LEASE}.{self.token}.tmp"
                try:
                    tmp.write_bytes(self._body())
                    os.replace(tmp, self.path)
                    ok = True
                except OSError:
                    pass
            misses = 0 if ok else misses + 1
            if misses >= limit:
                what = "unreadable" if cur is None else "unwritable"
                self.lost = f"{misses} heartbeats in a row failed ({what} lease.json)"
                return

    def check(self) -> None:
        """LeaseLost unless this process still holds the lease: its heartbeat has not failed
        and the file names its token (an unreadable read is retried a few times)."""
        if self.lost:
            raise LeaseLost(f"lease lost: {self.lost}")
        if not self.held:
            raise LeaseLost("lease lost: not held")
        for i in range(4):
            cur = _read_lease_file(self.path)
            if cur is not None:
                break
            time.sleep(0.1 * (i + 1))
        if cur is None or cur.get("token") != self.token:
            self.lost = "lease.json is gone or unreadable" if cur is None else \
                f"taken over by {cur.get('host')} pid {cur.get('pid')}"
            raise LeaseLost(f"lease lost: {self.lost}")

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        cur = _read_lease_file(self.path)
        if cur is not None and cur.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        (self.rd / f".{LEASE}.{self.token}.tmp").unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
