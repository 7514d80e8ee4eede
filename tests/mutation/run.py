"""Mutation check: does some test catch each deliberate bug? (Not part of the pytest run.)

Each mutant is a one-place text patch of a source file (flip a sign, drop a weight, drop an
endpoint term, re-introduce a fixed bug). For each, the repository's tracked files are copied
to a scratch directory, the patch is applied there (the working tree is never touched), and
the tests that guard that code run (``pytest -x``). A mutant is *caught* when they fail. The
patch text must occur exactly once, so a refactor cannot silently turn a mutant into a no-op.

    python tests/mutation/run.py              # every mutant; prints caught/total, exit 1 if any survives
    python tests/mutation/run.py -k mdlm      # only mutants whose id contains "mdlm"
    python tests/mutation/run.py --list

It takes several CPU-minutes: on a shared machine wrap it in the CPU lock.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ORACLE = "tests/test_oracle.py"
EVAL = "tests/test_evaluate.py"
ROWS = "tests/test_protocol_rows.py"
DISC = "tests/test_discrete.py"
ENDS = "tests/test_endpoints.py"
PROBE = "tests/test_learning_probe.py"
SHOWN = "tests/test_training_loss.py"

# (id, file, old text, new text, tests to run [, pytest -k expression])
MUTANTS = [
    # ---------------------------------------------------------------- methods/mdlm.py
    ("mdlm-drop-count-weight", "methods/mdlm.py", "    return n / m\n", "    return torch.ones_like(m)\n", [ORACLE]),
    ("mdlm-count-weight-n-over-m-plus-1", "methods/mdlm.py", "    return n / m\n", "    return n / (m + 1)\n", [ORACLE]),
    ("mdlm-feed-m-over-n (the old default)", "methods/mdlm.py",
     "    return _weighted_ce(x0, x_t, masked, n, m, t, denoise)\n",
     "    return _weighted_ce(x0, x_t, masked, n, m, (m / n.clamp(min=1)).to(u.dtype), denoise)\n", [ORACLE]),
    ("mdlm-beta-parameters-swapped", "methods/mdlm.py",
     "torch.distributions.Beta(a, b)", "torch.distributions.Beta(b, a)", [ORACLE]),
    ("mdlm-drop-time-weight", "methods/mdlm.py", "    return 1 / t\n", "    return torch.ones_like(t)\n", [ORACLE]),
    ("mdlm-mask-prob-flipped", "methods/mdlm.py", "< (1 - alpha(t))[:, None]", "< alpha(t)[:, None]", [ORACLE]),
    ("mdlm-mask-context-first", "methods/mdlm.py", ".masked_fill(~counted, 2.0)", ".masked_fill(~counted, -1.0)", [ORACLE]),
    # (an earlier mutant, dropping "& counted" from the m-subset mask, is equivalent: uncounted
    # tokens already rank last, so it cannot be caught and is not listed)
    # ---------------------------------------------------------------- methods/d3pm.py
    ("d3pm-hybrid-T-times-KL (the old weighting)", "methods/d3pm.py",
     "return (kl_t.sum() + self.p.hybrid_lambda * ce.sum()) / n", "return (self.p.T * kl_t.sum() + self.p.hybrid_lambda * ce.sum()) / n",
     [DISC], "wire"),
    ("d3pm-drop-lambda", "methods/d3pm.py",
     "return (kl_t.sum() + self.p.hybrid_lambda * ce.sum()) / n", "return kl_t.sum() / n", [DISC], "wire"),
    ("d3pm-bound-drop-T", "methods/d3pm.py", "bound = T * kl_t + prior", "bound = kl_t + prior", [DISC], "wire or oracle"),
    ("d3pm-absorb-kl-weight", "methods/d3pm.py", "w = ((abar_s - abar_t) / (1 - abar_t)).to(dt)",
     "w = (abar_s - abar_t).to(dt)", [DISC], "closed_forms or oracle"),
    ("d3pm-uniform-kl-sign", "methods/d3pm.py", "    kl = q_log_B - safe_log(c(D)) - q_log_M\n",
     "    kl = q_log_B - safe_log(c(D)) + q_log_M\n", [DISC], "closed_forms or oracle"),
    ("d3pm-drop-likelihood-bonus", "methods/d3pm.py", "        if not self.graph.absorbing:\n            a = self.abar(t)",
     "        if False:\n            a = self.abar(t)", [DISC], "likelihood"),
    # ---------------------------------------------------------------- methods/_discrete.py (shared)
    ("shared-absorb-prior-dropped", "methods/_discrete.py", "        return a_end.double() * math.log(V)\n",
     "        return torch.zeros_like(a_end.double())\n", [DISC, ENDS], "prior or endpoint or oracle"),
    ("shared-absorb-recon-dropped", "methods/_discrete.py", "        return (1 - a0.double()) * math.log(V)\n",
     "        return torch.zeros_like(a0.double())\n", [ENDS, DISC], "endpoint or bound"),
    ("shared-uniform-recon-sign", "methods/_discrete.py", "        return -torch.xlogy(a + b, a + b) - (V - 1) * torch.xlogy(b, b)\n",
     "        return -torch.xlogy(a + b, a + b) + (V - 1) * torch.xlogy(b, b)\n", [ENDS, DISC], "endpoint or bound"),
    ("shared-uniform-prior-kl-sign", "methods/_discrete.py", "            (V - 1) * (1 - a) / V * torch.log1p(",
     "            -(V - 1) * (1 - a) / V * torch.log1p(", [ENDS, DISC], "endpoint or prior"),
    ("shared-corrupt-uncounted-too", "methods/_discrete.py", "               >= keep.to(x0.device)[:, None]) & counted\n",
     "               >= keep.to(x0.device)[:, None])\n", [DISC], "counted"),
    ("shared-logit-stats-backward-sign", "methods/_discrete.py", "                gc.add_(ex.mul_(scale[:, None]))",
     "                gc.sub_(ex.mul_(scale[:, None]))", [DISC], "logit_stats"),
    # ---------------------------------------------------------------- methods/sedd.py
    ("sedd-dse-absorb-sign", "methods/sedd.py", "    ell = w * (torch.exp(tot) - l0 - 1)\n",
     "    ell = w * (torch.exp(tot) + l0 - 1)\n", [DISC], "sedd or tight or score"),
    ("sedd-drop-endpoint-terms", "methods/sedd.py",
     "        return (ell * counted).sum(1) + self.endpoint_terms(x0.device).to(ell.dtype) * counted.sum(1)\n",
     "        return (ell * counted).sum(1)\n", [ENDS, DISC], "endpoint or oracle"),
    ("sedd-absorb-score-scale-dropped", "methods/sedd.py",
     "        return f + (-torch.log(torch.expm1(sigma)) - math.log(self.V)).float()[:, None, None]\n",
     "        return f\n", [DISC], "scaled"),
    ("sedd-uniform-ratio-rho", "methods/sedd.py", "torch.log1p(V / em1)", "torch.log1p(V * em1)", [DISC], "sedd or score or csm"),
    # ---------------------------------------------------------------- bench/evaluate.py
    ("eval-per-sequence-mean", "bench/evaluate.py", "    r = n_i.sum() / C\n", "    r = (n_i / ntok).mean()\n", [EVAL]),
    ("eval-ci-too-wide (drop 1/R)", "bench/evaluate.py", "reps.var(1, ddof=1) / R).sum()", "reps.var(1, ddof=1)).sum()", [EVAL]),
    ("eval-ci-too-narrow", "bench/evaluate.py", "    z = NormalDist().inv_cdf(0.5 + confidence / 2)\n",
     "    z = 0.5 * NormalDist().inv_cdf(0.5 + confidence / 2)\n", [EVAL]),
    ("eval-R1-branch-ignores-lengths", "bench/evaluate.py", "        resid = n_i - r * ntok\n",
     "        resid = n_i - n_i.mean()\n", [EVAL]),
    ("eval-R1-branch-too-narrow", "bench/evaluate.py", "        se = math.sqrt(N / max(N - 1, 1) * (resid ** 2).sum()) / C\n",
     "        se = 0.5 * math.sqrt(N / max(N - 1, 1) * (resid ** 2).sum()) / C\n", [EVAL]),
    ("eval-no-antithetic-pairs", "bench/evaluate.py", "        U[:, :, 1] = 1 - U[:, :, 0]\n", "        pass\n", [EVAL]),
    ("eval-no-strata", "bench/evaluate.py", "        U = (torch.arange(S, dtype=torch.float64) + U) / S\n", "        pass\n", [EVAL]),
    ("eval-t-min-unscaled", "bench/evaluate.py", "    return t_min + (1 - t_min) * u\n", "    return t_min + u\n", [ROWS, EVAL]),
    # ---------------------------------------------------------------- bench/runner.py, bench/leaderboard.py
    ("runner-truncated-as-bound", "bench/runner.py", '        return "truncated"\n', '        return "bound"\n', [ROWS]),
    ("runner-gap-unpaired", "bench/runner.py", "    d = nll.mean(1) - source_nll\n",
     "    d = nll.mean(1) - source_nll.mean()\n", [ROWS]),
    ("runner-bpc-natural-log", "bench/runner.py", "    lg = lambda v: None if v is None else math.log2(v)",
     "    lg = lambda v: None if v is None else math.log(v)", [ROWS]),
    # the learning-curve probe (issue 26): its draws, its interval, its blocks
    ("probe-iid-draws (the old probe)", "bench/runner.py",
     "    u, strata = draw_u_joint(len(tokens), 1 if exact else e.curve_t_samples, torch.Generator().manual_seed(e.seed))\n",
     "    u, strata = draw_u_joint(len(tokens), 1 if exact else e.curve_t_samples, torch.Generator().manual_seed(e.seed))\n"
     "    from bench.evaluate import draw_u\n"
     "    u = draw_u(len(tokens), u.shape[1], 'stratified', torch.Generator().manual_seed(e.seed))\n", [PROBE]),
    ("probe-counting-default (the old probe)", "bench/runner.py",
     "load_blocks(ref, \"test\", spec.data, e.packing, e.counting).head(e.curve_blocks)",
     "load_blocks(ref, \"test\", spec.data, e.packing).head(e.curve_blocks)", [PROBE]),
    ("eval-joint-not-stratified", "bench/evaluate.py",
     "    U = (strata.double() + torch.rand(M, generator=generator, dtype=torch.float64)) / M\n",
     "    U = torch.rand(M, generator=generator, dtype=torch.float64)\n", [EVAL]),
    ("eval-joint-ci-too-narrow (drop |G|/(|G|-1))", "bench/evaluate.py",
     "        var = sum(len(g) / (len(g) - 1) * ((g - g.mean()) ** 2).sum() for g in groups) / K ** 2\n",
     "        var = sum(((g - g.mean()) ** 2).sum() for g in groups) / K ** 2\n", [EVAL]),
    ("eval-joint-ci-too-wide (1/K for 1/K²)", "bench/evaluate.py",
     "        var = sum(len(g) / (len(g) - 1) * ((g - g.mean()) ** 2).sum() for g in groups) / K ** 2\n",
     "        var = sum(len(g) / (len(g) - 1) * ((g - g.mean()) ** 2).sum() for g in groups) / K\n", [EVAL]),
    ("eval-joint-strata-unsorted", "bench/evaluate.py",
     '    y = nll.reshape(-1)[np.argsort(np.asarray(strata).reshape(-1), kind="stable")]\n',
     "    y = nll.reshape(-1)\n", [EVAL]),
    # ---------------------------------------------------------------- bench/train.py: the loss shown
    ("train-shown-loss-last-batch (the old display)", "bench/train.py",
     "                       loss=recent_loss(state[\"losses\"]), tokens_per_s=rate,",
     "                       loss=state[\"losses\"][-1] if state[\"losses\"] else None, tokens_per_s=rate,", [SHOWN]),
    ("train-loss-curve-subsampled (the old curve)", "bench/train.py",
     '             "loss_curve": windowed(losses, max(1, len(losses) // 100)),',
     '             "loss_curve": losses[:: max(1, len(losses) // 100)],', [SHOWN]),
    ("leaderboard-truncated-shown-as-bound", "bench/leaderboard.py", '    elif row.get("estimate") == "truncated":\n        s = "≈ " + s + " (t_min)"',
     '    elif row.get("estimate") == "truncated":\n        s = "≤ " + s', [ROWS]),
]


def copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in files:
        if not f or f.startswith(("results/", "tests/mutation/")) or not (REPO / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)


def run_one(m, tmp_root: Path, timeout: int) -> tuple[bool, str, float]:
    mid, path, old, new, tests, *k = m
    d = Path(tempfile.mkdtemp(prefix="mutant-", dir=tmp_root))
    try:
        copy_repo(d)
        src = (d / path).read_text()
        n = src.count(old)
        if n != 1:
            return False, f"patch text found {n} times in {path} (update the mutant)", 0.0
        (d / path).write_text(src.replace(old, new))
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
        if k:
            cmd += ["-k", k[0]]
        env = {**os.environ, "PYTHONPATH": str(d), "OMP_NUM_THREADS": "1"}
        t0 = time.time()
        try:
            p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return True, "timeout (counted as caught)", time.time() - t0
        dt = time.time() - t0
        tail = (p.stdout.strip().splitlines() or [""])[-1]
        if p.returncode == 5:
            return False, "no tests selected", dt
        return p.returncode != 0, tail, dt
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", help="only mutants whose id contains this")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    a = ap.parse_args(argv)
    ms = [m for m in MUTANTS if not a.k or a.k in m[0]]
    if a.list:
        for m in ms:
            print(f"{m[0]:45s} {m[1]}")
        return 0
    caught = 0
    with tempfile.TemporaryDirectory(prefix="tdbench-mutants-") as tmp:
        for m in ms:
            ok, why, dt = run_one(m, Path(tmp), a.timeout)
            caught += ok
            print(f"{'caught  ' if ok else 'SURVIVED'} {m[0]:45s} {dt:6.1f}s  {why}", flush=True)
    print(f"\n{caught}/{len(ms)} mutants caught")
    return 0 if caught == len(ms) else 1


if __name__ == "__main__":
    sys.exit(main())
