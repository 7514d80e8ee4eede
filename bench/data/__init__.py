"""Datasets and tokenizers: the registry of named datasets, tokenized-block caching.

``load_blocks(ref, split, data, packing, counting)`` is the one entry point the harness uses:
it returns packed ``tokens``/``counted`` arrays, memory-mapped from the block cache
(bench.data.blockcache) keyed by a hash of corpus + tokenizer + packing + counting + length,
built once (in parallel, under a lock) and shared by every rank and run.

Datasets: the embedded corpora (bench.data.corpora), the public benchmarks through Hugging
Face ``datasets`` with a local ``path:`` override (bench.data.hub), ``textfile`` (your own
UTF-8 file), and synthetic sources with an exactly known truth (bench.data.synthetic:
``markov``; bench.data.hmm, bench.data.dyck), whose training split may be a stream of fresh
blocks (:class:`StreamBlocks`).
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from bench.config import DataConfig, DatasetRef, short_hash, tokenizer_key
from bench.config_io import first_error
from bench.data import blockcache, corpora, dyck, hmm, hub, synthetic
from bench.data.detokenizers import DETOKENIZERS
from bench.data.paths import cache_dir
from bench.data.tokenizers import CharTokenizer, IdentityTokenizer, PretrainedTokenizer, Tokenizer, gpt2, train_bpe
from bench.errors import UserError, did_you_mean

CACHE_FORMAT = 2


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# synthetic sources with an exactly known truth: name -> source class (its Params: the schema)
SYNTHETIC: dict[str, type[synthetic.Source]] = {
    "markov": synthetic.MarkovSource, "hmm": hmm.HMMSource, "dyck": dyck.DyckSource}

# name -> (kind, params schema)
DATASETS: dict[str, tuple[str, type[BaseModel]]] = {
    **{name: ("text", NoParams) for name in corpora.CORPORA},
    **{name: ("hub", hub.HubParams) for name in hub.SOURCES},
    "textfile": ("file", hub.TextfileParams),
    **{name: ("synthetic", cls.Params) for name, cls in SYNTHETIC.items()},
}


def dataset_params(ref: DatasetRef, where: str = "data") -> BaseModel:
    if ref.name not in DATASETS:
        raise UserError(f"{where}.name: {did_you_mean(ref.name, DATASETS)}")
    try:
        return DATASETS[ref.name][1](**ref.params)
    except ValidationError as e:
        raise UserError(first_error(e, (where,))) from None


def is_synthetic(ref: DatasetRef) -> bool:
    return DATASETS[ref.name][0] == "synthetic"


@lru_cache(maxsize=16)
def _source(name: str, params: BaseModel) -> synthetic.Source:
    return SYNTHETIC[name](params)


def synthetic_source(ref: DatasetRef) -> synthetic.Source:
    """The source object of a synthetic dataset entry (built once per parameters)."""
    return _source(ref.name, dataset_params(ref))


def validate_data_config(data: DataConfig, train: str = "data.train") -> None:
    """Check a run's data block before anything runs; ``train`` names its training entry in
    the messages (a suite listing several: ``data.train[i]``). Raises UserError."""
    dataset_params(data.train, train)
    for i, ref in enumerate(data.eval):
        dataset_params(ref, f"data.eval[{i}]")
    for ref in (data.train, *data.eval):
        if DATASETS[ref.name][0] == "text":
            corpora.check(ref.name)  # a damaged corpus file is reported now, not inside a run
    if is_synthetic(data.train):
        for i, ref in enumerate(data.eval):
            if ref != data.train:
                raise UserError(f"data.eval[{i}]: a synthetic source is evaluated on itself; "
                                f"use the same entry as {train} ({data.train.key}), or leave data.eval out")
        problem = synthetic_source(data.train).length_error(data.seq_len)
        if problem:
            raise UserError(f"data.seq_len: {problem}")
    elif any(is_synthetic(r) for r in data.eval):
        raise UserError("data.eval: a synthetic source cannot evaluate a model trained on text")
    if data.seq_len < 4:
        raise UserError("data.seq_len: must be at least 4")
    for where, ref in [(train, data.train)] + [(f"data.eval[{i}]", r) for i, r in enumerate(data.eval)]:
        kind, params = DATASETS[ref.name][0], dataset_params(ref, where)
        if kind in ("hub", "file") and params.path:
            p = Path(params.path).expanduser()
            if not p.exists() or (kind == "file" and not p.is_file()):
                raise UserError(f"{where}.path: {params.path}: {'not a file' if p.exists() else 'not found'}")
        if kind == "hub":
            need = "train" if where == train else "test"
            if need not in hub.SOURCES[ref.name].splits:
                raise UserError(f"{where}: {ref.name} has no {need} split (only "
                                f"{', '.join(hub.SOURCES[ref.name].splits)})")


# ----------------------------------------------------------------------------- tokenizers
def get_tokenizer(data: DataConfig) -> Tokenizer:
    if is_synthetic(data.train):
        return IdentityTokenizer(dataset_params(data.train).vocab)
    if data.tokenizer.name == "hf":
        return _pretrained_tokenizer(data.tokenizer.model)
    return _text_tokenizer(data.tokenizer.name, data.tokenizer.vocab_size or 8000, data.train.name)


@lru_cache(maxsize=4)
def _pretrained_tokenizer(model: str) -> Tokenizer:
    """``tokenizer: {name: hf, model: ...}``: the model's own tokenizer (bench.hf.load_tokenizer,
    the one rule for local / hub / named models); a UserError naming the key when it has none."""
    from bench import hf

    tok = hf.load_tokenizer(model, where="data.tokenizer.model")
    if tok is None:
        raise UserError(f"data.tokenizer.model: {model}: no tokenizer found (save it beside the model)")
    return PretrainedTokenizer(tok, model)


@lru_cache(maxsize=8)
def _text_tokenizer(name: str, vocab_size: int, train_name: str) -> Tokenizer:
    if name == "gpt2":
        return gpt2()
    if name == "char":
        return CharTokenizer()
    if train_name not in corpora.CORPORA:
        raise UserError("data.tokenizer: a trained bpe is trained on an embedded corpus "
                        f"({', '.join(corpora.CORPORA)}); "
                        f"for {train_name} use gpt2")
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
    source: str | None = None   # the block cache directory they were mapped from (None: built in memory)

    def __len__(self):
        return len(self.tokens)

    def head(self, n: int | None) -> "Blocks":
        if n is None or n >= len(self):
            return self
        return Blocks(self.tokens[:n], self.counted[:n], self.source and f"{self.source}[:{n}]")

    def describe(self) -> str:
        return f"{len(self):,}"

    def batch(self, step: int, size: int, seed: int) -> "Blocks":
        """The global batch of training step ``step``: consecutive slots of per-epoch
        permutations seeded by (seed, epoch) (:func:`batch_indices`)."""
        idx = batch_indices(step, size, len(self), seed)
        return Blocks(self.tokens[idx], self.counted[idx])


def batch_indices(step: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Global batch of step ``step``: consecutive slots of per-epoch permutations."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, off = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[off: off + batch - len(out)].tolist())
    return np.asarray(out)


@dataclass(frozen=True)
class StreamBlocks:
    """A synthetic source's training split as a stream (``train_blocks: stream``): the batch of
    step k is ``size`` fresh blocks drawn from the source with the generator seeded by (source
    seed, run seed, k) — no epochs, no block seen twice (but by chance), the same blocks on a
    resume and on every rank (each rank draws the global batch and takes its slice)."""

    source: synthetic.Source
    seq_len: int

    def describe(self) -> str:
        return "a stream of fresh"

    def batch(self, step: int, size: int, seed: int) -> Blocks:
        toks = self.source.stream(size, self.seq_len, seed, step)
        return Blocks(toks, np.ones_like(toks, dtype=bool))


def source_fingerprint(ref: DatasetRef) -> str:
    """What identifies a dataset's content for the cache (no network: hub sets by name)."""
    kind = DATASETS[ref.name][0]
    if kind == "text":
        return corpora.corpus_sha(ref.name)
    return hub.source_fingerprint(ref.name, dataset_params(ref))


def documents(ref: DatasetRef, split: str):
    """One split's raw documents as a ``datasets.Dataset`` (column ``text``)."""
    import datasets

    kind = DATASETS[ref.name][0]
    if kind == "text":
        return datasets.Dataset.from_dict({"text": corpora.documents(ref.name, split)})
    return hub.split_documents(ref.name, dataset_params(ref), split)


def detokenizer(ref: DatasetRef):
    return DETOKENIZERS[hub.SOURCES[ref.name].detokenizer] if ref.name in hub.SOURCES else DETOKENIZERS["none"]


def block_cache_dir(ref: DatasetRef, split: str, data: DataConfig, packing: str,
                    counting: tuple[bool, bool] = (False, True)) -> Path:
    tok = get_tokenizer(data)
    key = short_hash([CACHE_FORMAT, ref.name, source_fingerprint(ref), split, tok.key, tok.vocab_size,
                      data.train.name if tok.key.startswith("bpe") else "", packing, data.seq_len,
                      list(counting)])[:20]
    return cache_dir() / "blocks" / f"{ref.name}-{split}-{tok.key}-{data.seq_len}-{key}"


def load_blocks(ref: DatasetRef, split: str, data: DataConfig, packing: str,
                counting: tuple[bool, bool] = (False, True), num_proc: int | None = None) -> Blocks | StreamBlocks:
    """Packed blocks of one split; ``counting`` = (count_bos, count_eos), the protocol's
    ``EvalConfig.counting``. Builds the cache on first use (see bench.data.blockcache). A
    synthetic source's train split with ``train_blocks: stream`` is a :class:`StreamBlocks`."""
    params = dataset_params(ref)
    L = data.seq_len
    if is_synthetic(ref):
        if split == "train" and params.train_blocks == "stream":
            return StreamBlocks(synthetic_source(ref), L)
        n = params.train_blocks if split == "train" else params.test_blocks
        toks = synthetic_source(ref).sample(n, L, split)
        return Blocks(toks, np.ones_like(toks, dtype=bool))
    tok = get_tokenizer(data)
    if packing != "none" and tok.eos_id < 0:
        raise UserError(f"eval.packing: {packing} needs an EOS token; the {tok.key} tokenizer has none "
                        "(use packing: none)")
    d = block_cache_dir(ref, split, data, packing, counting)
    for attempt in (0, 1):
        if not blockcache.is_built(d):
            meta = {"dataset": ref.key, "split": split, "tokenizer": tok.key, "source": source_fingerprint(ref)}
            blockcache.build(d, lambda: documents(ref, split), tok, detokenizer(ref), L, packing, counting[0],
                             counting[1], f"{ref.key}/{split}", meta, num_proc=num_proc)
        try:
            toks, counted = blockcache.open_blocks(d)
            if toks.shape != counted.shape or toks.ndim != 2 or toks.shape[1] != L:
                raise ValueError(f"shapes {toks.shape} / {counted.shape}")
            return Blocks(toks, counted, d.name)
        except (OSError, ValueError, EOFError) as e:  # damaged cache entry: derived data, rebuild it
            if attempt:
                raise
            print(f"warning: {d}: unreadable cached blocks ({type(e).__name__}: {str(e)[:80]}); rebuilding",
                  file=sys.stderr)
            shutil.rmtree(d, ignore_errors=True)


def source_nll_of_blocks(ref: DatasetRef, tokens: np.ndarray) -> np.ndarray:
    """−log p(block) under a synthetic source for each of the given blocks (nats), (N,)."""
    return -synthetic_source(ref).log_prob(np.asarray(tokens, dtype=np.int64))


def source_entropy(ref: DatasetRef, seq_len: int) -> dict | None:
    """A synthetic source's per-token entropy of a block (nats): ``{value, estimate: exact}``,
    or an estimate with ``ci_low``/``ci_high`` (bench.data.hmm); None for real text."""
    if not is_synthetic(ref):
        return None
    return synthetic_source(ref).entropy(seq_len)
