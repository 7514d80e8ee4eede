"""The protocol's estimator: t draws and the perplexity / CI arithmetic."""
from __future__ import annotations

import math

import numpy as np
import torch

from bench.evaluate import draw_u, summarize


def test_stratified_draws_cover_each_stratum_once():
    u = draw_u(50, 8, "stratified", torch.Generator().manual_seed(0))
    k = (u * 8).floor().long()
    assert (k == torch.arange(8)[None]).all()
    a = draw_u(50, 8, "antithetic", torch.Generator().manual_seed(0))
    assert torch.allclose(a[:, :4] + a[:, 4:], torch.ones(50, 4), atol=1e-6)


def test_exact_has_no_interval_and_ppl_is_token_weighted():
    nll = np.array([[10.0], [30.0]])
    ntok = np.array([10.0, 10.0])
    s = summarize(nll, ntok, 0.95, exact=True)
    assert s["value"] == math.exp(2.0) == s["ci_low"] == s["ci_high"]
    assert s["n_tokens"] == 20


def test_interval_covers_the_true_mean_at_about_the_nominal_rate():
    """200 repetitions of an estimator with known mean: the 95% interval covers it in
    at least 90% of them (binomial slack for 200 trials)."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(200):
        nll = 5.0 + rng.normal(0, 2.0, size=(40, 4))  # per-block estimates, true mean 5/token·1
        s = summarize(nll, np.ones(40), 0.95, exact=False)
        hits += s["ci_low"] <= math.exp(5.0) <= s["ci_high"]
    assert hits >= 180
