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

import methods.continuous as continuous
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


@torch.no_grad()
def test_plaid_draw_estimates_one_term_weighted_by_its_share():
    """PLAID's one-draw estimate (methods/continuous.py): u < q gives prior + CE of the network
    at t = 0 over q; u ≥ q gives prior + the diffusion term at t = (u − q)/(1 − q) over 1 − q.
    Averaged over u ~ U(0, 1) that is prior + reconstruction + ∫ diffusion: the bound.
    Same ε in the estimate and the reference (same seed); float32 sums of 8 tokens: 1e-5."""
    import torch.nn.functional as F

    from methods._gaussian import diffusion_term, prior_kl
    m = _make("plaid", self_condition=False).eval()
    torch.nn.init.normal_(m.net.head.weight)          # the zero-initialised head gives flat logits
    q = m.p.reconstruction_share
    x, c = torch.randint(0, 20, (3, 8)), torch.ones(3, 8, dtype=torch.bool)
    e = m.embedding(x)
    prior = prior_kl(e, m.endpoints(e)[1])

    def estimate_and_z(u, t):
        torch.manual_seed(0)
        est = m.elbo_terms(x, c, u, train=False)
        torch.manual_seed(0)
        return est, m.noised(e, c, t)[0]

    t0 = torch.zeros(3)
    est, z = estimate_and_z(torch.tensor([0.0, q / 2, q * 0.99]), t0)
    ce = F.cross_entropy(m.net(t=t0, embeds=z).flatten(0, 1), x.flatten(), reduction="none").view(3, 8)
    assert torch.allclose(est, prior + ce / q, rtol=1e-5, atol=1e-5)

    u = torch.tensor([q, 0.5, 0.9])
    t = (u - q) / (1 - q)
    est, z = estimate_and_z(u, t)
    diff = diffusion_term(e, m.predict_x0(z, t, None), m.schedule.gamma(t)[:, None], m.schedule.dgamma(t)[:, None])
    assert torch.allclose(est, prior + diff / (1 - q), rtol=1e-5, atol=1e-5)


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
    monkeypatch.setattr(continuous._ExpectedEmbedding, "BLOCK", block)
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
    h = m.net.register_forward_hook(lambda mod, a, kw, out: firsts.append(out), with_kwargs=True)
    calls = Calls(m.net)
    x = torch.randint(0, 20, (3, 8))
    with torch.no_grad():
        m.nll(x, torch.ones(3, 8, dtype=torch.bool), torch.rand(3))
    h.remove()
    log = calls.take()
    assert len(log) == 2 and log[0] is None
    # the condition of the second call is the x̂0 the first call produced
    out = firsts[0].float()
    # the network's call returns x̂0 itself: Diffusion-LM (x0-param) its output, PLAID softmax(·)E
    # from the fused head (tests/test_backbone.py checks that expectation)
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
