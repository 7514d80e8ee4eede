"""BD3-LM's sampling speed against MDLM's at equal NFE (tokens/s), at the smoke size.

The smoke suite's backbone (2 layers × 128 hidden × 4 heads, seq_len 128, BPE vocabulary 2048),
one thread by default, untrained weights whose zero-initialised matrices (output head, adaLN)
get std 0.02 so the logits are not flat. Every row draws ``--n`` samples of L = 128 tokens in
``--steps`` network calls per sample (NFE, counted by the harness's hook
bench.samples.count_calls and asserted equal to the budget): MDLM (its default sampler: every
call reads all L positions), BD3-LM at each ``--blocks`` size with the KV cache (each call reads
one block, plus the previous block once) and without it (each call reads the clean prefix and
the block again); BD3-LM's call skipping is off (``reuse=False``) so that NFE = steps in every
row. The budget must be at least L/L′ for every block size (one call per block). Interleaved round by
round so machine load hits all rows alike; figures are medians over rounds [range].

    python benchmarks/bd3lm_sampling.py [--n 8] [--steps 32 128] [--blocks 4 16] [--rounds 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.samples import count_calls  # noqa: E402
from benchmarks.sampler_throughput import build as _build  # noqa: E402


def build(name: str, kw: dict, V: int, L: int):
    """The smoke-size model of benchmarks/sampler_throughput.py (2 × 128, structured weights)."""
    return _build(name, kw, V, L)[1]


def rows(blocks: list[int], V: int, L: int):
    out = [("MDLM", build("mdlm", {}, V, L), {})]
    for size in blocks:
        m = build("bd3lm", {"block_size": size}, V, L)
        out += [(f"BD3-LM L′={size}, KV cache", m, {"reuse": False}),
                (f"BD3-LM L′={size}, no cache", m, {"reuse": False, "kv_cache": False})]
    return out


def timed(m, n: int, steps: int, kw: dict) -> tuple[float, float]:
    """(tokens/s, NFE per sample) of one sampling call."""
    calls, h = count_calls(m.net)
    t0 = time.perf_counter()
    x = m.sample(n, steps, generator=torch.Generator().manual_seed(0), **kw)
    dt = time.perf_counter() - t0
    h.remove()
    return x.numel() / dt, calls[0] / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8, help="samples per call (the sampling batch)")
    ap.add_argument("--steps", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    V, L = 2048, 128
    table = rows(a.blocks, V, L)
    res = {(label, s): [] for label, _, _ in table for s in a.steps}
    for r in range(a.rounds + 1):                       # round 0 is a warm-up, not counted
        for s in a.steps:
            for label, m, kw in table:
                rate, nfe = timed(m, a.n, s, kw)
                assert nfe == s, (label, s, nfe)
                if r:
                    res[label, s].append(rate)
    print(f"V={V} L={L} 2x128 n={a.n} threads={a.threads} rounds={a.rounds} (NFE per sample = steps; "
          "in brackets the range over rounds, then the median over MDLM's)")
    print("| sampler | " + " | ".join(f"tokens/s at NFE {s}" for s in a.steps) + " |")
    print("|---|" + "---|" * len(a.steps))
    mdlm = {s: statistics.median(res["MDLM", s]) for s in a.steps}
    for label, _, _ in table:
        cells = []
        for s in a.steps:
            v = res[label, s]
            cells.append(f"{statistics.median(v):,.0f} [{min(v):,.0f}, {max(v):,.0f}] "
                         f"({statistics.median(v) / mdlm[s]:.2f}×)")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
