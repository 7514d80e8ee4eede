"""The protocol's estimator: t draws and the perplexity / CI arithmetic."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.evaluate import draw_u, summarize


def test_stratified_draws_cover_each_stratum_once():
    u = draw_u(50, 8, "stratified", torch.Generator().manual_seed(0)).view(50, 2, 4)  # R=2 × S=4
    k = (u * 4).floor().long()
    assert (k == torch.arange(4)[None, None]).all()
    a = draw_u(50, 8, "antithetic", torch.Generator().manual_seed(0)).view(50, 4, 2)
    assert torch.allclose(a[..., 0] + a[..., 1], torch.ones(50, 4), atol=1e-6)


def test_exact_has_no_interval_and_ppl_is_token_weighted():
    nll = np.array([[10.0], [30.0]])
    ntok = np.array([10.0, 10.0])
    s = summarize(nll, ntok, 0.95, exact=True)
    assert s["value"] == math.exp(2.0) == s["ci_low"] == s["ci_high"]
    assert s["n_tokens"] == 20


def test_stratified_interval_covers_the_integral_at_the_nominal_rate():
    """A known integral: per block i, E[f_i(t)] = ∫_0^1 (a_i e^t + noise) dt = a_i (e − 1),
    estimated with the protocol's replicated stratified draws. Over 300 repetitions the 95%
    interval must cover the truth at least 90% of the time (binomial sd ≈ 1.3% at 300
    trials, so 90% is > 3 sd below nominal)."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    a = np.linspace(0.5, 2.0, 30)
    truth = (math.e - 1) * a.sum() / 30   # 30 blocks of 1 token each
    hits = 0
    for _ in range(300):
        u = draw_u(30, 8, "stratified", g).double().numpy()
        f = a[:, None] * np.exp(u) + rng.normal(0, 0.5, size=u.shape)
        s = summarize(f, np.ones(30), 0.95, exact=False, scheme="stratified")
        hits += s["ci_low"] <= math.exp(truth) <= s["ci_high"]
    assert hits >= 270, hits


def test_perplexity_is_token_weighted_not_a_mean_over_blocks():
    """Blocks of different lengths: ppl = exp(Σ nll / Σ tokens) = exp(70/40), not the mean of the
    per-block rates exp((1 + 2)/2) nor the mean of per-block perplexities."""
    nll = np.array([[10.0, 10.0], [60.0, 60.0]])
    ntok = np.array([10.0, 30.0])
    for exact in (True, False):
        s = summarize(nll[:, :1] if exact else nll, ntok, 0.95, exact=exact, scheme="iid")
        assert s["value"] == pytest.approx(math.exp(70 / 40), rel=1e-12)
        assert s["value"] != pytest.approx(math.exp(1.5)) and s["value"] != pytest.approx((math.e + math.e ** 2) / 2)


def coverage(K: int, scheme: str, trials: int = 600, hetero: bool = True, seed: int = 0,
             lengths: bool = False) -> float:
    """Fraction of ``trials`` 95% intervals that cover a known integral (see the test below).
    ``lengths``: blocks of c_i = 1…30 tokens whose per-token integrand is the same (so only the
    ratio estimator's residual n_i − r·c_i, not n_i − mean(n), has the Monte-Carlo spread)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    a = np.linspace(0.5, 2.0, 30) if hetero else np.ones(30)
    c = np.arange(1.0, 31.0) if lengths else np.ones(30)
    truth = (math.e - 1) * (a * c).sum() / c.sum()
    hits = 0
    for _ in range(trials):
        u = draw_u(30, K, scheme, g).double().numpy()
        f = (a * c)[:, None] * np.exp(u) + np.sqrt(c)[:, None] * rng.normal(0, 0.5, size=u.shape)
        s = summarize(f, c, 0.95, exact=False, scheme=scheme)
        hits += s["ci_low"] <= math.exp(truth) <= s["ci_high"]
    return hits / trials


@pytest.mark.parametrize("K,scheme,hetero,lengths", [
    (8, "stratified", True, False), (8, "antithetic", True, False), (8, "iid", True, False),
    (1, "stratified", False, False), (7, "stratified", False, False), (1, "stratified", False, True)],
    ids=["stratified", "antithetic", "iid", "R=1 (K=1)", "R=1 (odd K)", "R=1, unequal lengths"])
def test_interval_coverage_is_nominal_two_sided(K, scheme, hetero, lengths):
    """Per block i, E[f_i(t)] = ∫_0^1 (a_i e^t + noise) dt = a_i (e − 1), estimated with the
    protocol's draws; the 95% interval must cover the truth in [91%, 98.5%] of 600 repetitions
    (binomial sd ≈ 0.9%: the band is 4.4 sd below and 3.9 sd above nominal), so an interval too
    wide (a dropped 1/R, a doubled se) fails as well as one too narrow. The R = 1 branches
    (K = 1; odd K under stratification) use the between-block variance, which also contains the
    blocks' own spread; with equal blocks (a_i = 1) it is the Monte-Carlo variance alone and the
    coverage must be nominal too."""
    from bench.evaluate import layout

    R, _ = layout(K, scheme)
    assert (R == 1) == (K in (1, 7))           # the parametrisation exercises the branch it names
    c = coverage(K, scheme, hetero=hetero, lengths=lengths)
    assert 0.91 <= c <= 0.985, c


def test_antithetic_pairs_and_iid_draws():
    u = draw_u(4000, 8, "iid", torch.Generator().manual_seed(1)).double()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    a = draw_u(100, 6, "antithetic", torch.Generator().manual_seed(1)).double().view(100, 3, 2)
    assert torch.allclose(a.sum(-1), torch.ones(100, 3, dtype=torch.float64), atol=1e-6)
    assert (a[..., 0] != a[..., 1]).all()


def test_t_min_maps_onto_the_truncated_range():
    """apply_t_min maps U(0,1) onto U(t_min, 1): the estimate of ∫ f is then
    (1 − t_min)⁻¹ ∫_{t_min}^1 f — for f(t) = t, (1 + t_min)/2 (what 'truncated' means)."""
    from bench.evaluate import apply_t_min

    u = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(apply_t_min(u, 0.2), torch.tensor([0.2, 0.6, 1.0]))
    uu = draw_u(2000, 8, "stratified", torch.Generator().manual_seed(3)).double()
    t = apply_t_min(uu, 0.2)
    assert t.min() >= 0.2 and t.max() <= 1.0
    assert t.mean().item() == pytest.approx(0.6, abs=2e-3)


def joint_coverage(K: int, n: int, hetero: bool, trials: int = 600, seed: int = 0) -> tuple[float, float, float]:
    """(coverage of the 95% interval, mean se / sd of the estimate, (mean estimate − truth) in
    standard errors of that mean) over the trials, of
    ``draw_u_joint`` + ``summarize_joint`` on a known integral: block i's integrand is
    a_i·e^t + N(0, 0.5²) (∫ = a_i (e − 1)); ``hetero`` makes the a_i differ (0.5…2)."""
    from bench.evaluate import draw_u_joint, summarize_joint

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    a = np.linspace(0.5, 2.0, n) if hetero else np.ones(n)
    truth = (math.e - 1) * a.sum() / n
    hits, est, ses = 0, [], []
    for _ in range(trials):
        u, strata = draw_u_joint(n, K, g)
        f = a[:, None] * np.exp(u.double().numpy()) + rng.normal(0, 0.5, size=(n, K))
        s = summarize_joint(f, np.ones(n), strata.numpy(), 0.95)
        hits += s["ci_low_nll"] <= truth <= s["ci_high_nll"]
        est.append(s["nll_per_token"])
        ses.append(s["se_nll_per_token"])
    sd = np.std(est, ddof=1)
    return hits / trials, float(np.mean(ses) / sd), float((np.mean(est) - truth) / (sd / math.sqrt(trials)))


@pytest.mark.parametrize("K,n", [(2, 30), (1, 31), (3, 5)], ids=["pairs", "odd M (a triple)", "K=3, M=15"])
def test_joint_draws_interval_is_nominal_for_equal_blocks(K, n):
    """The learning probe's draws (one stratified sample over all n·K) and its collapsed-strata
    interval: with equal blocks the groups' means differ only by the integrand's change across
    adjacent strata, so the 95% interval covers the truth in [91%, 98.5%] of 600 repetitions (as
    the protocol's, test_interval_coverage_is_nominal_two_sided): a variance without its
    |G|/(|G|−1) (too narrow) or without its 1/K (too wide) fails."""
    cov, _, _ = joint_coverage(K, n, hetero=False)
    assert 0.91 <= cov <= 0.985, cov


def test_joint_draws_interval_is_conservative_for_unequal_blocks():
    """Unequal blocks (a_i = 0.5…2) in one group add the blocks' difference to the variance
    estimate: the interval is conservative (coverage ≥ 91%, se ≥ the estimate's sd), never
    too narrow; and each block's estimate stays unbiased in u — the mean of the total over the
    trials is within 4 standard errors of the truth (the draws' strata are dealt at random)."""
    cov, ratio, bias = joint_coverage(2, 30, hetero=True)
    assert cov >= 0.91 and ratio >= 1.0 and abs(bias) < 4, (cov, ratio, bias)


def test_joint_draws_cover_every_stratum_once_and_are_uniform_per_slot():
    """draw_u_joint: the n·K draws hold one draw in each of the n·K strata; over many calls each
    (block, draw) slot is U(0, 1) (mean 1/2, variance 1/12) — so every block's estimate is
    unbiased, as under the protocol's own draws."""
    from bench.evaluate import draw_u_joint

    g = torch.Generator().manual_seed(3)
    u, strata = draw_u_joint(7, 3, g)
    assert sorted(strata.reshape(-1).tolist()) == list(range(21))
    assert ((u.double() * 21).floor().long() == strata).all()
    us = torch.stack([draw_u_joint(7, 3, g)[0] for _ in range(4000)]).double()   # (4000, 7, 3)
    assert (us.mean(0) - 0.5).abs().max() < 0.02        # sd of a mean of 4000: 0.0046; 4.3 sd
    assert (us.var(0) - 1 / 12).abs().max() < 0.01      # sd of the variance: ≈ 0.0011; 9 sd


def test_a_bound_beyond_floats_range_is_an_infinite_perplexity():
    """An untrained Diffusion-LM bounds ~800 nats per token (½(SNR(0) − SNR(1))·‖e‖² with x̂0 = 0);
    e^800 is no float64: the perplexity (and the interval's upper end) is inf, the per-token NLL
    and its s.e. stay the finite numbers, and nothing raises (math.exp did: the run failed)."""
    nll = np.array([[800.0, 820.0], [790.0, 810.0]]) * 4
    s = summarize(nll, np.array([4.0, 4.0]), 0.95, exact=False, scheme="stratified")
    assert s["value"] == math.inf and s["ci_high"] == math.inf and s["nll_per_token"] == pytest.approx(805.0)
    assert math.isfinite(s["se_nll_per_token"])
