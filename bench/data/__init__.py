"""Datasets and tokenizers: the registry of named datasets, tokenized-block caching.

``load_blocks(ref, split, data, packing)`` is the one entry point the harness uses: it returns
packed ``tokens``/``counted`` arrays (memory-mapped from a cache keyed by a hash of corpus +
tokenizer + packing + length, so a second run does not re-tokenize).
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from bench.config import DataConfig, DatasetRef, first_error, short_hash, tokenizer_key
from bench.data import corpora, synthetic
from bench.data.packing import pack
from bench.data.tokenizers import CharTokenizer, IdentityTokenizer, Tokenizer, encode_to_array, gpt2, train_bpe
from bench.errors import UserError, did_you_mean

CACHE_FORMAT = 1


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# name -> (kind, params schema)
DATASETS: dict[str, tuple[str, type[BaseModel]]] = {
    **{name: ("text", NoParams) for name in corpora.CORPORA},
    "markov": ("synthetic", synthetic.MarkovParams),
}


def cache_dir() -> Path:
    return Path(os.environ.get("TDBENCH_CACHE", Path.home() / ".cache" / "tdbench"))


def dataset_params(ref: DatasetRef, where: str = "data") -> BaseModel:
    if ref.name not in DATASETS:
        raise UserError(f"{where}.name: {did_you_mean(ref.name, DATASETS)}")
    try:
        return DATASETS[ref.name][1](**ref.params)
    except ValidationError as e:
        raise UserError(first_error(e, (where,))) from None


def is_synthetic(ref: DatasetRef) -> bool:
    return DATASETS[ref.name][0] == "synthetic"


def validate_data_config(data: DataConfig) -> None:
    dataset_params(data.train, "data.train")
    for i, ref in enumerate(data.eval):
        dataset_params(ref, f"data.eval[{i}]")
    for ref in (data.train, *data.eval):
        if DATASETS[ref.name][0] == "text":
            corpora.check(ref.name)  # a damaged corpus file is reported now, not inside a run
    if is_synthetic(data.train):
        for i, ref in enumerate(data.eval):
            if ref != data.train:
                raise UserError(f"data.eval[{i}]: a synthetic source is evaluated on itself; "
                                f"use the same entry as data.train ({data.train.key})")
    elif any(is_synthetic(r) for r in data.eval):
        raise UserError("data.eval: a synthetic source cannot evaluate a model trained on text")
    if data.seq_len < 4:
        raise UserError("data.seq_len: must be at least 4")


# ----------------------------------------------------------------------------- tokenizers
def get_tokenizer(data: DataConfig) -> Tokenizer:
    if is_synthetic(data.train):
        return IdentityTokenizer(dataset_params(data.train).vocab)
    return _text_tokenizer(data.tokenizer.name, data.tokenizer.vocab_size or 8000, data.train.name)


@lru_cache(maxsize=8)
def _text_tokenizer(name: str, vocab_size: int, train_name: str) -> Tokenizer:
    if name == "gpt2":
        return gpt2()
    if name == "char":
        return CharTokenizer()
    key = f"bpe-{vocab_size}"
    h = short_hash([key, train_name, corpora.corpus_sha(train_name), "bytelevel-bpe/1"])[:16]
    return train_bpe(corpora.documents(train_name, "train"), vocab_size,
                     cache_dir() / "tokenizers" / f"{train_name}-{key}-{h}.json", key)


def protocol_tokenizer_key(data: DataConfig) -> str:
    return get_tokenizer(data).key if is_synthetic(data.train) else tokenizer_key(data.tokenizer)


# ----------------------------------------------------------------------------- blocks
@dataclass
class Blocks:
    tokens: np.ndarray   # (N, L) int32
    counted: np.ndarray  # (N, L) bool

    def __len__(self):
        return len(self.tokens)

    def head(self, n: int | None) -> "Blocks":
        return self if n is None else Blocks(self.tokens[:n], self.counted[:n])


def load_blocks(ref: DatasetRef, split: str, data: DataConfig, packing: str) -> Blocks:
    params = dataset_params(ref)
    L = data.seq_len
    if is_synthetic(ref):
        n = params.train_blocks if split == "train" else params.test_blocks
        toks = synthetic.markov(params).sample(n, L, split)
        return Blocks(toks, np.ones_like(toks, dtype=bool))
    tok = get_tokenizer(data)
    key = short_hash([CACHE_FORMAT, ref.name, corpora.corpus_sha(ref.name), split, tok.key,
                      tok.vocab_size, data.train.name if tok.key.startswith("bpe") else "", packing, L])[:20]
    d = cache_dir() / "blocks" / f"{ref.name}-{split}-{tok.key}-{L}-{key}"
    if (d / "counted.npy").is_file():
        try:
            tokens = np.load(d / "tokens.npy", mmap_mode="r")
            counted = np.load(d / "counted.npy", mmap_mode="r")
            if tokens.shape == counted.shape and tokens.ndim == 2 and tokens.shape[1] == L:
                return Blocks(tokens, counted)
            raise ValueError(f"shapes {tokens.shape} / {counted.shape}")
        except (OSError, ValueError, EOFError) as e:  # damaged cache entry: derived data, rebuild it
            print(f"warning: {d}: unreadable cached blocks ({type(e).__name__}: {str(e)[:80]}); rebuilding",
                  file=sys.stderr)
            shutil.rmtree(d, ignore_errors=True)
    if not (d / "counted.npy").is_file():
        docs = encode_to_array(tok, corpora.documents(ref.name, split))
        toks, counted = pack(docs, L, packing, tok.eos_id)
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "tokens.npy", toks)
        np.save(tmp / "counted.npy", counted)
        try:
            os.replace(tmp, d)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return Blocks(np.load(d / "tokens.npy", mmap_mode="r"), np.load(d / "counted.npy", mmap_mode="r"))


def source_nll_of_blocks(ref: DatasetRef, tokens: np.ndarray) -> np.ndarray:
    """−log p(block) under a synthetic source for each of the given blocks (nats), (N,)."""
    return -synthetic.markov(dataset_params(ref)).log_prob(np.asarray(tokens, dtype=np.int64))


def true_nll_per_token(ref: DatasetRef, seq_len: int) -> float | None:
    """Exact per-token entropy (nats) of a synthetic source's blocks; None for real text."""
    if not is_synthetic(ref):
        return None
    return synthetic.markov(dataset_params(ref)).block_entropy(seq_len) / seq_len
