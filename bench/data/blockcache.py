"""The block cache: documents → parallel tokenisation → packed, memory-mapped blocks.

One directory per (corpus + split + tokenizer + length + packing + counting), built once
under an exclusive file lock, so every rank of a run and every run of a suite that needs the
same blocks waits for one builder and then maps the same files (``np.load(mmap_mode="r")``:
the OS page cache shares them between processes; nothing is copied per rank).

Building: ``datasets.Dataset.map`` detokenizes and tokenizes in ``num_proc`` worker processes
(batched; big corpora are spilled to Arrow files by ``datasets``, never held in memory), then
:func:`bench.data.packing.pack_stream` writes the packed blocks chunk by chunk straight into
``tokens.npy`` / ``counted.npy`` (``np.lib.format.open_memmap``) in a temporary directory that
is renamed into place last, with ``meta.json`` (counts, timings). A crash leaves no partial
cache; a complete one is never rebuilt.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from bench.data.packing import pack_stream
from bench.records import usable_cores


@contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (``flock``) held for the ``with`` block; released when the
    process dies, so a killed builder never wedges the others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def default_num_proc(n_rows: int) -> int:
    """Tokenisation workers: all cores for big sets, one process for small ones (forking
    costs more than it saves below ~20k rows). ``TDBENCH_NUM_PROC`` overrides."""
    env = os.environ.get("TDBENCH_NUM_PROC")
    if env:
        return max(1, min(int(env), max(1, n_rows)))
    return max(1, min(usable_cores(), n_rows // 20_000)) if n_rows >= 40_000 else 1


def is_built(d: Path) -> bool:
    return (d / "meta.json").is_file()


class _Encode:
    """Picklable map function for ``datasets`` workers: detokenize, then tokenize."""

    def __init__(self, tok, detok: Callable[[str], str]):
        self.tok, self.detok = tok, detok

    def __call__(self, batch):
        return {"ids": self.tok.encode_batch([self.detok(t) for t in batch["text"]])}


def build(d: Path, documents: Callable[[], "object"], tok, detok: Callable[[str], str], seq_len: int,
          packing: str, count_bos: bool, count_eos: bool, desc: str, meta: dict,
          num_proc: int | None = None) -> dict:
    """Build the cache directory ``d`` unless it exists; return its meta.json content."""
    import datasets
    from tqdm.auto import tqdm

    with file_lock(d.parent / f".{d.name}.lock"):
        if is_built(d):
            return json.loads((d / "meta.json").read_text())
        t0 = time.time()
        ds = documents()
        n_docs = len(ds)
        workers = num_proc or default_num_proc(n_docs)
        feats = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))})
        was = datasets.is_progress_bar_enabled()
        datasets.enable_progress_bars()
        try:
            enc = ds.map(_Encode(tok, detok), batched=True, batch_size=1000, num_proc=workers if workers > 1 else None,
                         remove_columns=ds.column_names, features=feats, desc=f"tokenize {desc}",
                         new_fingerprint=d.name)
        finally:
            if not was:
                datasets.disable_progress_bars()
        t_tok = time.time() - t0
        import pyarrow.compute as pc

        arrow = enc.with_format("arrow")
        n_tokens = 0
        for b in arrow.iter(batch_size=100_000):
            n_tokens += int(pc.sum(pc.list_value_length(b["ids"])).as_py() or 0)

        def chunks():
            bar = tqdm(total=n_docs, desc=f"pack {desc}", unit="doc", leave=False, mininterval=1)
            for b in arrow.iter(batch_size=50_000):
                col = b["ids"].combine_chunks()
                yield col.flatten().to_numpy(zero_copy_only=False), pc.list_value_length(col).to_numpy()
                bar.update(len(col))
            bar.close()

        tmp = d.with_name(f".{d.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            files = {np.dtype(np.int32): tmp / "tokens.npy", np.dtype(np.bool_): tmp / "counted.npy"}
            alloc = lambda shape, dtype: np.lib.format.open_memmap(files[np.dtype(dtype)], mode="w+",  # noqa: E731
                                                                  dtype=dtype, shape=shape)
            toks, counted = pack_stream(chunks(), n_tokens, n_docs, seq_len, packing, tok.eos_id, alloc,
                                        count_bos=count_bos, count_eos=count_eos)
            n_counted = int(counted.sum())
            toks.flush()
            counted.flush()
            del toks, counted
            wall = time.time() - t0
            info = {**meta, "n_docs": n_docs, "n_tokens": n_tokens, "n_blocks": int(np.load(files[np.dtype(np.int32)],
                                                                                           mmap_mode="r").shape[0]),
                    "n_counted": n_counted, "seq_len": seq_len, "packing": packing, "count_bos": count_bos,
                    "count_eos": count_eos, "num_proc": workers, "tokenize_s": round(t_tok, 3),
                    "build_s": round(wall, 3), "tokens_per_s": round(n_tokens / max(wall, 1e-9)),
                    "tokenize_tokens_per_s": round(n_tokens / max(t_tok, 1e-9)), "builder_pid": os.getpid(),
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / "meta.json").write_text(json.dumps(info, indent=1))
            shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info


def open_blocks(d: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(d / "tokens.npy", mmap_mode="r"), np.load(d / "counted.npy", mmap_mode="r")


def cached(root: Path) -> list[dict]:
    """meta.json of every complete cache directory under ``root``."""
    out = []
    for m in sorted(Path(root).glob("*/meta.json")):
        try:
            out.append({**json.loads(m.read_text()), "dir": str(m.parent)})
        except (OSError, json.JSONDecodeError):
            continue
    return out
