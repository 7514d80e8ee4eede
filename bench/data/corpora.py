"""Embedded corpora and their deterministic document splits.

Each corpus ships gzipped in ``bench/data/assets/corpora`` (provenance: ``assets/PROVENANCE.md``).
A corpus is cut into *documents* at heading lines (never at random lines):

- ``austen``: six Austen novels; a document starts at each ``CHAPTER``/``Chapter`` heading.
- ``kjv``: the King James Bible; a document starts at each chapter heading (``Genesis 1``).
- ``shakespeare``: the plays and poems; a document starts at each ``SCENE``/``Scene`` heading
  (and at each work's title, so poems are documents too).

Text before the first heading is its own document. Split rule, by document index ``i`` in file
order: ``i % 10 == 8`` → valid, ``i % 10 == 9`` → test, otherwise train (80/10/10 by chapter).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import re
import zlib
from pathlib import Path

from bench.errors import FileError

ASSETS = Path(__file__).parent / "assets" / "corpora"

_HEADINGS = {
    "austen": re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?\s*$"),
    "kjv": re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z]+(?: (?:of )?[A-Z][A-Za-z]+)* [0-9]+$"),
    "shakespeare": re.compile(r"^(SCENE|Scene) [0-9IVXLC]+\b|^by William Shakespeare\s*$"),
}
CORPORA = tuple(_HEADINGS)
SPLITS = ("train", "valid", "test")


def split_of(i: int) -> str:
    return {8: "valid", 9: "test"}.get(i % 10, "train")


@functools.lru_cache(maxsize=None)
def _raw_text(name: str) -> str:
    """The corpus text; FileError naming the file when it is missing, not gzip, cut short,
    not UTF-8 or empty (checked when a suite is loaded, before anything runs)."""
    path = ASSETS / f"{name}.txt.gz"
    try:
        with gzip.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise FileError(f"{path}: corpus file not found") from None
    except UnicodeDecodeError as e:
        raise FileError(f"{path}: corrupt corpus (not UTF-8 text at byte {e.start})") from None
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise FileError(f"{path}: corrupt corpus ({type(e).__name__}: {str(e)[:120] or 'truncated'})") from None
    if not text.strip():
        raise FileError(f"{path}: corrupt corpus (empty)")
    return text


def check(name: str) -> None:
    """Raise FileError unless the corpus reads cleanly (cached: read once per process)."""
    _raw_text(name)


def corpus_sha(name: str) -> str:
    return hashlib.sha256((ASSETS / f"{name}.txt.gz").read_bytes()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def all_documents(name: str) -> tuple[str, ...]:
    heading = _HEADINGS[name]
    docs, cur = [], []
    for line in _raw_text(name).split("\n"):
        if heading.match(line) and any(x.strip() for x in cur):
            docs.append("\n".join(cur).strip("\n"))
            cur = []
        cur.append(line)
    if any(x.strip() for x in cur):
        docs.append("\n".join(cur).strip("\n"))
    return tuple(docs)


def documents(name: str, split: str) -> list[str]:
    return [d for i, d in enumerate(all_documents(name)) if split_of(i) == split]
