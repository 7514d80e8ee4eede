"""PLAID's parameterisation (methods/_plaid.py, PLAID in methods/continuous.py) against the
reference igul222/plaid: each property below is what one of its choices is for, checked against
a computation by hand (float64, torch.distributions), not against the method's own helpers.

- unit-norm rows of E (lib/models.py:91–98) — they stay unit through training;
- the logit bias (α/σ²)·z_t·Eᵀ (lib/models.py:194–209) — with unit rows it makes a network with
  zero logits (PLAID's zero-initialised head) read out the exact posterior of one position under
  a uniform token prior: x̂0 = E[e | z_t] and, at t = 0, −log q(w | z_0) as decoder;
- input rescaling (lib/models.py:169–177) — the network reads z_t/√(α²/d + σ²), of unit second
  moment per coordinate at every t, and x̃0·√d;
- conditioning on γ (lib/models.py:179–183) — x̂0 depends on t only through γ(t);
- float64 sampling (sample.py:44–47) — the DDIM chain's telescoping product is exact to 1e-9;
- decoding (sample.py:176–183) — a sample is the argmax of the logits at (z_0, t = 0), in
  ``steps`` network calls.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from bench.config import BackboneConfig
from methods import _plaid
from methods._gaussian import ddim_step
from methods.continuous import PLAID

CFG = BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16)
V, L, D = 20, 8, 16


def _make(**kw):
    torch.manual_seed(0)
    return PLAID(PLAID.Params(**kw), CFG, V, L)


def _randomise(m, std=0.1):
    """Every weight away from its zero initialisation (adaLN, head), so that the condition and
    the network's logits matter."""
    with torch.no_grad():
        for name, p in m.net.named_parameters():
            torch.nn.init.normal_(p, std=std)


def _alpha_sigma(gamma):
    """(α, σ) = (√sigmoid(−γ), √sigmoid(γ)) in float64, by hand."""
    g = torch.as_tensor(gamma, dtype=torch.float64)
    return torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()


def _log_posterior(z, E, alpha, sigma):
    """log q(v | z) ∝ log N(z; α e_v, σ² I) under a uniform prior over v, (…, V), float64."""
    logp = Normal(alpha * E.double(), sigma).log_prob(z.double()[..., None, :]).sum(-1)
    return torch.log_softmax(logp, -1)


def test_embedding_rows_stay_unit_length_through_training():
    """Three AdamW steps at lr 0.1 move the trained matrix; every row of E that the forward
    process, x̂0 and the logit bias read stays of length 1 (float32: 1e-6)."""
    m = _make()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    x, c = torch.randint(0, V, (4, L)), torch.ones(4, L, dtype=torch.bool)
    before = m.embedding.weight.detach().clone()
    for i in range(3):
        torch.manual_seed(i)
        opt.zero_grad()
        m.loss(x, c, torch.rand(4)).backward()
        opt.step()
    E = m.embedding.weight.detach()
    assert (E - before).abs().max() > 1e-2                      # it did train
    assert (E.norm(dim=1) - 1).abs().max() < 1e-6, E.norm(dim=1)
    assert torch.equal(m.embedding(x).detach(), E[x])


@pytest.mark.parametrize("t", [0.0, 0.4, 1.0])
@torch.no_grad()
def test_zero_network_reads_out_the_posterior_mean_of_a_uniform_token_prior(t):
    """The head starts at zero, so the network's own logits are 0 and the logits are the bias
    (α/σ²)·z_t·Eᵀ alone. With unit rows that is log N(z_t; α e_v, σ² I) up to a constant in v,
    so x̂0 = Σ_v q(v | z_t) e_v exactly (reference: torch's Normal log-density, float64). The
    logits reach ≈ 20 at t = 0 (α/σ² = 20.6 at γ_0 = −3); their float32 rounding (≤ 2e-6 each)
    moves x̂0 by ≤ 1e-5: tolerance 1e-5. Without the bias x̂0 is the plain mean row."""
    m = _make(self_condition=False)
    E = m.embedding.weight.detach()
    gamma = float(m.gamma(torch.tensor([t])))
    a, s = _alpha_sigma(gamma)
    w = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(1))
    z = (a * E.double()[w] + s * torch.randn(3, L, D, generator=torch.Generator().manual_seed(2),
                                             dtype=torch.float64)).float()
    tt = torch.full((3,), t)
    want = _log_posterior(z, E, a, s).exp() @ E.double()
    got = m.predict_x0(z, tt, None).double()
    assert (got - want).abs().max() < 1e-5, (got - want).abs().max()
    off = PLAID(PLAID.Params(self_condition=False, logit_bias=False), CFG, V, L)
    off.embedding.load_state_dict(m.embedding.state_dict())
    flat = off.predict_x0(z, tt, None).double()
    assert torch.allclose(flat, E.double().mean(0).expand_as(flat), atol=1e-6)


@torch.no_grad()
def test_zero_network_decoder_at_t0_is_the_gaussian_posterior():
    """The reconstruction rows (u < q) of the bound are prior + (1/q)·(−log p(w | z_0)); with the
    zero head p(w | z_0) = q(w | z_0) of a uniform token prior. Reference by hand: z_0 = α_0 e +
    σ_0 ε with the same ε (same seed), the prior KL by torch.distributions, the posterior by
    Normal densities, all float64. Float32 logits ≤ 30: ≤ 4e-6 per token, times 1/q = 8: 1e-4."""
    m = _make(self_condition=False)
    q, E = m.p.reconstruction_share, m.embedding.weight.detach()
    w, c = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(1)), torch.ones(3, L, dtype=torch.bool)
    torch.manual_seed(0)
    got = m.elbo_terms(w, c, torch.tensor([0.0, q / 3, q * 0.9]), train=False)
    torch.manual_seed(0)
    eps = torch.randn(3, L, D)
    g0, g1 = (float(v) for v in m.schedule.endpoints())
    a0, s0 = _alpha_sigma(g0)
    a1, s1 = _alpha_sigma(g1)
    e = E.double()[w]
    z0 = a0 * e + s0 * eps.double()
    rec = -_log_posterior(z0, E, a0, s0).gather(-1, w[..., None])[..., 0]
    prior = torch.distributions.kl_divergence(Normal(a1 * e, s1), Normal(0.0, 1.0)).sum(-1)
    assert rec.mean() < 0.5 * math.log(V)                            # the decoder is informative
    assert (got - (prior + rec / q)).abs().max() < 1e-4, (got - (prior + rec / q)).abs().max()


@torch.no_grad()
def test_network_reads_z_and_x0_rescaled_to_unit_scale():
    """The backbone's input is z_t/√(α_t²/d + σ_t²) and x̃0·√d (rtol 1e-6, float32), and with unit
    rows that input has second moment 1 per coordinate at every t: the mean of its squares over
    B·L·d = 32,768 coordinates is 1 within 4 s.e. (s.e. = sd of the squares/√n ≈ 0.008). With
    ``rescale_input: false`` the backbone reads z_t itself."""
    m = _make()
    seen = []
    m.net.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw), with_kwargs=True)
    E = m.embedding.weight.detach()
    g = torch.Generator().manual_seed(3)
    w = torch.randint(0, V, (256, L), generator=g)
    for t in (0.0, 0.5, 1.0):
        a, s = _alpha_sigma(float(m.gamma(torch.tensor([t]))))
        z = (a * E.double()[w] + s * torch.randn(256, L, D, generator=g, dtype=torch.float64)).float()
        x_sc = torch.randn(256, L, D, generator=g) / math.sqrt(D)
        seen.clear()
        m.predict_x0(z, torch.full((256,), t), x_sc)
        kw = seen[0]
        scale = 1 / math.sqrt(a.item() ** 2 / D + s.item() ** 2)
        assert torch.allclose(kw["embeds"], z * scale, rtol=1e-6, atol=1e-7)
        assert torch.allclose(kw["self_cond"], x_sc * math.sqrt(D), rtol=1e-6, atol=1e-7)
        sq = kw["embeds"].double() ** 2
        assert abs(sq.mean().item() - 1) <= 4 * sq.std().item() / math.sqrt(sq.numel()), (t, sq.mean())
    off = PLAID(PLAID.Params(rescale_input=False), CFG, V, L)
    seen2 = []
    off.net.register_forward_pre_hook(lambda mod, a, kw: seen2.append(kw), with_kwargs=True)
    off.predict_x0(z, torch.full((256,), 1.0), x_sc)
    assert torch.equal(seen2[0]["embeds"], z) and torch.equal(seen2[0]["self_cond"], x_sc)


@torch.no_grad()
def test_x0_depends_on_t_only_through_gamma():
    """Two copies of one network whose schedules share the endpoints but not the shape in t: at
    t_A and t_B with γ_A(t_A) = γ_B(t_B) (bisection in float64) they give the same x̂0 for the
    same z_t — the network sees γ, not t. The float32 t_B meets γ_A(t_A) to γ′·ulp(t)/2 ≲ 3e-7;
    the γ features (highest frequency e⁵ ≈ 148 per unit of γ) move by ≤ 5e-5 radians, and x̂0
    moves less than they do here (a whole change of condition, t_A → t_B under ``condition: t``,
    moves it by ≈ 6e-3): tolerance 1e-4 (measured 2e-7), and the t-conditioned pair must be
    apart by more than 10× that."""
    def pair(**kw):
        a, b = _make(**kw), _make(**kw)
        _randomise(a)
        b.load_state_dict(a.state_dict())
        with torch.no_grad():                      # B's schedule: another shape, the same endpoints
            b.schedule.a.fill_(1.5)
            b.schedule.b.copy_(torch.tensor([0.2, 0.3, 0.35, 0.4]))
        return a, b

    def match(a, b, t_a):
        target = float(a.gamma(torch.tensor([t_a])))
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float(b.gamma(torch.tensor([mid], dtype=torch.float64))) < target else (lo, mid)
        return lo

    z = torch.randn(2, L, D, generator=torch.Generator().manual_seed(4))
    diffs = {}
    for cond in ("gamma", "t"):
        a, b = pair(self_condition=False, condition=cond)
        t_a = 0.3
        t_b = match(a, b, t_a)
        assert abs(t_b - t_a) > 0.05                 # the shapes differ where it is checked
        xa = a.predict_x0(z, torch.full((2,), t_a), None)
        xb = b.predict_x0(z, torch.full((2,), t_b), None)
        diffs[cond] = (xa - xb).abs().max().item()
    assert diffs["gamma"] < 1e-4 and diffs["t"] > 10 * 1e-4, diffs


@pytest.mark.parametrize("dtype,tol,exact", [(torch.float64, 1e-9, True), (torch.float32, 1e-9, False)])
def test_float64_chain_telescopes_over_4096_ddim_steps(dtype, tol, exact):
    """With a constant predictor x̂0 = x, DDIM's steps compose exactly: z_0 = α_0 x + (σ_0/σ_1)
    (z_1 − α_1 x) (each step scales z_t − α_t x by σ_s/σ_t). Over PLAID's 4,096 reference steps
    the float64 chain (``float64_sampling``, sample.py:44–47) meets it to 1e-9 (4,096 steps of a
    few roundings of 1e-16; measured 7e-15); the float32 chain misses by more (measured 3e-6)."""
    m = _make()
    x = torch.randn(2, L, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z1 = torch.randn(2, L, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        z0, _ = _plaid.sample_to_zero(lambda z, t, sc: x.to(z.dtype), z1.to(dtype), m.gamma, 4096, ddim_step)
    g0, g1 = (float(v.detach()) for v in m.schedule.endpoints())
    a0, s0 = _alpha_sigma(g0)
    a1, s1 = _alpha_sigma(g1)
    want = a0 * x + (s0 / s1) * (z1 - a1 * x)
    err = (z0.double() - want).abs().max().item()
    assert (err < tol) == exact, err


@torch.no_grad()
def test_sample_is_the_argmax_of_the_logits_at_z0():
    """``sample(n, steps)``: steps − 1 steps down to z_0, then one call at t = 0 (condition
    γ_0·e⁵/1000) whose logits h Wᵀ + b + (α_0/σ_0²)·z_0·Eᵀ — rebuilt here in float64 from that
    call's hidden states and input — are the argmax behind every sampled token; ``steps`` calls
    in all, every step's z in float64. Argmax ties within float32 rounding (margin < 1e-3) are
    skipped; most are not."""
    m = _make().eval()
    _randomise(m)
    calls, dtypes, predict = [], [], m.predict_x0
    m.net.register_forward_hook(lambda mod, a, kw, out: calls.append((kw, out)), with_kwargs=True)
    m.predict_x0 = lambda z, t, sc: dtypes.append(z.dtype) or predict(z, t, sc)
    s = m.sample(3, 5, torch.Generator().manual_seed(7))
    assert len(calls) == 5 and dtypes == [torch.float64] * 4
    kw, h = calls[-1]
    g0 = float(m.schedule.endpoints()[0])
    a0, s0 = _alpha_sigma(g0)
    assert torch.allclose(kw["t"].double(), torch.full((3,), g0 * math.exp(5) / 1000, dtype=torch.float64), rtol=1e-6)
    z0 = kw["embeds"].double() * math.sqrt(a0.item() ** 2 / D + s0.item() ** 2)
    E, W, b = m.embedding.weight.double(), m.net.head.weight.double(), m.net.head.bias.double()
    logits = h.double() @ W.t() + b + (a0 / s0 ** 2) * z0 @ E.t()
    top2 = logits.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    assert clear.float().mean() > 0.9
    assert torch.equal(s[clear], logits.argmax(-1)[clear])


def test_the_label_names_each_choice_switched_off():
    """A row that is not PLAID's parameterisation says so (docs/methods.md#plaid)."""
    P = PLAID.Params
    assert PLAID.default_label(P()) == "PLAID"
    assert PLAID.default_label(P(self_condition=False)) == "PLAID −SC"
    assert PLAID.default_label(P(unit_embeddings=False, logit_bias=False)) == "PLAID −unit-norm −logit-bias"
    assert PLAID.default_label(P(rescale_input=False, condition="t")) == "PLAID −rescale −γ-cond"
