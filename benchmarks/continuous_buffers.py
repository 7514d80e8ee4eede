"""Peak CPU memory of the continuous family's V-wide steps at the published size (issue 22, point 6).

V = 50,257, L = 1,024, d = 16, ``--n`` sequences: Diffusion-LM's rounding term (forward and
backward) through the fused head against the cross-entropy path it replaced, and the clamping
sampler's nearest-embedding search in 64 MiB blocks against the one-shot (n, L, V) distances.
Peaks from the torch profiler's allocation events (tests/test_continuous_buffers.py's
``peak_bytes``), in MiB, above what was allocated before.

    python benchmarks/continuous_buffers.py [--n 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.backbone import fused_nll  # noqa: E402
from methods._gaussian import nearest_embedding  # noqa: E402
from tests.test_continuous_buffers import peak_bytes  # noqa: E402

V, L, D = 50_257, 1_024, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1)
    n = ap.parse_args().n
    torch.manual_seed(0)
    z0 = torch.randn(n, L, D, requires_grad=True)
    E = torch.randn(V, D, requires_grad=True)
    w = torch.randint(0, V, (n, L))

    def old():
        logits = z0 @ E.t()
        F.cross_entropy(logits.float().flatten(0, 1), w.flatten(), reduction="none").sum().backward()

    mib = lambda b: b / 2 ** 20  # noqa: E731
    buf = n * L * V * 4
    print(f"n = {n}, L = {L}, V = {V}: one (n·L, V) fp32 buffer = {mib(buf):.0f} MiB")
    print(f"rounding, fwd + bwd: cross-entropy path {mib(peak_bytes(old)):.0f} MiB, "
          f"fused head {mib(peak_bytes(lambda: fused_nll(z0, E, w).sum().backward())):.0f} MiB")
    x, Ed = z0.detach(), E.detach()
    one_shot = lambda: ((x * x).sum(-1, keepdim=True) - 2 * x @ Ed.t() + (Ed * Ed).sum(-1)).argmin(-1)  # noqa: E731
    print(f"nearest embedding: one shot {mib(peak_bytes(one_shot)):.0f} MiB, "
          f"64 MiB blocks {mib(peak_bytes(lambda: nearest_embedding(x, Ed))):.0f} MiB")


if __name__ == "__main__":
    main()
