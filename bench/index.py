"""The results store's index: one pass over a directory's run records, cached.

``<out>/index.json`` holds, per run, the parts of its record that tables, plots and
``tdbench status`` read (status, label, size, seed, metrics, the loss curve, …), keyed by the
record's sealed sha256 (the hash it ends with) and the (mtime, size) of its ``result.json``.
The file is sealed as a record is: ``{"format":…,"sha256":"<hash of the runs JSON>","runs":…}``,
the hash checked on the bytes as read, so editing the index (a value typed in by hand, an entry
copied from another run) cannot change what a table shows: a damaged or edited index is ignored
and every record read again. A scan stats every record and reads its last bytes (cheap); an
entry is used only when its key and sealed sha256 match the record on disk; an entry whose
record vanished is dropped. The index is derived, never the truth: delete it and the next scan
rebuilds it from the records. Records are read through ``read_record``, with its content-hash
check, whenever they change.

Speed (10,000 records, docs/performance.md): the index is checked with one hash over its
bytes and parsed once (nothing is serialised again to be checked), a changed record is parsed
once and its summary serialised once (into the index), and the garbage collector is paused
while the records' JSON trees are built (they hold no cycles; a collection pass over them
cost a third of the time).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
from pathlib import Path

from bench.errors import UserError
from bench.records import JSON_ERRORS, atomic_write_text, check_record, json_error, sealed_hash, usable_cores

INDEX = "index.json"
# 2: the train curve (learning.png) is kept; 3: the protocol keeps its preset; 4: its text_crossing;
# 5: keyed by the record's sealed sha256, with a digest of each entry; 6: started (the report's wall time);
# 7: the file sealed as a whole; 8: a metric row keeps what it bounds
FORMAT = 8
# record keys the derived views use; the spec, env and log tail stay in the record
KEEP = ("run_id", "label", "method", "size", "seed", "status", "metrics", "reference", "error", "started",
        "finished", "protocol")
TRAIN_KEEP = ("params", "steps", "tokens", "tokens_per_s", "wall_s", "final_loss", "loss_curve", "curve")
# per metric row: what the leaderboard reads (bench.leaderboard.tidy); n_tokens, eval_s, … stay in the record
METRIC_KEEP = ("dataset", "metric", "value", "ci_low", "ci_high", "bound", "protocol_id", "estimate", "label",
               "bounds")
_HEAD = re.compile(rb'\{"format":(\d+),"sha256":"([0-9a-f]{64})","runs":')


def summarize(rec: dict) -> dict:
    out = {k: rec[k] for k in KEEP if k in rec}
    for key in ("metrics", "reference"):
        if isinstance(out.get(key), list):
            out[key] = [{k: m[k] for k in METRIC_KEEP if k in m} if isinstance(m, dict) else m for m in out[key]]
    if isinstance(rec.get("protocol"), dict):
        out["protocol"] = {"confidence": rec["protocol"].get("confidence"), "id": rec["protocol"].get("id"),
                           "preset": rec["protocol"].get("preset", "custom")}
        if rec["protocol"].get("text_crossing"):
            out["protocol"]["text_crossing"] = rec["protocol"]["text_crossing"]
    if isinstance(rec.get("train"), dict):
        out["train"] = {k: rec["train"][k] for k in TRAIN_KEEP if k in rec["train"]}
    return out


@contextlib.contextmanager
def _gc_paused():
    """No garbage collection while many small JSON trees are built (they hold no cycles)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def seal(runs: dict) -> str:
    """index.json's text: the runs as compact JSON, sealed with the sha256 of exactly those bytes."""
    body = json.dumps(runs, separators=(",", ":"))
    return f'{{"format":{FORMAT},"sha256":"{hashlib.sha256(body.encode()).hexdigest()}","runs":{body}}}'


def _load(out: Path) -> dict:
    """The runs of an intact index of this format; {} when it is missing, damaged or edited."""
    try:
        raw = (out / INDEX).read_bytes()
    except OSError:
        return {}
    m = _HEAD.match(raw)
    if m is None or int(m.group(1)) != FORMAT or not raw.endswith(b"}"):
        return {}
    body = raw[m.end():-1]
    if hashlib.sha256(body).hexdigest().encode() != m.group(2):
        return {}
    try:
        runs = json.loads(body.decode("utf-8"))
    except JSON_ERRORS:   # deep nesting or a huge integer too: the index is rebuilt
        return {}
    return runs if isinstance(runs, dict) else {}


def _entry(key: list, rec: dict) -> dict:
    # a record is parsed JSON, so its summary reads back from index.json exactly as it is
    return {"key": key, "sha256": rec["sha256"], "rec": summarize(rec)}


def _valid(hit, key: list, fd: int) -> bool:
    """Is the cached entry the record open as ``fd``? Same (mtime, size) and the sha256 the
    record is sealed with (records written before the seal: not checked here)."""
    if not isinstance(hit, dict) or hit.get("key") != key or not isinstance(hit.get("rec"), dict):
        return False
    sha = hit.get("sha256")
    if not isinstance(sha, str):
        return False
    sealed = sealed_hash(os.pread(fd, 100, max(0, key[1] - 100)))
    return sealed is None or sealed == sha


def _read(path: str, hit) -> tuple[list | None, dict | None, bytes | None]:
    """(key, the cached entry if it is this record's, else the record's bytes) of one result.json,
    all from one open file (its key and its bytes cannot come from two versions of it); key None
    when there is no record."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None, None, None
    try:
        st = os.fstat(fd)
        key = [st.st_mtime_ns, st.st_size]
        if _valid(hit, key, fd):
            return key, hit, None
        parts = []
        while chunk := os.read(fd, max(key[1], 1 << 12) + 1):
            parts.append(chunk)
        return key, None, b"".join(parts)
    finally:
        os.close(fd)


PARALLEL_MIN = 2000   # records to parse before a cold scan shares them with a second process


def _scan_part(dirs: list[tuple[str, str]], old: dict) -> list[tuple[str, str, object]]:
    """[(run id, "hit" | "new" | "problem" | "changed-problem", entry or message)] for the run
    directories ``dirs`` ((name, path) pairs) against the index entries ``old``."""
    out = []
    with _gc_paused():
        for name, path in dirs:
            p = os.path.join(path, "result.json")
            try:
                key, hit, raw = _read(p, old.get(name))
                if key is None:
                    continue
                if hit is not None:
                    out.append((name, "hit", hit))
                    continue
                out.append((name, "new", _entry(key, check_record(raw, p))))
            except OSError as err:
                out.append((name, "changed-problem", f"{p}: corrupt run record ({json_error(err)})"))
            except UserError as err:
                out.append((name, "problem", str(err)))
    return out


def _scan_parts(dirs: list[tuple[str, str]], old: dict) -> list[tuple[str, str, object]]:
    """:func:`_scan_part` over ``dirs``; with no index to reuse, at least PARALLEL_MIN records and
    two cores, the second half is parsed in a spawned process (not forked: the caller may hold
    threads, e.g. a run's lease heartbeats) while this one parses the first — the parse is the
    cold scan's cost (docs/performance.md). Any failure of the helper process falls back to
    parsing its half here."""
    if old or len(dirs) < PARALLEL_MIN or usable_cores() < 2:
        return _scan_part(dirs, old)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    half = len(dirs) // 2
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        future = pool.submit(_scan_part, dirs[half:], {})
    except (OSError, RuntimeError):
        return _scan_part(dirs, old)
    first = _scan_part(dirs[:half], {})
    try:
        second = future.result()
    except Exception:  # noqa: BLE001 - a helper that died (killed, out of memory): parse its half here
        second = _scan_part(dirs[half:], {})
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return first + second


def scan(out: Path, write: bool = True) -> tuple[dict[str, dict], list[str]]:
    """({run_id: summary of its record}, problems as one-line messages naming the file).
    Corrupt records are reported, never indexed."""
    out = Path(out)
    runs_dir = out / "runs"
    if not runs_dir.is_dir():
        return {}, []
    with _gc_paused():
        old = _load(out)
        runs, problems, changed = {}, [], False
        with os.scandir(runs_dir) as it:
            dirs = sorted((e.name, e.path) for e in it if e.is_dir())
        for name, kind, value in _scan_parts(dirs, old):
            if kind in ("hit", "new"):
                runs[name] = value
            else:
                problems.append(value)
            changed = changed or kind in ("new", "changed-problem")
        if set(old) - set(runs):
            changed = True
        if write and changed:
            try:
                atomic_write_text(out / INDEX, seal(runs))
            except OSError:
                pass  # a read-only results dir still gets its tables; only the cache is lost
    return {k: v["rec"] for k, v in runs.items()}, problems
