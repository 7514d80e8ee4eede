"""Run records and other files written atomically (temp file + rename): never half-written.

A run record (``result.json``) carries ``sha256``: the hash of its own canonical JSON (sorted
keys, the ``sha256`` key left out), checked on every read, so a truncated or hand-edited record
is reported by name and never trusted. Checkpoint files are hashed likewise (bench.checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

from bench.errors import UserError

STATUSES = ("complete", "failed", "running")


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc; elsewhere set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open`` gives a new file: 0666 & ~umask."""
    return 0o666 & ~current_umask()


def honour_umask(fd: int) -> None:
    """Give a file made by ``mkstemp`` (always 0600) the mode ``open`` would (:func:`file_mode`),
    so a second user sharing a results directory can read what the first one wrote."""
    os.fchmod(fd, file_mode())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temp file and a rename, with the mode the umask gives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        honour_umask(fd)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (0700), created if missing: for the
    folders whose files are unpickled (submitit's job pickles, DeepSpeed's optimizer shards),
    which anyone who could write them could turn into code run as the job's owner."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.chmod(path, 0o700)
    except PermissionError:
        raise UserError(f"{path}: belongs to another user; it holds pickles that are run as code, so it stays "
                        f"private (0700) to its owner: use an --out of your own") from None
    return path


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True, default=str, ensure_ascii=False)


def content_hash(rec: dict) -> str:
    """sha256 of a record's canonical JSON without its own ``sha256`` key."""
    return hashlib.sha256(_canonical({k: v for k, v in rec.items() if k != "sha256"}).encode()).hexdigest()


# A record is written as its canonical JSON with the hash appended as the last key, so a
# reader can check the hash on the bytes as read, without serialising the record again.
_SEAL = re.compile(rb', "sha256": "([0-9a-f]{64})"}\n?$')


def write_record(path: Path, rec: dict) -> None:
    """Write a run record with its content hash (atomically): the canonical JSON of the record
    (sorted keys) with ``"sha256"`` appended as its last key."""
    body = json.loads(json.dumps({k: v for k, v in rec.items() if k != "sha256"}, default=str))
    text = _canonical(body)
    digest = hashlib.sha256(text.encode()).hexdigest()
    atomic_write_text(path, text[:-1] + ("" if text == "{}" else ", ") + f'"sha256": "{digest}"}}\n')


def _sealed(raw: bytes) -> bool:
    """True when ``raw`` is a record as write_record writes it and its hash matches its bytes."""
    m = _SEAL.search(raw)
    return m is not None and hashlib.sha256(raw[:m.start()] + b"}").hexdigest().encode() == m.group(1)


def sealed_hash(tail: bytes) -> str | None:
    """The sha256 a sealed record ends with, from its last 100 bytes (no check of the bytes
    before them); None when they do not end as write_record ends a record."""
    m = _SEAL.search(tail)
    return m.group(1).decode() if m else None


# What parsing untrusted JSON may raise besides a syntax error: ValueError (JSONDecodeError,
# UnicodeDecodeError, an integer over Python's int-str digit limit) and RecursionError (deep nesting).
JSON_ERRORS = (ValueError, RecursionError)


def json_error(e: BaseException) -> str:
    """``Type: message`` of a parse error, bounded (one line)."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg[:200]}"


def read_record(path: Path) -> dict:
    """Read and check a result.json; UserError naming the file if it is corrupt (check_record)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: corrupt run record ({json_error(e)})") from None
    return check_record(raw, path)


def check_record(raw: bytes, path) -> dict:
    """The record whose bytes are ``raw``, checked; UserError naming ``path`` if it is corrupt.
    The hash is checked on the bytes when the file is sealed as write_record writes it, else (a
    record written by an older version, pretty-printed) on the canonical JSON of what was parsed."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except JSON_ERRORS as e:
        raise UserError(f"{path}: corrupt run record ({json_error(e)})") from None
    if not isinstance(rec, dict) or rec.get("status") not in STATUSES or "spec" not in rec:
        raise UserError(f"{path}: corrupt run record (missing 'status' or 'spec')")
    if not isinstance(rec.get("sha256"), str):
        raise UserError(f"{path}: corrupt run record (no content hash 'sha256')")
    if not _sealed(raw) and content_hash(rec) != rec["sha256"]:
        raise UserError(f"{path}: corrupt run record (content hash mismatch: edited or damaged)")
    for key in ("run_id", "label", "size"):
        if not isinstance(rec.get(key), str):
            raise UserError(f"{path}: corrupt run record ('{key}' must be a string)")
    if rec["status"] == "complete":
        for i, m in enumerate(rec.get("metrics", [])):
            if not isinstance(m, dict) or not all(k in m for k in ("dataset", "metric", "value", "bound")):
                raise UserError(f"{path}: corrupt run record (metrics[{i}] incomplete)")
    return rec


def record_status(run_dir: Path) -> str:
    """complete | failed | running | pending (no record) | corrupt."""
    p = Path(run_dir) / "result.json"
    if not p.exists():
        return "pending"
    try:
        return read_record(p)["status"]
    except UserError:
        return "corrupt"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a Slurm allocation), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str, world_size: int, threads: int) -> dict:
    import accelerate
    import torch

    import bench

    return {"python": platform.python_version(), "torch": torch.__version__,
            "accelerate": accelerate.__version__, "tdbench": bench.__version__, "git_sha": git_sha(),
            "device": device, "world_size": world_size, "threads": threads,
            "host": platform.node()}
