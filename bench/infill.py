"""The infilling benchmark (``eval.infill``, :class:`bench.config.InfillConfig`): hide positions
of held-out blocks, let each method fill them given the rest, keep the fills as
``<run>/infill.jsonl`` (scored by bench/metrics/infill.py, tabled by bench/infilltable.py).

Tasks, the same for every method of a suite (a function of the data and ``eval.infill`` only):

- ``span``: the first ``blocks`` test blocks whose every position is counted (a leading injected
  BOS aside), the middle m = round(span_fraction·L) positions hidden (from ⌊(L − m)/2⌋): a span
  of known length with context on both sides.
- ``random``: the same blocks; in block i a fraction r_i ~ U(random_fraction) of its counted
  positions, chosen uniformly (numpy generator seeded (infill.seed, i)).
- ``rocstories`` (a ``rocstories`` eval set only; DiffuLLaMA's setting): story i of the test
  split, split into sentences at [.!?] + space and tokenized sentence by sentence (each after the
  first with its leading space), then stories i+1, … packed after it as the eval packing packs
  them, cut at L; the tokens of its third sentence hidden. Stories that are not five sentences,
  or whose third sentence does not end inside the block, are skipped.

How a method fills (``bench.condition``): one whose ``conditioning`` is ``any`` keeps every
visible position (``given`` = the block, ``keep`` = not hidden) — both sides; a left-to-right
one (``prefix``) keeps only what precedes the first hidden position and generates the rest of
the block, of which only the hidden positions are scored (the visible suffix is put back):
infilling measured against a model that cannot look right; one that cannot condition
(``none``, the latent methods) has no fills — one line per task saying so, "—" in the table.

One line per filled block: ``{"dataset", "setting", "steps", "index", "ids" (the filled block:
the visible positions as given, the hidden ones as filled), "hidden" (positions), "target" (the
true ids there), "nfe", "wall_s", "seed"}``; NFE and wall time as bench/samples.py counts them.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.config import DataConfig, EvalConfig, InfillConfig, RunSpec, short_hash
from bench.errors import UserError

FILE = "infill.jsonl"
SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Task:
    """One setting on one eval set: the true blocks and their hidden positions."""

    dataset: str
    setting: str
    tokens: np.ndarray   # (N, L) int
    hidden: np.ndarray   # (N, L) bool


def check_infill(e: EvalConfig, data: DataConfig, where: str) -> None:
    """UserError (naming the field) for an ``eval.infill`` the suite's data cannot run."""
    c = e.infill
    if c is None:
        return
    m = span_length(c, data.seq_len)
    if "span" in c.settings and m > data.seq_len - 2:
        raise UserError(f"eval.infill.span_fraction: {c.span_fraction} of seq_len {data.seq_len} hides {m} "
                        f"positions; the span needs at least one visible position on each side")
    if "rocstories" in c.settings and not any(r.name == "rocstories" for r in data.eval):
        raise UserError(f"eval.infill.settings: 'rocstories' needs a rocstories eval set ({where} evaluates on "
                        f"{', '.join(r.key for r in data.eval)})")


def span_length(c: InfillConfig, L: int) -> int:
    return max(1, round(c.span_fraction * L))


def span_hidden(counted: np.ndarray, c: InfillConfig) -> np.ndarray:
    """(N, L) the middle round(span_fraction·L) positions of every block."""
    N, L = counted.shape
    m = span_length(c, L)
    h = np.zeros((N, L), dtype=bool)
    h[:, (L - m) // 2:(L - m) // 2 + m] = True
    return h


def random_hidden(counted: np.ndarray, c: InfillConfig) -> np.ndarray:
    """(N, L) in block i, round(r_i·n_i) ≥ 1 of its n_i counted positions, r_i ~ U(random_fraction),
    uniformly without replacement; generator seeded (infill.seed, i): block i's pattern never
    depends on how many blocks there are."""
    lo, hi = c.random_fraction
    h = np.zeros(counted.shape, dtype=bool)
    for i, row in enumerate(counted):
        rng = np.random.default_rng([c.seed, i])
        pos = np.nonzero(row)[0]
        k = min(len(pos), max(1, round(rng.uniform(lo, hi) * len(pos))))
        h[i, rng.choice(pos, size=k, replace=False)] = True
    return h


def full_blocks(tokens: np.ndarray, counted: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` blocks whose every position but the first is counted (no padding)."""
    ok = np.nonzero(np.asarray(counted)[:, 1:].all(1))[0][:n]
    return np.asarray(tokens)[ok].astype(np.int64), np.asarray(counted)[ok]


def story_blocks(stories: list[str], tok, L: int, packing: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, hidden) of the ``rocstories`` setting (module doc), at most ``n`` blocks."""
    eos = tok.eos_id
    docs, spans = [], []
    for s in stories:
        sents = [x for x in SENTENCE.split(s.strip()) if x]
        ids = tok.encode_batch([sents[0]] + [" " + x for x in sents[1:]]) if len(sents) == 5 else None
        docs.append(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]) if ids else None)
        spans.append((sum(map(len, ids[:2])), sum(map(len, ids[:3]))) if ids else None)
    toks, hidden = [], []
    lead = 1 if packing == "bos_eos_per_block" else 0
    body = L - 2 if packing == "bos_eos_per_block" else L
    for i, (d, sp) in enumerate(zip(docs, spans)):
        if d is None or sp[1] > body - 1 or sp[0] == sp[1]:
            continue
        parts, have = [], 0
        for nxt in (x for x in docs[i:] if x is not None):   # story i, then the next ones, packed
            parts += [nxt, np.array([eos])] if eos >= 0 and packing != "none" else [nxt]
            have += len(nxt) + 1
            if have >= body:
                break
        stream = np.concatenate(parts)[:body]
        if len(stream) < body:
            continue
        row = np.concatenate([[eos], stream, [eos]]) if lead else stream
        h = np.zeros(L, dtype=bool)
        h[lead + sp[0]:lead + sp[1]] = True
        toks.append(row)
        hidden.append(h)
        if len(toks) == n:
            break
    if not toks:
        raise UserError("eval.infill.settings: rocstories: no five-sentence story of the test split whose third "
                        f"sentence fits in seq_len {L}")
    return np.stack(toks).astype(np.int64), np.stack(hidden)


def tasks(spec: RunSpec) -> list[Task]:
    """Every (eval set, setting) task of the spec (module doc), in a fixed order."""
    from bench.data import documents, get_tokenizer, load_blocks

    c, e, data = spec.eval.infill, spec.eval, spec.data
    out = []
    for ref in data.eval:
        blocks = None
        for setting in c.settings:
            if setting == "rocstories":
                if ref.name != "rocstories":
                    continue
                stories = documents(ref, "test")["text"]
                toks, hid = story_blocks(list(stories), get_tokenizer(data), data.seq_len, e.packing, c.blocks)
                out.append(Task(ref.key, setting, toks, hid))
                continue
            if blocks is None:
                b = load_blocks(ref, "test", data, e.packing, e.counting)
                blocks = full_blocks(b.tokens, b.counted, c.blocks)
                if not len(blocks[0]):
                    raise UserError(f"eval.infill: {ref.key} has no test block of {data.seq_len} real tokens")
            hid = (span_hidden if setting == "span" else random_hidden)(blocks[1], c)
            out.append(Task(ref.key, setting, blocks[0], hid & blocks[1]))
    return out


def keep_of(conditioning: str, hidden: np.ndarray) -> np.ndarray | None:
    """What a method keeps (module doc): every visible position (``any``), the positions before
    the first hidden one (``prefix``), nothing (``none``: None, the method cannot fill)."""
    if conditioning == "none":
        return None
    if conditioning == "prefix":
        return np.cumsum(hidden, axis=1) == 0
    return ~hidden


def fill(method, task: Task, steps: int | None, c: InfillConfig, tag: int) -> list[dict]:
    """The task's blocks filled by ``method`` at ``steps``, in batches of ``infill.batch_size``
    (generator of batch b seeded (infill.seed, tag, steps, b))."""
    import torch

    from bench.condition import conditional_sample
    from bench.samples import count_calls
    from bench.train import seed_of

    keep = keep_of(method.conditioning, task.hidden)
    out = []
    method.eval()
    for b, lo in enumerate(range(0, len(task.tokens), c.batch_size)):
        x0, h = task.tokens[lo:lo + c.batch_size], task.hidden[lo:lo + c.batch_size]
        n, seed = len(x0), seed_of(c.seed, tag, steps or 0, b)
        g = torch.Generator(device=method.device).manual_seed(seed)
        calls, handle = count_calls(method.net)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                x = conditional_sample(method, n, steps, g, given=torch.as_tensor(x0),
                                       keep=torch.as_tensor(keep[lo:lo + n])).cpu().numpy()
        finally:
            handle.remove()
        wall = time.perf_counter() - t0
        filled = np.where(h, x, x0)   # a prefix-only method's suffix is put back: only the hidden positions count
        for j in range(n):
            pos = np.nonzero(h[j])[0]
            out.append({"dataset": task.dataset, "setting": task.setting, "steps": steps, "index": lo + j,
                        "ids": filled[j].tolist(), "hidden": pos.tolist(), "target": x0[j, pos].tolist(),
                        "nfe": round(calls[0] / n, 4), "wall_s": round(wall / n, 6), "seed": seed})
    return out


def settings_of(spec: RunSpec) -> dict:
    """The recorded settings of a run's infill fills (with their id)."""
    d = {**spec.eval.infill.model_dump(mode="json"), "steps": spec.eval.infill_steps}
    return {**d, "id": short_hash(d)[:8]}


def write_infill(method, spec: RunSpec, run_dir: Path, log=None) -> dict | None:
    """Every task filled at every step budget into ``run_dir/infill.jsonl``; the record's
    ``infill`` entry (settings, the method's conditioning, fills), or None when ``eval.infill``
    is off or the method does not sample."""
    from bench.records import atomic_write_text

    c = spec.eval.infill
    if c is None or "sampling" not in method.supports():
        return None
    kind = method.conditioning
    lines = []
    for tag, task in enumerate(tasks(spec)):
        if keep_of(kind, task.hidden) is None:
            lines.append({"dataset": task.dataset, "setting": task.setting, "steps": None,
                          "unfilled": f"{method.name} cannot condition on given positions (conditioning: none)"})
            continue
        for steps in (spec.eval.infill_steps if method.sampler_steps else [None]):
            t0 = time.time()
            lines += fill(method, task, steps, c, tag)
            if log:
                log(f"infill {task.dataset} {task.setting}: {len(task.tokens)} blocks at steps={steps} "
                    f"in {time.time() - t0:.1f} s")
    atomic_write_text(Path(run_dir) / FILE, "".join(json.dumps(r) + "\n" for r in lines))
    return {"settings": settings_of(spec), "conditioning": kind, "fills": sum("ids" in r for r in lines)}


def read_infill(path: Path) -> list[dict]:
    """The lines of an infill file; UserError naming the file and line when one is malformed."""
    out = []
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__})") from None
    for no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{no}: not JSON ({e})") from None
        if not isinstance(r, dict) or not all(k in r for k in ("dataset", "setting")) or \
                ("unfilled" not in r and not all(isinstance(r.get(k), list) for k in ("ids", "hidden", "target"))):
            raise UserError(f"{path}:{no}: not an infill line (dataset, setting, ids, hidden, target)")
        out.append(r)
    return out
