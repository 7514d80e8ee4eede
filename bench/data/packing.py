"""Packing tokenized documents into fixed-length blocks, per the protocol's packing rule.

Returns ``tokens`` (N, L) int32 and ``counted`` (N, L) bool: which tokens count in the NLL.
The last partial block is padded (pad id = EOS, or 0 without one) and its padding masked out;
it is never dropped (DUO issue #9: dropping remainders empties small sets such as PTB), so
any non-empty split gives at least one block.

Which injected specials count is the protocol's (``count_bos``, ``count_eos``): SEDD counts
the EOS appended per document, MDLM counts its per-block [BOS] and [EOS] too, ``no-specials``
counts neither. An uncounted special is still in the input (clean context), never scored.

:func:`pack` is the in-memory reference; :func:`pack_stream` writes the same arrays chunk by
chunk into preallocated (memory-mapped) arrays, so a corpus never has to fit in memory.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np


def _blocks(stream: np.ndarray, width: int, pad: int, counted_stream=None) -> tuple[np.ndarray, np.ndarray]:
    n = max(1, -(-len(stream) // width))
    toks = np.full(n * width, pad, dtype=np.int32)
    toks[: len(stream)] = stream
    counted = np.zeros(n * width, dtype=bool)
    counted[: len(stream)] = True if counted_stream is None else counted_stream
    return toks.reshape(n, width), counted.reshape(n, width)


def pack(docs: list[np.ndarray], seq_len: int, packing: str, eos_id: int,
         count_bos: bool = False, count_eos: bool = True):
    pad = max(eos_id, 0)
    if packing == "eos_per_doc":       # SEDD: doc EOS doc EOS ..., cut every seq_len tokens
        if eos_id < 0:
            raise ValueError("packing eos_per_doc needs a tokenizer with an EOS token")
        eos = np.array([eos_id], dtype=np.int32)
        stream = np.concatenate([x for d in docs for x in (d, eos)]) if docs else np.zeros(0, np.int32)
        cnt = np.concatenate([x for d in docs for x in (np.ones(len(d), bool), np.array([count_eos]))]) \
            if docs else np.zeros(0, bool)
        return _blocks(stream, seq_len, pad, cnt)
    if packing == "none":
        stream = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        return _blocks(stream, seq_len, pad)
    if packing == "bos_eos_per_block":  # MDLM: [BOS] seq_len-2 tokens [EOS]
        if eos_id < 0:
            raise ValueError("packing bos_eos_per_block needs a tokenizer with an EOS/BOS token")
        stream = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        body, body_counted = _blocks(stream, seq_len - 2, pad)
        n = body.shape[0]
        col = np.full((n, 1), eos_id, dtype=np.int32)
        toks = np.concatenate([col, body, col], axis=1)
        counted = np.concatenate([np.full((n, 1), count_bos), body_counted, np.full((n, 1), count_eos)], axis=1)
        return toks, counted
    raise ValueError(f"unknown packing {packing!r}")


def n_blocks(n_tokens: int, n_docs: int, seq_len: int, packing: str) -> int:
    """Blocks that :func:`pack` makes from ``n_docs`` documents of ``n_tokens`` tokens in all."""
    if packing == "eos_per_doc":
        return max(1, -(-(n_tokens + n_docs) // seq_len))
    if packing == "bos_eos_per_block":
        return max(1, -(-n_tokens // (seq_len - 2)))
    if packing == "none":
        return max(1, -(-n_tokens // seq_len))
    raise ValueError(f"unknown packing {packing!r}")


def pack_stream(chunks: Iterable[tuple[np.ndarray, np.ndarray]], n_tokens: int, n_docs: int, seq_len: int,
                packing: str, eos_id: int, alloc: Callable, count_bos: bool = False, count_eos: bool = True):
    """What :func:`pack` returns, built from ``chunks`` of (flat token ids, document lengths)
    into arrays from ``alloc(shape, dtype)`` (e.g. ``np.lib.format.open_memmap``)."""
    if packing not in ("eos_per_doc", "bos_eos_per_block", "none"):
        raise ValueError(f"unknown packing {packing!r}")
    if packing != "none" and eos_id < 0:
        raise ValueError(f"packing {packing} needs a tokenizer with an EOS token")
    pad = max(eos_id, 0)
    N = n_blocks(n_tokens, n_docs, seq_len, packing)
    toks, counted = alloc((N, seq_len), np.int32), alloc((N, seq_len), np.bool_)
    toks[:] = pad
    counted[:] = False
    width = seq_len - 2 if packing == "bos_eos_per_block" else seq_len
    if packing == "bos_eos_per_block":
        toks[:, 0] = eos_id
        toks[:, -1] = eos_id
        counted[:, 0] = count_bos
        counted[:, -1] = count_eos
    ft, fc = toks.reshape(-1), counted.reshape(-1)
    pos = 0  # position in the body stream
    for values, lengths in chunks:
        values = np.asarray(values, dtype=np.int32)
        lengths = np.asarray(lengths, dtype=np.int64)
        if packing == "eos_per_doc":
            seg = np.empty(len(values) + len(lengths), np.int32)
            seg_c = np.ones(len(seg), bool)
            ends = np.cumsum(lengths) + np.arange(len(lengths))  # index of each doc's EOS
            seg[ends] = eos_id
            seg_c[ends] = count_eos
            body = np.ones(len(seg), bool)
            body[ends] = False
            seg[body] = values
        else:
            seg, seg_c = values, np.ones(len(values), bool)
        p = pos + np.arange(len(seg))
        flat = p if width == seq_len else (p // width) * seq_len + 1 + p % width
        ft[flat] = seg
        fc[flat] = seg_c
        pos += len(seg)
    return toks, counted
