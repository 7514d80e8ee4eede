"""The harness's own code unpickles nothing it reads from a results directory (grep-level, over
the source with comments and docstrings included, so a mention in a comment also counts), and a
record's content hash catches an edit.

Two third-party readers do unpickle files there: submitit (the job pickles in ``.submitit/`` and
``.slurm/``, read by the job they start) and DeepSpeed (its ZeRO optimizer shards in
``ckpt/…/deepspeed/``, torch.load-ed inside DeepSpeed on resume). Those folders are created 0700
(tests/test_pickle_folders.py); this file checks only our code."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.errors import UserError
from bench.records import read_record, write_record

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("bench", "methods") for p in (ROOT / d).rglob("*.py"))


def _calls(pattern: str) -> list[str]:
    hits = []
    for p in SOURCES:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(pattern, line):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    return hits


def test_no_torch_load_without_weights_only():
    bad = [h for h in _calls(r"torch\.load\(") if "weights_only=True" not in h]
    assert not bad, "torch.load without weights_only=True:\n" + "\n".join(bad)
    assert _calls(r"torch\.load\(")  # the checker sees the one that exists (bench/checkpoint.py)


@pytest.mark.parametrize("pattern", [r"pickle\.loads?\(", r"yaml\.load\(", r"yaml\.unsafe_load", r"cloudpickle",
                                     r"\bdill\b", r"np\.load\([^)]*allow_pickle=True", r"marshal\.loads?\("])
def test_no_unpickling(pattern):
    assert not _calls(pattern), "\n".join(_calls(pattern))


def test_record_hash_catches_an_edit(tmp_path):
    p = tmp_path / "result.json"
    write_record(p, {"run_id": "r", "label": "MDLM", "size": "tiny", "seed": 0, "spec": {}, "status": "complete",
                     "metrics": [{"dataset": "a", "metric": "ppl", "value": 41.84, "bound": True}]})
    assert read_record(p)["metrics"][0]["value"] == 41.84
    rec = json.loads(p.read_text())
    rec["metrics"][0]["value"] = 14.84  # a "better" number typed in by hand
    p.write_text(json.dumps(rec))
    with pytest.raises(UserError, match="content hash mismatch"):
        read_record(p)


def _record():
    return {"run_id": "r", "label": "MDLM é", "size": "tiny", "seed": 0, "spec": {"lr": 1e-3}, "status": "complete",
            "metrics": [{"dataset": "a", "metric": "ppl", "value": 41.84, "bound": True}]}


def test_sealed_record_is_checked_on_its_bytes_and_an_edit_in_place_is_caught(tmp_path):
    """write_record seals the canonical bytes (hash as the last key); an edit that keeps the
    sealed shape (same length, hash untouched) fails the byte check and the canonical check."""
    p = tmp_path / "result.json"
    write_record(p, _record())
    raw = p.read_bytes()
    assert raw.rstrip().endswith(b'"}') and b'"sha256": "' in raw[-80:]
    assert read_record(p)["label"] == "MDLM é"
    p.write_bytes(raw.replace(b"41.84", b"14.84"))
    with pytest.raises(UserError, match="content hash mismatch"):
        read_record(p)
    p.write_bytes(raw[:-30])  # truncated
    with pytest.raises(UserError, match="corrupt run record"):
        read_record(p)


def test_record_written_pretty_by_an_older_version_still_reads(tmp_path):
    """Records written before the seal (indented JSON, hash over the canonical form) are
    checked the old way, so existing results directories stay readable."""
    from bench.records import content_hash

    rec = _record()
    p = tmp_path / "result.json"
    p.write_text(json.dumps({**rec, "sha256": content_hash(rec)}, indent=2) + "\n", encoding="utf-8")
    assert read_record(p)["metrics"][0]["value"] == 41.84
    rec2 = {**rec, "sha256": content_hash(rec)}
    rec2["seed"] = 1
    p.write_text(json.dumps(rec2, indent=2), encoding="utf-8")
    with pytest.raises(UserError, match="content hash mismatch"):
        read_record(p)
