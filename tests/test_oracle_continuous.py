"""The continuous family's bounds against exact answers (methods/continuous.py, run through the
real ``DiffusionLM.nll`` and ``PLAID.nll`` with the Bayes-optimal denoiser injected).

The world: V = 4, L = 2, all 16 sequences with a random distribution p; fixed embeddings
E_v = c·b_v + M·u (b_v orthonormal, u a fifth direction shared by every token), e = E[w] ∈ R^{2×5};
for PLAID, whose rows have unit length, E_v = (c·b_v + M·u)/√(c² + M²).
The oracle is the posterior mean of the finite embedding mixture, the Bayes-optimal
x0-prediction for these embeddings:

    x̂(z_t) = E[e | z_t] = Σ_w' q(w' | z_t) E[w'],   q(w' | z_t) ∝ p(w') N(z_t; α_t E[w'], σ_t² I).

Diffusion-LM's ``predict_x0`` is replaced by it; PLAID's backbone by ``PLAIDOracle``, which from
the backbone's own inputs (the rescaled z_t and the condition γ·e⁵/1000, inverted by hand)
returns the hidden state that makes PLAID's logits — read out by PLAID's own code, its logit bias
(α/σ²)·z_t·Eᵀ added — the per-position log-marginals log q(w_i = v | z_t): they give the same
x̂ = Σ_v q(w_i = v | z_t) E_v and, at t = 0, PLAID's decoder −log q(w_i | z_0). Everything else
is the methods' own code.

What the bound then equals. With the optimal x̂ the diffusion term telescopes: it is the T → ∞
limit of Σ KL(q(z_s | z_t, w) ‖ q(z_s | z_t)), and q(z_s | z_t, w)/q(z_s | z_t) =
q(w | z_s)/q(w | z_t), so (the pointwise I-MMSE relation)

    D(w) = E_{z_1|w}[−log q(w | z_1)] − E_{z_0|w}[−log q(w | z_0)].

The expected estimate is B(w) = R(w) + P(w) + D(w) (rounding, prior KL, diffusion), and

    B(w) − (−log p(w)) = G_rec(w) + G_prior(w),
    G_rec(w)   = E_{z_0|w}[log q(w | z_0) − log p_dec(w | z_0)]         (decoder vs exact posterior, t = 0)
    G_prior(w) = P(w) − E_{z_1|w}[log q(w | z_1) − log p(w)]
               = E_{z_1|w}[log q(z_1) − log N(z_1; 0, I)]                  (prior mismatch, t = 1).

Averaged over p both gaps are KL divergences (≥ 0), so E_p[B] ≥ H(p); for one w they are small
numbers of either sign, computed here. R, P and the two expectations in D are computed
independently of the methods' code: P by torch.distributions' Gaussian KL, the rest by Monte
Carlo over z_0, z_1 ~ q(· | w) in float64 (REF_DRAWS draws, s.e. ≤ 1e-3).

Tolerances. An estimate is the mean of DRAWS one-draw estimates of the real ``nll`` (stratified
u); its s.e. is their standard deviation / √DRAWS (measured 0.009–0.025 nats). A check passes
when |estimate − reference| ≤ 4·s.e. (reference s.e. included in quadrature; a false failure
has probability 6e-5 under normality) plus, for Diffusion-LM's tied decoder, its float32
rounding: its logits z_0·E_v have magnitude ≈ M², each rounded to ½ ulp (the shared M² part is
one product, the same in every logit), and −log softmax moves by at most the largest logit
error plus the target's, so ≤ L·ulp(M² + c²) per sequence; for PLAID's float32 logits, each of
the oracle's part and the bias ≲ 2·α_0/σ_0² at t = 0, ≤ 2L·ulp(2·α_0/σ_0²) (1.2e-4 and 1.5e-5
in its two worlds). Every term a mutant could drop is checked to be larger than 8 s.e. plus that
rounding allowance, so dropping it must fail.

Two worlds:
- tight: well-separated embeddings (tokens ≥ 15 σ_0 apart at t = 0: Diffusion-LM c = 4; PLAID's
  unit rows √2 apart with γ_0 = −5, σ_0 = 0.082), M = 0: G_rec ≈ 0 and G_prior = O(α_1²‖e‖²),
  bounded a priori (``tight_gap_bound``) by 1.4e-4 for Diffusion-LM (α_1² = sigmoid(−13) =
  2.3e-6) and 0.01 for PLAID (α_1² = sigmoid(−6) = 2.5e-3); computed, they are ≤ 2e-5 and
  ≤ 1.2e-3. The estimate is −log p(w) to 4 s.e. plus the computed gap.
- every term: closer embeddings (a real rounding / reconstruction term) and a shared offset M
  (the offset cancels in every posterior and in every softmax, so it changes nothing else), and
  a real prior term — Diffusion-LM's from the offset, P ≈ ½ α_1² M² per token; PLAID's unit rows
  (tokens 2.9 σ_0 apart at γ_0 = −3) from a lower γ_1 = 1, P = ½(α_1² + d(σ_1² − 1 − log σ_1²))
  = 0.25 per token: the estimate equals the exact B(w), and each of R, P, D (for PLAID also
  (1 − q)·R and q·D, what a wrong 1/q or 1/(1 − q) weight would move) is far outside the
  tolerance.
"""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.backbone import Head
from bench.config import BackboneConfig
from bench.evaluate import draw_u
from methods._plaid import GAMMA_TIME
from methods.continuous import PLAID, DiffusionLM

V, L, DRAWS, REF_DRAWS = 4, 2, 128_000, 100_000
BB = BackboneConfig(layers=1, hidden=8, heads=1, cond_dim=8)
X = torch.tensor(list(itertools.product(range(V), repeat=L)))              # (16, L)
# (c, M) per method and world, and PLAID's (γ_0, γ_1) there; see the module docstring
WORLDS = {("diffusion-lm", "tight"): (4.0, 0.0), ("diffusion-lm", "every term"): (1.5, 600.0),
          ("plaid", "tight"): (1.0, 0.0), ("plaid", "every term"): (0.5, 1.0)}
PLAID_GAMMAS = {"tight": (-5.0, 6.0), "every term": (-3.0, 1.0)}


@pytest.fixture(scope="module")
def p():
    g = torch.Generator().manual_seed(0)
    q = torch.rand(len(X), generator=g, dtype=torch.float64) ** 3
    return q / q.sum()


def embeddings(c: float, M: float, unit: bool = False) -> torch.Tensor:
    """E_v = c·b_v + M·u (module docstring), divided by its length √(c² + M²) when ``unit``."""
    E = torch.zeros(V, V + 1)
    E[:, :V] = c * torch.eye(V)
    E[:, V] = M
    return E / math.hypot(c, M) if unit else E


def log_posterior(z, alpha, sigma, E, p):
    """log q(w' | z) over the 16 sequences, (B, 16), float64; α, σ (B,)."""
    z, E = z.double(), E.double()
    a, s2 = alpha.double().reshape(-1, 1, 1), sigma.double().reshape(-1, 1, 1) ** 2
    d2 = ((z[:, :, None, :] - a[..., None] * E) ** 2).sum(-1) / (2 * s2)      # (B, L, V)
    loglik = sum(d2[:, i, X[:, i]] for i in range(L))                          # (B, 16)
    return torch.log_softmax(p.log() - loglik, -1)


def marginals(logq):
    """q(w_i = v | z) from the joint posterior, (B, L, V)."""
    return torch.einsum("bn,nlv->blv", logq.exp(), F.one_hot(X, V).double())


def log_marginals(logq):
    """log q(w_i = v | z) from the joint posterior, (B, L, V), in log space (finite everywhere)."""
    return torch.stack([torch.stack([torch.logsumexp(logq[:, X[:, i] == v], -1) for v in range(V)], -1)
                        for i in range(L)], 1)


class PLAIDOracle(nn.Module):
    """Stands in for PLAID's backbone, given only what the backbone is given: the condition c =
    γ·GAMMA_TIME and the rescaled z_t·(α²/d + σ²)^{−1/2}. It inverts both maps (by hand) to γ and
    z_t and returns as its hidden state ℓ_v = log q(w_i = v | z_t) − (α/σ²)·z_t·E_v, read out by
    an identity head: the logits PLAID forms, ℓ + (α/σ²)·z_t·Eᵀ, are then the exact log-marginals,
    so x̂ = Σ_v q(w_i = v | z_t) E_v and, at t = 0, the decoder is −log q(w_i | z_0). ``seen``
    keeps each recovered z_t."""

    def __init__(self, m, p):
        super().__init__()
        self.embedding, self.p, self.d, self.seen = m.embedding, p, m.p.embed_dim, []
        self.head = Head(V, V)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(V))
            self.head.bias.zero_()

    def forward(self, t=None, embeds=None, self_cond=None, return_hidden=False, **_):
        assert return_hidden, "PLAID reads its logits out itself"
        g = t.double() / GAMMA_TIME
        a2, s2 = torch.sigmoid(-g)[:, None, None], torch.sigmoid(g)[:, None, None]
        z = embeds.double() * torch.sqrt(a2 / self.d + s2)
        self.seen.append(z)
        E = self.embedding.weight.double()
        logpi = log_marginals(log_posterior(z, a2.sqrt(), s2.sqrt(), E, self.p))
        return (logpi - (a2.sqrt() / s2) * z @ E.t()).float()


def model(name, world, p):
    """The real method with the embeddings of ``world`` and the oracle in place of its network."""
    c, M = WORLDS[name, world]
    torch.manual_seed(0)
    if name == "diffusion-lm":
        m = DiffusionLM(DiffusionLM.Params(embed_dim=V + 1), BB, V, L)
        with torch.no_grad():
            m.embedding.weight.copy_(embeddings(c, M))
    else:
        g0, g1 = PLAID_GAMMAS[world]
        m = PLAID(PLAID.Params(embed_dim=V + 1, gamma_0=g0, gamma_1=g1), BB, V, L)
        with torch.no_grad():
            m.embedding.matrix.copy_(embeddings(c, M, unit=True))
    if name == "diffusion-lm":
        cand = lambda: m.embedding.weight.double()[X].reshape(len(X), -1)  # noqa: E731

        def predict_x0(z, t, x_sc):
            a, s = m.schedule.alpha_sigma(t)
            return (log_posterior(z, a, s, m.embedding.weight, p).exp() @ cand()).reshape(z.shape)
        m.predict_x0 = predict_x0
    else:
        m.net = PLAIDOracle(m, p)
    return m.eval()


def estimate(m, j, seed, draws=DRAWS):
    """Mean and s.e. of the real ``m.nll`` of sequence j over ``draws`` stratified draws."""
    torch.manual_seed(seed)
    u = draw_u(1, draws, "stratified", torch.Generator().manual_seed(seed))[0]
    x = X[j][None].repeat(draws, 1)
    with torch.no_grad():
        est = m.nll(x, torch.ones_like(x, dtype=torch.bool), u).double()
    return est.mean().item(), est.std().item() / math.sqrt(draws)


def reference(m, name, j, p, seed=1, n=REF_DRAWS):
    """R, P, D, the gaps and B = R + P + D for sequence j (module docstring), with B's s.e."""
    g = torch.Generator().manual_seed(seed)
    E = m.embedding.weight.detach().double()
    w, e = X[j], E[X[j]]
    g0, g1 = (float(v.detach()) for v in m.endpoints(E))
    z = {}
    for k, gam in (("0", g0), ("1", g1)):
        a, s = math.sqrt(torch.sigmoid(torch.tensor(-gam)).item()), math.sqrt(torch.sigmoid(torch.tensor(gam)).item())
        zk = a * e + s * torch.randn(n, L, V + 1, generator=g, dtype=torch.float64)
        z[k] = zk, log_posterior(zk, torch.full((n,), a), torch.full((n,), s), E, p), a, s
    z0, lq0, _, _ = z["0"]
    if name == "diffusion-lm":        # the tied rounding softmax(z_0 Eᵀ)
        dec = torch.log_softmax(z0 @ E.t(), -1)
    else:                             # PLAID at t = 0: the (oracle) network's own marginals
        dec = marginals(lq0).log()
    rec = -dec.gather(-1, w[None, :, None].expand(n, L, 1))[..., 0].sum(1)
    ent0, ent1 = -lq0[:, j], -z["1"][1][:, j]
    _, _, a1, s1 = z["1"]
    P = torch.distributions.kl_divergence(torch.distributions.Normal(a1 * e, s1),
                                          torch.distributions.Normal(0.0, 1.0)).sum().item()
    truth = -math.log(p[j].item())
    R, D = rec.mean().item(), (ent1.mean() - ent0.mean()).item()
    se = math.sqrt(((rec - ent0).var() + ent1.var()).item() / n)
    return dict(R=R, P=P, D=D, B=R + P + D, se=se, truth=truth, ent0=ent0.mean().item(),
                G_rec=(rec - ent0).mean().item(), G_prior=P - truth + ent1.mean().item(),
                R_se=rec.std().item() / math.sqrt(n))


def float_allowance(name, world):
    """The float32 logits' rounding (docstring): Diffusion-LM's tied decoder ≤ L·ulp(M² + c²) per
    sequence; PLAID's logits ℓ + (α/σ²)·z·Eᵀ, each term ≲ 2·α_0/σ_0² at t = 0 (|z·e| ≤ 2 for
    unit rows), ≤ L·2·ulp(2·α_0/σ_0²)."""
    c, M = WORLDS[name, world]
    if name == "diffusion-lm":
        return L * float(np.spacing(np.float32(M * M + c * c)))
    g0 = PLAID_GAMMAS[world][0]
    return 2 * L * float(np.spacing(np.float32(2 * math.sqrt(1 / (1 + math.exp(g0))) * (1 + math.exp(-g0)))))


def tight_gap_bound(m, ref):
    """What the tight world's gap G_rec + G_prior can be, without computing it: |G_rec| ≤ R +
    E[−log q(w | z_0)] (both ≈ 0 there), and to second order in α_1 (expanding log q(z_1) −
    log N(z_1) around α_1 = 0) G_prior = α_1²(e·ē − ½‖ē‖²), ē = E_p[e], so |G_prior| ≤
    1.5·α_1²·max_w ‖E[w]‖²; 2 instead of 1.5 leaves room for the next order (relatively
    α_1²‖e‖² ≤ 4% here)."""
    a1 = torch.sigmoid(-m.endpoints(m.embedding.weight)[1]).item()
    return ref["R"] + ref["ent0"] + 2 * a1 * m.embedding.weight.detach().double()[X].pow(2).sum((1, 2)).max().item()


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
@pytest.mark.parametrize("j", [0, 10])
def test_oracle_bound_is_the_true_nll_in_the_tight_world(name, j, p):
    """Well-separated embeddings, no offset: the computed gap G_rec + G_prior is within its
    a-priori bound (``tight_gap_bound``: 1.4e-4 for Diffusion-LM, 0.01 for PLAID), and the real
    estimate is −log p(w) to 4 s.e. plus that gap (so it is not below −log p(w) by more)."""
    m = model(name, "tight", p)
    ref = reference(m, name, j, p)
    gap = ref["G_rec"] + ref["G_prior"]
    assert abs(gap) <= tight_gap_bound(m, ref), (gap, tight_gap_bound(m, ref), ref)
    mean, se = estimate(m, j, seed=j)
    assert abs(mean - ref["truth"]) <= 4 * math.hypot(se, ref["se"]) + abs(gap), (mean, se, ref)


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
@pytest.mark.parametrize("j", [5, 10])
def test_oracle_bound_equals_rounding_plus_prior_plus_diffusion(name, j, p):
    """Every term present: the real estimate equals the exact B(w) = R + P + D to 4 s.e. (+ the
    float32 allowance); B(w) ≥ −log p(w) here (both gaps > 0); and R, P and D — for PLAID also
    (1 − q)R and qD — each exceed 8 s.e. + the allowance, so a dropped or misweighted term fails."""
    m = model(name, "every term", p)
    ref = reference(m, name, j, p)
    mean, se = estimate(m, j, seed=100 + j)
    tol = 4 * math.hypot(se, ref["se"]) + float_allowance(name, "every term")
    assert abs(mean - ref["B"]) <= tol, (mean, se, tol, ref)
    assert ref["B"] > ref["truth"] and mean >= ref["truth"] - 4 * se, (mean, se, ref)
    terms = [ref["R"], ref["P"], ref["D"]]
    if name == "plaid":
        q = m.p.reconstruction_share
        terms += [(1 - q) * ref["R"], q * ref["D"]]
    power = 8 * math.hypot(se, ref["se"]) + float_allowance(name, "every term")
    assert min(terms) > power, (terms, power, ref)


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
def test_average_over_the_source_is_at_least_its_entropy(name, p):
    """Σ_w p(w) B(w) ≥ H(p) (both gaps are KLs on average), for the exact B of the every-term
    world, and the p-weighted real estimates agree with it (4 s.e., s.e. combined over w)."""
    m = model(name, "every term", p)
    H = -(p * p.log()).sum().item()
    exact, mean, var = 0.0, 0.0, 0.0
    for j in range(len(X)):
        ref = reference(m, name, j, p, seed=200 + j, n=REF_DRAWS // 5)
        mu, se = estimate(m, j, seed=200 + j, draws=DRAWS // 32)
        exact += p[j].item() * ref["B"]
        mean += p[j].item() * mu
        var += p[j].item() ** 2 * (se ** 2 + ref["se"] ** 2)
    assert exact > H, (exact, H)
    assert abs(mean - exact) <= 4 * math.sqrt(var) + float_allowance(name, "every term"), (mean, exact, math.sqrt(var))


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
def test_uncounted_positions_reach_the_predictor_clean(name, p):
    """Uncounted tokens are clean context: the predictor sees e at them and a noised z_t at the
    counted ones (docs/methods.md#notation-and-self-conditioning)."""
    m = model(name, "tight", p)
    seen = []
    if name == "diffusion-lm":
        inner = m.predict_x0
        m.predict_x0 = lambda z, t, sc: seen.append(z) or inner(z, t, sc)
    else:
        seen = m.net.seen             # the z_t the oracle recovers from PLAID's rescaled input
    x = X[[5, 10, 15]]
    counted = torch.tensor([[True, False]] * 3)
    with torch.no_grad():
        m.nll(x, counted, torch.tensor([0.3, 0.5, 0.9]))
    e = m.embedding.weight[x].detach()
    assert seen
    for z in seen:                    # PLAID's z_t went through its float32 rescaling and back: 1e-6
        assert torch.allclose(z[:, 1].float(), e[:, 1], atol=1e-6) and not torch.allclose(z[:, 0].float(), e[:, 0])


def test_rounding_term_is_the_tied_decoders_nll_at_a_draw_of_z0():
    """Diffusion-LM's rounding term is E_{z_0 ~ N(α_0 e, σ_0² I)}[−log softmax(z_0 Eᵀ)_w]. On
    embeddings where token 0's and token 1's logits tie in the mean (E_0·E_0 = E_0·E_1) their
    difference is pure noise, σ_0·b·ξ with b = ‖E_0 − E_1‖ = 10, so the term depends on σ_0 at
    first order (≈ 1.11 nats at σ_0 = 0.1, ≈ 1.01 if the noise were 10× smaller), which the
    oracle worlds above cannot see (there the noise moves it by < 0.01). Reference: float64 Monte
    Carlo over 400k draws; the real ``rounding_nll`` over 200k: 4 s.e. (s.e. ≈ 0.002)."""
    torch.manual_seed(0)
    m = DiffusionLM(DiffusionLM.Params(embed_dim=V + 1), BB, V, L)
    E = torch.zeros(V, V + 1)
    E[0, 0], E[1, 0], E[1, 1] = 1.0, 1.0, 10.0          # E_0·E_0 = E_0·E_1 = 1, E_0 − E_1 = −10·b_1
    E[2, 2], E[3, 3] = 3.0, 3.0
    with torch.no_grad():
        m.embedding.weight.copy_(E)
    w = torch.tensor([[0, 2]]).repeat(200_000, 1)
    with torch.no_grad():
        got = m.rounding_nll(m.embedding(w), w).sum(1).double()
    g0 = float(m.endpoints(E)[0].detach())
    a0, s0 = math.sqrt(1 / (1 + math.exp(g0))), math.sqrt(1 / (1 + math.exp(-g0)))
    z0 = a0 * E.double()[w[0]] + s0 * torch.randn(400_000, L, V + 1, generator=torch.Generator().manual_seed(1),
                                                   dtype=torch.float64)
    ref = -torch.log_softmax(z0 @ E.double().t(), -1).gather(-1, w[:1, :, None].expand(400_000, L, 1))[..., 0].sum(1)
    se = math.hypot(got.std().item() / math.sqrt(len(got)), ref.std().item() / math.sqrt(len(ref)))
    assert abs(got.mean().item() - ref.mean().item()) <= 4 * se, (got.mean().item(), ref.mean().item(), se)


def discrete_reference(m, j, p, T, n=20_000, seed=7):
    """L_T of sequence j with the Bayes predictor (VDM eq. 13): Σ_i ½(SNR(s_i) − SNR(t_i))·mmse(t_i)
    on t_i = i/T, mmse(t) = E‖e − E[e | z_t]‖² by float64 Monte Carlo (n draws of z_t per grid
    point), the posterior mean from ``log_posterior`` (not the methods' code); and its s.e."""
    g = torch.Generator().manual_seed(seed)
    E = m.embedding.weight.detach().double()
    e = E[X[j]]
    with torch.no_grad():
        gam = m.schedule.gamma(torch.arange(T + 1, dtype=torch.float64) / T).double()
    snr = torch.exp(-gam)
    total, var = 0.0, 0.0
    for i in range(1, T + 1):
        a, s = torch.sigmoid(-gam[i]).sqrt(), torch.sigmoid(gam[i]).sqrt()
        z = a * e + s * torch.randn(n, L, V + 1, generator=g, dtype=torch.float64)
        post = log_posterior(z, a.expand(n), s.expand(n), E, p).exp()
        err = ((e - (post @ E[X].reshape(len(X), -1)).reshape(n, L, V + 1)) ** 2).sum((1, 2))
        wgt = 0.5 * float(snr[i - 1] - snr[i])
        total += wgt * err.mean().item()
        var += wgt ** 2 * err.var().item() / n
    return total, math.sqrt(var)


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
def test_discrete_time_bound_with_the_bayes_predictor_lies_above_and_converges(name, p):
    """With the Bayes predictor its mmse(t) grows with t, so the T-step VLB (prior + decoder + L_T,
    eq. 13) exceeds the continuous-time bound B(w) (its cells' right Riemann sums) and falls
    towards it as T grows: for T = 2, 8, 32 the independent references B_T = R + P + L_T are
    decreasing and above B(w) (4 s.e.); the real ``nll`` under eval.bound_steps = T with the weight
    proposal equals B_T to 4 s.e. (estimate and reference s.e. in quadrature, plus the float32
    allowance); and B_2 − B_8 exceeds 8 s.e., so an estimator that ignored T fails."""
    m = model(name, "every term", p)
    j = 10
    ref = reference(m, name, j, p)
    out = {}
    for T in (2, 8, 32):
        lt, lt_se = discrete_reference(m, j, p, T)
        b, b_se = ref["R"] + ref["P"] + lt, math.hypot(ref["R_se"], lt_se)
        m.use_protocol(SimpleNamespace(bound_steps=T, t_proposal="weight"))
        mean, se = estimate(m, j, seed=300 + T, draws=DRAWS // 4)
        tol = 4 * math.hypot(se, b_se) + float_allowance(name, "every term")
        assert abs(mean - b) <= tol, (T, mean, se, b, b_se)
        out[T] = (b, b_se)
    (b2, s2), (b8, s8), (b32, s32) = out[2], out[8], out[32]
    assert b2 - b8 > 8 * math.hypot(s2, s8) and b8 > b32 - 4 * math.hypot(s8, s32), out
    assert b32 > ref["B"] - 4 * math.hypot(s32, ref["se"]), (out, ref["B"])
