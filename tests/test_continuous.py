"""The continuous family (methods/continuous.py): self-conditioning's training branch and
stop-gradient, what the bound and the sampler condition on, masking of uncounted tokens, and on
a synthetic Markov source the Diffusion-LM and PLAID bounds stay above the true perplexity
while SSD-LM shows "—" for ppl and real sample metrics."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import methods.simplex as simplex
from bench.backbone import Head
from bench.config import BackboneConfig
from bench.registry import get_method
from methods._gaussian import NormalStream

CFG = BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16)
METHODS = ["diffusion-lm", "plaid", "ssd-lm"]


def _make(name, **kw):
    cls = get_method(name)
    torch.manual_seed(0)
    return cls(cls.Params(**kw), CFG, 20, 8)


class Calls:
    """Records every call of the method's network: the self_cond it was given."""

    def __init__(self, net):
        self.log = []
        self.h = net.register_forward_pre_hook(lambda mod, args, kw: self.log.append(kw.get("self_cond")),
                                               with_kwargs=True)

    def take(self):
        out, self.log = self.log, []
        return out


@pytest.mark.parametrize("name", METHODS)
def test_self_conditioning_two_pass_half_the_time_and_no_gradient_through_x0_tilde(name):
    """At the generic rate ½ (the lecture's); PLAID's own default (¼) is checked below."""
    m = _make(name, self_condition=True, self_condition_rate=0.5)
    calls = Calls(m.net)
    x = torch.randint(0, 20, (4, 8))
    c = torch.ones(4, 8, dtype=torch.bool)
    two, n = 0, 200
    for i in range(n):
        torch.manual_seed(i)
        loss = m.loss(x, c, torch.rand(4))
        log = calls.take()
        assert len(log) in (1, 2) and log[0] is None
        if len(log) == 2:
            two += 1
            assert log[1] is not None and not log[1].requires_grad and log[1].grad_fn is None
            if i % 50 == 0:
                loss.backward()          # the graph holds only the second pass
    # Binomial(200, ½): s.d. 7.1; ±30 is 4.2 s.d.
    assert abs(two - n / 2) < 30, two


def test_plaid_conditions_a_quarter_of_its_training_draws():
    m = _make("plaid")
    assert m.p.self_condition and m.p.self_condition_rate == 0.25
    calls = Calls(m.net)
    x, c, two, n = torch.randint(0, 20, (4, 8)), torch.ones(4, 8, dtype=torch.bool), 0, 400
    for i in range(n):
        torch.manual_seed(i)
        m.loss(x, c, torch.rand(4))
        two += len(calls.take()) == 2
    # Binomial(400, ¼): s.d. 8.7; ±35 is 4.0 s.d.
    assert abs(two - n / 4) < 35, two


class KnownNet(torch.nn.Module):
    """Stands in for PLAID's backbone with hidden states a known function of what it reads,
    h = z_in·A + c·k (c the condition it is given), and the real fused head, weights N(0, 0.1²)."""

    def __init__(self, d, hidden, V):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.A = torch.randn(d, hidden, generator=g) * 0.3
        self.k = torch.randn(hidden, generator=g)
        self.head = Head(hidden, V)
        with torch.no_grad():
            self.head.weight.copy_(0.1 * torch.randn(V, hidden, generator=g))
            self.head.bias.copy_(0.1 * torch.randn(V, generator=g))

    def forward(self, t=None, embeds=None, self_cond=None, return_hidden=False, targets=None, expect=None):
        h = embeds @ self.A + t[:, None, None] * self.k
        return h if return_hidden else self.head(h, targets, expect)


@pytest.mark.parametrize("options", [{}, {"logit_bias": False, "rescale_input": False, "condition": "t"}],
                         ids=["plaid", "options-off"])
@torch.no_grad()
def test_plaid_draw_estimates_one_term_weighted_by_its_share(options):
    """PLAID's one-draw estimate (methods/continuous.py) against a computation by hand that uses
    none of the method's helpers: u < q gives prior + (1/q)·CE of the logits at t = 0, u ≥ q gives
    prior + (1/(1 − q))·½γ′e^{−γ}‖e − x̂0‖² at t = (u − q)/(1 − q); averaged over u ~ U(0, 1),
    prior + reconstruction + ∫ diffusion: the bound. By hand, in float64: a linear schedule
    (the learned one with its bumps switched off: γ = γ_0 + (γ_1 − γ_0)t, γ′ = γ_1 − γ_0), e the
    normalised rows, z = α e + σ ε with the same ε (same seed), the network a known linear map
    (``KnownNet``), logits = its head + (α/σ²) z·Eᵀ, x̂0 = softmax·E, the prior KL by
    torch.distributions. The method's network path is float32 (logits ≲ 30, rounding ≤ 2e-6
    each, so CE and x̂0 err ≤ 4e-6, times 1/q = 8 or the diffusion weight ≤ 100): 5e-4, while
    any wrong term moves the estimate by far more (mutants: tests/mutation/run.py). Measured: 2e-5."""
    m = _make("plaid", self_condition=False, **options).eval()
    m.net = KnownNet(m.p.embed_dim, 24, 20)
    m.schedule.a.fill_(-100.0)                       # softplus(−100) = 4e-44: h̃(t) = t
    q, d = m.p.reconstruction_share, m.p.embed_dim
    g0 = m.schedule.gamma_0.double()[0]
    g1 = g0 + F.softplus(m.schedule.raw_gap.double()[0])
    x, c = torch.randint(0, 20, (3, 8)), torch.ones(3, 8, dtype=torch.bool)
    E = m.embedding.matrix.double() / m.embedding.matrix.double().norm(dim=1, keepdim=True)
    e = E[x]
    sig = lambda g: (torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt())  # noqa: E731
    a1, s1 = sig(g1)
    prior = torch.distributions.kl_divergence(torch.distributions.Normal(a1 * e, s1),
                                              torch.distributions.Normal(0.0, 1.0)).sum(-1)

    def by_hand(u):
        t = torch.where(u < q, torch.zeros_like(u), (u - q) / (1 - q)).double()
        g = (g0 + (g1 - g0) * t)[:, None, None]
        a, s = sig(g)
        torch.manual_seed(0)
        z = a * e + s * torch.randn(3, 8, d).double()
        z_in = z / torch.sqrt(a ** 2 / d + s ** 2) if m.p.rescale_input else z
        cond = g[:, 0, 0] * math.exp(5) / 1000 if m.p.condition == "gamma" else t
        h = z_in @ m.net.A.double() + cond[:, None, None] * m.net.k.double()
        logits = h @ m.net.head.weight.double().t() + m.net.head.bias.double()
        if m.p.logit_bias:
            logits = logits + (a / s ** 2) * z @ E.t()
        ce = -torch.log_softmax(logits, -1).gather(-1, x[..., None])[..., 0]
        diff = 0.5 * (g1 - g0) * torch.exp(-g[..., 0]) * ((e - torch.softmax(logits, -1) @ E) ** 2).sum(-1)
        return prior + torch.where((u < q)[:, None], ce / q, diff / (1 - q))

    for u in (torch.tensor([0.0, q / 2, q * 0.99]), torch.tensor([q, 0.5, 0.9])):
        torch.manual_seed(0)
        est = m.elbo_terms(x, c, u, train=False)
        ref = by_hand(u)
        assert est.dtype == torch.float64
        assert (est - ref).abs().max() < 5e-4, (u, (est - ref).abs().max())


@pytest.mark.parametrize("rows", [1, 3, 24])
def test_ssd_lm_noised_probs_is_softmax_of_the_simplex_forward_process(rows, monkeypatch):
    """SSDLM.noised_probs is softmax(S_t), S_t = α_t S_0 + σ_t·k·ε (S_0 where uncounted),
    S_0 = k(2·onehot(w) − 1), whatever its CPU block size (1 row, 3 rows — 24 is not a multiple —
    and all 24 rows at once). The reference draws ε from the same seeded NormalStream filled in the
    same row blocks. Probabilities of logits |S| ≲ 30 in float32: 1e-6."""
    m = _make("ssd-lm")
    k, V = m.p.simplex_k, 20
    monkeypatch.setattr(type(m), "ROWS_BYTES", rows * 4 * V)
    w, c = torch.randint(0, V, (3, 8)), torch.ones(3, 8, dtype=torch.bool)
    c[0, :2] = False
    t = torch.tensor([0.1, 0.5, 0.9])
    P = m.noised_probs(w, c, t, torch.Generator().manual_seed(0))
    stream, eps = NormalStream(torch.Generator().manual_seed(0)), torch.empty(24, V)
    for r in range(0, 24, rows):
        stream.fill_(eps[r:r + rows])
    a, s = (v[:, None, None] for v in m.schedule.alpha_sigma(t))
    S0 = k * (2 * F.one_hot(w, V).float() - 1)
    ref = torch.where(c[..., None], a * S0 + s * k * eps.view(3, 8, V), S0)
    assert torch.allclose(P, torch.softmax(ref, -1), atol=1e-6)
    assert torch.allclose(P.sum(-1), torch.ones(3, 8), atol=1e-6)


@pytest.mark.parametrize("block", [1, 5, 128])
def test_ssd_lm_expected_embedding_gradient_is_the_transposed_product(block, monkeypatch):
    """simplex_input's ∂E, summed over row blocks of P on CPU (1 row, 5 rows — 24 rows is not a
    multiple — and one block of all), equals Pᵀ ḡ; the forward equals P E. float64, so the only
    difference is summation order: 1e-12."""
    m = _make("ssd-lm").double()
    monkeypatch.setattr(simplex._ExpectedEmbedding, "BLOCK", block)
    P = torch.softmax(torch.randn(3, 8, 20, dtype=torch.float64), -1)
    g = torch.randn(3, 8, m.E.shape[1], dtype=torch.float64)
    out = m.simplex_input(P)
    (grad,) = torch.autograd.grad(out, m.E, g)
    assert torch.allclose(out, P @ m.E, atol=1e-12)
    assert torch.allclose(grad, P.reshape(-1, 20).t() @ g.reshape(-1, g.shape[-1]), atol=1e-12)


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
def test_bound_conditions_on_the_models_own_first_pass(name):
    m = _make(name, self_condition=True).eval()
    with torch.no_grad():
        torch.nn.init.normal_(m.net.head.weight)    # the zero-initialised head would give x̂0 = 0
    firsts = []
    # the x̂0 of a call: Diffusion-LM's network returns it (x0-param); PLAID's comes out of its
    # fused head, softmax(logits)·E (tests/test_backbone.py checks that expectation)
    src = m.net.head if name == "plaid" else m.net
    h = src.register_forward_hook(lambda mod, a, kw, out: firsts.append(out), with_kwargs=True)
    calls = Calls(m.net)
    x = torch.randint(0, 20, (3, 8))
    with torch.no_grad():
        m.nll(x, torch.ones(3, 8, dtype=torch.bool), torch.rand(3))
    h.remove()
    log = calls.take()
    assert len(log) == 2 and log[0] is None
    # the condition of the second call is the x̂0 the first call produced (PLAID reads it ×√d,
    # its input scaling: tests/test_plaid.py)
    out = firsts[0].float() * (math.sqrt(m.p.embed_dim) if name == "plaid" else 1.0)
    assert log[1].abs().sum() > 0 and torch.allclose(log[1], out)


@pytest.mark.parametrize("name", METHODS)
def test_sampler_feeds_previous_x0_one_call_per_step(name):
    m = _make(name, self_condition=True).eval()
    calls = Calls(m.net)
    out = m.sample(2, 6, torch.Generator().manual_seed(0))
    log = calls.take()
    assert out.shape == (2, 8) and out.dtype == torch.long and int(out.max()) < 20
    assert len(log) == 6 and log[0] is None and all(s is not None for s in log[1:])


@pytest.mark.parametrize("name", ["diffusion-lm", "plaid"])
def test_uncounted_tokens_are_never_scored(name):
    m = _make(name).eval()
    x = torch.randint(0, 20, (2, 8))
    with torch.no_grad():
        assert torch.equal(m.nll(x, torch.zeros(2, 8, dtype=torch.bool), torch.rand(2)), torch.zeros(2))


def test_no_parameter_is_unused_in_a_training_step():
    """DDP runs with find_unused_parameters=False: every parameter must get a gradient in both
    self-conditioning branches (no token embedding exists when embeddings are passed)."""
    for name in METHODS:
        for sc in (False, True):
            m = _make(name, self_condition=sc)
            assert getattr(m.net, "tok", None) is None
            for seed in range(6):                  # both coin outcomes occur
                m.zero_grad()
                torch.manual_seed(seed)
                m.loss(torch.randint(0, 20, (2, 8)), torch.ones(2, 8, dtype=torch.bool), torch.rand(2)).backward()
                missing = [n for n, p in m.named_parameters() if p.grad is None]
                assert not missing, (name, sc, missing)


def test_markov_source_bounds_above_truth_and_ssd_lm_has_no_ppl(tmp_path):
    from conftest import write_suite

    from bench.cli import main

    src = {"name": "markov", "vocab": 16, "order": 1, "seed": 7, "concentration": 0.3}
    suite = {"name": "cont-markov", "data": {"train": src, "eval": [src], "seq_len": 32},
             "sizes": {"tiny": {"layers": 1, "hidden": 32, "heads": 2, "cond_dim": 16}},
             "methods": [{"method": "diffusion-lm"}, {"method": "plaid"}, {"method": "ssd-lm"}],
             "baseline": "ar",
             "train": {"steps": 150, "batch_size": 16, "lr": 3e-3, "warmup": 10, "ckpt_every": 150},
             "eval": {"t_samples": 8, "packing": "none", "max_blocks": 64, "batch_size": 64,
                      "samples": 8, "sample_steps": [16]},
             "metrics": {"mauve": None, "source_text": False},
             "launch": {"executor": "debug", "threads": 1}}
    out = tmp_path / "out"
    assert main(["run", str(write_suite(tmp_path / "s.yaml", suite)), "--out", str(out)]) == 0
    t = pd.read_csv(out / "leaderboard.csv")
    ppl = t[t.metric == "ppl"].set_index("model")
    true = ppl.loc["Source (true)", "value"]
    print(ppl[["value", "ci_low", "ci_high"]])
    for model in ("Diffusion-LM", "PLAID"):
        r = ppl.loc[model]
        half = r.value - r.ci_low
        assert bool(r.bound) and r.value >= true - half, (model, r.value, r.ci_low, true)
    ssd = ppl.loc["SSD-LM"]
    assert pd.isna(ssd.value)
    md = (out / "leaderboard.md").read_text()
    row = next(line for line in md.splitlines() if "SSD-LM" in line and "|" in line)
    assert "—" in row
    # its samples are scored all the same — on a synthetic source by the source itself
    # (bench.metrics.truth: true_nll in place of gen_ppl)
    s = t[(t.model == "SSD-LM") & t.metric.isin(["true_nll", "entropy"])]
    assert len(s) == 2 and s.value.notna().all() and (s.value.astype(float) > 0).all(), s
    assert math.isfinite(float(s[s.metric == "true_nll"].value.iloc[0]))
    assert "gen_ppl" not in set(t.metric)


def test_new_method_continuous_skeleton_trains_bounds_and_samples(tmp_path):
    import importlib.util
    import sys

    from bench.cli import main

    assert main(["new-method", "skel_cont", "--family", "continuous", "--dir", str(tmp_path)]) == 0
    spec = importlib.util.spec_from_file_location("skel_cont", tmp_path / "skel_cont.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["skel_cont"] = mod          # pydantic resolves the annotations through it
    spec.loader.exec_module(mod)
    cls = get_method("skel_cont")
    for sc in (False, True):
        m = cls(cls.Params(self_condition=sc), CFG, 20, 8)
        x, c = torch.randint(0, 20, (2, 8)), torch.ones(2, 8, dtype=torch.bool)
        m.loss(x, c, torch.rand(2)).backward()
        assert all(p.grad is not None for p in m.parameters())
        with torch.no_grad():
            nll = m.nll(x, c, torch.rand(2))
        assert nll.shape == (2,) and torch.isfinite(nll).all() and (nll > 0).all()
        assert m.sample(2, 4).shape == (2, 8)
