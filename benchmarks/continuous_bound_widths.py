"""The Monte-Carlo interval of a continuous bound at K = 8 under each t proposal (issue 22, point 7),
where its variance comes from, and the discrete-time bounds L_T of the same weights.

On the smoke suite's data and backbone (Austen, 2k BPE, 128-token blocks, 2 × 128; the first 64
austen test blocks, as suites/smoke.yaml scores them): Diffusion-LM and PLAID untrained (as built
with seed 0) and trained (``--steps`` of the smoke's training settings, through ``tdbench run``).
For each model and each ``eval.t_proposal`` (uniform: the estimator before; weight: t ∝ ½γ′e^{−γ};
log-snr: uniform in γ; mixture: half and half; adaptive: a density fitted to a pilot pass, and
PLAID's reconstruction draws on one stratum per replicate) the protocol's estimate at K = 8
(stratified: two replicates of four strata per block) and its 95% half-width on the NLL per
token, over ``--seeds`` evaluation seeds (each seed its own u and ε draws, and its own pilot): the
mean estimate, the mean half-width, the sd of the estimate over the seeds (what the half-width
should be ~2× of), and the ratio of the uniform half-width to each one's; for the trained
weights also uniform t at the smallest even K whose network calls cover adaptive's K = 8 and its
pilot (equal cost). Then, for the trained weights and the mixture proposal, the per-token bound
at T = ∞ and each ``--bound-steps`` T (eval.bound_steps).

With ``--decompose J`` (trained PLAID, uniform and adaptive): where the variance of a block's
K = 8 estimate comes from. Per block and stratum, J draws of u in the stratum, each with two ε
draws; the per-stratum variance of one draw splits into the part from u (the variance over u of
E_ε[estimate | u], estimated as the variance of the ε-means less half the ε-part) and the part
from ε (the mean of ½(difference of the two ε draws)²); a stratum that holds both reconstruction
draws (u < q) and diffusion draws splits its u-part further into the coin between the two terms,
p(1 − p)(μ_rec − μ_diff)² (less the noise of the two means), and the rest. The stratified
estimate's variance is Σ_strata (u-part + ε-part)/S² per replicate, over R = 2 replicates; its
predicted half-width is printed beside the shares. The spread of the blocks' own bounds is printed
too: it is not in the interval (bench.evaluate: within-block replicates only).

    python benchmarks/continuous_bound_widths.py [--steps 800] [--seeds 5] [--threads 2] [--decompose 8] [--out DIR]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import get_tokenizer, load_blocks  # noqa: E402
from bench.evaluate import layout, per_sequence_nll, summarize  # noqa: E402
from bench.registry import build_method  # noqa: E402
from bench.samples import load_final_method  # noqa: E402
from bench.suite import load_suite  # noqa: E402
from methods._vlb import PILOT_ROWS  # noqa: E402

PROPOSALS = ("uniform", "weight", "log-snr", "mixture", "adaptive")

SUITE = """name: bound-widths
data: {{train: {{name: austen}}, eval: [{{name: austen}}], tokenizer: {{name: bpe, vocab_size: 2048}}, seq_len: 128}}
sizes: {{tiny: {{layers: 2, hidden: 128, heads: 4}}}}
methods: [{{method: diffusion-lm}}, {{method: plaid}}]
baseline: null
train: {{steps: {steps}, batch_size: 16, lr: 1.0e-3, warmup: 50, ckpt_every: {ckpt}}}
eval: {{t_samples: 8, confidence: 0.95, max_blocks: 64}}
launch: {{executor: debug, threads: {threads}}}
"""


def widths(method, spec, blocks, proposal, seeds, T=None, K=None):
    """(mean nll/token, mean 95% half-width, sd of the estimate over the seeds)."""
    prot = spec.protocol().model_copy(update={"t_proposal": proposal, "bound_steps": T,
                                              "t_samples": K or spec.eval.t_samples})
    est, half = [], []
    for seed in seeds:
        nll, ntok = per_sequence_nll(method, blocks.tokens, blocks.counted, prot, 32, seed, "cpu")
        s = summarize(nll, ntok, prot.confidence, exact=False, scheme=prot.t_sampling)
        est.append(s["nll_per_token"])
        half.append(1.959964 * s["se_nll_per_token"])
    return statistics.mean(est), statistics.mean(half), statistics.stdev(est) if len(est) > 1 else math.nan


@torch.no_grad()
def decompose(method, spec, blocks, proposal, J, seed=7):
    """Print where the variance of a block's K-draw stratified estimate comes from (module docstring)."""
    prot = spec.protocol().model_copy(update={"t_proposal": proposal})
    R, S = layout(prot.t_samples, prot.t_sampling)
    x = torch.as_tensor(np.array(blocks.tokens), dtype=torch.long)
    c = torch.as_tensor(np.array(blocks.counted), dtype=torch.bool)
    N, C, bs = len(x), float(c.sum()), spec.eval.batch_size
    method.eval()
    method.use_protocol(prot)
    torch.manual_seed(seed)
    method.nll(x[:bs], c[:bs], torch.full((min(bs, N),), 0.5))   # adaptive: the pilot, on the first batch
    gen = torch.Generator().manual_seed(seed)
    U, Y = np.zeros((N, S, J)), np.zeros((N, S, J, 2))
    for s in range(S):
        for j in range(J):
            u = ((s + torch.rand(N, generator=gen, dtype=torch.float64)) / S).clamp(1e-6, 1 - 1e-6).float()
            U[:, s, j] = u.numpy()
            for k in range(2):
                torch.manual_seed(seed * 1_000_003 + (s * J + j) * 2 + k)
                Y[:, s, j, k] = method.nll(x, c, u).double().numpy()
    v_eps = ((Y[..., 0] - Y[..., 1]) ** 2 / 2).mean(2)             # (N, S): E_u Var_ε
    Yb = Y.mean(3)
    v_u = Yb.var(2, ddof=1) - v_eps / 2                             # (N, S): Var_u E_ε
    total = ((v_u + v_eps).sum(1) / S ** 2 / R).sum()
    share = lambda v: 100 * v.sum() / S ** 2 / R / total  # noqa: E731
    q = getattr(method, "eval_share", None)
    print(f"\n{spec.label}, t_proposal {proposal}" + (f", reconstruction share q = {q:g}" if q else "")
          + f": predicted 95% half-width {1.959964 * math.sqrt(total) / C:.3f} nats/token "
          f"(K = {prot.t_samples}: {R} × {S} strata; {N} blocks, {J} u × 2 ε per stratum)")
    print("| stratum of u | from u | of which the coin | from ε |\n|---|---|---|---|")
    for s in range(S):
        p = min(max(q * S - s, 0.0), 1.0) if q else 0.0           # share of the stratum below q
        coin = np.zeros(N)
        if 0 < p < 1:
            for i in range(N):
                rec = U[i, s] < q
                a, b = Yb[i, s, rec], Yb[i, s, ~rec]
                if len(a) > 1 and len(b) > 1:
                    noise = a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)
                    coin[i] = p * (1 - p) * max((a.mean() - b.mean()) ** 2 - noise, 0.0)
        print(f"| [{s / S:.2f}, {(s + 1) / S:.2f}) | {share(v_u[:, s]):.1f}% | "
              f"{f'{share(coin):.1f}%' if 0 < p < 1 else '—'} | {share(v_eps[:, s]):.1f}% |")
    ntok = c.sum(1).numpy()
    noise = ((v_u / J + v_eps / (2 * J)).sum(1) / S ** 2) / ntok ** 2     # Monte-Carlo variance of each block's mean
    spread = np.var(Yb.mean((1, 2)) / ntok, ddof=1) - noise.mean()
    spread = f"sd {math.sqrt(spread):.3f} nats/token" if spread > 0 else "within the Monte-Carlo noise"
    print(f"the blocks' own bounds: {spread} over the blocks, less the Monte-Carlo noise "
          f"of their {S * J * 2}-draw means (not in the interval, which is within-block: R = {R}); one block's "
          f"Monte-Carlo sd at K = {prot.t_samples}: {np.mean(np.sqrt((v_u + v_eps).sum(1) / S ** 2 / R) / ntok):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bound-steps", type=int, nargs="*", default=[4, 16, 64])
    ap.add_argument("--decompose", type=int, default=0, metavar="J", help="u draws per stratum (0: skip)")
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
    trained = {}
    for spec in specs:
        torch.manual_seed(spec.seed)
        untrained = build_method(spec, tok.vocab_size, tok).eval()
        trained[spec.method], _ = load_final_method(out / "runs" / spec.run_id)
        for what, m in (("untrained", untrained), (f"{a.steps} steps", trained[spec.method])):
            rows = {p: widths(m, spec, blocks, p, seeds) for p in PROPOSALS}
            if m is trained[spec.method]:      # uniform at ≥ adaptive's network calls: K + pilot rows per block
                K_eq = 2 * math.ceil((spec.eval.t_samples + PILOT_ROWS / len(blocks.tokens)) / 2)
                rows[f"uniform, K = {K_eq}"] = widths(m, spec, blocks, "uniform", seeds, K=K_eq)
            for p, (e, h, sd) in rows.items():
                r = f"{rows['uniform'][1] / h:.1f}×" if p != "uniform" else ""
                print(f"| {spec.label} | {what} | {p} | {e:.3f} | {h:.3f} | {sd:.3f} | {r} |", flush=True)
        for T in [None, *a.bound_steps]:
            e, h, sd = widths(trained[spec.method], spec, blocks, "mixture", seeds[:2], T)
            print(f"{spec.label}, {a.steps} steps: T = {T or '∞'}: {e:.3f} ± {h:.3f} nats/token (mixture proposal)",
                  flush=True)
    if a.decompose:
        spec = next(s for s in specs if s.method == "plaid")
        for proposal in ("uniform", "adaptive"):
            decompose(trained["plaid"], spec, blocks, proposal, a.decompose)

if __name__ == "__main__":
    main()
