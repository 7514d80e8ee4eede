"""Properties of the Gaussian machinery (methods/_gaussian.py) and of self-conditioning.

Tolerances: sampling checks use N draws and allow 5 standard errors (a false failure has
probability < 1e-6 per check); closed-form checks are float64 to 1e-9 relative.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from methods._gaussian import (
    GAMMA_MAX,
    GAMMA_MIN,
    PARAMETERISATIONS,
    SAMPLERS,
    Cosine,
    Learned,
    NormalStream,
    Sqrt,
    TanD,
    bcast,
    ddim_step,
    diffuse,
    diffusion_term,
    nearest_embedding,
    posterior,
    prior_kl,
    sample_loop,
    standard_normal,
)

SCHEDULES = {"cosine": Cosine(), "sqrt": Sqrt(), "tan-d": TanD(), "learned": Learned(-3.0, 6.0)}
T = torch.linspace(0, 1, 2001, dtype=torch.float64)


def _alpha_bar_closed(name, t):
    """The schedules' published closed forms (clamped where they leave (0, 1))."""
    if name == "cosine":
        f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return f(t) / f(torch.zeros_like(t))
    if name == "sqrt":
        return 1 - torch.sqrt(t + 1e-4)
    if name == "tan-d":
        return 1 / (1 + 81 * torch.tan(math.pi * t / 2) ** 2)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["cosine", "sqrt", "tan-d"])
def test_fixed_schedules_match_their_closed_forms_where_unclamped(name):
    s = SCHEDULES[name]
    t = torch.linspace(0.01, 0.97, 97, dtype=torch.float64)
    g = s.raw_gamma(t)
    inside = (g > GAMMA_MIN) & (g < GAMMA_MAX)
    assert int(inside.sum()) > len(t) // 2, int(inside.sum())       # not a comparison of nothing
    got, want = s.alpha_bar(t)[inside], _alpha_bar_closed(name, t)[inside]
    # cosine drops the normaliser cos²(φ_0) = 1 − 1.6e-4, so 2e-4 relative there; exact otherwise
    tol = 2e-4 if name == "cosine" else 1e-9
    assert torch.allclose(got, want, rtol=tol, atol=1e-12), (got - want).abs().max()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_monotone_with_right_endpoints_and_exact_derivative(name):
    s = SCHEDULES[name]
    with torch.no_grad():
        g, dg = s.gamma(T), s.dgamma(T)
    assert (g[1:] >= g[:-1]).all() and (dg >= 0).all()
    a = torch.sigmoid(-g)
    if name == "learned":
        assert math.isclose(float(g[0]), -3.0, abs_tol=1e-6) and math.isclose(float(g[-1]), 6.0, abs_tol=1e-6)
    else:
        assert float(a[-1]) < 1e-5, a[-1]
        assert float(a[0]) > (0.989 if name == "sqrt" else 0.9998), a[0]
    if name == "sqrt":
        assert math.isclose(float(a[0]), 0.99, rel_tol=1e-6)           # ᾱ_0 = 1 − √1e-4
    # γ' is the derivative of γ (central differences, away from the clamp's kinks)
    h = 1e-6
    t = torch.linspace(0.02, 0.95, 50, dtype=torch.float64)
    with torch.no_grad():
        fd = (s.gamma(t + h) - s.gamma(t - h)) / (2 * h)
        inside = (s.gamma(t - 1e-3) > GAMMA_MIN) & (s.gamma(t + 1e-3) < GAMMA_MAX)
        assert int(inside.sum()) > len(t) // 2, int(inside.sum())
        assert torch.allclose(s.dgamma(t)[inside], fd[inside], rtol=1e-4), (s.dgamma(t) - fd).abs().max()


@pytest.mark.parametrize("name", ["cosine", "sqrt", "tan-d"])
def test_clamped_schedule_has_zero_slope_exactly_where_the_clamp_binds(name):
    """The bound's diffusion integral ∫ γ' e^{−γ} ... dt runs between the clamped endpoints; it is
    that integral only if γ' = 0 where the clamp binds and γ' > 0 elsewhere. Every fixed schedule
    reaches its clamp on [0, 1] (20,001 points; at least one clamped, asserted)."""
    s = SCHEDULES[name]
    t = torch.linspace(0, 1, 20_001, dtype=torch.float64)
    with torch.no_grad():
        raw, dg = s.raw_gamma(t), s.dgamma(t)
    clamped = (raw <= GAMMA_MIN) | (raw >= GAMMA_MAX)
    assert clamped.any() and not clamped.all()
    assert (dg[clamped] == 0).all() and (dg[~clamped] > 0).all()


def test_learned_schedule_stays_monotone_with_its_endpoints_for_any_parameters():
    torch.manual_seed(0)
    s = Learned(-2.0, 5.0)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 2)
        g0, g1 = s.endpoints()
        g = s.gamma(T)
        assert (g[1:] >= g[:-1]).all() and (s.dgamma(T) > 0).all()
        assert torch.allclose(g[[0, -1]], torch.stack([g0, g1]).double(), atol=1e-6)


def _gamma(s, t):
    return s.gamma(torch.tensor([t], dtype=torch.float64))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_forward_marginal_and_posterior_marginal_by_sampling(name):
    """z_t = α_t x0 + σ_t ε has mean α_t x0 and variance σ_t²; and drawing z_s from
    q(z_s | z_t, x0) (the DDPM posterior) gives back the forward marginal q(z_s | x0)."""
    s, N = SCHEDULES[name], 400_000
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor(1.7, dtype=torch.float64)
    with torch.no_grad():
        for tt, ss in [(0.9, 0.5), (0.5, 0.2), (0.2, 0.05)]:
            g_t, g_s = _gamma(s, tt), _gamma(s, ss)
            a_t, s_t = torch.sigmoid(-g_t).sqrt(), torch.sigmoid(g_t).sqrt()
            z, _ = diffuse(x0.expand(N), a_t, s_t, torch.randn(N, generator=g, dtype=torch.float64))
            se_m, se_v = s_t / math.sqrt(N), s_t ** 2 * math.sqrt(2 / N)
            assert abs(z.mean() - a_t * x0) < 5 * se_m and abs(z.var() - s_t ** 2) < 5 * se_v
            mean, var = posterior(z, x0.expand(N), g_t, g_s)
            zs = mean + var.sqrt() * torch.randn(N, generator=g, dtype=torch.float64)
            a_s, s_s = torch.sigmoid(-g_s).sqrt(), torch.sigmoid(g_s).sqrt()
            assert abs(zs.mean() - a_s * x0) < 5 * s_s / math.sqrt(N), (name, tt, ss)
            assert abs(zs.var() - s_s ** 2) < 5 * s_s ** 2 * math.sqrt(2 / N), (name, tt, ss)


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_with_an_exact_oracle_stays_on_the_forward_path_of_z1(steps):
    """Point-mass data x0: E[x0 | z_t] = x0, and a DDIM step (η = 0) keeps ε̂ = (z_t − α_t x0)/σ_t
    fixed, so every z_t the predictor sees is α_t x0 + σ_t ε_1, ε_1 = (z_1 − α_1 x0)/σ_1: the
    forward process with z_1's own noise, at the grid's times t = i/steps, and the last x̂0 is x0.
    (The returned x̂0 alone cannot fail: it is the oracle's output, and with one step no DDIM step
    is taken at all.) float64 data, float32 schedule values used as the sampler uses them: 1e-9."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    for name in ("cosine", "sqrt", "learned"):
        s, seen = SCHEDULES[name], []

        def oracle(z, t, sc):
            seen.append((z, t))
            return x0
        z1 = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
        with torch.no_grad():
            out = sample_loop(oracle, z1, s, steps, ddim_step)
            ab = lambda t: [torch.sigmoid(v * s.gamma(t)).sqrt().double()[:, None, None] for v in (-1, 1)]  # noqa: E731
            a1, s1 = ab(seen[0][1])
            eps1 = (z1 - a1 * x0) / s1
            assert len(seen) == steps and torch.equal(out, x0)
            for i, (z, t) in enumerate(seen):
                assert torch.allclose(t, torch.full_like(t, (steps - i) / steps))
                a, sd = ab(t)
                ref = a * x0 + sd * eps1
                assert torch.allclose(z, ref, rtol=0, atol=1e-9), (name, i, (z - ref).abs().max())


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_with_the_exact_gaussian_denoiser_converge_to_the_data_distribution(sampler):
    """Data x ~ N(m, v): E[x | z_t] = m + α v (z − α m)/(α² v + σ²). Both samplers started at
    z_1 ~ N(0, 1) end with mean m and a variance that converges to v as the grid refines: the
    plug-in x̂0 = E[x | z_t] makes each step slightly under-dispersed (an O(1/steps) bias,
    measured 12% at 50 steps, 4% at 200, 1–2% at 1000). Checked: the error shrinks from 50 to
    500 steps and is < 5% at 500 (the sampling s.e. of the variance is 1% at N = 2e4)."""
    m, v, N = 0.8, 0.25, 20_000
    s = Cosine()

    def denoise(z, t, sc):
        g = s.gamma(t)[:, None].double()
        a2, s2 = torch.sigmoid(-g), torch.sigmoid(g)
        return m + a2.sqrt() * v * (z - a2.sqrt() * m) / (a2 * v + s2)

    err = {}
    for steps in (50, 500):
        gen = torch.Generator().manual_seed(3)
        z1 = torch.randn(N, 1, generator=gen, dtype=torch.float64)
        x = sample_loop(denoise, z1, s, steps, SAMPLERS[sampler], gen)[:, 0]
        assert abs(float(x.mean()) - m) < 5 * math.sqrt(v / N)
        err[steps] = abs(float(x.var()) / v - 1)
    assert err[500] < err[50] and err[500] < 0.05, err


@pytest.mark.parametrize("name", ["x0", "eps", "v"])
def test_each_parameterisation_turns_its_own_target_back_into_x0(name):
    """A network whose output is exactly its parameterisation's target (x0, ε, or v = α ε − σ x0)
    yields x̂0 = x0, for z_t and ε from ``diffuse`` at α_t from 1.5e-3 to 0.99998 (cosine); and
    the target is what the parameterisation names. float64; ε-prediction divides by α, so 1e-9."""
    p, s = PARAMETERISATIONS[name], Cosine()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.4, 0.7, 0.95, 1.0], dtype=torch.float64)
    with torch.no_grad():
        a, sd = (bcast(v, x0) for v in s.alpha_sigma(t))
    z, eps = diffuse(x0, a, sd, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    target = p.target(x0, eps, a, sd)
    assert torch.allclose(target, {"x0": x0, "eps": eps, "v": a * eps - sd * x0}[name], rtol=0, atol=1e-12)
    assert torch.allclose(p.x0(target, z, a, sd), x0, rtol=0, atol=1e-9)


def test_nearest_embedding_is_the_euclidean_argmin():
    """Diffusion-LM's rounding picks the row of E nearest in Euclidean distance (not the largest
    dot product: the rows have different norms here), as torch.cdist's argmin (float64; ties have
    probability 0)."""
    g = torch.Generator().manual_seed(0)
    E = torch.randn(50, 8, generator=g, dtype=torch.float64) * torch.rand(50, 1, generator=g, dtype=torch.float64) * 3
    x = 2 * torch.randn(4, 30, 8, generator=g, dtype=torch.float64)
    want = torch.cdist(x.reshape(-1, 8), E).argmin(-1).reshape(4, 30)
    got = nearest_embedding(x, E)
    assert torch.equal(got, want)
    assert not torch.equal(got, (x @ E.t()).argmax(-1))       # the two rules differ on this E


# ----------------------------------------------------------------------------- the bound
@pytest.mark.parametrize("gamma_1", [-2.0, 0.5, 3.0, 9.0])
def test_prior_kl_equals_the_gaussian_kl(gamma_1):
    from torch.distributions import Normal, kl_divergence

    x = torch.randn(5, 7, dtype=torch.float64)
    g = torch.tensor(gamma_1, dtype=torch.float64)
    a, s = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
    want = kl_divergence(Normal(a * x, s), Normal(torch.zeros_like(x), torch.ones_like(x))).sum(-1)
    assert torch.allclose(prior_kl(x, g), want, rtol=1e-10)


MIX = dict(w=torch.tensor([0.3, 0.7], dtype=torch.float64), mu=torch.tensor([-1.0, 1.5], dtype=torch.float64),
           sd=torch.tensor([0.3, 0.5], dtype=torch.float64))


def _mix_logpdf(x):
    w, mu, sd = MIX["w"], MIX["mu"], MIX["sd"]
    return torch.logsumexp(torch.log(w) - 0.5 * ((x[:, None] - mu) / sd) ** 2 - torch.log(sd * math.sqrt(2 * math.pi)),
                           dim=1)


def _mix_denoiser(z, a, s2):
    """E[x | z_t] for the mixture: responsibilities × per-component posterior means."""
    w, mu, v = MIX["w"], MIX["mu"], MIX["sd"] ** 2
    var_z = a[:, None] ** 2 * v + s2[:, None]
    logr = torch.log(w) - 0.5 * (z[:, None] - a[:, None] * mu) ** 2 / var_z - 0.5 * torch.log(var_z)
    r = torch.softmax(logr, dim=1)
    m = mu + a[:, None] * v * (z[:, None] - a[:, None] * mu) / var_z
    return (r * m).sum(1)


def _vlb(lam, N=200_000, seed=0):
    """Per-point VLB (nats) of the 1-D mixture under x̂_λ = λ·E[x|z_t] (the truth at λ = 1),
    with a Gaussian decoder p(x | z_0) = N(z_0/α_0, σ_0²/α_0²), and the true NLL of the same x."""
    g = torch.Generator().manual_seed(seed)
    s = Learned(-7.0, 7.0)
    comp = torch.multinomial(MIX["w"], N, replacement=True, generator=g)
    x = MIX["mu"][comp] + MIX["sd"][comp] * torch.randn(N, generator=g, dtype=torch.float64)
    t = ((torch.arange(N, dtype=torch.float64) + torch.rand(N, generator=g, dtype=torch.float64)) / N)
    t = t[torch.randperm(N, generator=g)]
    with torch.no_grad():
        gam, dgam = s.gamma(t), s.dgamma(t)
        a, s2 = torch.sigmoid(-gam).sqrt(), torch.sigmoid(gam)
        z, _ = diffuse(x, a, s2.sqrt(), torch.randn(N, generator=g, dtype=torch.float64))
        x_hat = lam * _mix_denoiser(z, a, s2)
        diff = diffusion_term(x[:, None], x_hat[:, None], gam, dgam)
        g0, g1 = s.endpoints()
        g0, g1 = g0.double(), g1.double()
        a0, s0 = torch.sigmoid(-g0).sqrt(), torch.sigmoid(g0).sqrt()
        z0 = a0 * x + s0 * torch.randn(N, generator=g, dtype=torch.float64)
        dec_sd = s0 / a0
        recon = 0.5 * ((x - z0 / a0) / dec_sd) ** 2 + torch.log(dec_sd * math.sqrt(2 * math.pi))
        bound = diff + prior_kl(x[:, None], g1) + recon
    return bound, -_mix_logpdf(x)


def test_gaussian_vlb_bounds_the_true_nll_and_tightens_towards_the_truth():
    means = {}
    for lam in (0.0, 0.5, 0.9, 1.0):
        b, nll = _vlb(lam)
        gap = b - nll
        means[lam] = (float(gap.mean()), float(gap.std() / math.sqrt(len(gap))))
    g1, se1 = means[1.0]
    assert g1 > -3 * se1, means                  # a bound: never below the truth
    assert g1 < 0.05, means                      # and nearly tight with the exact denoiser
    gaps = [means[lam][0] for lam in (0.0, 0.5, 0.9, 1.0)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])), means   # tightens as the model → truth


# ----------------------------------------------------------------------------- NormalStream (SSD-LM's noise)
N_DRAWS = 1 << 21


def test_normal_stream_draws_are_standard_normal():
    """Moments to the 4th within 5 standard errors (SE of mean, variance, skewness, excess
    kurtosis: √(1/n), √(2/n), √(6/n), √(24/n)); Kolmogorov–Smirnov against Φ at p > 1e-6; the two
    halves of one fill (cos and sin of the same radius) uncorrelated, also in their squares (SE
    √(1/m)); the tail P(|z| > 3) within 5 binomial SE."""
    z = standard_normal((N_DRAWS,), torch.Generator().manual_seed(0)).double()
    n = z.numel()
    m1 = z.mean()
    c = z - m1
    var = (c ** 2).mean()
    skew, kurt = (c ** 3).mean() / var ** 1.5, (c ** 4).mean() / var ** 2 - 3
    for value, se in [(m1, 1 / n), (var - 1, 2 / n), (skew, 6 / n), (kurt, 24 / n)]:
        assert abs(float(value)) < 5 * math.sqrt(se), (float(value), math.sqrt(se))
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-6
    a, b = z[: n // 2], z[n // 2:]
    for x, y in [(a, b), (a ** 2, b ** 2)]:
        r = torch.corrcoef(torch.stack([x, y]))[0, 1]
        assert abs(float(r)) < 5 / math.sqrt(n // 2)
    p3 = 2 * stats.norm.sf(3.0)
    assert abs(float((z.abs() > 3).double().mean()) - p3) < 5 * math.sqrt(p3 * (1 - p3) / n)


def test_normal_stream_follows_the_torch_generator_and_never_repeats():
    """Same torch seed (explicit generator or the global one) → same draws; a stream's next fill,
    another seed and an odd size all give new draws (an odd size is the first n of n + 1)."""
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    assert torch.equal(standard_normal((4, 5), g(1)), standard_normal((4, 5), g(1)))
    torch.manual_seed(3)
    first = standard_normal((4, 5))
    torch.manual_seed(3)
    assert torch.equal(first, standard_normal((4, 5)))
    assert not torch.equal(standard_normal((4, 5), g(1)), standard_normal((4, 5), g(2)))
    stream, out = NormalStream(g(1)), torch.empty(4, 5)
    before = stream.fill_(out).clone()
    assert not torch.equal(before, stream.fill_(out))
    odd = standard_normal((7,), g(1))
    assert torch.equal(odd, standard_normal((8,), g(1))[:7])


def test_normal_stream_extreme_words_stay_finite():
    """The smallest uniform a 32-bit word can give (U₁ = 0, word −2³¹) is lifted to 2⁻²⁶, so
    |ε| ≤ √(52 ln 2) ≈ 6.004 instead of ∞; the largest (U₁ → 1) gives ε → 0."""
    class Words:
        def __init__(self, word):
            self.word = word

        def random_raw(self, n):
            return np.full(2 * n, self.word, dtype=np.int32).view(np.uint64)[:n]

    bound = math.sqrt(52 * math.log(2))
    for word, expect in [(-(1 << 31), bound), ((1 << 31) - 1, 0.0)]:
        stream = NormalStream(torch.Generator().manual_seed(0))
        stream.words = Words(word)
        z = stream.fill_(torch.empty(8))
        assert torch.isfinite(z).all() and z.abs().max() <= bound + 1e-5
        assert abs(float(z.abs().max()) - expect) < 1e-3, (word, z)


def test_learned_schedule_loads_checkpoints_that_held_scalar_endpoints():
    """Checkpoints written before γ_0 and the gap became one-element tensors still load."""
    old = Learned(-2.0, 5.0)
    sd = {k: (v[0].clone() if k in ("gamma_0", "raw_gap") else v) for k, v in old.state_dict().items()}
    assert sd["gamma_0"].dim() == 0
    new = Learned()
    new.load_state_dict(sd)
    assert [float(v.detach()) for v in new.endpoints()] == pytest.approx([-2.0, 5.0], abs=1e-6)
