"""n-gram statistics of a sample set: diversity, memorization, unigram entropy.

- **div** (TEncDM, LD4LG): Π_{n=2..4} |unique n-grams| / |n-grams|, over the whole sample set
  (n-grams never cross a sample boundary; a sample shorter than n contributes none).
- **mem**: the fraction of the samples' 4-grams (with multiplicity) that occur anywhere in the
  training split. The training 4-grams are hashed to uint64 (a stable hash: blake2b per word,
  mixed per position) and kept as one sorted, de-duplicated numpy array, built once per
  (corpus, tokenisation) and cached on disk; a lookup is one ``searchsorted`` over all sample
  4-grams at once, never a scan per sample. A hash collision can only raise mem, by at most
  (#sample 4-grams)·(#train 4-grams)/2⁶⁴ in expectation (~10⁻⁸ here).
- **entropy**: the unigram entropy (nats) of each sample's tokens, averaged over samples (DUO /
  BD3-LM's convention); low gen ppl with low entropy is repetitive text.

Words are whitespace-separated (``tokenization: whitespace``, default) or lowercased
(``whitespace_lower``); the document separator <|endoftext|> counts as whitespace.

No sample floor here (unlike MAUVE's ``min_samples``, bench.metrics.mauve), by design: mem and
entropy are means over the samples' n-grams / samples — a handful of samples gives an imprecise
but unbiased estimate of the same quantity, not an artefact of a fitted model; div is a property
of the set itself (not an estimate of a population value), defined from one sample up. div falls
as a set grows (more text, more chances to repeat), so it compares sets of equal size only: every
set records its ``n``, and every method of a suite draws the same ``eval.samples``.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
from pydantic import Field

from bench.metrics.base import MetricSettings, words

HASH_VERSION = "blake2b8-mix/1"
_MIX = np.uint64(0x9E3779B97F4A7C15)


class NgramSettings(MetricSettings):
    """div and mem settings (recorded beside both values)."""

    tokenization: Literal["whitespace", "whitespace_lower"] = "whitespace"
    div_orders: tuple[int, ...] = Field((2, 3, 4), min_length=1)
    mem_n: int = Field(4, ge=1)


def tokenize(text: str, tokenization: str = "whitespace") -> list[str]:
    w = words(text)
    return [x.lower() for x in w] if tokenization == "whitespace_lower" else w


# ----------------------------------------------------------------------------- diversity
def ngrams(seq, n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def diversity(seqs: list[list], orders=(2, 3, 4)) -> float | None:
    """Π_n |unique n-grams| / |n-grams| over all sequences; None if some order has no n-gram."""
    out = 1.0
    for n in orders:
        grams = [g for s in seqs for g in ngrams(s, n)]
        if not grams:
            return None
        out *= len(set(grams)) / len(grams)
    return out


# ----------------------------------------------------------------------------- entropy
def unigram_entropy(seq) -> float:
    """Entropy (nats) of the empirical token distribution of one sequence (0 for ≤ 1 token)."""
    if len(seq) == 0:
        return 0.0
    c = np.fromiter(Counter(seq).values(), dtype=np.float64)
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


def mean_entropy(seqs: list) -> float | None:
    return float(np.mean([unigram_entropy(s) for s in seqs])) if seqs else None


# ----------------------------------------------------------------------------- memorization
def _word_hashes(ws: list[str]) -> np.ndarray:
    vocab = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in ws), dtype=np.int64, count=len(ws))
    table = np.array([int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                      for w in vocab], dtype=np.uint64)
    return table[ids] if len(ws) else np.zeros(0, dtype=np.uint64)


def hashed_ngrams(ws: list[str], n: int) -> np.ndarray:
    """uint64 hashes of the n-grams of one word sequence (len(ws) − n + 1 of them)."""
    m = len(ws) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = _word_hashes(ws)
    with np.errstate(over="ignore"):
        out = np.zeros(m, dtype=np.uint64)
        for j in range(n):          # position-dependent mix: (w1, w2) and (w2, w1) differ
            out = (out ^ h[j:j + m]) * _MIX + np.uint64(j + 1)
            out ^= out >> np.uint64(29)
    return out


def build_index(docs: Iterable[str], n: int = 4, tokenization: str = "whitespace") -> np.ndarray:
    parts = [hashed_ngrams(tokenize(d, tokenization), n) for d in docs]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def cached_index(key: str, docs_fn, n: int, tokenization: str, cache: Path) -> np.ndarray:
    """The sorted hashed n-gram array of a corpus, cached at ``cache/ngrams/<key>...npy``."""
    h = hashlib.sha256(f"{key}|{n}|{tokenization}|{HASH_VERSION}".encode()).hexdigest()[:16]
    path = Path(cache) / "ngrams" / f"{key}-{n}gram-{tokenization}-{h}.npy"
    if path.is_file():
        return np.load(path)
    idx = build_index(docs_fn(), n, tokenization)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, idx)
    os.replace(tmp, path)
    return idx


def memorization(seqs: list[list[str]], index: np.ndarray, n: int = 4) -> float | None:
    """Fraction of the sequences' n-grams (with multiplicity) present in ``index`` (sorted)."""
    q = np.concatenate([hashed_ngrams(s, n) for s in seqs]) if seqs else np.zeros(0, dtype=np.uint64)
    if len(q) == 0:
        return None
    if len(index) == 0:
        return 0.0
    pos = np.searchsorted(index, q).clip(max=len(index) - 1)
    return float((index[pos] == q).mean())
