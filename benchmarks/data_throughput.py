"""Data-path throughput on the embedded corpora: cache building, loading, and the training
step's consumption at the small size — the loader must never be the bottleneck.

    python benchmarks/data_throughput.py [--workers 1 2] [--steps 3]

1. Cache building (bench.data.blockcache): all splits of austen, kjv and shakespeare with the
   GPT-2 tokenizer into 1024-token blocks (SEDD packing), fresh cache, for each worker count;
   tokens/s of the whole build (detokenize + tokenize in `datasets.map` workers + streamed
   packing into the memory-mapped files) and of the tokenisation stage alone.
2. Loader: what the training loop does per step — the global batch's indices
   (bench.data.batch_indices), a fancy-indexed read of `tokens`/`counted` from the memory-map,
   `torch.as_tensor` — for a 512 × 1024 global batch, as tokens/s (page cache warm).
3. Training step: a few AdamW steps of the AR baseline at the small size (12 × 768, 12 heads,
   GPT-2 vocabulary), here on this machine's CPU, as tokens/s; and the rate a GPU would consume
   at the dry run's assumed MFU and peak (bench.plan), 6·N FLOPs per token.

Prints a table; nothing is asserted (timing belongs in benchmarks, not tests).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_rate(workers: int) -> tuple[int, float, float]:
    from bench.config import DataConfig, DatasetRef
    from bench.data import corpora, load_blocks

    with tempfile.TemporaryDirectory() as d:
        os.environ["TDBENCH_CACHE"] = d
        n_tok, t_all, t_tok = 0, 0.0, 0.0
        for name in corpora.CORPORA:
            data = DataConfig(train=name, eval=[name], seq_len=1024)
            for split in corpora.SPLITS:
                t0 = time.perf_counter()
                load_blocks(DatasetRef(name=name), split, data, "eos_per_doc", num_proc=workers)
                t_all += time.perf_counter() - t0
                meta = __import__("json").loads(
                    next((Path(d) / "blocks").glob(f"{name}-{split}-*/meta.json")).read_text())
                n_tok += meta["n_tokens"]
                t_tok += meta["tokenize_s"]
        return n_tok, t_all, t_tok


def loader_rate(batch: int = 512, steps: int = 50) -> float:
    import numpy as np
    import torch

    from bench.config import DataConfig, DatasetRef
    from bench.data import batch_indices, load_blocks

    d = tempfile.mkdtemp()
    os.environ["TDBENCH_CACHE"] = d
    data = DataConfig(train="austen", eval=["austen"], seq_len=1024)
    b = load_blocks(DatasetRef(name="austen"), "train", data, "eos_per_doc")
    n = 0
    t0 = time.perf_counter()
    for step in range(steps):
        idx = np.sort(batch_indices(step, batch, len(b), 0))
        x = torch.as_tensor(b.tokens[idx], dtype=torch.long)
        c = torch.as_tensor(b.counted[idx], dtype=torch.bool)
        n += x.numel()
        del x, c
    return n / (time.perf_counter() - t0)


def step_rate(steps: int, batch: int, seq_len: int) -> tuple[float, int]:
    import torch

    from bench.config import NAMED_SIZES, BackboneConfig
    from bench.registry import get_method

    torch.manual_seed(0)
    cls = get_method("ar")
    m = cls(cls.Params(), BackboneConfig(**NAMED_SIZES["small"]), 50257, seq_len)
    N = sum(p.numel() for p in m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4)
    x = torch.randint(0, 50257, (batch, seq_len))
    c = torch.ones_like(x, dtype=torch.bool)
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations), not timed
        t0 = time.perf_counter()
        loss = m.loss(x, c, torch.rand(batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return batch * seq_len / (sum(times[1:]) / steps), N


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--step-batch", type=int, default=2)
    ap.add_argument("--step-seq-len", type=int, default=1024)
    a = ap.parse_args()
    from bench.plan import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS

    print(f"machine: {os.cpu_count()} CPUs; torch threads {__import__('torch').get_num_threads()}")
    for w in a.workers:
        n, t, tt = build_rate(w)
        print(f"cache build, {w} worker(s): {n:,} tokens in {t:.2f} s = {n / t:,.0f} tokens/s "
              f"(tokenisation stage alone {n / tt:,.0f} tokens/s)")
    lr = loader_rate()
    print(f"loader (512 × 1024 global batch from the memory-map): {lr:,.0f} tokens/s")
    sr, N = step_rate(a.steps, a.step_batch, a.step_seq_len)
    gpu = DEFAULT_MFU * DEFAULT_PEAK_TFLOPS * 1e12 / (6 * N)
    print(f"training step, AR small ({N / 1e6:.1f}M params), batch {a.step_batch} × {a.step_seq_len}, "
          f"this CPU: {sr:,.0f} tokens/s -> loader / step = {lr / sr:,.0f}x")
    print(f"one GPU at the dry run's assumed {DEFAULT_MFU:.0%} MFU of {DEFAULT_PEAK_TFLOPS:g} TFLOP/s: "
          f"{gpu:,.0f} tokens/s -> loader / step = {lr / gpu:,.1f}x (per process; each rank loads its own slice)")


if __name__ == "__main__":
    main()
