"""Benchmark figures for docs/performance.md (a script, not a test: timings are printed, never asserted).

For each synthetic source (bench.data.synthetic, hmm, dyck), blocks of 64 symbols, one thread:

1. a training batch of 32 fresh blocks from the stream (``train_blocks: stream``: drawn every step);
2. the exact log p of 1,000 blocks (the Source (test blocks) row, the gaps, true_nll);
3. scoring 1,000 samples by the source (true_nll, valid, ngram_tv for n = 1..3; bench.metrics.truth);
4. the Source (true) entropy (hmm: its estimate from 4,096 fresh blocks).

    python benchmarks/synthetic_truth.py
"""
from __future__ import annotations

import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def best_of(fn, k=3) -> float:
    ts = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    from bench.data.dyck import DyckParams, DyckSource
    from bench.data.hmm import HMMParams, HMMSource
    from bench.data.synthetic import MarkovParams, MarkovSource
    from bench.metrics.truth import Truth, TruthSettings

    L = 64
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible; blocks of {L}")
    print("| source | stream batch (32 blocks) | exact log p (1,000 blocks) | score 1,000 samples | Source (true) |")
    print("|---|---|---|---|---|")
    for name, src in [("markov(vocab=16)", MarkovSource(MarkovParams(vocab=16, seed=7))),
                      ("hmm(states=16,vocab=32)", HMMSource(HMMParams(states=16, vocab=32, seed=1))),
                      ("dyck(types=4,max_depth=8)", DyckSource(DyckParams(types=4, max_depth=8, seed=1)))]:
        x = src.sample(1000, L, "test")
        truth = Truth(src, name, L, TruthSettings())
        samples = [{"ids": r.tolist()} for r in x]
        print(f"| {name} | {best_of(lambda: src.stream(32, L, 0, 5)) * 1e3:.1f} ms "
              f"| {best_of(lambda: src.log_prob(x)) * 1e3:.0f} ms | {best_of(lambda: truth.score(samples), 2):.2f} s "
              f"| {best_of(lambda: src.entropy(L), 1):.2f} s |")


if __name__ == "__main__":
    main()
