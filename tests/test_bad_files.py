"""Every file the harness reads fails cleanly: one case per input kind × fault.

Kinds: suite YAML, cluster profile YAML, run record (result.json), checkpoint (manifest,
weights, optimizer state), text dataset (an embedded corpus file). Faults: undecodable bytes,
truncated, empty, wrong-typed content. Each case must give exit code 2, exactly one stderr line
``error: <file>: …`` naming the damaged file (and the key where there is one), no traceback,
and leave every file under the test's directory as it was (nothing written, nothing removed).
(samples.jsonl is not read by anything in the harness yet, so it has no case here.)
"""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_suite, write_suite

from bench.cli import main

SUITE = tiny_suite()
SUITE["train"].update(steps=4, ckpt_every=4)
SUITE["methods"] = [{"method": "mdlm"}]
SUITE["baseline"] = None


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A suite, a cluster profile, and an output dir with one complete run (record + checkpoint)."""
    d = tmp_path_factory.mktemp("base")
    write_suite(d / "suite.yaml", SUITE)
    (d / "prof.yaml").write_text("cpus_per_task: 1\ntime_min: 5\npartition: debug\n")
    assert main(["run", str(d / "suite.yaml"), "--out", str(d / "out")]) == 0
    return d


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() or p.is_dir()}


def _run_dir(d: Path) -> Path:
    (rd,) = (d / "out" / "runs").iterdir()
    return rd


def undecodable(p: Path):
    p.write_bytes(p.read_bytes()[:40] + b"\xff\xfe\xfa" + p.read_bytes()[40:])


def truncated(p: Path):
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def empty(p: Path):
    p.write_bytes(b"")


# ---- the files, and what to run to make the harness read them
def suite_file(d):
    return d / "suite.yaml", ["run", str(d / "suite.yaml"), "--out", str(d / "fresh")]


def profile_file(d):
    return d / "prof.yaml", ["submit", str(d / "suite.yaml"), "--cluster", str(d / "prof.yaml"),
                             "--out", str(d / "fresh")]


def record_file(d):
    return _run_dir(d) / "result.json", ["run", str(d / "suite.yaml"), "--out", str(d / "out")]


def _resumable(d) -> Path:
    """The run with its record gone: the next `run` resumes from its checkpoint."""
    rd = _run_dir(d)
    (rd / "result.json").unlink()
    (ck,) = (rd / "ckpt").iterdir()
    return ck


def ckpt_manifest(d):
    return _resumable(d) / "manifest.json", ["run", str(d / "suite.yaml"), "--out", str(d / "out")]


def ckpt_weights(d):
    return _resumable(d) / "model.safetensors", ["run", str(d / "suite.yaml"), "--out", str(d / "out")]


def ckpt_optim(d):
    return _resumable(d) / "optim.pt", ["run", str(d / "suite.yaml"), "--out", str(d / "out")]


def corpus_file(d):
    return d / "corpora" / "austen.txt.gz", ["run", str(d / "suite.yaml"), "--out", str(d / "fresh")]


# ---- wrong-typed content, per kind
def wrong_yaml(p):
    p.write_text("- partition: debug\n- 2\n")


def wrong_record(p):
    rec = json.loads(p.read_text())
    rec["status"] = 7
    p.write_text(json.dumps(rec))


def edited_record(p):
    rec = json.loads(p.read_text())
    rec["metrics"][0]["value"] = 1.0
    p.write_text(json.dumps(rec))


def wrong_manifest(p):
    p.write_text(json.dumps(["model.safetensors"]))


def wrong_bytes(p):  # same size, other content: only the hash can tell
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def plain_text_corpus(p):
    p.write_text("CHAPTER 1\nnot gzip at all\n")


def undecodable_corpus(p):
    p.write_bytes(gzip.compress(b"CHAPTER 1\n\xff\xfe not utf-8\n"))


def empty_corpus(p):
    p.write_bytes(gzip.compress(b""))


CASES = [  # (kind, fault, file, damage, text the message must contain)
    ("suite", "undecodable", suite_file, undecodable, "not UTF-8 text"),
    ("suite", "truncated", suite_file, truncated, ""),
    ("suite", "empty", suite_file, empty, "empty file"),
    ("suite", "wrong-typed", suite_file, wrong_yaml, "expected a mapping at the top level, got list"),
    ("profile", "undecodable", profile_file, undecodable, "not UTF-8 text"),
    ("profile", "truncated", profile_file, lambda p: p.write_text(p.read_text()[:29]), "partition: Field required"),
    ("profile", "empty", profile_file, empty, "empty file"),
    ("profile", "wrong-typed", profile_file, lambda p: p.write_text("partition: [a, b]\n"),
     "partition: Input should be a valid string"),
    ("record", "undecodable", record_file, undecodable, "corrupt run record (UnicodeDecodeError"),
    ("record", "truncated", record_file, truncated, "corrupt run record (JSONDecodeError"),
    ("record", "empty", record_file, empty, "corrupt run record (JSONDecodeError"),
    ("record", "wrong-typed", record_file, wrong_record, "corrupt run record (missing 'status' or 'spec')"),
    ("record", "edited", record_file, edited_record, "content hash mismatch"),
    ("record", "deep-nesting", record_file, lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
     "corrupt run record (RecursionError: maximum recursion depth exceeded"),
    ("record", "huge-int", record_file, lambda p: p.write_text('{"status": ' + "9" * 5000 + "}"),
     "corrupt run record (ValueError: Exceeds the limit (4300 digits)"),
    ("checkpoint", "undecodable", ckpt_manifest, undecodable, "corrupt checkpoint (UnicodeDecodeError"),
    ("checkpoint", "truncated", ckpt_weights, truncated, "truncated?"),
    ("checkpoint", "empty", ckpt_optim, empty, "0 bytes, the manifest says"),
    ("checkpoint", "wrong-typed", ckpt_manifest, wrong_manifest, "not a mapping of file"),
    ("dataset", "undecodable", corpus_file, undecodable_corpus, "corrupt corpus (not UTF-8 text"),
    ("dataset", "truncated", corpus_file, truncated, "corrupt corpus (EOFError"),
    ("dataset", "empty", corpus_file, empty_corpus, "corrupt corpus (empty)"),
    ("dataset", "wrong-typed", corpus_file, plain_text_corpus, "corrupt corpus (BadGzipFile"),
]


@pytest.mark.parametrize("kind,fault,where,damage,expect", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_file(base, tmp_path, capsys, monkeypatch, kind, fault, where, damage, expect):
    from bench.data import corpora

    d = tmp_path / "d"
    shutil.copytree(base, d)
    if kind == "dataset":
        shutil.copytree(corpora.ASSETS, d / "corpora")
        monkeypatch.setattr(corpora, "ASSETS", d / "corpora")
        corpora._raw_text.cache_clear()
    f, argv = where(d)
    damage(f)
    before = _snapshot(d)
    capsys.readouterr()
    try:
        rc = main(argv)
    finally:
        corpora._raw_text.cache_clear()
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, cap.err
    assert len(lines) == 1 and lines[0].startswith(f"error: {f}: "), cap.err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in cap.err + cap.out
    assert _snapshot(d) == before, "something was written or removed"


def test_edited_checkpoint_of_same_size_is_caught_when_loaded(base, tmp_path, capsys):
    """Same size, other bytes: the pre-flight (sizes) passes; loading checks the sha256 and
    the run fails naming the file, its checkpoint left as it was."""
    d = tmp_path / "d"
    shutil.copytree(base, d)
    ck = _resumable(d)
    wrong_bytes(ck / "optim.pt")
    blob = (ck / "optim.pt").read_bytes()
    assert main(["run", str(d / "suite.yaml"), "--out", str(d / "out")]) == 1
    rec = json.loads((_run_dir(d) / "result.json").read_text())
    assert rec["status"] == "failed" and f"{ck / 'optim.pt'}: corrupt checkpoint (content hash mismatch" in rec["error"]
    assert (ck / "optim.pt").read_bytes() == blob


def test_damaged_cache_entries_are_rebuilt_with_a_warning(tmp_path, monkeypatch, capsys):
    """The tokenizer and the tokenized blocks under $TDBENCH_CACHE are derived data: a damaged
    entry is reported by name on stderr and rebuilt (same content), never trusted or fatal."""
    import numpy as np

    from bench.config import DataConfig
    from bench.data import _text_tokenizer, load_blocks

    monkeypatch.setenv("TDBENCH_CACHE", str(tmp_path / "cache"))
    _text_tokenizer.cache_clear()
    data = DataConfig(**SUITE["data"])
    want = np.array(load_blocks(data.train, "test", data, "eos_per_doc").tokens)
    (tok_file,) = (tmp_path / "cache" / "tokenizers").glob("*.json")
    (blocks,) = [p.parent for p in (tmp_path / "cache" / "blocks").rglob("tokens.npy")]
    truncated(blocks / "tokens.npy")
    empty(tok_file)
    _text_tokenizer.cache_clear()
    capsys.readouterr()
    got = np.array(load_blocks(data.train, "test", data, "eos_per_doc").tokens)
    err = capsys.readouterr().err
    assert f"warning: {blocks}: unreadable cached blocks" in err
    assert f"warning: {tok_file}: unreadable cached tokenizer" in err  # the rebuild needed it
    assert (got == want).all() and tok_file.stat().st_size > 0
    _text_tokenizer.cache_clear()
