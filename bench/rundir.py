"""Run-directory facts, shared by every executor: where a run lives, which runs are
complete, and who is training one now (its lease).

``<out>/runs/<run_id>/`` holds a run's spec, record, checkpoints, logs, ``progress.json`` (the
training loop's live numbers) and, while a process trains it, ``lease.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from bench.config import RunSpec
from bench.errors import UserError
from bench.records import read_record, record_status


def run_dir(out: Path, spec: RunSpec) -> Path:
    return Path(out) / "runs" / spec.run_id


def plan(specs: list[RunSpec], out: Path) -> tuple[list[RunSpec], list[RunSpec]]:
    """Split into (to run, already complete)."""
    todo, done = [], []
    for s in specs:
        (done if record_status(run_dir(out, s)) == "complete" else todo).append(s)
    return todo, done


PROGRESS = "progress.json"  # written by the training loop (bench.train), read by bench.live


# ----------------------------------------------------------------------------- checkpoints
MANIFEST = "manifest.json"


def checkpoint_root(rd: Path, stage: str | None = None, index: int = 0) -> Path:
    """Where a run's checkpoints live: ``ckpt/`` for a single-stage method, and
    ``ckpt/<index+1>-<stage>/`` for each stage of a multi-stage one (each keeps its latest
    checkpoint; a finished stage's last one stays, holding the weights the stage ended with)."""
    root = Path(rd) / "ckpt"
    return root if stage is None else root / f"{index + 1}-{stage}"


def _stage_number(p: Path) -> int:
    head = p.name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def latest_checkpoint(rd: Path, root: Path | None = None) -> Path | None:
    """The latest checkpoint under ``root`` (a checkpoint root), or of the whole run: of its
    last stage that has one (every checkpoint holds all of the method's weights)."""
    roots = [Path(root)] if root is not None else \
        sorted((p for p in (Path(rd) / "ckpt").glob("[0-9]*-*") if p.is_dir()), key=_stage_number, reverse=True) \
        + [Path(rd) / "ckpt"]
    for r in roots:
        ck = [c for c in sorted(r.glob("step_*[0-9]")) if (c / "state.json").is_file()]
        if ck:
            return ck[-1]
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt_dir: Path) -> None:
    """sha256 and size of every file of a checkpoint directory (recursively), as manifest.json."""
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    (ckpt_dir / MANIFEST).write_text(json.dumps(
        {str(p.relative_to(ckpt_dir)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}, indent=1))


def _corrupt(f: Path, ckpt: Path, why: str) -> UserError:
    return UserError(f"{f}: corrupt checkpoint ({why}); delete {ckpt} to restart from the previous state")


def verify_manifest(ckpt: Path, full: bool = True) -> None:
    """UserError naming the file unless every file of the checkpoint is as its manifest says:
    present with its size (``full=False``: cheap, for a pre-flight over many runs) and its
    sha256 (``full=True``, before anything is parsed)."""
    m = Path(ckpt) / MANIFEST
    try:
        manifest = json.loads(m.read_bytes().decode("utf-8"))
        if not isinstance(manifest, dict) or not manifest or not all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                for v in manifest.values()):
            raise ValueError("not a mapping of file -> {sha256, bytes}")
    except FileNotFoundError:
        raise _corrupt(m, ckpt, "no manifest") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _corrupt(m, ckpt, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
    for name, want in manifest.items():
        f = Path(ckpt) / name
        if not f.is_file():
            raise _corrupt(f, ckpt, "file missing")
        if f.stat().st_size != want["bytes"]:
            raise _corrupt(f, ckpt, f"{f.stat().st_size} bytes, the manifest says {want['bytes']}: truncated?")
        if full and _sha256(f) != want["sha256"]:
            raise _corrupt(f, ckpt, "content hash mismatch: edited or damaged")


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
