"""What a continuous "≤" bounds, and how its t is drawn (methods/_vlb.py, methods/continuous.py,
the protocol's ``eval.bound_steps`` / ``eval.t_proposal``), against closed forms.

The linear world. V = 4 tokens, L = 2, d = 5, embeddings E_v = c·b_v (b_v orthonormal), so every
‖e‖² = c² = d·v with v = c²/d; in place of the network the linear predictor x̂(z_t; t) = k_t z_t,
k_t = α_t v/(α_t² v + σ_t²) (the Bayes predictor of e ~ N(0, v I), applied here to a fixed e).
For a fixed e with ‖e‖² = d·v, z_t = α_t e + σ_t ε,

    f(t) = E_ε‖e − k_t z_t‖² = d·v(1 − k_t α_t)² + d·k_t² σ_t² = d·v / (1 + v·SNR(t))   (=: m(SNR(t)))

so both diffusion terms have closed forms per token (SNR(t) = e^{−γ(t)}, γ the method's schedule):

    L_∞ = ∫ ½γ′e^{−γ} f dt = ∫_{SNR(1)}^{SNR(0)} ½ m(x) dx = ½ d log((1 + v·SNR(0)) / (1 + v·SNR(1)))  (VDM eq. 17)
    L_T = Σ_{i=1..T} ½ (SNR(s_i) − SNR(t_i)) m(SNR(t_i)),  t_i = i/T, s_i = (i − 1)/T                (VDM eq. 13)

m decreases in SNR, so each cell's term ½ΔSNR_i·m(SNR(t_i)) exceeds its part of the integral by at
most ½ΔSNR_i·(m(SNR(t_i)) − m(SNR(s_i))): L_∞ ≤ L_T ≤ L_∞ + Σ_i ½ΔSNR_i·(m(SNR(t_i)) − m(SNR(s_i))),
and once the grid resolves the schedule (ΔSNR_i ≈ |dSNR/dt|/T) the excess is C/T + o(1/T). The prior term
is closed form (torch.distributions' Gaussian KL); the decoder term E_{z_0|w}[−log softmax(z_0 Eᵀ)_w]
(Diffusion-LM's tied decoder; PLAID's stand-in network uses the same one at t = 0) is float64 Monte
Carlo over REF_DRAWS draws. Everything else is the methods' own ``nll``.

Tolerances: an estimate is the mean of n one-draw estimates of the real ``nll`` at iid u ~ U[0, 1)
(not the harness's draws, clamped to [1e-6, 1 − 1e-6], whose uniform-t form leaves out
∫_0^{1e-6} ½γ′e^{−γ} f dt ≈ 0.013 nats per token here); its s.e. is their sd/√n. A check passes when
|estimate − reference| ≤ 4 s.e. (the reference's s.e. in quadrature; a false failure has
probability 6e-5 under normality) — the float32 rounding of the tied decoder's logits (magnitude
c² = 16, ulp 2e-6) is far below it. Every difference a mutant would make (T ignored, the proposal's
weight off, the discrete weights of the uniform form) is checked to exceed 8 s.e.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import specs_of, tiny_suite, write_suite

from bench.config import BackboneConfig, EvalConfig, Protocol, short_hash
from methods import _vlb
from methods._gaussian import SCHEDULES, Learned
from methods.continuous import PLAID, DiffusionLM

V, L, D, C = 4, 2, 5, 4.0
VAR = C * C / D
BB = BackboneConfig(layers=1, hidden=8, heads=1, cond_dim=8)
REF_DRAWS = 400_000


def gain(schedule, t):
    """k_t = α_t v/(α_t² v + σ_t²), (B, 1, 1)."""
    a, s = schedule.alpha_sigma(t)
    return (a * VAR / (a * a * VAR + s * s)).reshape(-1, 1, 1)


def linear_model(name):
    torch.manual_seed(0)
    if name == "diffusion-lm":
        m = DiffusionLM(DiffusionLM.Params(embed_dim=D, self_condition=False), BB, V, L)
        m.predict_x0 = lambda z, t, x_sc: gain(m.schedule, t) * z
    else:   # PLAID's readout in the linear world: x̂ = k_t z_t and, with targets, the tied decoder's
        # −log softmax(z Eᵀ)[target] (at t = 0 PLAID's reconstruction term); rows C·e_v, not unit
        m = PLAID(PLAID.Params(embed_dim=D, self_condition=False, unit_embeddings=False), BB, V, L)

        def readout(z, t, x_sc, targets=None):
            x_hat = gain(m.schedule, t) * z
            if targets is None:
                return x_hat
            return x_hat, -torch.log_softmax(z @ m.embedding.weight.t(), -1).gather(-1, targets[..., None])[..., 0]
        m.readout = readout
    with torch.no_grad():
        m.embedding.weight.zero_()
        m.embedding.weight[:, :V] = C * torch.eye(V)
    return m.eval()


def snr_at(m, t) -> torch.Tensor:
    """SNR(t) = e^{−γ(t)} of the method's schedule, γ evaluated in float64."""
    with torch.no_grad():
        return torch.exp(-m.schedule.gamma(torch.as_tensor(t, dtype=torch.float64)).double())


def closed_form(m, T=None) -> float:
    """L_∞ or L_T per token (module docstring), float64."""
    mm = lambda x: D * VAR / (1 + VAR * x)  # noqa: E731
    if T is None:
        s0, s1 = snr_at(m, [0.0, 1.0])
        return float(0.5 * D * torch.log((1 + VAR * s0) / (1 + VAR * s1)))
    snr = snr_at(m, torch.arange(T + 1, dtype=torch.float64) / T)
    return float((0.5 * (snr[:-1] - snr[1:]) * mm(snr[1:])).sum())


def prior_and_decoder(m, w, seed=1):
    """(prior + decoder term of sequence w, its s.e.): the prior by torch.distributions, the
    decoder term E_{z_0 | w}[−log softmax(z_0 Eᵀ)_w] by float64 Monte Carlo."""
    E = m.embedding.weight.detach().double()
    with torch.no_grad():
        g0, g1 = (float(v) for v in m.endpoints(E))
    a0, s0 = math.sqrt(1 / (1 + math.exp(g0))), math.sqrt(1 / (1 + math.exp(-g0)))
    a1, s1 = math.sqrt(1 / (1 + math.exp(g1))), math.sqrt(1 / (1 + math.exp(-g1)))
    e = E[w]
    prior = torch.distributions.kl_divergence(torch.distributions.Normal(a1 * e, s1),
                                              torch.distributions.Normal(0.0, 1.0)).sum().item()
    z0 = a0 * e + s0 * torch.randn(REF_DRAWS, L, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rec = -torch.log_softmax(z0 @ E.t(), -1).gather(-1, w[None, :, None].expand(REF_DRAWS, L, 1))[..., 0].sum(1)
    return prior + rec.mean().item(), rec.std().item() / math.sqrt(REF_DRAWS)


def estimate(m, w, T, proposal, n, seed=0):
    """Mean and s.e. of the real ``nll`` of sequence w over n iid draws u ~ U[0, 1)."""
    m.use_protocol(SimpleNamespace(bound_steps=T, t_proposal=proposal, t_samples=1, t_sampling="iid"))
    torch.manual_seed(seed)
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    x = w[None].repeat(n, 1)
    with torch.no_grad():
        est = m.nll(x, torch.ones_like(x, dtype=torch.bool), u).double()
    return est.mean().item(), est.std().item() / math.sqrt(n)


W = torch.tensor([1, 3])


def test_closed_forms_decrease_to_the_continuous_time_bound():
    """L_T decreases along T = 1, 2, 4, …, 2¹⁸, stays above L_∞ and within the cells' variation
    bound (module docstring), and converges to L_∞: in the 1/T regime each doubling of T halves
    L_T − L_∞ (ratio in [1.9, 2.1] from T = 2¹⁶ for Diffusion-LM, whose sqrt schedule's offset
    s = 10⁻⁴ is resolved only for T ≫ 1/s; from T = 2⁸ for PLAID's smooth learned γ)."""
    mm = lambda x: D * VAR / (1 + VAR * x)  # noqa: E731
    for name, settled in (("diffusion-lm", 16), ("plaid", 8)):
        m = linear_model(name)
        inf = closed_form(m)
        Ts = [2 ** k for k in range(19)]
        LT = [closed_form(m, T) for T in Ts]
        assert all(a > b for a, b in zip(LT, LT[1:])) and LT[-1] > inf, (name, LT, inf)
        for T, lt in zip(Ts, LT):
            snr = snr_at(m, torch.arange(T + 1, dtype=torch.float64) / T)
            assert lt - inf <= float((0.5 * (snr[:-1] - snr[1:]) * (mm(snr[1:]) - mm(snr[:-1]))).sum()) + 1e-9
        excess = [lt - inf for lt in LT[settled:]]
        ratios = [a / b for a, b in zip(excess, excess[1:])]
        assert all(1.9 <= r <= 2.1 for r in ratios), (name, ratios)


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
@pytest.mark.parametrize("proposal", ["uniform", "weight", "log-snr", "mixture", "adaptive"])
def test_estimates_are_the_closed_form_bounds(name, proposal):
    """The real ``nll`` at T = ∞ and T = 4, 16 under each t proposal is unbiased for prior +
    decoder + L_T (4 s.e.); the gaps L_4 − L_16 and L_16 − L_∞ each exceed 8 s.e. (so an
    estimator that ignored T could not pass)."""
    m = linear_model(name)
    base, base_se = prior_and_decoder(m, W)
    n = 400_000 if proposal == "uniform" else 100_000
    got = {}
    for T in (None, 4, 16):
        mean, se = estimate(m, W, T, proposal, n, seed=T or 0)
        ref = base + L * closed_form(m, T)
        assert abs(mean - ref) <= 4 * math.hypot(se, base_se), (name, proposal, T, mean, se, ref)
        got[T] = (ref, se)
    power = 8 * max(se for _, se in got.values())
    assert got[4][0] - got[16][0] > power and got[16][0] - got[None][0] > power, (got, power)


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
def test_mixture_proposal_narrows_the_estimate(name):
    """At T = ∞ and equal draws (100,000) the mixture proposal's sd is below the uniform one's for
    both: for Diffusion-LM by far (the sqrt schedule's ½γ′e^{−γ} reaches 2.5e5 at t = 0; measured
    282 against 37 nats), for PLAID by a little (its learned γ runs from −3 to 6, a weight that
    varies 8,000-fold, and uniform t is already near uniform in γ; measured 23.3 against 20.1, a
    gap of ~10 s.e. of an sd estimate of these bounded draws)."""
    m = linear_model(name)
    n = 100_000
    _, se_u = estimate(m, W, None, "uniform", n, seed=5)
    _, se_m = estimate(m, W, None, "mixture", n, seed=5)
    assert se_m < se_u, (name, se_m, se_u)


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
def test_adaptive_proposal_narrows_below_every_fixed_one(name):
    """t_proposal: adaptive (a density fitted to a pilot pass, _vlb.BinnedProposal) gives the
    smallest sd at T = ∞ and equal draws (100,000): in the linear world the term's integrand
    ½e^{−γ}·d·v/(1 + v·SNR) is neither flat in γ (log-snr's best case) nor ∝ e^{−γ} (weight's),
    and the fit follows it. Measured: Diffusion-LM 16.2 against 37.5 (mixture, the best fixed
    one), PLAID 13.9 against 20.3 (its share q of reconstruction draws is the same in both);
    asserted with a 10% margin, far beyond the ~0.5% s.e. of an sd estimate at these draws."""
    m = linear_model(name)
    n = 100_000
    sd = {p: estimate(m, W, None, p, n, seed=5)[1] for p in ("uniform", "weight", "log-snr", "mixture", "adaptive")}
    assert sd["adaptive"] < 0.9 * min(v for p, v in sd.items() if p != "adaptive"), (name, sd)


def _masses(B, seed=3):
    """Uneven bin masses, a factor ~30 apart, in a fixed random order."""
    g = torch.Generator().manual_seed(seed)
    return torch.linspace(1.0, 3.0, B, dtype=torch.float64)[torch.randperm(B, generator=g)] ** 3


@pytest.mark.parametrize("T", [None, 3])
def test_binned_proposal_weights_are_exact(T):
    """For a BinnedProposal with uneven masses on the sqrt schedule, v ↦ (t, w) (diffusion_draw)
    reproduces the weighted integral whatever the masses: the mean of w·h(t) over v on a midpoint
    grid of 10⁶ points equals ∫½γ′e^{−γ}h dt, for h = γ(t) (T = ∞; in γ: ½[e^{−γ}(γ + 1)] from γ(1)
    to γ(0), γ clamped at 13 by the schedule) and for h = t with T = 3 (Σ_i ½ΔSNR_i·t_i). The
    midpoint rule's error is O(1/n) at each of the ≤ 32 jumps of w and O(1/n²) elsewhere, so
    rtol 10⁻⁴; a weight or draw that disagreed with the density by one bin's mass would be off by
    percent."""
    s = SCHEDULES["sqrt"]()
    gam = lambda x: s.gamma(torch.as_tensor(x, dtype=torch.float64)).double()  # noqa: E731
    g0, g1 = gam(0.0), gam(1.0)
    prop = _vlb.BinnedProposal(g0, g1, _masses(_vlb.ADAPTIVE_BINS))
    n = 1_000_000
    v = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t, w = _vlb.diffusion_draw(s, v, prop, T)
    if T is None:
        got = float((w * gam(t)).mean())
        ref = float(0.5 * (torch.exp(-g0) * (g0 + 1) - torch.exp(-g1) * (g1 + 1)))
    else:
        got = float((w * t).mean())
        snr = torch.exp(-gam(torch.arange(T + 1, dtype=torch.float64) / T))
        ref = float((0.5 * (snr[:-1] - snr[1:]) * torch.arange(1, T + 1) / T).sum())
    assert math.isclose(got, ref, rel_tol=1e-4), (got, ref)


def test_binned_fit_minimises_the_variance():
    """BinnedProposal.fit (no floor) on a noise-free pilot of a known error m(γ) = 1 + tanh(γ)
    (4,000 pilot draws per bin) gives the masses of least variance among proposals of its form:
    the variance of one draw, ∫½e^{−γ}m²·w dγ − (∫½e^{−γ}m dγ)² (w = ½e^{−γ}/p, by quadrature on
    10⁵ points), rises under each of 20 random perturbations of the masses by e^{0.2ξ} (a
    second-order rise of ~1%, against the pilot's first-order error of ~0.1%), and is below the
    weight density's (equal multipliers)."""
    s = SCHEDULES["learned"]()
    g0, g1 = (g.reshape(()).double() for g in s.endpoints())
    B = _vlb.ADAPTIVE_BINS
    m = lambda g: 1 + torch.tanh(g)  # noqa: E731
    pilot = _vlb.BinnedProposal.pilot_gammas(g0, g1, B * 4000, generator=torch.Generator().manual_seed(0))
    fitted = _vlb.BinnedProposal.fit(g0, g1, pilot, m(pilot), floor=0.0)
    grid = torch.linspace(float(g0), float(g1), 100_001, dtype=torch.float64)[:-1] + (g1 - g0) / 200_000
    dg = float(g1 - g0) / 100_000
    integral = float((0.5 * torch.exp(-grid) * m(grid)).sum() * dg)

    def variance(prop):
        return float((0.5 * torch.exp(-grid) * m(grid) ** 2 * prop.weight(grid)).sum() * dg) - integral ** 2

    best = variance(fitted)
    gen = torch.Generator().manual_seed(1)
    worse = [variance(_vlb.BinnedProposal(g0, g1, fitted.mass * torch.exp(0.2 * torch.randn(B, generator=gen,
                                                                                           dtype=torch.float64))))
             for _ in range(20)]
    assert min(worse) > best, (best, sorted(worse)[:3])
    assert variance(_vlb.BinnedProposal(g0, g1, fitted.Z)) > best


def test_binned_fit_is_defensive():
    """Whatever the pilot saw, the fit keeps ADAPTIVE_FLOOR of its mass on the weight's own
    density, so every importance weight is at most ½(SNR(0) − SNR(1))/ADAPTIVE_FLOOR (here a pilot
    that saw error in one bin only, which would leave the others with no mass); and with a flat
    error (the same in every bin) it is the weight density itself, the zero-variance proposal of a
    flat integrand (every weight ½(SNR(0) − SNR(1)))."""
    g0, g1 = torch.tensor(-3.0, dtype=torch.float64), torch.tensor(6.0, dtype=torch.float64)
    B = _vlb.ADAPTIVE_BINS
    pilot = _vlb.BinnedProposal.pilot_gammas(g0, g1, 4 * B, generator=torch.Generator().manual_seed(0))
    full = 0.5 * float(torch.exp(-g0) - torch.exp(-g1))
    grid = torch.linspace(-3.0, 6.0, 10_001, dtype=torch.float64)
    one = _vlb.BinnedProposal(g0, g1, torch.ones(B))
    lonely = _vlb.BinnedProposal.fit(g0, g1, pilot, (one.bin_of(pilot) == 5).double())
    assert float(lonely.weight(grid).max()) <= full / _vlb.ADAPTIVE_FLOOR * (1 + 1e-9)
    flat = _vlb.BinnedProposal.fit(g0, g1, pilot, torch.full_like(pilot, 7.0))
    assert torch.allclose(flat.weight(grid), torch.full_like(grid, full), rtol=1e-9)


def test_plaid_adaptive_gives_the_reconstruction_one_stratum():
    """Under t_proposal: adaptive and stratified draws (K = 8: two replicates of S = 4 strata),
    PLAID's evaluation share is q = 1/S, so through bench.evaluate.per_sequence_nll every
    replicate of every block has exactly one reconstruction draw (t = 0), its first stratum — no
    draw of the first stratum is left to a coin between the two terms (the coin that makes most of
    a trained PLAID's interval at q = 1/8; docs/performance.md) — and the estimate is still the
    closed-form bound (4 s.e., the interval's own). The pilot leaves torch's RNG state as it was."""
    from bench.evaluate import per_sequence_nll, summarize

    m = linear_model("plaid")
    prot = Protocol(tokenizer="x", seq_len=L, packing="none", counted="all", t_samples=8, t_sampling="stratified",
                    t_min=0.0, confidence=0.95, max_blocks=None, t_proposal="adaptive")
    readout, seen = m.readout, []

    def spy(z, t, x_sc, targets=None):
        seen.append(t.detach().clone())
        return readout(z, t, x_sc, targets)
    m.readout = spy
    N = 20_000
    x, c = W[None].repeat(N, 1).numpy(), torch.ones(N, L, dtype=torch.bool).numpy()
    nll, ntok = per_sequence_nll(m, x, c, prot, N, 0, "cpu")
    at_zero = torch.stack(seen[-8:], 1) == 0                    # (N, K): the K main draws, after the pilot
    assert at_zero[:, [0, 4]].all() and not at_zero[:, [1, 2, 3, 5, 6, 7]].any()
    base, base_se = prior_and_decoder(m, W)
    s = summarize(nll, ntok, 0.95, False, "stratified")
    assert abs(s["nll_per_token"] * L - (base + L * closed_form(m))) <= 4 * math.hypot(s["se_nll_per_token"] * L,
                                                                                         base_se)
    m.use_protocol(prot)
    state = torch.get_rng_state()
    m.pilot(torch.as_tensor(x[:8]), torch.as_tensor(c[:8]))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("schedule", ["sqrt", "cosine", "tan-d", "learned"])
def test_t_of_gamma_inverts_the_schedule(schedule):
    """Schedule.t_of_gamma is γ's inverse on the unclamped range (closed forms; bisection for the
    learned one): t → γ(t) → t to 1e-5 (γ in float32: a relative 1e-7 of γ moves t by ≤ 1e-5 where
    γ′ ≥ 0.1·|γ|, everywhere on these grids)."""
    s = SCHEDULES[schedule]()
    if isinstance(s, Learned):
        with torch.no_grad():
            s.a.copy_(torch.tensor([0.5, -1.0, 1.0, 0.0]))      # a curved h̃, not the near-linear init
    t = torch.linspace(0.02, 0.98, 49)
    with torch.no_grad():
        g = s.gamma(t)
        inside = (g > -13) & (g < 13)
        back = s.t_of_gamma(g.double())
    assert inside.sum() > 30 and torch.allclose(back[inside].float(), t[inside], atol=1e-5), (back - t).abs().max()


@pytest.mark.parametrize("proposal", ["weight", "log-snr"])
@pytest.mark.parametrize("T", [None, 3])
def test_proposals_draw_t_with_their_distribution(proposal, T):
    """u ↦ t has the proposal's CDF, F(t) = (SNR(0) − SNR(t)) / (SNR(0) − SNR(1)) for weight and
    (γ(t) − γ(0)) / (γ(1) − γ(0)) for log-snr (sqrt schedule; with T = 3 the cells' probabilities
    F(t_i) − F(s_i)): on a grid of u the drawn t's F must equal u, or cell i
    must contain u; and weight's importance weight is the constant ½(SNR(0) − SNR(1)). In float64
    (u's dtype sets t's), to 1e-6: a float32 t resolves γ near t = 1 only to ~10⁻² (γ′ ~ 10⁵ there)."""
    s = SCHEDULES["sqrt"]()
    u = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    t, w = _vlb.diffusion_draw(s, u, proposal, T)
    gam = lambda x: s.gamma(torch.as_tensor(x, dtype=torch.float64))  # noqa: E731
    g0, g1 = gam(0.0), gam(1.0)
    if proposal == "weight":
        F = lambda x: (torch.exp(-g0) - torch.exp(-gam(x))) / (torch.exp(-g0) - torch.exp(-g1))  # noqa: E731
        assert torch.allclose(w.double(), 0.5 * (torch.exp(-g0) - torch.exp(-g1)).expand(len(u)), rtol=1e-5)
    else:
        F = lambda x: (gam(x) - g0) / (g1 - g0)  # noqa: E731
    if T is None:
        assert torch.allclose(F(t), u, atol=1e-6), (F(t) - u).abs().max()
    else:
        assert ((F(t - 1 / T) <= u + 1e-6) & (u <= F(t) + 1e-6)).all()
        assert set(torch.unique(t * T).round().tolist()) == {1, 2, 3}


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
@pytest.mark.parametrize("sc", [False, True])
def test_bounds_say_which_model(name, sc):
    """The recorded ``bounds`` names the predictor (two-pass when self-conditioned), that it is
    unclamped, the decoder, T (∞ or the protocol's bound_steps) and the sampler that draws from
    it with its budget; before this change every row said "the sampled model's NLL"."""
    cls = DiffusionLM if name == "diffusion-lm" else PLAID
    m = cls(cls.Params(self_condition=sc), BB, 20, 8)
    text = m.bounds()
    assert "T = ∞" in text and "unclamped" in text and "sampler: bounded" in text
    assert ("f(z_t, t, f(z_t, t, 0))" in text) == sc and m.decoder in text
    m.use_protocol(SimpleNamespace(bound_steps=16, t_proposal="uniform"))
    text = m.bounds()
    calls = (2 if sc else 1) * (16 + (name == "plaid"))
    assert "T = 16 ancestral steps" in text and f"step budget of {calls}" in text
    assert _vlb.bounded_steps(calls, sc, name == "plaid") == 16


def test_protocol_ids_and_run_ids_stay_without_the_settings():
    """At their defaults the settings leave the protocol id (a hash of its dump without them) and
    the eval dump (so every run id) as before; set, they change the id and are recorded."""
    e = EvalConfig()
    assert "bound_steps" not in e.model_dump() and "t_proposal" not in e.model_dump()
    p = Protocol(tokenizer="bpe", seq_len=8, packing="none", counted="all", t_samples=8, t_sampling="stratified",
                 t_min=0.0, confidence=0.95, max_blocks=4)
    old = short_hash(p.model_dump(exclude={"preset", "bound_steps", "t_proposal"}))[:8]
    assert p.id == old
    assert old != p.model_copy(update={"bound_steps": 64}).id != p.model_copy(update={"t_proposal": "weight"}).id != old
    assert EvalConfig(bound_steps=64, t_proposal="weight").model_dump()["bound_steps"] == 64
    with pytest.raises(ValueError, match="t_min"):
        EvalConfig(t_min=0.1, t_proposal="weight")


def test_a_suite_cannot_claim_an_estimator_a_method_does_not_use(tmp_path):
    """eval.t_proposal / bound_steps with a bound method that does not read them (MDLM) is a
    one-line error naming the field, exit code 2; with Diffusion-LM and the exact AR baseline the
    suite expands, and the specs' protocol records the settings."""
    from bench.cli import main

    bad = tiny_suite(methods=[{"method": "mdlm"}], eval={"t_samples": 2, "t_proposal": "weight"})
    assert main(["run", str(write_suite(tmp_path / "bad.yaml", bad)), "--dry-run"]) == 2
    specs = specs_of(tiny_suite(methods=[{"method": "diffusion-lm"}],
                                eval={"t_samples": 2, "bound_steps": 8, "t_proposal": "weight"}), tmp_path)
    assert {s.protocol().bound_steps for s in specs} == {8} and {s.protocol().t_proposal for s in specs} == {"weight"}


def test_rows_record_what_they_bound_and_samples_what_they_drew(tmp_path):
    """Through the real harness (bench.runner.evaluate_all, the record, the index, the
    leaderboard, bench.samples.draw): a Diffusion-LM row under eval.bound_steps records the
    T-step bound text and the protocol settings, its table shows that text in a note under the
    "≤", and its bounded samples record T, the end at t = 0 and the decoder's draw."""
    from bench import leaderboard
    from bench.records import write_record
    from bench.runner import build_method, evaluate_all, record_header
    from bench.samples import draw

    suite = tiny_suite(methods=[{"method": "diffusion-lm", "sampler": "bounded"}], baseline=None,
                       eval={"t_samples": 2, "max_blocks": 2, "batch_size": 2, "bound_steps": 8,
                             "t_proposal": "weight", "samples": 2, "sample_steps": [8]})
    spec = specs_of(suite, tmp_path)[0]
    torch.manual_seed(0)
    method = build_method(spec, 512)
    with torch.no_grad():   # untrained (x̂0 = 0): ½(SNR(0) − SNR(1))·‖e‖² ≈ 800 nats per token at N(0, 1)
        method.embedding.weight.mul_(0.1)       # embeddings, beyond exp()'s range; ≈ 8 at a tenth
    metrics, _ = evaluate_all(method, spec, "cpu", lambda *_: None)
    assert metrics[0]["bound"] is True and "T = 8 ancestral steps" in metrics[0]["bounds"]
    rec = {**record_header(spec), "status": "complete", "metrics": metrics, "reference": [], "train": {}}
    assert rec["protocol"]["bound_steps"] == 8 and rec["protocol"]["t_proposal"] == "weight"
    (tmp_path / "out" / "runs" / spec.run_id).mkdir(parents=True)
    write_record(tmp_path / "out" / "runs" / spec.run_id / "result.json", rec)
    md = "\n".join(leaderboard.md_table(tb) for tb in leaderboard.board(tmp_path / "out").tables)
    assert f"- ≤ {spec.label}: NLL of the model" in md and "T = 8 ancestral steps" in md, md
    lines = draw(method, spec, type("Tok", (), {"decode": staticmethod(lambda ids: "")})(), 8, 2)
    assert lines[0]["sampler"] == {"name": "bounded", "T": 8, "ends": "t = 0",
                                   "word": "drawn from the bounded decoder at z_0", "bounded_by": "eval.bound_steps: 8"}
    assert lines[0]["nfe"] <= 8


def test_every_nll_estimate_uses_the_protocols_estimator():
    """bench.evaluate.per_sequence_nll (the final evaluation and the learning-curve probe alike)
    hands the protocol to the method first: on the linear world its per-block estimates are those
    of ``nll`` under eval.bound_steps = 4 at the same draws and seeds, which differ from T = ∞'s."""
    from bench.evaluate import draw_u, per_sequence_nll

    m = linear_model("diffusion-lm")
    prot = Protocol(tokenizer="x", seq_len=L, packing="none", counted="all", t_samples=4, t_sampling="stratified",
                    t_min=0.0, confidence=0.95, max_blocks=None, bound_steps=4, t_proposal="uniform")
    x, c = W[None].repeat(3, 1), torch.ones(3, L, dtype=torch.bool)
    got, _ = per_sequence_nll(m, x.numpy(), c.numpy(), prot, 3, 0, "cpu")
    at_inf, _ = per_sequence_nll(m, x.numpy(), c.numpy(), prot.model_copy(update={"bound_steps": None}), 3, 0, "cpu")
    m.use_protocol(prot)
    u = draw_u(3, 4, "stratified", torch.Generator().manual_seed(0))
    want = torch.empty(3, 4, dtype=torch.float64)
    for k in range(4):
        torch.manual_seed(k)                   # per_sequence_nll's noise seed of batch 0, draw k
        with torch.no_grad():
            want[:, k] = m.nll(x, c, u[:, k]).double()
    got, at_inf = torch.as_tensor(got), torch.as_tensor(at_inf)
    assert torch.allclose(got, want) and not torch.allclose(got, at_inf)


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
@pytest.mark.parametrize("sc", [False, True])
def test_bounded_sampler_runs_the_bounds_predictor_to_t0_then_the_decoder(name, sc):
    """``sampler: bounded`` in a budget of 12 calls: T = bounded_steps(12) steps of the bound's own
    predictor (two calls per step when self-conditioned, the first without a condition), at
    t = T/T … 1/T, then the decoder at t = 0 (PLAID: the network, self-conditioned the same way;
    Diffusion-LM: the tied head, no call); within the budget; clamp is refused with it."""
    cls = DiffusionLM if name == "diffusion-lm" else PLAID
    extra = {"condition": "t"} if name == "plaid" else {}   # so that the network's t is t, not γ(t)
    m = cls(cls.Params(self_condition=sc, sampler="bounded", **extra), BB, 20, 8).eval()
    assert m.p.clamp is False
    with pytest.raises(ValueError, match="clamp"):
        cls.Params(sampler="bounded", clamp=True)
    seen = []
    m.net.register_forward_pre_hook(lambda mod, a, kw: seen.append((float(kw["t"][0]), kw.get("self_cond") is None)),
                                    with_kwargs=True)
    out = m.sample(3, 12, torch.Generator().manual_seed(0))
    T = _vlb.bounded_steps(12, sc, name == "plaid")
    per = 2 if sc else 1
    want = [(i / T, first) for i in range(T, 0, -1) for first in ([True, False] if sc else [True])]
    if name == "plaid":
        want += [(0.0, True), (0.0, False)] if sc else [(0.0, True)]
    assert [(round(t, 6), f) for t, f in seen] == [(round(t, 6), f) for t, f in want], seen
    assert len(seen) <= 12 and T == 12 // per - (name == "plaid")
    assert out.shape == (3, 8) and out.dtype == torch.long and int(out.max()) < 20


def test_bounded_sampler_reaches_t0_with_the_ancestral_posterior():
    """For Gaussian data e ~ N(0, v) per coordinate and its Bayes predictor k_t z_t, each
    ancestral step z_s = a z_t + b x̂ + σ_q ξ (q(z_s | z_t, x̂)) is linear, so Var(z_0) follows the
    recursion Var_s = (a + b k_t)² Var_t + σ_q² from Var(z_1) = 1 down to t = 0 (the sqrt schedule,
    T = 5). The sampler's z_0 over 200,000 coordinates matches it to 4 s.e. (s.e. of a Gaussian
    variance: Var·√(2/n)); stopping at t = 1/T, as the ddpm sampler does, gives a different variance."""
    s = SCHEDULES["sqrt"]()
    T, n = 5, 200_000
    k = lambda t: gain(s, t).reshape(-1)  # noqa: E731
    z1 = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    z0 = _vlb.ancestral_to_zero(lambda z, t: k(t)[:, None] * z, z1, s, T, torch.Generator().manual_seed(1))
    var = 1.0
    for i in range(T, 0, -1):
        g_t, g_s = s.gamma(torch.tensor([i / T])).double(), s.gamma(torch.tensor([(i - 1) / T])).double()
        c = -torch.expm1(g_s - g_t)
        a_t, a_s = torch.sigmoid(-g_t).sqrt(), torch.sigmoid(-g_s).sqrt()
        a, b = (a_s / a_t) * (1 - c), a_s * c
        var_before = var
        var = float((a + b * k(torch.tensor([i / T])).double()) ** 2 * var + torch.sigmoid(g_s) * c)
    se = var * math.sqrt(2 / n)
    assert abs(z0.double().var().item() - var) <= 4 * se, (z0.var().item(), var, se)
    assert abs(var_before - var) > 8 * se


def test_decoder_draw_follows_the_softmax_in_row_blocks():
    """decoder_draw(h, W) draws w ~ softmax(h Wᵀ), a block of rows at a time: with 64-row blocks
    over 60,000 rows of one h, each token's frequency is its probability to 4 binomial s.e."""
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]])
    h = torch.tensor([0.7, -0.2]).repeat(60_000, 1)
    w = _vlb.decoder_draw(h, W, None, torch.Generator().manual_seed(0), block_bytes=64 * 8 * 3)
    p = torch.softmax(h[0] @ W.t(), -1).double()
    freq = torch.bincount(w, minlength=3).double() / len(w)
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / len(w)).sqrt()).all(), (freq, p)
