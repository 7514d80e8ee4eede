"""Samples as artifacts: ``<run>/samples.jsonl``, drawn by the harness from a method's sampler.

One line per sample::

    {"ids": [...], "text": "...", "steps": 64, "index": 0, "seed": 12345, "nfe": 64,
     "wall_s": 0.031, "float64_sampling": true}

``steps`` is the step budget (null for samplers that ignore it, e.g. the AR baseline); ``nfe``
the real network evaluations per sample, averaged over its batch (a hook on the method's
network counts the sequences each call processed, so a call a cache skipped, or a sequence it
left out of a call, is not counted); ``wall_s`` the batch's sampling wall time
divided by its size; ``seed`` the seed of the batch's generator; ``sampler`` (only for methods
that describe it, ``Method.sampler_info``) what the sampler draws from, e.g. a continuous
method's T and whether it ends at t = 0 with a draw from the bounded decoder.

The sampling batch is a function of the spec only: ``B = min(eval.batch_size, eval.samples)``
(``eval.batch_size`` when ``eval.samples`` is 0), never of how many samples a call asks for.
Sample ``i`` of a budget comes from batch ``i // B`` with the generator seeded by (eval.seed,
steps, batch): the first n samples never depend on how many were drawn, so ``tdbench sample
DIR --n N`` extends a file and gives the same lines as drawing N at once. A run that keeps 4
samples draws batches of 4 (not an evaluation batch of 32 to keep 4); asking for more later
draws more batches of the same size.

Any JSONL file of ``{"text": ...}`` lines (other fields optional) is a sample file for
``tdbench score``; a malformed one is a one-line error naming the file and line.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.config import RunSpec
from bench.errors import UserError
from bench.records import JSON_ERRORS, atomic_write_text, json_error, read_record

if TYPE_CHECKING:   # torch is imported where samples are drawn: reading them (the report) needs no torch
    import torch

FILE = "samples.jsonl"


def budgets(method, spec: RunSpec) -> list[int | None]:
    return list(spec.eval.sample_steps) if method.sampler_steps else [None]


def count_calls(module: torch.nn.Module):
    """[sequences evaluated so far] and the hook's handle (remove it when done)."""
    box = [0]

    def hook(_module, _args, output):
        box[0] += output.shape[0]
    return box, module.register_forward_hook(hook)


def sampling_batch(spec: RunSpec) -> int:
    """The sequences per ``method.sample`` call: min(eval.batch_size, eval.samples), or
    eval.batch_size when eval.samples is 0 — from the spec only (see the module doc)."""
    e = spec.eval
    return min(e.batch_size, e.samples) if e.samples > 0 else e.batch_size


def draw(method, spec: RunSpec, tokenizer, steps: int | None, n: int, start: int = 0) -> list[dict]:
    """Samples ``start .. n−1`` of budget ``steps`` (see the module doc for the batch and seeding)."""
    import torch

    from bench.train import seed_of

    B = sampling_batch(spec)
    f64 = method.float64_sampling
    described = method.sampler_info(steps)
    info = {"sampler": described} if described is not None else {}
    out = []
    method.eval()
    for b in range(start // B, -(-n // B)):
        seed = seed_of(spec.eval.seed, steps or 0, b)
        g = torch.Generator(device=method.device).manual_seed(seed)
        calls, handle = count_calls(method.net)
        t0 = time.perf_counter()
        try:
            x = method.sample(B, steps, generator=g).cpu().tolist()
        finally:
            handle.remove()
        wall = time.perf_counter() - t0
        for j, ids in enumerate(x):
            i = b * B + j
            if start <= i < n:
                out.append({"ids": ids, "text": tokenizer.decode(ids), "steps": steps, "index": i, "seed": seed,
                            "nfe": round(calls[0] / B, 4), "wall_s": round(wall / B, 6), "float64_sampling": f64,
                            **info})
    return out


def write_run_samples(method, spec: RunSpec, tokenizer, run_dir: Path, n: int | None = None,
                      steps: list[int] | None = None, log=None) -> int:
    """Draw (or extend to) ``n`` samples per step budget into ``run_dir/samples.jsonl``;
    returns the number of lines in the file."""
    n = spec.eval.samples if n is None else n
    path = Path(run_dir) / FILE
    have = read_samples(path) if path.is_file() else []
    todo = budgets(method, spec) if steps is None or not method.sampler_steps else list(steps)
    new = []
    for s in todo:
        k = sum(1 for r in have if r.get("steps") == s)
        if k < n:
            t0 = time.time()
            new += draw(method, spec, tokenizer, s, n, start=k)
            if log:
                log(f"samples: {n - k} at steps={s} in {time.time() - t0:.1f} s")
    if new:
        lines = [json.dumps(r) for r in have + new]
        atomic_write_text(path, "\n".join(lines) + "\n")
    return len(have) + len(new)


def read_samples(path: Path) -> list[dict]:
    """Parse a JSONL sample file; UserError naming the file (and line) if it is malformed."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    out = []
    for no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{no}: not JSON ({e.msg})") from None
        except JSON_ERRORS as e:  # nesting too deep, an integer over the digit limit
            raise UserError(f"{path}:{no}: not JSON ({json_error(e)})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{no}: expected a JSON object with a 'text' field")
        if not isinstance(rec.get("text"), str):
            raise UserError(f"{path}:{no}: missing 'text' (a string)" if "text" not in rec else
                            f"{path}:{no}: 'text' must be a string")
        ids = rec.get("ids")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
            raise UserError(f"{path}:{no}: 'ids' must be a list of integers")
        out.append(rec)
    if not out:
        raise UserError(f"{path}: empty (no samples)")
    return out


def load_final_method(run_dir: Path):
    """(method with its final weights, spec) of a complete run: built from the run's spec, with
    bench.checkpoint.load_weights from its final checkpoint (``ema.safetensors`` over
    ``model.safetensors`` when the (last stage of the) run trained with EMA). Frozen parts come
    again from their source and must be the ones the run recorded. A method that does not train
    (``trains = False``, a pretrained model) has no checkpoint: it is built from its source,
    whose ``weights_sha256`` (when its ``info()`` gives one) must be the one the run recorded."""
    from bench.checkpoint import final_checkpoint, load_weights
    from bench.data import get_tokenizer
    from bench.registry import build_method, get_method

    run_dir = Path(run_dir)
    rec = read_record(run_dir / "result.json")
    if rec["status"] != "complete":
        raise UserError(f"{run_dir}: run is {rec['status']}, not complete")
    spec = RunSpec(**rec["spec"])
    tokenizer = get_tokenizer(spec.data)
    if not get_method(spec.method).trains:   # a pretrained row: its weights come from its source, as recorded
        method = build_method(spec, tokenizer.vocab_size, tokenizer)
        want = (rec.get("method_info") or {}).get("weights_sha256")
        have = method.info().get("weights_sha256")
        if want and have and want != have:
            raise UserError(f"{run_dir}: the pretrained model changed since the run recorded it (sha256 "
                            f"{have[:12]}… ≠ {want[:12]}…); restore it or start a new run")
        return method.eval(), spec
    ck = final_checkpoint(run_dir)
    return load_weights(build_method(spec, tokenizer.vocab_size, tokenizer), ck).eval(), spec
