"""Human reference text for the sample metrics, drawn from held-out splits.

``human_sets``: ``n`` full blocks (no padding) of a dataset's ``split`` for the MAUVE reference
and another ``n``, disjoint, for the Source-text row (the same count and length as the samples,
in the same tokenizer, decoded to text), chosen by a seeded permutation of the split's blocks.
``train_index``: the memorization index of a text corpus's train split (bench.metrics.ngrams).
``source_truth`` / ``true_set``: for a synthetic source, the source itself and its Source row
(fresh true blocks; bench.metrics.truth).
"""
from __future__ import annotations

import numpy as np

from bench.config import DataConfig, DatasetRef
from bench.errors import UserError
from bench.metrics import MetricsConfig
from bench.metrics.truth import Truth


def human_sets(data: DataConfig, packing: str, ref: DatasetRef, split: str, n: int, seed: int,
               source: bool = True) -> tuple[list[dict], list[dict]]:
    from bench.data import get_tokenizer, load_blocks

    blocks = load_blocks(ref, split, data, packing)
    full = np.flatnonzero(np.asarray(blocks.counted).all(1))
    need = 2 * n if source else n
    if len(full) < need:
        raise UserError(f"metrics.reference: {ref.key} {split} split has {len(full)} full blocks of "
                        f"{data.seq_len} tokens; scoring {n} samples needs {need} "
                        "(a MAUVE reference set and a disjoint Source-text set); use fewer samples")
    pick = full[np.random.default_rng(seed).permutation(len(full))[:need]]
    tok = get_tokenizer(data)
    rows = [{"ids": [int(i) for i in blocks.tokens[j]], "text": tok.decode(blocks.tokens[j])} for j in pick]
    return rows[:n], rows[n:]


def train_index(name: str, n: int, tokenization: str) -> np.ndarray | None:
    """Sorted hashed n-grams of a text corpus's train split (None for synthetic sources)."""
    from bench.data import cache_dir, corpora
    from bench.metrics.ngrams import cached_index

    if name not in corpora.CORPORA:
        return None
    key = f"{name}-train-{corpora.corpus_sha(name)}"
    return cached_index(key, lambda: corpora.documents(name, "train"), n, tokenization, cache_dir())


def source_truth(spec, cfg: MetricsConfig) -> Truth | None:
    """The synthetic source a run's samples are scored by (``spec``: a RunSpec); None for text."""
    from bench.data import is_synthetic, synthetic_source

    ref = spec.data.train
    return Truth(synthetic_source(ref), ref.key, spec.data.seq_len, cfg.truth) if is_synthetic(ref) else None


def true_set(truth: Truth, data: DataConfig, n: int, seed: int) -> tuple[list[dict], dict]:
    """(``n`` fresh true blocks as samples, their description): a synthetic source's Source row."""
    from bench.data import get_tokenizer

    desc = {"dataset": data.train.key, "split": "fresh true blocks", "seed": seed, "seq_len": data.seq_len}
    return truth.ceiling_set(n, seed, get_tokenizer(data).decode), desc
