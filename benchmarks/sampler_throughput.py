"""Sampling throughput of the absorbing-state samplers at the smoke size (samples/s).

The smoke suite's backbone (2 layers × 128 hidden × 4 heads, seq_len 128, BPE vocabulary 2048),
one thread by default, untrained weights whose zero-initialised matrices (output head, adaLN)
get std 0.02 so the logits are not flat. Each method's sampler (x_0 drawn only where a token is revealed) runs
against the full-Gumbel algorithm it replaced (a Gumbel draw over every position and the whole
vocabulary each step; the reference copies in tests/test_fast_samplers.py), same network, same
``--n`` samples and ``--steps`` steps. Everything is interleaved round by round so machine load
hits all alike; the figures are medians over rounds (range in brackets), the speed-up the median
of the per-round ratios. NFE per sample is counted by the harness's hook
(bench.samples.count_calls) and must be equal.

    python benchmarks/sampler_throughput.py [--n 4] [--steps 64] [--rounds 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository: tests/ is no package

from bench.config import BackboneConfig  # noqa: E402
from bench.registry import get_method  # noqa: E402
from bench.samples import count_calls  # noqa: E402
from tests.test_fast_samplers import old_d3pm, old_mdlm, old_sedd  # noqa: E402

ROWS = [("mdlm", {}, old_mdlm), ("d3pm", {"transition": "absorb"}, old_d3pm),
        ("sedd", {"graph": "absorb"}, old_sedd), ("csm", {"graph": "absorb"}, old_sedd)]


def build(name: str, kw: dict, V: int, L: int):
    cls = get_method(name)
    torch.manual_seed(0)
    m = cls(cls.Params(**kw), BackboneConfig(layers=2, hidden=128, heads=4), V, L)
    for p in m.parameters():            # zero-initialised (flat logits): give them structure
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.02)
    return cls.default_label(cls.Params(**kw)), m.eval()


def timed(m, fn, n):
    """(samples/s, network sequence evaluations per sample) of one call of ``fn(generator)``."""
    calls, h = count_calls(m.net)
    t0 = time.perf_counter()
    fn(torch.Generator().manual_seed(0))
    dt = time.perf_counter() - t0
    h.remove()
    return n / dt, calls[0] / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4, help="samples per call (the sampling batch)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    V, L = 2048, 128
    rows = [(*build(name, kw, V, L), old) for name, kw, old in ROWS]
    res = {label: {"new": [], "old": [], "ratio": []} for label, _, _ in rows}
    for r in range(a.rounds + 1):                       # round 0 is a warm-up, not counted
        for label, m, old in rows:
            new_rate, new_nfe = timed(m, lambda g: m.sample(a.n, a.steps, generator=g), a.n)
            old_rate, old_nfe = timed(m, lambda g: old(m, a.n, a.steps, g), a.n)
            assert new_nfe == old_nfe == a.steps, (label, new_nfe, old_nfe)
            if r:
                for k, v in (("new", new_rate), ("old", old_rate), ("ratio", new_rate / old_rate)):
                    res[label][k].append(v)
    print(f"V={V} L={L} 2x128  n={a.n} steps={a.steps} threads={a.threads} rounds={a.rounds} (NFE/sample = steps)")
    print("| method | full Gumbel (samples/s) | reveal-only (samples/s) | speed-up |")
    print("|---|---|---|---|")
    rng = lambda v: f"{statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]"  # noqa: E731
    for label, _, _ in rows:
        d = res[label]
        print(f"| {label} | {rng(d['old'])} | {rng(d['new'])} | {rng(d['ratio'])}× |")


if __name__ == "__main__":
    main()
