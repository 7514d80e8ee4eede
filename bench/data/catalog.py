"""``tdbench data prepare`` and ``tdbench data list``: build a dataset's block cache ahead of a
run (e.g. on a login node with network, or from a local copy), and show what is registered,
what is cached and how many tokens it holds."""
from __future__ import annotations

import json
import os

from bench.config import PROTOCOL_PRESETS, DataConfig, DatasetRef, EvalConfig
from bench.errors import UserError


def _ref(name: str, path: str | None) -> DatasetRef:
    from bench.data import DATASETS
    from bench.errors import did_you_mean

    if name not in DATASETS:
        raise UserError(f"data prepare NAME: {did_you_mean(name, DATASETS)}")
    kind = DATASETS[name][0]
    if kind == "synthetic":
        raise UserError(f"data prepare NAME: {name} is a synthetic source; it is generated, never cached")
    if path is not None and kind == "text":
        raise UserError(f"--path: {name} is embedded in the package; it takes no path")
    if kind == "file" and path is None:
        raise UserError("--path: textfile needs --path FILE")
    return DatasetRef(name=name, **({"path": path} if path is not None else {}))


def prepare(name: str, path: str | None = None, tokenizer: str | None = None, seq_len: int | None = None,
            protocol: str | None = None, splits: list[str] | None = None, num_proc: int | None = None) -> list[dict]:
    """Build the block cache of every split of ``name`` (or of ``splits``); return their meta."""
    from bench.data import DATASETS, block_cache_dir, blockcache, dataset_params, hub, load_blocks

    ref = _ref(name, path)
    dataset_params(ref, "data")
    text8 = name == "text8"
    tokenizer = tokenizer or ("char" if text8 else "gpt2")
    if tokenizer not in ("gpt2", "char"):
        raise UserError(f"--tokenizer: {tokenizer}: prepare builds gpt2 or char caches (a trained bpe is built "
                        "by the suite that trains it)")
    protocol = protocol or ("none" if tokenizer == "char" else "sedd")
    if protocol not in (*PROTOCOL_PRESETS, "none"):
        raise UserError(f"--protocol: {protocol}: one of {', '.join(PROTOCOL_PRESETS)}, none")
    ev = EvalConfig(packing="none") if protocol == "none" else EvalConfig(protocol=protocol)
    seq_len = seq_len or (256 if text8 else 1024)
    if seq_len < 4:
        raise UserError("--seq-len: must be at least 4")
    data = DataConfig(train=ref, eval=[ref], tokenizer={"name": tokenizer}, seq_len=seq_len)
    kind = DATASETS[name][0]
    have = list(hub.SOURCES[name].splits) if kind == "hub" else (["test"] if kind == "file" else list(hub.SPLITS))
    for s in splits or []:
        if s not in have:
            raise UserError(f"--split: {name} has no '{s}' split (only {', '.join(have)})")
    out = []
    for split in splits or have:
        d = block_cache_dir(ref, split, data, ev.packing, ev.counting)
        before = blockcache.is_built(d)
        b = load_blocks(ref, split, data, ev.packing, ev.counting, num_proc=num_proc)
        info = {**json.loads((d / "meta.json").read_text()), "dir": str(d)}
        # built by this call (not found cached, nor built by another process we waited for)
        fresh = not before and info.get("builder_pid") == os.getpid()
        out.append({**info, "split": split, "fresh": fresh, "blocks": len(b)})
    return out


def listing() -> list[dict]:
    """One row per registered dataset, with its cached entries."""
    from bench.data import DATASETS, blockcache, cache_dir, hub

    caches = blockcache.cached(cache_dir() / "blocks")
    rows = []
    for name, (kind, _) in DATASETS.items():
        if kind == "hub":
            src = hub.SOURCES[name]
            where = src.hub + (f" ({src.config})" if src.config else "")
            splits = ", ".join(src.splits)
        elif kind == "text":
            where, splits = "embedded (bench/data/assets)", "train, valid, test"
        elif kind == "file":
            where, splits = "your UTF-8 file (path:)", "test (= train)"
        else:
            where, splits = "generated (exact likelihood)", "train (or a stream), test"
        mine = [c for c in caches if c.get("dataset", "").split("(")[0] == name]
        rows.append({"name": name, "kind": kind, "source": where, "splits": splits, "cached": mine})
    return rows
