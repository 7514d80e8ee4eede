"""Conditioning of the diffusion samplers and bounds, checked against exact answers
(bench/condition.py; methods/_discrete.clamp, methods/_gaussian.Replacement).

The source: a Markov chain on V = 3 tokens, L = 5 positions, with strong transitions; its 243
sequences are enumerated, so every conditional is exact. The oracle denoiser returns the exact
log p(x_0^i = v | the unmasked tokens of x_t) at every position.

- Absorbing samplers (MDLM, D3PM absorb, SEDD absorb with both samplers, CSM absorb): with
  positions 0, 2, 4 kept, positions 1 and 3 are independent given them (Markov), so a sampler
  that starts the kept positions unmasked draws each of them from exactly
  p(x_i | x_{i−1}, x_{i+1}) with the oracle, whatever the reveal order — mixed with Uniform(V)
  w.p. α_1 for SEDD's p_base (a position unmasked at t = 1). One-sample χ² per (prefix, position)
  at α = 1e-3, Bonferroni over the four, 10 000 draws per prefix. A sampler that hid the kept
  positions would draw from the unconditional marginal instead.
- MDLM's conditional NELBO with the oracle is tight: for exact conditionals every order of the
  any-order factorisation gives −log p exactly, so the NELBO's expectation is
  −log p(x[~keep] | x[keep]) of the source; checked for a prefix, a suffix and a middle context
  through ``bench.evaluate.conditional_nll`` with 2 000 iid draws each, to 4.5 standard errors
  (the per-sequence se of the draws; two-sided p ≈ 7e-6 per sequence).
- Replacement samplers (D3PM/SEDD/CSM uniform, Diffusion-LM ddpm/ddim/bounded, PLAID ddpm/bounded,
  SSD-LM): at every network call, the kept positions of the state the network reads are a draw
  of the forward process at that call's t — the defining step of the replacement method.
  Discrete: the share of kept positions equal to the given id against ᾱ_t + (1 − ᾱ_t)/V
  (binomial, 5 sd). Gaussian: (z − α_t e)/σ_t over the kept coordinates has mean 0 and variance 1
  (5 sd each; sd 1/√M and √(2/M)). SSD-LM: S_g − mean_{v≠g} S_v = 2kα_t + kσ_t(ε_g − ε̄), so its mean over
  kept positions / 2k is α_t, sd σ_t·√(1 + 1/(V−1))/(2√M) (5 sd).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from bench.config import BackboneConfig, Protocol
from bench.evaluate import conditional_nll
from bench.registry import get_method

BB = BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16)
V, L = 3, 5
PI = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
P = torch.tensor([[0.1, 0.8, 0.1], [0.15, 0.1, 0.75], [0.7, 0.2, 0.1]], dtype=torch.float64)
STATES = torch.tensor(list(itertools.product(range(V), repeat=L)))                       # (243, L)
LOGP = torch.log(PI[STATES[:, 0]]) + torch.log(P[STATES[:, :-1], STATES[:, 1:]]).sum(1)
ALPHA = 1e-3


def build(name: str, V_: int = V, L_: int = L, **params):
    cls = get_method(name)
    torch.manual_seed(0)
    m = cls(cls.Params(**params), BB, V_, L_)
    with torch.no_grad():                   # away from the zero-initialised heads
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


class Oracle(torch.nn.Module):
    """log p(x_0^i = v | the tokens of x that are not [MASK] (= V)) + ``offset``, (B, L, V)."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = offset
        self.head = torch.nn.Identity()   # its output is the logits: the hidden states are too
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)   # a device for Method.device
        self.register_buffer("onehot", torch.nn.functional.one_hot(STATES, V).double())   # (S, L, V)

    def forward(self, x, t=None, **_):
        seen = x != V
        ok = ((STATES[None] == x[:, None]) | ~seen[:, None]).all(-1)                   # (B, S)
        post = torch.softmax(torch.where(ok, LOGP[None], -math.inf), -1)
        marg = torch.einsum("bs,slv->blv", post, self.onehot)
        return torch.log(marg.clamp_min(1e-300)) + self.offset


def conditional_marginal(given: torch.Tensor, keep: torch.Tensor, i: int) -> torch.Tensor:
    """p(x_i | x[keep] = given[keep]) of the chain, by enumeration."""
    ok = (STATES[:, keep] == given[keep]).all(1)
    w = torch.exp(LOGP) * ok
    return torch.stack([w[STATES[:, i] == v].sum() for v in range(V)]) / w.sum()


ABSORBING = {
    "mdlm": ("mdlm", {}),
    "d3pm-absorb": ("d3pm", {"transition": "absorb"}),
    "sedd-absorb-analytic": ("sedd", {"graph": "absorb"}),
    "sedd-absorb-euler": ("sedd", {"graph": "absorb", "sampler": "euler"}),
    "csm-absorb": ("csm", {"graph": "absorb"}),
}


@pytest.mark.parametrize("case", list(ABSORBING))
def test_absorbing_conditional_draw_is_exact_with_an_oracle(case):
    name, params = ABSORBING[case]
    m = build(name, **params)
    score = name in ("sedd", "csm")
    m.net = Oracle(offset=math.log(V) if score else 0.0)     # SEDD: score = f + log r − log V
    a1 = math.exp(-float(m.sigma(torch.tensor([1.0]))[0])) if score else 0.0
    keep = torch.tensor([True, False, True, False, True])
    n, stats = 10_000, []
    for g, given in enumerate((torch.tensor([0, 0, 1, 0, 2]), torch.tensor([2, 0, 2, 0, 0]))):
        x = m.sample(n, 8, generator=torch.Generator().manual_seed(g), given=given, keep=keep)
        assert (x[:, keep] == given[keep]).all() and int(x.max()) < V
        for i in (1, 3):
            p = (1 - a1) * conditional_marginal(given, keep, i) + a1 / V
            obs = torch.bincount(x[:, i], minlength=V).double()
            stats.append(float(((obs - n * p) ** 2 / (n * p)).sum()))
    limit = chi2.isf(ALPHA / len(stats), V - 1)
    assert max(stats) < limit, (stats, limit)


def test_mdlm_conditional_nelbo_with_an_oracle_is_the_sources_conditional_nll():
    m = build("mdlm")
    m.net = Oracle()
    x = STATES[[37, 150, 201]]
    keep = torch.tensor([[True, True, False, False, False],         # a prefix context
                         [False, False, False, True, True],         # a suffix context
                         [True, False, False, False, True]])        # both sides: infill the middle
    K = 2000
    prot = Protocol(tokenizer="x", seq_len=L, packing="none", counted="all", t_samples=K, t_sampling="iid",
                    t_min=0.0, confidence=0.95, max_blocks=None)
    got = conditional_nll(m, x.numpy(), keep.numpy(), prot, 8, 0, "cpu")
    logp_x = LOGP[[37, 150, 201]]
    ctx = torch.stack([torch.logsumexp(torch.where((STATES[:, k] == xi[k]).all(1), LOGP, -math.inf), 0)
                       for xi, k in zip(x, keep)])
    truth = (ctx - logp_x).numpy()                                  # −log p(x[~keep] | x[keep])
    assert np.all(np.abs(got.nll - truth) <= 4.5 * got.se), (got.nll, truth, got.se)
    assert np.all(got.se < 0.05 * truth), got.se                   # the check has power


# ----------------------------------------------------------------------------- replacement
def _spy(m, attr: str, log: list):
    """Record (first argument, t) of every call of ``m.<attr>`` (an instance-level wrapper)."""
    inner = getattr(m, attr)

    def wrapped(x, t, *a, **k):
        log.append((x.detach().clone(), t.detach().clone()))
        return inner(x, t, *a, **k)
    setattr(m, attr, wrapped)


def _pattern(n: int, L_: int, V_: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V_, (n, L_), generator=g), torch.rand(n, L_, generator=g) < 0.5


def _binomial_ok(hits: torch.Tensor, p: float) -> bool:
    M = hits.numel()
    return abs(float(hits.double().mean()) - p) <= 5 * math.sqrt(p * (1 - p) / M) + 1 / M


UNIFORM = {"d3pm-uniform": ("d3pm", {"transition": "uniform"}), "sedd-uniform": ("sedd", {"graph": "uniform"}),
           "csm-uniform": ("csm", {"graph": "uniform"})}


@pytest.mark.parametrize("case", list(UNIFORM))
def test_uniform_state_samplers_show_the_network_a_forward_draw_of_the_kept_tokens(case):
    name, params = UNIFORM[case]
    V_, L_, n = 11, 12, 400
    m = build(name, V_, L_, **params)
    given, keep = _pattern(n, L_, V_)
    log = []
    _spy(m, "denoise" if name == "d3pm" else "score", log)
    x = m.sample(n, 6, generator=torch.Generator().manual_seed(1), given=given, keep=keep)
    assert torch.equal(x[keep], given[keep]) and len(log) == 6
    for x_t, t in log:
        if name == "d3pm":
            a = float(m.abar(t[:1]))
        else:
            a = math.exp(-float(m.sigma(t[:1].double())[0]))
        p = a + (1 - a) / V_
        hits = x_t[keep] == given[keep]
        assert _binomial_ok(hits, p), (float(t[0]), p, float(hits.double().mean()))


GAUSSIAN = {"diffusion-lm-ddpm": ("diffusion-lm", {}), "diffusion-lm-ddim": ("diffusion-lm", {"sampler": "ddim"}),
            "diffusion-lm-bounded": ("diffusion-lm", {"sampler": "bounded"}),
            "diffusion-lm-self-cond": ("diffusion-lm", {"self_condition": True}),
            "plaid-ddpm": ("plaid", {}), "plaid-bounded": ("plaid", {"sampler": "bounded"})}


@pytest.mark.parametrize("case", list(GAUSSIAN))
def test_gaussian_samplers_show_the_network_a_forward_draw_of_the_kept_tokens(case):
    name, params = GAUSSIAN[case]
    V_, L_, n = 11, 12, 64
    m = build(name, V_, L_, **params)
    given, keep = _pattern(n, L_, V_)
    log = []
    _spy(m, "predict_x0", log)
    x = m.sample(n, 8, generator=torch.Generator().manual_seed(1), given=given, keep=keep)
    assert torch.equal(x[keep], given[keep]) and len(log) >= 4
    with torch.no_grad():
        e = m.embedding(given).double()[keep]                       # (M, d)
        for z, t in log:
            g = m.schedule.gamma(t[:1].double()).double()
            a, s = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
            r = (z.double()[keep] - a * e) / s
            M = r.numel()
            assert abs(float(r.mean())) <= 5 / math.sqrt(M), (float(t[0]), float(r.mean()))
            assert abs(float(r.var()) - 1) <= 5 * math.sqrt(2 / M), (float(t[0]), float(r.var()))


def test_simplex_sampler_shows_the_network_a_forward_draw_of_the_kept_tokens():
    V_, L_, n, steps = 11, 12, 400, 6
    m = build("ssd-lm", V_, L_)
    k = m.p.simplex_k
    given, keep = _pattern(n, L_, V_)
    log = []
    inner = m.simplex_input
    m.simplex_input = lambda P: (log.append(P.detach().clone()), inner(P))[1]
    x = m.sample(n, steps, generator=torch.Generator().manual_seed(1), given=given, keep=keep)
    assert torch.equal(x[keep], given[keep]) and len(log) == steps
    for i, Pr in zip(range(steps, 0, -1), log):
        S = torch.log(Pr.double())[keep]                            # S_t up to a constant per position
        g = given[keep]
        S_g = S.gather(1, g[:, None])[:, 0]
        d = (S_g - (S.sum(1) - S_g) / (V_ - 1)) / (2 * k)
        a, s = (float(v) for v in m.schedule.alpha_sigma(torch.tensor([i / steps])))
        sd = s * math.sqrt(1 + 1 / (V_ - 1)) / (2 * math.sqrt(d.numel()))
        assert abs(float(d.mean()) - a) <= 5 * sd, (i, float(d.mean()), a, sd)
