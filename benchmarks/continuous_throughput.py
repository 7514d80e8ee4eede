"""Training-step throughput of the continuous methods relative to MDLM at the smoke size.

The smoke suite's configuration (2 layers × 128 hidden × 4 heads, seq_len 128, batch 16,
BPE vocabulary 2048), one thread, AdamW steps on fresh uniformly random tokens every step: the
objective's arithmetic does not depend on the data, but its speed does through denormal floats —
a model that has memorised a fixed batch emits peaked logits whose softmax underflows into
denormals, which x86 handles in slow microcode (up to 2× on log_softmax here), and how fast each
model gets there would decide the ratio. Random tokens keep every model's logits flat. Methods are
interleaved round by round so machine load hits all alike; the figure is the median over rounds of
(tokens/s of the method) / (tokens/s of MDLM) in the same round. Run it alone (on a shared
machine: ``flock /work/cpu.lock python benchmarks/...``).

    python benchmarks/continuous_throughput.py [--rounds 5] [--steps 8]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.config import BackboneConfig
from bench.registry import get_method

ROWS = [("mdlm", {}), ("diffusion-lm", {}), ("diffusion-lm", {"self_condition": True}),
        ("plaid", {}), ("plaid", {"self_condition_rate": 0.5}), ("plaid", {"self_condition": False}),
        ("ssd-lm", {}), ("ssd-lm", {"self_condition": True})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = BackboneConfig(layers=2, hidden=128, heads=4)
    V, L, B = 2048, 128, 16
    c = torch.ones(B, L, dtype=torch.bool)
    models = []
    for name, kw in ROWS:
        cls = get_method(name)
        torch.manual_seed(0)
        m = cls(cls.Params(**kw), cfg, V, L)
        label = cls.default_label(cls.Params(**kw)) + (" (SC rate ½)" if "self_condition_rate" in kw else "")
        models.append((label, m, torch.optim.AdamW(m.parameters(), 1e-3, fused=True)))

    def run(m, opt, n):
        t0 = time.perf_counter()
        for _ in range(n):
            m.loss(torch.randint(0, V, (B, L)), c, torch.rand(B)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return B * L * n / (time.perf_counter() - t0)

    for _, m, opt in models:
        run(m, opt, 2)                                      # warm-up
    tok = {label: [] for label, _, _ in models}
    for _ in range(a.rounds):
        for label, m, opt in models:
            tok[label].append(run(m, opt, a.steps))
    ref = tok[models[0][0]]
    print(f"| method | tokens/s (median) | × MDLM (median over {a.rounds} rounds) [min, max] |")
    print("|---|---|---|")
    for label, _, _ in models:
        r = [t / b for t, b in zip(tok[label], ref)]
        print(f"| {label} | {statistics.median(tok[label]):,.0f} | {statistics.median(r):.2f} "
              f"[{min(r):.2f}, {max(r):.2f}] |")


if __name__ == "__main__":
    main()
