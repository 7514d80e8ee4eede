"""The results store's index: one pass over a directory's run records, cached.

``<out>/index.json`` holds, per run, the parts of its record that tables, plots and
``tdbench status`` read (status, label, size, seed, metrics, the loss curve, …), keyed by the
record's sealed sha256 (the hash it ends with) and the (mtime, size) of its ``result.json``,
with ``digest`` = sha256 of that hash and the summary. A scan stats every record and reads its
last bytes (cheap); an entry is used only when the key matches the record on disk and the digest
matches the entry, so editing only the index (a value typed in by hand, an entry copied from
another run) cannot change what a table shows: the record is read again instead. An entry whose
record vanished is dropped. The index is derived, never the truth: delete it and the next scan
rebuilds it from the records; a damaged index is ignored (and rebuilt). Records are read through
``read_record``, with its content-hash check, whenever they change.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bench.errors import UserError
from bench.records import JSON_ERRORS, atomic_write_text, read_record, sealed_hash

INDEX = "index.json"
# 2: the train curve (learning.png) is kept; 3: the protocol keeps its preset; 4: its text_crossing;
# 5: keyed by the record's sealed sha256, with a digest of each entry; 6: started (the report's wall time)
FORMAT = 6
# record keys the derived views use; the spec, env and log tail stay in the record
KEEP = ("run_id", "label", "method", "size", "seed", "status", "metrics", "reference", "error", "started",
        "finished", "protocol")
TRAIN_KEEP = ("params", "steps", "tokens", "tokens_per_s", "wall_s", "final_loss", "loss_curve", "curve")


def summarize(rec: dict) -> dict:
    out = {k: rec[k] for k in KEEP if k in rec}
    if isinstance(rec.get("protocol"), dict):
        out["protocol"] = {"confidence": rec["protocol"].get("confidence"), "id": rec["protocol"].get("id"),
                           "preset": rec["protocol"].get("preset", "custom")}
        if rec["protocol"].get("text_crossing"):
            out["protocol"]["text_crossing"] = rec["protocol"]["text_crossing"]
    if isinstance(rec.get("train"), dict):
        out["train"] = {k: rec["train"][k] for k in TRAIN_KEEP if k in rec["train"]}
    return out


def _load(out: Path) -> dict:
    try:
        idx = json.loads((out / INDEX).read_bytes().decode("utf-8"))
        if isinstance(idx, dict) and idx.get("format") == FORMAT and isinstance(idx.get("runs"), dict):
            return idx["runs"]
    except (OSError, *JSON_ERRORS):   # deep nesting or a huge integer too: the index is rebuilt
        pass
    return {}


def _digest(sha: str, summary: dict) -> str:
    body = json.dumps(summary, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(f"{sha}\n{body}".encode()).hexdigest()


def _entry(key: list, rec: dict) -> dict:
    summary = json.loads(json.dumps(summarize(rec), default=str))   # as it reads back from index.json
    return {"key": key, "sha256": rec["sha256"], "digest": _digest(rec["sha256"], summary), "rec": summary}


def _valid(hit, key: list, path: str) -> bool:
    """Is the cached entry the record on disk? Same (mtime, size), the sha256 the record is
    sealed with (records written before the seal: not checked here), and an intact digest."""
    if not isinstance(hit, dict) or hit.get("key") != key or not isinstance(hit.get("rec"), dict):
        return False
    sha = hit.get("sha256")
    sealed = sealed_hash(Path(path))
    return (isinstance(sha, str) and (sealed is None or sealed == sha)
            and hit.get("digest") == _digest(sha, hit["rec"]))


def scan(out: Path, write: bool = True) -> tuple[dict[str, dict], list[str]]:
    """({run_id: summary of its record}, problems as one-line messages naming the file).
    Corrupt records are reported, never indexed."""
    out = Path(out)
    old = _load(out)
    runs, problems, changed = {}, [], False
    runs_dir = out / "runs"
    if not runs_dir.is_dir():
        return {}, []
    with os.scandir(runs_dir) as it:
        entries = sorted((e for e in it if e.is_dir()), key=lambda e: e.name)
    for e in entries:
        p = os.path.join(e.path, "result.json")
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        key = [st.st_mtime_ns, st.st_size]
        hit = old.get(e.name)
        if _valid(hit, key, p):
            runs[e.name] = hit
            continue
        changed = True
        try:
            rec = read_record(Path(p))
        except UserError as err:
            problems.append(str(err))
            continue
        runs[e.name] = _entry(key, rec)
    if set(old) - set(runs):
        changed = True
    if write and changed:
        try:
            atomic_write_text(out / INDEX, json.dumps({"format": FORMAT, "runs": runs}, separators=(",", ":")))
        except OSError:
            pass  # a read-only results dir still gets its tables; only the cache is lost
    return {k: v["rec"] for k, v in runs.items()}, problems
