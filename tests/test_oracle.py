"""MDLM's bound against exact answers (methods/mdlm.py, run through the real ``MDLM.nll``).

The world: V = 3, L = 4, all 81 sequences enumerated with a random distribution p. Two oracles
stand in for the network:

- the exact conditional p(x0^i | unmasked tokens), which ignores t: the continuous-time
  absorbing ELBO is then tight, E[bound] = −log p(x0) (it averages the any-order
  autoregressive factorisations, each exact for the true conditionals);
- a t-dependent denoiser, the exact conditional tempered towards uniform by λ(t) = 0.9·t. Its
  diffusion NELBO is computed exactly: L = Σ_{M≠∅} ∫_0^1 t^{m−1}(1−t)^{n−m} CE_M(t) dt by
  Gauss–Legendre quadrature (64 nodes; doubling the nodes moves it by < 1e-12). For such a
  denoiser the pure masked-count form (t = m/n) has a different expectation,
  Σ_M B(m, n−m+1) CE_M(m/n), the NLL bound of the any-order AR model at t = m/n.

Tolerance: an estimate is a mean over M = 4000 stratified draws; |mean − exact| ≤ 4 standard
errors (+1e-6 for float rounding). Every test that must separate two values checks first that
they differ by more than 8 standard errors (the test has the power to fail).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bench.config import BackboneConfig
from bench.evaluate import draw_u
from methods import _masked, mdlm
from methods.mdlm import MDLM

V, L, M = 3, 4, 4000
BB = BackboneConfig(layers=1, hidden=8, heads=1, cond_dim=8)


@pytest.fixture(scope="module")
def dist():
    X = torch.tensor(list(itertools.product(range(V), repeat=L)))
    g = torch.Generator().manual_seed(0)
    p = torch.rand(len(X), generator=g, dtype=torch.float64) ** 3
    return X, p / p.sum()


def oracle(X, p, temper=0.0):
    """log p(x0^i = v | unmasked tokens of x_t), mixed with uniform by ``temper`` (a number, or
    a function of t for a t-dependent denoiser)."""
    def denoise(x_t, t):
        visible = x_t != V
        agree = ((X[None] == x_t[:, None]) | ~visible[:, None]).all(-1)        # (B, |X|)
        w = agree.double() * p[None]
        onehot = torch.nn.functional.one_hot(X, V).double()                     # (|X|, L, V)
        marg = torch.einsum("bn,nlv->blv", w, onehot)
        marg = marg / marg.sum(-1, keepdim=True)
        lam = temper(t.double())[:, None, None] if callable(temper) else temper
        return ((1 - lam) * marg + lam / V).log()
    return denoise


def t_dependent(t):
    return 0.9 * t


def model(estimator="beta", denoise=None):
    """The real MDLM (``estimator`` None: the default one)."""
    m = MDLM(MDLM.Params() if estimator is None else MDLM.Params(estimator=estimator), BB, V, L)
    if denoise is not None:
        m.denoise = denoise     # the oracle replaces the network; everything else is mdlm.py's
    return m


def estimate(m, x0, counted=None, seed=0, draws=M):
    """Mean and standard error of the real ``m.nll`` over ``draws`` stratified draws."""
    torch.manual_seed(seed)
    u = draw_u(1, draws, "stratified", torch.Generator().manual_seed(seed))[0].double()
    xb = x0[None].repeat(draws, 1)
    c = torch.ones_like(xb, dtype=torch.bool) if counted is None else counted[None].repeat(draws, 1)
    est = m.nll(xb, c, u)
    return est.mean().item(), est.std().item() / math.sqrt(draws)


def masks(counted):
    idx = [i for i in range(L) if counted[i]]
    for r in range(1, len(idx) + 1):
        for sub in itertools.combinations(idx, r):
            mk = torch.zeros(L, dtype=torch.bool)
            mk[list(sub)] = True
            yield mk


def ce_of(den, x0, mk, t):
    x_t = torch.where(mk, torch.full_like(x0, V), x0)[None].repeat(len(t), 1)
    lp = den(x_t, t)
    return -(lp[:, mk].gather(-1, x0[mk][None, :, None].expand(len(t), -1, 1))[..., 0]).sum(1)


def exact_nelbo(den, x0, counted, nodes=64):
    """The diffusion NELBO of denoiser ``den`` for x0 by quadrature over t (see the docstring)."""
    n = int(counted.sum())
    z, w = np.polynomial.legendre.leggauss(nodes)
    t = torch.tensor((z + 1) / 2, dtype=torch.float64)
    wt = torch.tensor(w / 2, dtype=torch.float64)
    total = 0.0
    for mk in masks(counted):
        m = int(mk.sum())
        total += (wt * t ** (m - 1) * (1 - t) ** (n - m) * ce_of(den, x0, mk, t)).sum().item()
    return total


def exact_count_form(den, x0, counted):
    """Expectation of the pure masked-count form (t = m/n): Σ_M B(m, n−m+1) CE_M(m/n)."""
    n = int(counted.sum())
    total = 0.0
    for mk in masks(counted):
        m = int(mk.sum())
        beta = math.gamma(m) * math.gamma(n - m + 1) / math.gamma(n + 1)
        total += beta * ce_of(den, x0, mk, torch.tensor([m / n], dtype=torch.float64)).item()
    return total


def test_exact_enumeration_identity(dist):
    """Deterministic check of the theory: Σ_masks B(m, L−m+1) Σ_{i∈M} −log p(x_i|x_¬M) = −log p(x)."""
    X, p = dist
    den = oracle(X, p)
    ones = torch.ones(L, dtype=torch.bool)
    for j in [0, 17, 40, 80]:
        assert exact_count_form(den, X[j], ones) == pytest.approx(-math.log(p[j].item()), abs=1e-9)
        assert exact_nelbo(den, X[j], ones) == pytest.approx(-math.log(p[j].item()), abs=1e-9)


def test_quadrature_is_converged(dist):
    X, p = dist
    den = oracle(X, p, temper=t_dependent)
    ones = torch.ones(L, dtype=torch.bool)
    assert exact_nelbo(den, X[33], ones, 64) == pytest.approx(exact_nelbo(den, X[33], ones, 128), abs=1e-12)


@pytest.mark.parametrize("estimator", ["beta", "time", "count"])
@pytest.mark.parametrize("j", [0, 5, 33, 80])
def test_oracle_bound_equals_true_nll(dist, j, estimator):
    X, p = dist
    truth = -math.log(p[j].item())
    mean, se = estimate(model(estimator, oracle(X, p)), X[j], seed=j)
    assert abs(mean - truth) <= 4 * se + 1e-6, (mean, truth, se)


@pytest.mark.parametrize("j", [33, 80])
def test_default_estimator_bounds_the_t_dependent_diffusion_model(dist, j):
    """With a t-conditioned denoiser the default estimator's expectation is the diffusion
    model's NELBO (time form, exact by quadrature), not the count form's value (16000 draws:
    the two values are > 8 standard errors apart for these x0)."""
    X, p = dist
    den = oracle(X, p, temper=t_dependent)
    ones = torch.ones(L, dtype=torch.bool)
    exact, count = exact_nelbo(den, X[j], ones), exact_count_form(den, X[j], ones)
    mean, se = estimate(model(None, den), X[j], seed=j, draws=4 * M)   # the default estimator
    assert abs(exact - count) > 8 * se, (exact, count, se)           # the test can tell them apart
    assert abs(mean - exact) <= 4 * se + 1e-6, (mean, exact, count, se)
    mean_c, se_c = estimate(model("count", den), X[j], seed=j, draws=4 * M)  # the named option: AO-ARM bound
    assert abs(mean_c - count) <= 4 * se_c + 1e-6, (mean_c, count, se_c)
    mean_t, se_t = estimate(model("time", den), X[j], seed=j, draws=4 * M)   # the plain time form agrees
    assert abs(mean_t - exact) <= 4 * se_t + 1e-6, (mean_t, exact, se_t)


def test_data_average_time_form_vs_count_form(dist):
    """Averaged over p (the issue's enumeration): H(p) < diffusion NELBO (time form) ≠ count form,
    and the default estimator's p-average matches the time form within 4 standard errors."""
    X, p = dist
    den = oracle(X, p, temper=t_dependent)
    ones = torch.ones(L, dtype=torch.bool)
    H = -(p * p.log()).sum().item()
    time_form = sum(p[j].item() * exact_nelbo(den, X[j], ones) for j in range(len(X)))
    count_form = sum(p[j].item() * exact_count_form(den, X[j], ones) for j in range(len(X)))
    mean, var = 0.0, 0.0
    m = model(None, den)
    for j in range(len(X)):
        mu, s = estimate(m, X[j], seed=100 + j)
        mean += p[j].item() * mu
        var += (p[j].item() * s) ** 2
    se = math.sqrt(var)
    assert H < time_form and abs(time_form - count_form) > 8 * se, (H, time_form, count_form, se)
    assert abs(mean - time_form) <= 4 * se + 1e-6, (mean, time_form, count_form, se)


@pytest.mark.parametrize("estimator", ["beta", "time"])
def test_uncounted_context_tokens(dist, estimator):
    """Uncounted tokens are clean context: with the exact oracle the bound equals
    −log p(x_counted | x_context) exactly (here x_1, x_3 counted given x_0, x_2), and with the
    t-dependent oracle it equals that model's exact NELBO over the counted tokens only."""
    X, p = dist
    counted = torch.tensor([False, True, False, True])
    for j in [7, 50]:
        x0 = X[j]
        ctx = ((X[:, ~counted] == x0[~counted]).all(-1).double() * p).sum().item()
        truth = -math.log(p[j].item() / ctx)
        mean, se = estimate(model(estimator, oracle(X, p)), x0, counted, seed=j)
        assert abs(mean - truth) <= 4 * se + 1e-6, (mean, truth, se)
        assert -math.log(ctx) > 8 * se   # scoring the context too (−log p(x0)) would be caught
        den = oracle(X, p, temper=t_dependent)
        exact = exact_nelbo(den, x0, counted)
        mean, se = estimate(model(estimator, den), x0, counted, seed=j + 1)
        assert abs(mean - exact) <= 4 * se + 1e-6, (mean, exact, se)


def test_count_form_has_lower_variance_than_time_form(dist):
    X, p = dist
    _, se_time = estimate(model("time", oracle(X, p)), X[33], seed=5)
    _, se_beta = estimate(model("beta", oracle(X, p)), X[33], seed=5)
    assert se_beta < se_time


def test_missing_weight_is_detected(dist, monkeypatch):
    """Dropping the weight in the real estimators MDLM uses (methods/_masked.py: n/m → 1 in the count
    forms, 1/t → 1 in the time form) must move the estimate far from −log p(x0)."""
    X, p = dist
    j = 33
    truth = -math.log(p[j].item())
    monkeypatch.setattr(_masked, "count_weight", lambda n, m: torch.ones_like(m))
    mean, se = estimate(model("beta", oracle(X, p)), X[j], seed=1)
    assert abs(mean - truth) > 8 * se, (mean, truth, se)
    monkeypatch.setattr(_masked, "elbo_weight", lambda t: torch.ones_like(t))
    mean, se = estimate(model("time", oracle(X, p)), X[j], seed=2)
    assert abs(mean - truth) > 8 * se, (mean, truth, se)


@pytest.mark.parametrize("estimator", ["beta", "time", "count"])
def test_perturbed_denoiser_bound_is_strictly_larger(dist, estimator):
    """E_p[bound] − H(p) = E over t of a KL between true and model conditionals: > 0 for a
    wrong denoiser (exact expectation over all 81 sequences, MC over t only)."""
    X, p = dist
    gap, var = 0.0, 0.0
    m = model(estimator, oracle(X, p, temper=0.3))
    for j in range(len(X)):
        mu, s = estimate(m, X[j], seed=j)
        gap += p[j].item() * (mu + math.log(p[j].item()))
        var += (p[j].item() * s) ** 2
    assert gap > 4 * math.sqrt(var), (gap, math.sqrt(var))


def test_labels_and_records_say_what_the_count_form_bounds():
    assert MDLM.default_label(MDLM.Params()) == "MDLM"
    assert "any-order" in MDLM.default_label(MDLM.Params(estimator="count"))
    assert "any-order" in model("count").bounds() and "any-order" not in model("beta").bounds()


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_training_loss_is_the_time_form_through_the_fused_head(time_conditioning):
    """MDLM.loss takes the masked tokens' cross-entropy from the backbone's fused head; it must
    equal the time-form NELBO of ``mdlm.nelbo`` with the log-prob denoiser, the same masks (same
    seed) and the same t. float32 sums of ≤ 16·12 terms: rtol 1e-5."""
    m = MDLM(MDLM.Params(time_conditioning=time_conditioning), BackboneConfig(layers=1, hidden=16, heads=2), 11, 12)
    with torch.no_grad():                  # zero-initialised head and adaLN: flat, and blind to t
        for name, p in m.net.named_parameters():
            if name.startswith(("head.", "adaLN_f.")) or ".adaLN." in name:
                torch.nn.init.normal_(p, std=0.5)
    x0 = torch.randint(0, 11, (16, 12), generator=torch.Generator().manual_seed(1))
    counted = torch.ones_like(x0, dtype=torch.bool)
    counted[:, :3] = False
    u = torch.rand(16, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    fused = m.loss(x0, counted, u)
    torch.manual_seed(3)
    ref = (mdlm.nelbo(x0, counted, u, m.denoise, m.mask_id).sum() / counted.sum()).detach()
    fused = fused.detach()
    assert float(ref) > 1.0 and torch.allclose(fused, ref, rtol=1e-5), (float(fused), float(ref))


def test_training_loss_spends_the_head_on_masked_rows_only_and_equals_the_full_head():
    """MDLM.loss runs the V-wide head at the masked rows only; an unmasked token is carried over
    (SUBS) and contributes nothing. The loss and every gradient equal those of the head over all
    rows with the unmasked rows' NLL multiplied by zero (same mask draws: the same seed).
    Tolerance 1e-6 relative: the two differ only in float summation order."""
    from methods.mdlm import elbo_weight, mask_tokens

    torch.manual_seed(0)
    m = MDLM(MDLM.Params(), BackboneConfig(layers=1, hidden=16, heads=2), 11, 12)
    x0 = torch.randint(0, 11, (4, 12))
    counted = torch.ones_like(x0, dtype=torch.bool)
    counted[0, :5] = False
    u = torch.tensor([0.02, 0.3, 0.7, 0.999])

    def full_head(x0, counted, u):
        x_t, masked = mask_tokens(x0, counted, u, m.mask_id)
        ce = m.net(x_t, u, targets=x0)
        return (elbo_weight(u) * (ce * masked).sum(1)).sum() / counted.sum()

    grads = []
    for f in (m.loss, full_head):
        torch.manual_seed(1)
        m.zero_grad()
        loss = f(x0, counted, u)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (l1, g1), (l2, g2) = grads
    assert torch.isfinite(l1) and l1 > 0
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=0)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
