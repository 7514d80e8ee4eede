"""Conditioning in the method contract (bench/condition.py, issue 25 point 1): what every
registered method does with ``sample(..., given, keep)`` and ``conditional_nll``, and the AR
row's exactness. The oracle checks of the diffusion samplers and bounds are
tests/test_conditioning_oracle.py.

- Every registered method and variant (from the registry, as tests/test_contract_every_method.py,
  so a new plugin is held to it the moment it registers), property-based over random keep
  patterns (hypothesis): a conditional draw never changes a kept position, gives ids in [0, V)
  and stays within the step budget (NFE counted as bench.samples counts it); a "prefix" method
  refuses any other pattern, and a "none" method any kept position, with one line naming
  ``keep``, before its sampler runs; the conditional NLL is finite, ≥ 0, 0 for an empty
  continuation, refused likewise.
- AR, exactly (float64): the conditional NLL of a continuation equals the joint NLL minus the
  context's NLL, the context's NLL computed two ways — by enumerating every continuation
  (Σ_c p(ctx, c) = p(ctx)) and from the counted-token path with other tokens after the context.
  Tolerance 1e-9 nats: each side is a sum of ≤ L float64 per-token terms of a few nats (or a
  logsumexp of ≤ 81), whose rounding is ~1e-14; a wrong term is ≳ 1e-3 nats.
- AR's prefix draw is the model's conditional: a χ² test of the continuations' distribution
  against p(x_{≥k} | x_{<k}) from enumeration (α = 1e-3, Bonferroni over the given prefixes),
  and the KV-cached draw equals the uncached one token for token.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from scipy.stats import chi2
from test_contract_every_method import _build, _cases

from bench.condition import can_condition, condition, conditional_sample
from bench.config import BackboneConfig, Protocol
from bench.errors import UserError
from bench.evaluate import conditional_nll
from bench.registry import get_method
from bench.samples import count_calls

L, N_ROWS, STEPS = 12, 3, 3
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)   # a failure is reported as drawn (no slow shrinking)


def protocol(K: int, scheme: str = "stratified", seq_len: int = L) -> Protocol:
    return Protocol(tokenizer="x", seq_len=seq_len, packing="none", counted="all", t_samples=K, t_sampling=scheme,
                    t_min=0.0, confidence=0.95, max_blocks=None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(name, variant) -> the contract's small instance (GPT-2 vocabulary, L = 12), built once."""
    workdir, cache = tmp_path_factory.mktemp("conditioning"), {}

    def get(name, variant):
        if (name, variant) not in cache:
            cache[name, variant] = _build(name, variant, Path(workdir))
        return cache[name, variant]
    return get


def _one_line_about_keep(err: UserError) -> None:
    msg = str(err)
    assert len(msg.splitlines()) == 1 and msg.startswith("keep:"), msg


def _patterns(draw, kind: str, V: int):
    """(given (n, L), keep (n, L)) from hypothesis: any pattern, or prefixes of any lengths."""
    if kind == "prefix":
        k = torch.tensor(draw(st.lists(st.integers(0, L), min_size=N_ROWS, max_size=N_ROWS)))
        keep = torch.arange(L)[None] < k[:, None]
    else:
        keep = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=L, max_size=L),
                                          min_size=N_ROWS, max_size=N_ROWS)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return torch.randint(0, V, (N_ROWS, L), generator=torch.Generator().manual_seed(seed)), keep


def _not_a_prefix(draw) -> torch.Tensor:
    """A keep pattern some row of which is not a prefix (a suffix, a middle span, a hole)."""
    keep = torch.zeros(N_ROWS, L, dtype=torch.bool)
    a = draw(st.integers(1, L - 1))
    keep[draw(st.integers(0, N_ROWS - 1)), a:draw(st.integers(a + 1, L))] = True
    return keep


@pytest.mark.parametrize("name,variant", _cases(), ids=lambda v: v or "default")
@settings(max_examples=5, deadline=None, derandomize=True, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_conditional_draw_never_changes_a_kept_position(built, name, variant, data):
    m = built(name, variant)
    kind = m.conditioning
    given_ids, keep = _patterns(data.draw, kind, m.V)
    sampling = "sampling" in type(m).supports()
    if kind == "none":
        keep[0, 0] = True
        with pytest.raises(UserError) as e:     # refused before the sampler is called
            conditional_sample(m, N_ROWS, STEPS, torch.Generator().manual_seed(0), given_ids, keep)
        _one_line_about_keep(e.value)
    elif sampling:
        calls, handle = count_calls(m.net)
        try:
            x = conditional_sample(m, N_ROWS, STEPS, torch.Generator().manual_seed(0), given_ids, keep)
        finally:
            handle.remove()
        assert x.shape == (N_ROWS, L) and not x.dtype.is_floating_point
        assert torch.equal(x[keep], given_ids[keep]), "a kept position changed"
        assert int(x.min()) >= 0 and int(x.max()) < m.V
        assert calls[0] / N_ROWS <= (STEPS if m.sampler_steps else L), calls[0] / N_ROWS
    if kind == "prefix":
        bad = _not_a_prefix(data.draw)
        with pytest.raises(UserError) as e:
            conditional_sample(m, N_ROWS, STEPS, None, given_ids, bad)
        _one_line_about_keep(e.value)


@pytest.mark.parametrize("name,variant", _cases(), ids=lambda v: v or "default")
@settings(max_examples=3, deadline=None, derandomize=True, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_conditional_nll_of_every_method_with_a_likelihood(built, name, variant, data):
    m = built(name, variant)
    if m.likelihood == "none":
        with pytest.raises(UserError):
            conditional_nll(m, np.zeros((1, L), np.int64), np.zeros((1, L), bool), protocol(2), 4, 0, "cpu")
        return
    given_ids, keep = _patterns(data.draw, "any" if m.conditioning == "any" else "prefix", m.V)
    keep[0] = True                                       # row 0: nothing to score
    if m.conditioning == "none":                         # a bound that cannot condition refuses a context
        with pytest.raises(UserError) as e:
            conditional_nll(m, given_ids.numpy(), keep.numpy(), protocol(2), 4, 0, "cpu")
        _one_line_about_keep(e.value)
        return
    out = conditional_nll(m, given_ids.numpy(), keep.numpy(), protocol(2), 4, 0, "cpu")
    assert out.draws.shape == (N_ROWS, 1 if m.likelihood == "exact" else 2) and out.nll.shape == (N_ROWS,)
    assert np.isfinite(out.draws).all() and (out.draws >= 0).all(), out.draws
    assert out.nll[0] == 0 and list(out.tokens) == (~keep).sum(1).tolist()
    if m.likelihood == "exact":
        assert (out.se == 0).all()
    if m.conditioning == "prefix":
        with pytest.raises(UserError) as e:
            conditional_nll(m, given_ids.numpy(), _not_a_prefix(data.draw).numpy(), protocol(2), 4, 0, "cpu")
        _one_line_about_keep(e.value)


def test_bad_arrays_are_one_line_naming_the_field(built):
    m = built("mdlm", None)
    ids, keep = torch.zeros(2, L, dtype=torch.long), torch.ones(2, L, dtype=torch.bool)
    for args, field in [((ids, None), "keep"), ((None, keep), "given"), ((ids[:, :5], keep), "given"),
                        ((ids, keep.long()), "keep"), ((ids.float(), keep), "given"), ((ids - 1, keep), "given"),
                        ((ids, keep[:1]), "keep")]:
        with pytest.raises(UserError) as e:
            condition(m, 2, *args)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and msg.startswith(f"{field}:"), msg
    assert condition(m, 2, ids, torch.zeros(2, L, dtype=torch.bool)) is None     # nothing kept: unconditional
    one = condition(m, 2, ids[0], keep[0])                                         # (L,): the same for every row
    assert one.given.shape == one.keep.shape == (2, L)


def test_what_a_table_reads():
    """``can_condition``: "none" accepts nothing kept, "prefix" only prefixes, "any" everything."""
    prefix = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    middle = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    assert can_condition("any", middle) and can_condition("prefix", prefix) and not can_condition("prefix", middle)
    assert not can_condition("none", prefix) and can_condition("none", torch.zeros(1, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- AR, exactly
V_AR = 3
BB = BackboneConfig(layers=2, hidden=32, heads=2, cond_dim=16)


def tiny_ar(seq_len: int, dtype=torch.float64, std: float = 0.5):
    """The AR baseline with random (non-flat) weights: its conditionals depend on the context."""
    cls = get_method("ar")
    torch.manual_seed(0)
    m = cls(cls.Params(), BB, V_AR, seq_len)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(std * torch.randn_like(p))
    return m.to(dtype).eval()


def every_sequence(seq_len: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(V_AR), repeat=seq_len)))


def test_ar_conditional_nll_is_the_joint_minus_the_context_exactly():
    Lq = 4
    m = tiny_ar(Lq)
    S = every_sequence(Lq)                                                  # 81 sequences
    with torch.no_grad():
        joint = m.nll(S, torch.ones_like(S, dtype=torch.bool)).double()
    assert abs(torch.logsumexp(-joint, 0).item()) < 1e-9, "the model is not normalised"
    x = S[torch.randperm(len(S), generator=torch.Generator().manual_seed(1))[:6]]
    for k in range(Lq + 1):
        keep = (torch.arange(Lq) < k).expand(len(x), Lq)
        got = conditional_nll(m, x.numpy(), keep.numpy(), protocol(4, seq_len=Lq), 8, 0, "cpu")
        same_ctx = (S[None, :, :k] == x[:, None, :k]).all(-1)               # (6, 81)
        ctx_enum = -torch.logsumexp(torch.where(same_ctx, -joint[None], -math.inf), 1)
        junk = torch.where(keep, x, (x + 1) % V_AR)                          # other tokens after the context
        with torch.no_grad():
            ctx_counted = m.nll(junk, keep).double()
        want = joint[(x[:, None] == S[None]).all(-1).nonzero()[:, 1]] - ctx_enum
        assert np.allclose(got.nll, want.numpy(), rtol=0, atol=1e-9), (k, got.nll, want)
        assert np.allclose(ctx_counted.numpy(), ctx_enum.numpy(), rtol=0, atol=1e-9), k
        assert got.draws.shape == (len(x), 1) and (got.se == 0).all()


def test_ar_prefix_draw_is_the_model_conditional():
    """x0 given (two prefixes of one token, 10 000 draws each): the (x1, x2) counts against the
    model's p(x1, x2 | x0) from enumeration, Pearson's χ² with V² − 1 = 8 df; with prefixes of
    different lengths in one batch, the cached and the uncached sampler give the same tokens."""
    Lq, n = 3, 10_000
    m = tiny_ar(Lq, torch.float32, std=0.8)
    S = every_sequence(Lq)
    with torch.no_grad():
        p = torch.exp(-m.nll(S, torch.ones_like(S, dtype=torch.bool)).double())
    keep = torch.tensor([True, False, False])
    for g0 in (0, 2):
        given_ids = torch.tensor([g0, 0, 0])
        x = m.sample(n, None, torch.Generator().manual_seed(g0), given=given_ids, keep=keep)
        assert (x[:, 0] == g0).all()
        obs = torch.bincount(x[:, 1] * V_AR + x[:, 2], minlength=V_AR ** 2).double()
        pc = p[S[:, 0] == g0]
        pc = pc / pc.sum()                                                   # S is in (x1, x2) order
        stat = float(((obs - n * pc) ** 2 / (n * pc)).sum())
        assert stat < chi2.isf(1e-3 / 2, V_AR ** 2 - 1), (g0, stat, pc.tolist(), (obs / n).tolist())
    ragged = torch.arange(Lq)[None] < torch.tensor([1, 2, 1, 3])[:, None]      # prefixes of 1..3 tokens
    ids = torch.randint(0, V_AR, (4, Lq), generator=torch.Generator().manual_seed(5))
    cached = m.sample(4, None, torch.Generator().manual_seed(7), given=ids, keep=ragged)
    assert torch.equal(cached, m.sample(4, None, torch.Generator().manual_seed(7), cache=False, given=ids, keep=ragged))
    assert torch.equal(cached[ragged], ids[ragged])


def test_hf_causal_lm_conditional_nll_is_the_models_and_retokenizing_refuses(tmp_path):
    """On the suite's ids, the conditional NLL of a pretrained causal LM is transformers' own
    Σ_{i ≥ k} −log p(x_i | BOS, x_<i) (1e-5 nats per token: the same float32 model on the same
    ids, tests/test_hf_causal_lm.py's tolerance); a model that retokenizes would drop the
    context with the uncounted tokens, so it refuses one (conditioning "none", one line)."""
    from test_hf_causal_lm import TOL, by_hand_nll, tiny_gpt2
    from transformers import PreTrainedTokenizerFast

    from bench.data.tokenizers import CharTokenizer, gpt2
    from bench.method import Context

    model = tiny_gpt2(tmp_path / "m", n_positions=64)
    PreTrainedTokenizerFast(tokenizer_object=gpt2()._tok, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(tmp_path / "m")
    cls, bb = get_method("hf-causal-lm"), BackboneConfig(layers=1, hidden=32, heads=2)
    m = cls(cls.Params(model=str(tmp_path / "m")), bb, 50257, 16, Context(tokenizer=gpt2()))
    assert m.conditioning == "prefix"
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    keep = torch.arange(16)[None] < torch.tensor([5, 11])[:, None]
    got = conditional_nll(m, x.numpy(), keep.numpy(), protocol(2, seq_len=16), 2, 0, "cpu")
    for i, k in enumerate((5, 11)):
        want = by_hand_nll(model, x[i].tolist(), 50256)[k:].sum().item()
        assert abs(got.nll[i] - want) < TOL * (16 - k), (i, got.nll[i], want)
    char = CharTokenizer()
    m2 = cls(cls.Params(model=str(tmp_path / "m")), bb, char.vocab_size, 16, Context(tokenizer=char))
    assert m2.info()["retokenized"] is True and type(m2).conditioning == "prefix" and m2.conditioning == "none"
    with pytest.raises(UserError) as e:
        conditional_nll(m2, np.zeros((1, 16), np.int64), keep[:1].numpy(), protocol(2, seq_len=16), 2, 0, "cpu")
    _one_line_about_keep(e.value)
