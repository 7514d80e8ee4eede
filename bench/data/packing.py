"""Packing tokenized documents into fixed-length blocks, per the protocol's packing rule.

Returns ``tokens`` (N, L) int32 and ``counted`` (N, L) bool: which tokens count in the NLL.
The last partial block is padded (pad id = EOS, or 0 without one) and its padding masked out;
it is never dropped (DUO issue #9: dropping remainders empties small sets such as PTB).
"""
from __future__ import annotations

import numpy as np


def _blocks(stream: np.ndarray, width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    n = max(1, -(-len(stream) // width))
    toks = np.full(n * width, pad, dtype=np.int32)
    toks[: len(stream)] = stream
    counted = np.zeros(n * width, dtype=bool)
    counted[: len(stream)] = True
    return toks.reshape(n, width), counted.reshape(n, width)


def pack(docs: list[np.ndarray], seq_len: int, packing: str, eos_id: int):
    pad = max(eos_id, 0)
    if packing == "eos_per_doc":       # SEDD: doc EOS doc EOS ..., cut every seq_len tokens
        if eos_id < 0:
            raise ValueError("packing eos_per_doc needs a tokenizer with an EOS token")
        eos = np.array([eos_id], dtype=np.int32)
        stream = np.concatenate([x for d in docs for x in (d, eos)]) if docs else np.zeros(0, np.int32)
        return _blocks(stream, seq_len, pad)
    if packing == "none":
        stream = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        return _blocks(stream, seq_len, pad)
    if packing == "bos_eos_per_block":  # MDLM: [BOS] seq_len-2 tokens [EOS]; BOS not counted
        if eos_id < 0:
            raise ValueError("packing bos_eos_per_block needs a tokenizer with an EOS/BOS token")
        stream = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        body, body_counted = _blocks(stream, seq_len - 2, pad)
        n = body.shape[0]
        col = np.full((n, 1), eos_id, dtype=np.int32)
        toks = np.concatenate([col, body, col], axis=1)
        counted = np.concatenate([np.zeros((n, 1), bool), body_counted, np.ones((n, 1), bool)], axis=1)
        return toks, counted
    raise ValueError(f"unknown packing {packing!r}")
