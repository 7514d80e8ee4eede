"""Benchmark figures for docs/performance.md (a script, not a test: timings are printed, never asserted).

1. Memorization of 1,000 samples × 128 tokens against the whole embedded training corpus
   (Austen's train split, hashed 4-gram index), after the index is built; one CPU thread.
2. AR sampling with vs without the KV cache at L = 512 (tiny backbone 2·128·4, |V| = 2048,
   8 samples, one thread): wall time and ratio; the tokens are checked identical.

    python benchmarks/sample_metrics.py
"""
from __future__ import annotations

import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def best_of(fn, k=3):
    ts = []
    for _ in range(k):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def memorization_benchmark():
    from bench.config import DataConfig
    from bench.data import corpora, get_tokenizer, load_blocks
    from bench.metrics.ngrams import build_index, memorization, tokenize

    t0 = time.perf_counter()
    index = build_index(corpora.documents("austen", "train"), 4)
    build = time.perf_counter() - t0
    data = DataConfig(train={"name": "austen"}, eval=[{"name": "austen"}], tokenizer="gpt2", seq_len=128)
    blocks = load_blocks(data.train, "train", data, "eos_per_doc")
    tok = get_tokenizer(data)
    texts = [tok.decode(blocks.tokens[i]) for i in range(1000)]          # 1,000 × 128 GPT-2 tokens
    ws = [tokenize(t) for t in texts]
    n4 = sum(max(0, len(w) - 3) for w in ws)
    dt, mem = best_of(lambda: memorization(ws, index, 4))
    print(f"memorization: index of {len(index):,} distinct train 4-grams built in {build:.2f} s; "
          f"1,000 samples x 128 tokens ({n4:,} word 4-grams): {dt:.3f} s (best of 3), mem = {mem:.3f}")


def kv_cache_benchmark(L=512, n=8):
    from bench.config import BackboneConfig
    from bench.registry import get_method

    cls = get_method("ar")
    torch.manual_seed(0)
    m = cls(cls.Params(), BackboneConfig(layers=2, hidden=128, heads=4), 2048, L).eval()
    for p in m.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    run = lambda cache: m.sample(n, generator=torch.Generator().manual_seed(1), cache=cache)  # noqa: E731
    t_c, a = best_of(lambda: run(True), 2)
    t_u, b = best_of(lambda: run(False), 1)
    assert torch.equal(a, b)
    print(f"AR sampling at L = {L} ({n} samples, 2x128x4 backbone, |V| = 2048): KV cache {t_c:.2f} s, "
          f"without {t_u:.2f} s: {t_u / t_c:.1f}x faster (identical tokens)")


if __name__ == "__main__":
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"1 torch thread, torch {torch.__version__}")
    memorization_benchmark()
    kv_cache_benchmark()
