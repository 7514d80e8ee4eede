"""The Monte-Carlo interval of a continuous bound at K = 8 under each t proposal (issue 22, point 7),
and the discrete-time bounds L_T of the same weights.

On the smoke suite's data and backbone (Austen, 2k BPE, 128-token blocks, 2 × 128; the first 64
austen test blocks, as suites/smoke.yaml scores them): Diffusion-LM and PLAID untrained (as built
with seed 0) and trained (``--steps`` of the smoke's training settings, through ``tdbench run``).
For each model and each ``eval.t_proposal`` (uniform: the estimator before; weight: t ∝ ½γ′e^{−γ};
log-snr: uniform in γ; mixture: half and half) the protocol's estimate at K = 8 (stratified: two
replicates of four strata per block) and its 95% half-width on the NLL per token, over
``--seeds`` evaluation seeds (each seed its own u and ε draws): the mean estimate, the mean
half-width, the sd of the estimate over the seeds (what the half-width should be ~2× of), and the
ratio of the uniform half-width to each one's. Then, for the trained weights and the mixture
proposal, the per-token bound at T = ∞ and each ``--bound-steps`` T (eval.bound_steps).

    python benchmarks/continuous_bound_widths.py [--steps 800] [--seeds 5] [--threads 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import get_tokenizer, load_blocks  # noqa: E402
from bench.evaluate import per_sequence_nll, summarize  # noqa: E402
from bench.registry import build_method  # noqa: E402
from bench.samples import load_final_method  # noqa: E402
from bench.suite import load_suite  # noqa: E402

SUITE = """name: bound-widths
data: {{train: {{name: austen}}, eval: [{{name: austen}}], tokenizer: {{name: bpe, vocab_size: 2048}}, seq_len: 128}}
sizes: {{tiny: {{layers: 2, hidden: 128, heads: 4}}}}
methods: [{{method: diffusion-lm}}, {{method: plaid}}]
baseline: null
train: {{steps: {steps}, batch_size: 16, lr: 1.0e-3, warmup: 50, ckpt_every: {ckpt}}}
eval: {{t_samples: 8, confidence: 0.95, max_blocks: 64}}
launch: {{executor: debug, threads: {threads}}}
"""


def widths(method, spec, blocks, proposal, seeds, T=None):
    """(mean nll/token, mean 95% half-width, sd of the estimate over the seeds)."""
    prot = spec.protocol().model_copy(update={"t_proposal": proposal, "bound_steps": T})
    est, half = [], []
    for seed in seeds:
        nll, ntok = per_sequence_nll(method, blocks.tokens, blocks.counted, prot, 32, seed, "cpu")
        s = summarize(nll, ntok, prot.confidence, exact=False, scheme=prot.t_sampling)
        est.append(s["nll_per_token"])
        half.append(1.959964 * s["se_nll_per_token"])
    return statistics.mean(est), statistics.mean(half), statistics.stdev(est) if len(est) > 1 else math.nan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bound-steps", type=int, nargs="*", default=[4, 16, 64])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out or tempfile.mkdtemp(prefix="bound-widths-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "suite.yaml"
    path.write_text(SUITE.format(steps=a.steps, ckpt=a.steps, threads=a.threads))
    _, specs = load_suite(path)
    tok = get_tokenizer(specs[0].data)
    blocks = load_blocks(specs[0].data.eval[0], "test", specs[0].data, specs[0].eval.packing,
                         specs[0].eval.counting).head(specs[0].eval.max_blocks)
    from bench.cli import main as cli

    assert cli(["run", str(path), "--out", str(out)]) == 0
    seeds = list(range(a.seeds))
    print(f"K = 8, {len(blocks.tokens)} blocks, {a.seeds} evaluation seeds; nats per token, 95% half-widths")
    print("| model | weights | proposal | estimate | half-width | sd over seeds | uniform / this |")
    print("|---|---|---|---|---|---|---|")
    for spec in specs:
        torch.manual_seed(spec.seed)
        untrained = build_method(spec, tok.vocab_size, tok).eval()
        trained, _ = load_final_method(out / "runs" / spec.run_id)
        for what, m in (("untrained", untrained), (f"{a.steps} steps", trained)):
            rows = {p: widths(m, spec, blocks, p, seeds) for p in ("uniform", "weight", "log-snr", "mixture")}
            for p, (e, h, sd) in rows.items():
                r = f"{rows['uniform'][1] / h:.1f}×" if p != "uniform" else ""
                print(f"| {spec.label} | {what} | {p} | {e:.3f} | {h:.3f} | {sd:.3f} | {r} |", flush=True)
        for T in [None, *a.bound_steps]:
            e, h, sd = widths(trained, spec, blocks, "mixture", seeds[:2], T)
            print(f"{spec.label}, {a.steps} steps: T = {T or '∞'}: {e:.3f} ± {h:.3f} nats/token (mixture proposal)",
                  flush=True)


if __name__ == "__main__":
    main()
