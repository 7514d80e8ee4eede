"""The small endpoint constants of the discrete bounds, against values computed here by hand
(plain float math, no code shared with methods/), not only "the CI reaches the truth".

- SEDD/CSM absorb, log-linear σ (ε = 1e-3): σ(0) = 0, so no reconstruction term; α_1 = ε, so
  the prior term KL(p_{1|0} ‖ (1−ε)δ_[MASK] + ε·U) = ε·log|V| per token.
- uniform, geometric σ (1e-4 … 20): the decoder term is the entropy of p_{t0|0}(·|x_0),
  α_0 = e^{−1e-4}; the prior KL to Uniform with α_1 = e^{−20}.
- absorb with geometric σ: decoder (1 − e^{−σ_min})·log|V|, prior e^{−σ_max}·log|V|.
- D3PM: ᾱ_T = 0 for both schedules (prior term 0); the uniform prior KL at other ᾱ.
- ``SEDD.nll`` adds exactly these constants per counted token to the integrand's estimate.
Tolerance: 1e-12 relative (float64 rounding only).
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.config import BackboneConfig
from methods._discrete import GRAPHS
from methods.d3pm import D3PM
from methods.sedd import SEDD, dse_absorb, dse_uniform

BB = BackboneConfig(layers=1, hidden=8, heads=1, cond_dim=8)


def entropy_uniform_kernel(a, V):
    hit, other = a + (1 - a) / V, (1 - a) / V
    return -(hit * math.log(hit) + (V - 1) * other * math.log(other))


def kl_to_uniform(a, V):
    hit, other = a + (1 - a) / V, (1 - a) / V
    return hit * math.log(hit * V) + (V - 1) * other * math.log(other * V)


@pytest.mark.parametrize("V", [5, 50, 50257])
def test_sedd_endpoint_constants(V):
    absorb = SEDD(SEDD.Params(graph="absorb"), BB, V, 4)
    assert absorb.endpoint_terms("cpu").item() == pytest.approx(1e-3 * math.log(V), rel=1e-12)
    uni = SEDD(SEDD.Params(graph="uniform"), BB, V, 4)
    want = entropy_uniform_kernel(math.exp(-1e-4), V) + kl_to_uniform(math.exp(-20.0), V)
    assert uni.endpoint_terms("cpu").item() == pytest.approx(want, rel=1e-9)
    assert want > 1e-4   # the decoder term is not negligible: dropping it changes the bound
    geo = SEDD(SEDD.Params(graph="absorb", noise="geometric"), BB, V, 4)
    want = (1 - math.exp(-1e-4)) * math.log(V) + math.exp(-20.0) * math.log(V)
    assert geo.endpoint_terms("cpu").item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("a", [0.0, 1e-6, 0.3, 0.999])
def test_graph_prior_and_decoder_terms(a):
    V = 7
    t = torch.tensor([a], dtype=torch.float64)
    assert GRAPHS["absorb"].prior_kl(t, V).item() == pytest.approx(a * math.log(V), rel=1e-12, abs=1e-300)
    assert GRAPHS["absorb"].recon(t, V).item() == pytest.approx((1 - a) * math.log(V), rel=1e-12)
    assert GRAPHS["uniform"].prior_kl(t, V).item() == pytest.approx(kl_to_uniform(a, V), rel=1e-9, abs=1e-15)
    if a < 0.999:
        assert GRAPHS["uniform"].recon(t, V).item() == pytest.approx(entropy_uniform_kernel(a, V), rel=1e-12)


@pytest.mark.parametrize("transition", ["absorb", "uniform"])
def test_d3pm_prior_term_is_zero_at_alpha_bar_T(transition):
    m = D3PM(D3PM.Params(transition=transition, T=50), BB, 7, 4)
    aT = m.abar(torch.tensor([50]))
    assert aT.item() == 0.0
    assert m.graph.prior_kl(aT, 7).item() == 0.0


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_sedd_nll_adds_the_endpoint_constants_per_counted_token(graph):
    torch.manual_seed(0)
    V, L = 6, 5
    m = SEDD(SEDD.Params(graph=graph), BB, V, L)
    x0 = torch.randint(0, V, (3, L))
    counted = torch.ones_like(x0, dtype=torch.bool)
    counted[0, :2] = False
    u = torch.tensor([0.2, 0.5, 0.9])
    x_t = m.graph.corrupt(x0, counted, torch.full((3,), 0.5, dtype=torch.float64), V)
    log_s = torch.randn(3, L, V, dtype=torch.float64)
    score = lambda x, t: log_s  # noqa: E731
    got = m.nll(x0, counted, u, score=score, x_t=x_t)
    _, sigma, dsigma = m.time_map(u)
    ell = dse_absorb(log_s, x0, x_t, sigma, dsigma, m.mask_id) if graph == "absorb" else \
        dse_uniform(log_s, x0, x_t, sigma, dsigma)
    const = 1e-3 * math.log(V) if graph == "absorb" else \
        entropy_uniform_kernel(math.exp(-1e-4), V) + kl_to_uniform(math.exp(-20.0), V)
    want = (ell * counted).sum(1) + const * counted.sum(1)
    assert torch.allclose(got.double(), want.double(), rtol=1e-10)
