"""The absorbing-state samplers draw x_0 only where a token is revealed (MDLM, D3PM absorb,
SEDD and CSM on the absorbing graph): the same distribution as the full-Gumbel algorithm, the
same network calls.

Statistical tests, each at a stated significance level α = 1e-3 per test function, Bonferroni
over the statistics it computes (so a correct sampler fails a given test with probability
≤ 1e-3 for a random seed; the seeds are fixed, so the outcome is deterministic):

- one-sample χ² against exact marginals: a "network" whose logits f do not depend on x_t or t
  makes each position's final token exactly Cat(softmax(f)) — whenever the position is
  revealed, the step's categorical restricted to real tokens is ∝ e^f (MDLM, D3PM: p_θ(x_0|x_t);
  SEDD/CSM: move_y ∝ s_y ∝ e^{f_y}) — mixed with Uniform(V) w.p. α_1 for SEDD's p_base (a
  token is unmasked at t = 1 w.p. e^{−σ(1)}). This guards the categorical (logits, temperature,
  which rows) and that every position ends revealed.
- two-sample χ² (homogeneity) between the old algorithm — a Gumbel draw over every position and
  the whole vocabulary each step, kept where revealed (reference implementations below, copied
  from the samplers before the change) — and the new one, with a real tiny network whose
  prediction depends on x_t and t: per-position token counts and adjacent-pair counts. This
  guards the reveal schedule (which positions move when), which the first test cannot see.

χ² cells whose pooled count is below 10 are merged into one (the χ² approximation needs
expected counts ≳ 5 on each side).
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2

from bench.config import BackboneConfig
from bench.method import gumbel_argmax
from bench.samples import count_calls
from methods._discrete import safe_log
from methods.sedd import step_probs_absorb

BB = BackboneConfig(layers=2, hidden=32, heads=2, cond_dim=16)
V, L = 6, 5
ALPHA = 1e-3
N = 20000          # samples per χ² test: expected counts ≥ 10 in nearly every cell
CASES = {
    "mdlm": ("mdlm", {}),
    "d3pm-absorb": ("d3pm", {"transition": "absorb"}),
    "sedd-absorb-analytic": ("sedd", {"graph": "absorb"}),
    "sedd-absorb-euler": ("sedd", {"graph": "absorb", "sampler": "euler"}),
    "csm-absorb": ("csm", {"graph": "absorb"}),
}


def build(case: str, std: float = 0.3, seed: int = 0, **over):
    from bench.registry import get_method

    name, params = CASES[case]
    cls = get_method(name)
    torch.manual_seed(seed)
    m = cls(cls.Params(**params, **over), BB, V, L)
    for p in m.parameters():          # the heads start at zero (flat): give the network structure
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=std)
    return m.eval()


# ----------------------------------------------------------------------------- the old samplers
@torch.no_grad()
def old_mdlm(m, n, steps, g):
    x = torch.full((n, m.L), m.mask_id, dtype=torch.long)
    for i in range(steps, 0, -1):
        t, s = i / steps, (i - 1) / steps
        still = x == m.mask_id
        log_p = m.denoise(x, torch.full((n,), t))
        x0_hat = gumbel_argmax(log_p, g, m.p.float64_sampling)
        reveal = still & (torch.rand(x.shape, generator=g) < (t - s) / t)
        x = torch.where(reveal, x0_hat, x)
    return x


@torch.no_grad()
def old_d3pm(m, n, steps, g):
    T = m.p.T
    grid = torch.round(torch.linspace(T, 0, steps + 1, dtype=torch.float64)).long().unique_consecutive()
    x = m.graph.prior_sample(n, m.L, m.abar(torch.tensor([T])).item(), m.V, m.mask_id, g, "cpu")
    for t_, s_ in zip(grid[:-1].tolist(), grid[1:].tolist()):
        a_s, a_t = m.abar(torch.tensor([s_])).item(), m.abar(torch.tensor([t_])).item()
        z = m.denoise(x, torch.full((n,), t_, dtype=torch.long))
        x0_hat = gumbel_argmax(z, g, True)
        p_reveal = 1.0 if s_ == 0 else (a_s - a_t) / (1 - a_t)
        u = torch.rand(x.shape, generator=g, dtype=torch.float64)
        x = torch.where((x == m.mask_id) & (u < p_reveal), x0_hat, x)
    return x


@torch.no_grad()
def old_sedd(m, n, steps, g):
    analytic = m.p.sampler == "analytic"
    grid = torch.linspace(1.0, 0, steps + 1, dtype=torch.float64)
    x = m._prior_sample(n, g)
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        dsig = (m.sigma(t[None])[0] - m.sigma(s[None])[0]).expand(n)
        log_s = m.score(x, torch.full((n,), float(t))).double()
        probs = step_probs_absorb(log_s, dsig, analytic)
        if i == steps - 1:
            probs[..., -1] = 0
        new = gumbel_argmax(safe_log(probs), g, True)
        x = torch.where(x == m.mask_id, new, x)
    return x


def old_sample(case, m, n, steps, g):
    return {"mdlm": old_mdlm, "d3pm": old_d3pm}.get(CASES[case][0], old_sedd)(m, n, steps, g)


# ----------------------------------------------------------------------------- χ² statistics
def pooled(counts: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Merge the cells (last axis) whose pooled count ``total`` is below 10 into one."""
    small = total < 10
    return torch.cat([counts[..., ~small], counts[..., small].sum(-1, keepdim=True)], -1) if small.any() else counts


def homogeneity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Pearson's χ² of the 2 × K table (a, b) of counts, and its degrees of freedom."""
    tot = a + b
    a, b = pooled(a, tot).double(), pooled(b, tot).double()
    tot = a + b
    keep = tot > 0
    a, b, tot = a[keep], b[keep], tot[keep]
    ea, eb = tot * a.sum() / tot.sum(), tot * b.sum() / tot.sum()
    return float(((a - ea) ** 2 / ea + (b - eb) ** 2 / eb).sum()), int(keep.sum()) - 1


def position_counts(x: torch.Tensor, K: int) -> torch.Tensor:
    """(L, K): per position, how often each token id 0..K−1 occurs."""
    return torch.stack([torch.bincount(x[:, i], minlength=K) for i in range(x.shape[1])])


class FixedLogits(torch.nn.Module):
    """A stand-in network: logits f (L, V) that depend on neither x_t nor t."""

    def __init__(self, f: torch.Tensor):
        super().__init__()
        self.f = torch.nn.Parameter(f, requires_grad=False)
        self.head = torch.nn.Identity()   # its output is the logits: the hidden states are too

    def forward(self, x, t=None, **_):
        return self.f.expand(x.shape[0], -1, -1).clone()


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", list(CASES))
def test_marginals_equal_the_exact_categorical_when_the_network_ignores_x_t(case):
    m = build(case)
    f = torch.randn(L, V, generator=torch.Generator().manual_seed(1)) * 1.5
    m.net = FixedLogits(f)
    a1 = 0.0                                       # p_base: a token is unmasked at the start w.p. a1
    if CASES[case][0] in ("sedd", "csm"):
        a1 = math.exp(-float(m.sigma(torch.tensor([1.0]))[0]))
    elif CASES[case][0] == "d3pm":
        a1 = float(m.abar(torch.tensor([m.p.T])))
    p = (1 - a1) * torch.softmax(f.double(), -1) + a1 / V
    x = m.sample(N, 8, generator=torch.Generator().manual_seed(2))
    assert x.shape == (N, L) and int(x.max()) < V and int(x.min()) >= 0, "a [MASK] left or an id out of range"
    obs = position_counts(x, V).double()
    stat = ((obs - N * p) ** 2 / (N * p)).sum(-1)            # one-sample χ², V − 1 df per position
    limit = chi2.isf(ALPHA / L, V - 1)
    assert (stat < limit).all(), (stat.tolist(), limit)


@pytest.mark.parametrize("case", list(CASES))
def test_same_distribution_as_the_full_gumbel_sampler_with_a_real_network(case):
    m = build(case, std=1.0)
    steps, K = 4, V + 1                              # K: the real tokens and [MASK]
    new = m.sample(N, steps, generator=torch.Generator().manual_seed(3))
    old = old_sample(case, m, N, steps, torch.Generator().manual_seed(4))
    tests = [(position_counts(new, K)[i], position_counts(old, K)[i]) for i in range(L)]
    pair = lambda x, i: torch.bincount(x[:, i] * K + x[:, i + 1], minlength=K * K)  # noqa: E731
    tests += [(pair(new, i), pair(old, i)) for i in range(L - 1)]
    for j, (a, b) in enumerate(tests):
        stat, df = homogeneity(a, b)
        limit = chi2.isf(ALPHA / len(tests), df)
        assert stat < limit, (j, stat, df, limit)


@pytest.mark.parametrize("case", list(CASES))
def test_network_calls_are_unchanged(case):
    """One network evaluation per sequence and step, as the full-Gumbel sampler made."""
    m = build(case)
    n, steps = 3, 7
    got = {}
    for name, fn in (("new", lambda g: m.sample(n, steps, generator=g)),
                     ("old", lambda g: old_sample(case, m, n, steps, g))):
        calls, h = count_calls(m.net)
        fn(torch.Generator().manual_seed(0))
        h.remove()
        got[name] = calls[0]
    assert got["new"] == got["old"] == n * steps


def test_mdlm_cache_calls_the_network_as_often_as_the_reveal_schedule_says():
    """Time-agnostic MDLM with its cache: a sequence is evaluated at the first step and after
    every step that revealed one of its tokens. Each position is revealed at a uniform step
    (P = 1/steps each: the reveal w.p. (t − s)/t = 1/i at t = i/steps), independently, so
    E[NFE per sequence] = 1 + (steps − 1)·(1 − (1 − 1/steps)^L). NFE per sequence lies in
    [1, 1 + L], so its sd is ≤ L/2 and the mean over n sequences is within 4·L/(2√n) of that."""
    m = build("mdlm", time_conditioning=False)
    n, steps = 2000, 50
    calls, h = count_calls(m.net)
    x = m.sample(n, steps, generator=torch.Generator().manual_seed(6))
    h.remove()
    assert (x != m.mask_id).all()
    want = 1 + (steps - 1) * (1 - (1 - 1 / steps) ** L)
    assert abs(calls[0] / n - want) <= 4 * L / (2 * math.sqrt(n)), (calls[0] / n, want)
