"""The frozen-features cache: what a method's frozen parts compute from each training block,
computed once per (frozen weights, blocks) and memory-mapped by every run that needs it.

A method whose frozen parts (``Method.add_frozen``) turn a block into something no training
step changes — TEncDM's encoder outputs E(w), a frozen LD4LG LM's encoder states — declares it
through the method contract (``Method.frozen_features`` and ``frozen_features_key``, read
through ``Method.features``). Before training, the runner calls :func:`attach` with the
training blocks; the method then reads a batch's features from the maps instead of running
its encoder, whenever every block of the batch is in the cache (found by content: a digest of
the block's tokens and counted mask), and computes them otherwise.

Key: the method's name and ``frozen_features_key()`` (its settings, its encoder's tokenizer
and config), the sha256 of every frozen part's weights, the blocks (the block cache they came
from and a sha256 of their content), the device type and autocast mode they are computed
under, and the torch version. Directory: ``$TDBENCH_CACHE/features/<method>-<hash of key>/``
with ``key.json`` and chunks ``c00000/``, ``c00001/`` … of :data:`CHUNK` blocks: one ``.npy``
per feature (the rows as the method returned them: dtype and shape kept, fp32 stays fp32)
and ``meta.json`` with each file's size and sha256.

Building: chunk by chunk, each under its own ``flock``, into a temporary directory renamed
into place last, so no reader ever sees half a chunk; a process that finds a chunk's lock
taken builds another (runs of a suite that start together build halves), then waits for the
rest. Reading: each chunk is checked against its ``meta.json`` (sizes, sha256) when opened; a
missing, torn or damaged chunk is rebuilt (with a warning when damaged), never used.

When: a cache not yet complete is built only when the run encodes at least half as many
blocks as the cache holds (it has paid for itself by the second run that reads it; the run's
encodings count its training steps' and those of the method's pass over the training set,
``Method.training_set_encodes``, e.g. TEncDM's normaliser statistics); a cache
over ``TDBENCH_FEATURE_CACHE_GB`` (default 16) GiB is never built; 0 turns caching off. Without
a cache the method computes its features every step, as before.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.config import short_hash
from bench.data.blockcache import file_lock
from bench.data.paths import cache_dir

FORMAT = 1
CHUNK = 512            # blocks per chunk file
BUILD_BATCH = 16       # blocks per frozen-features call while building (the fastest per block of 4–64 here)
DEFAULT_GB = 16.0
ENV_GB = "TDBENCH_FEATURE_CACHE_GB"

# torch dtypes numpy has no name for travel as their bits
_AS_BITS = {torch.bfloat16: torch.int16}


def max_bytes() -> int:
    """The largest cache built (``TDBENCH_FEATURE_CACHE_GB`` GiB; 0: caching off)."""
    raw = os.environ.get(ENV_GB, "")
    try:
        gb = float(raw) if raw.strip() else DEFAULT_GB
    except ValueError:
        from bench.errors import UserError
        raise UserError(f"{ENV_GB}: '{raw}' is not a number of GiB") from None
    return int(max(gb, 0.0) * 2 ** 30)


# ----------------------------------------------------------------------------- identities
def row_digests(tokens: np.ndarray, counted: np.ndarray) -> list[bytes]:
    """One 16-byte digest per block of (its tokens as int32, its counted mask): what a batch's
    blocks are looked up by."""
    t = np.ascontiguousarray(tokens, dtype=np.int32)
    c = np.ascontiguousarray(counted, dtype=np.bool_)
    return [hashlib.blake2b(t[i].tobytes() + c[i].tobytes(), digest_size=16).digest() for i in range(len(t))]


def blocks_sha256(tokens: np.ndarray, counted: np.ndarray) -> str:
    h = hashlib.sha256(f"{tokens.shape}".encode())
    h.update(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
    h.update(np.ascontiguousarray(counted, dtype=np.bool_).tobytes())
    return h.hexdigest()


def cache_key(method, blocks, device: torch.device, precision: str) -> dict:
    """Everything the cached rows are a function of (module docstring)."""
    return {"format": FORMAT, "chunk": CHUNK, "method": method.name, "features": method.frozen_features_key(),
            "frozen": {k: v["sha256"] for k, v in sorted(method.frozen_info().items())},
            "block_cache": getattr(blocks, "source", None), "blocks": blocks_sha256(blocks.tokens, blocks.counted),
            "device": torch.device(device).type, "precision": precision, "torch": torch.__version__}


def cache_path(key: dict) -> Path:
    return cache_dir() / "features" / f"{key['method']}-{short_hash(key)[:20]}"


# ----------------------------------------------------------------------------- the cache
class FrozenCache:
    """The mapped chunks of one cache and the row of every cached block (by content)."""

    def __init__(self, path: Path, chunks: list[dict[str, np.ndarray]], rows: dict[bytes, int],
                 dtypes: dict[str, str]):
        self.path, self.chunks, self.rows, self.dtypes = path, chunks, rows, dtypes
        self.chunk = CHUNK   # blocks per chunk, as built
        self.hits = self.misses = 0

    def summary(self) -> dict:
        """The record's note: the cache directory, and the batches read from it (hits) or
        computed because a block of theirs was not in it (misses)."""
        n = sum(len(next(iter(c.values()))) for c in self.chunks)
        return {"cache": str(self.path), "blocks": n, "hits": self.hits, "misses": self.misses}

    def lookup(self, x0: torch.Tensor, counted: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The cached features of the batch's blocks (on x0's device), None unless every one
        of them is cached."""
        found = [self.rows.get(d) for d in row_digests(x0.cpu().numpy(), counted.cpu().numpy())]
        if any(i is None for i in found):
            self.misses += 1
            return None
        self.hits += 1
        out = {}
        for name, dtype in self.dtypes.items():
            rows = np.stack([self.chunks[i // self.chunk][name][i % self.chunk] for i in found])
            out[name] = from_numpy(rows, dtype).to(x0.device)
        return out


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.view(_AS_BITS[t.dtype]) if t.dtype in _AS_BITS else t).numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    want = getattr(torch, dtype.removeprefix("torch."))
    t = torch.from_numpy(a)
    return t.view(want) if want in _AS_BITS else t


# ----------------------------------------------------------------------------- chunks on disk
def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def open_chunk(d: Path, n_rows: int) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(its maps, None) when chunk ``d`` is complete and intact; (None, None) when absent;
    (None, why) when damaged (a file missing, torn, or with another sha256 than recorded)."""
    if not d.is_dir():
        return None, None
    try:
        meta = json.loads((d / "meta.json").read_text())
        out = {}
        for name, f in meta["fields"].items():
            p = d / f"{name}.npy"
            if p.stat().st_size != f["bytes"] or file_sha256(p) != f["sha256"]:
                return None, f"{p.name}: size or sha256 differs from meta.json"
            arr = np.load(p, mmap_mode="r")
            if arr.shape[0] != n_rows:
                return None, f"{p.name}: {arr.shape[0]} rows, not {n_rows}"
            out[name] = arr
        return out, None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{type(e).__name__}: {str(e)[:80]}"


def build_chunk(d: Path, rows: range, blocks, compute: Callable, device) -> dict[str, np.ndarray]:
    """Compute the features of blocks ``rows`` into ``d`` (temporary directory, fsync, rename)."""
    tmp = d.with_name(f".{d.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        arrays, dtypes = {}, {}
        for s in range(rows.start, rows.stop, BUILD_BATCH):
            e = min(s + BUILD_BATCH, rows.stop)
            feats = compute(torch.as_tensor(np.array(blocks.tokens[s:e]), dtype=torch.long, device=device),
                            torch.as_tensor(np.array(blocks.counted[s:e]), dtype=torch.bool, device=device))
            for name, t in feats.items():
                a = to_numpy(t)
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=a.dtype,
                                                             shape=(len(rows), *a.shape[1:]))
                    dtypes[name] = str(t.dtype)
                arrays[name][s - rows.start:e - rows.start] = a
        fields = {}
        for name, a in arrays.items():
            a.flush()
            p = tmp / f"{name}.npy"
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
            fields[name] = {"dtype": dtypes[name], "bytes": p.stat().st_size, "sha256": file_sha256(p)}
        arrays.clear()
        (tmp / "meta.json").write_text(json.dumps({"rows": [rows.start, rows.stop], "fields": fields}, indent=1))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    got, why = open_chunk(d, len(rows))
    if got is None:
        raise RuntimeError(f"{d}: the chunk just built does not verify ({why})")
    return got


@contextmanager
def try_lock(path: Path):
    """An exclusive ``flock`` if free now: yields True (held for the block) or False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def open_or_build(path: Path, blocks, compute: Callable, device) -> tuple[list[dict], int]:
    """Every chunk of the cache at ``path``, mapped and verified, building (or rebuilding) the
    missing ones: first those no other process is building, then, waiting on their locks, the
    rest. Returns (the chunks, how many this process built)."""
    n = len(blocks)
    spans = [range(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    chunks: list[dict | None] = [None] * len(spans)
    built = 0

    def settle(c: int, wait: bool) -> None:
        nonlocal built
        d = path / f"c{c:05d}"
        got, _ = open_chunk(d, len(spans[c]))
        if got is not None:
            chunks[c] = got
            return
        with (file_lock(path / f".c{c:05d}.lock") if wait else try_lock(path / f".c{c:05d}.lock")) as held:
            if held is False:
                return                        # another process builds it: come back for it later
            got, why = open_chunk(d, len(spans[c]))   # (it may have been built meanwhile)
            if got is None:
                if why:
                    print(f"warning: {d}: damaged frozen-features chunk ({why}); rebuilding", file=sys.stderr)
                got = build_chunk(d, spans[c], blocks, compute, device)
                built += 1
            chunks[c] = got

    for c in range(len(spans)):
        settle(c, wait=False)
    for c in range(len(spans)):
        if chunks[c] is None:
            settle(c, wait=True)
    return chunks, built


# ----------------------------------------------------------------------------- the harness's call
def attach(method, blocks, device, precision: str = "no", autocast=nullcontext, log=print,
           encodes: int | None = None) -> FrozenCache | None:
    """Give ``method`` the cache of its frozen features over ``blocks``, or nothing when it
    declares none, caching is off, or the cache would exceed the size limit. A cache not yet
    complete is built only when the run encodes (``encodes``: blocks over all its steps; None:
    unknown; the method's ``training_set_encodes`` are added to it) at least half as many blocks
    as it holds, so that it has paid for itself by the second run that reads it (a suite's next
    seed, a rerun). ``autocast``: the context the
    training forward runs in (the features are computed under it, as in training);
    ``precision`` names it in the key."""
    if method.frozen_features_key() is None or not hasattr(blocks, "tokens") or len(blocks) == 0:
        return None
    limit = max_bytes()
    if limit == 0:
        log(f"frozen features: cache off ({ENV_GB}=0); computed every step")
        return None
    method.to(device)

    @torch.no_grad()
    def compute(x0, counted):
        with autocast():
            return method.frozen_features(x0, counted)

    probe = compute(torch.as_tensor(np.array(blocks.tokens[:1]), dtype=torch.long, device=device),
                    torch.as_tensor(np.array(blocks.counted[:1]), dtype=torch.bool, device=device))
    size = len(blocks) * sum(v.element_size() * v[0].numel() for v in probe.values())
    if size > limit:
        log(f"frozen features: a cache of {len(blocks):,} blocks would take {size / 2 ** 30:.1f} GiB "
            f"> {ENV_GB}={limit / 2 ** 30:g}; computed every step")
        return None
    key = cache_key(method, blocks, device, precision)
    path = cache_path(key)
    if encodes is not None:
        encodes += method.training_set_encodes(len(blocks))
    complete = all((path / f"c{c:05d}").is_dir() for c in range(-(-len(blocks) // CHUNK)))
    if not complete and encodes is not None and 2 * encodes < len(blocks):
        log(f"frozen features: not cached (the run encodes {encodes:,} blocks, under half of the "
            f"{len(blocks):,} a cache would hold); computed every step")
        return None
    path.mkdir(parents=True, exist_ok=True)
    _write_key(path, key)
    t0 = time.time()
    chunks, built = open_or_build(path, blocks, compute, device)
    rows = {}
    for i, d in enumerate(row_digests(blocks.tokens, blocks.counted)):
        rows.setdefault(d, i)
    cache = FrozenCache(path, chunks, rows, {k: str(v.dtype) for k, v in probe.items()})
    method.use_frozen_cache(cache)
    what = f"built {built} of {len(chunks)} chunks" if built else f"mapped {len(chunks)} chunks"
    log(f"frozen features: {len(blocks):,} blocks, {size / 2 ** 30:.2f} GiB in {path} "
        f"({what} in {time.time() - t0:.1f} s)")
    return cache


def _write_key(path: Path, key: dict) -> None:
    """``key.json`` (for a reader; the directory name is its hash), written atomically once."""
    p = path / "key.json"
    if not p.is_file():
        tmp = path / f".key.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
        os.replace(tmp, p)
