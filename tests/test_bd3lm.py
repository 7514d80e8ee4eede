"""BD3-LM (methods/bd3lm.py) against what it must equal.

- L′ = 1 is autoregressive: its NELBO, one vectorised pass over [x_t, x_0], is at every u the
  exact chain rule Σ_i −log p_θ(x_i | x_<i) of the same weights, computed one prefix at a time.
- L′ = L is MDLM: the same weights in MDLM (time_conditioning: false) give the same estimate
  under the same u and the same random masks, for both estimator forms.
- The vectorised pass equals the block-by-block conditionals p_θ(x^b | x_t^b, x^{<b}), the
  clean blocks fed one at a time through the KV cache (no hand-made mask).
- Both estimator forms are unbiased for L_BD, computed exactly by enumerating every masked
  subset of every block.
- The sampler draws each block from the trained conditional (the vectorised pass's), given the
  clean blocks before it or, beyond L, the last L − L′ tokens; the KV-cached sampler draws the
  uncached sampler's tokens, also beyond L; longer samples continue the shorter ones.
- The training loss is the time form of the bound (the ``time`` estimator) per counted token.
- The clip window: [1, 1] at L′ = 1 trains on the exact AR NLL; the search picks the least
  variance window, and keeps it in the state dict.

Tolerances: float32 forwards of the same weights that differ only in which keys sit masked in
one SDPA call, and in summation order: 1e-5 relative to the per-sequence totals (~10² nats)
or to the largest value compared (measured ≤ 3.1e-7 relative); a wrong mask, weight or position moves them by O(1).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import tiny_suite, write_suite

from bench.backbone import KVCache
from bench.config import BackboneConfig
from bench.evaluate import draw_u
from bench.samples import count_calls

BB = BackboneConfig(layers=2, hidden=32, heads=2, cond_dim=16)
V = 40
RTOL = 1e-5


def _method(name, L=16, seed=0, **params):
    from bench.registry import get_method

    cls = get_method(name)
    torch.manual_seed(seed)
    m = cls(cls.Params(**params), BB, V, L)
    with torch.no_grad():          # the head and adaLN start at zero (uniform): give them structure
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def _batch(B=6, L=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g)
    counted = torch.ones_like(x, dtype=torch.bool)
    counted[0, :3] = False                       # clean context, never scored
    counted[1, 5:7] = False
    return x, counted


def test_block_size_one_is_the_exact_autoregressive_likelihood():
    m = _method("bd3lm", block_size=1)
    x, counted = _batch()
    L = x.shape[1]
    chain = torch.zeros(x.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for i in range(L):     # −log p_θ(x_i | x_<i): [x_0 … x_{i−1}, MASK], x_0 causal, MASK sees all
            tokens = torch.cat([x[:, :i], torch.full_like(x[:, :1], m.mask_id)], 1)
            mask = torch.ones(i + 1, i + 1, dtype=torch.bool).tril()
            logp = torch.log_softmax(m.net(tokens, attn_mask=mask)[:, -1].double(), -1)
            chain -= logp.gather(-1, x[:, i:i + 1])[:, 0] * counted[:, i]
        for u in (torch.full((6,), 1e-6), torch.rand(6, generator=torch.Generator().manual_seed(2)),
                  torch.full((6,), 1 - 1e-6)):
            got = m.nll(x, counted, u).double()
            assert torch.allclose(got, chain, rtol=RTOL, atol=0), (got, chain)
    assert float(chain.min()) > 10          # ~log V per counted token: not a degenerate zero


@pytest.mark.parametrize("estimator", ["beta", "time"])
def test_block_size_L_is_mdlm(estimator):
    bd = _method("bd3lm", block_size=16, estimator=estimator)
    md = _method("mdlm", time_conditioning=False, estimator=estimator, seed=7)
    md.load_state_dict(bd.state_dict())           # the same weights: one network class, no mapping
    x, counted = _batch()
    u = torch.rand(6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            a = bd.nll(x, counted, u)
            torch.manual_seed(seed)
            b = md.nll(x, counted, u)
            assert torch.allclose(a, b, rtol=RTOL, atol=0), (a, b)
            assert float(b.sum()) > 50          # some masks drawn (the time form may mask none in a row)


def _blockwise_ce(m, x_t, x0):
    """−log p_θ(x_0 | x_t^b, x^{<b}) block by block: the clean blocks fed one at a time into a KV
    cache (each sees the cache and itself: block-causal by construction), x_t^b then queried
    against it without being stored."""
    size, L = m.p.block_size, m.L
    out = []
    for b in range(L // size):
        kv = KVCache(len(m.net.blocks))
        for j in range(b):
            m.net(x0[:, j * size:(j + 1) * size], cache=kv)
        blk = slice(b * size, (b + 1) * size)
        logits = m.net(x_t[:, blk], cache=kv, store=0)
        out.append(-torch.log_softmax(logits.double(), -1).gather(-1, x0[:, blk, None])[..., 0])
    return torch.cat(out, 1)


@pytest.mark.parametrize("size", [2, 4])
def test_vectorised_pass_is_the_block_by_block_conditionals(size):
    m = _method("bd3lm", block_size=size)
    x, _ = _batch()
    x_t = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.5, m.mask_id, x)
    with torch.no_grad():
        got, want = m.block_ce(x_t, x).double(), _blockwise_ce(m, x_t, x)
    assert (got - want).abs().max() <= RTOL * want.abs().max(), (got - want).abs().max()


def _exact_nelbo(m, x0, counted):
    """L_BD per sequence, exactly: for block b with n counted tokens, the time form and the
    count form both equal Σ_{M ≠ ∅} Σ_{i∈M} CE_i(x with M masked) / (|M|·C(n, |M|)) (the
    probability t^{m−1}(1−t)^{n−m} of masking exactly M, times 1/t, integrated over t; MDLM's
    derivation, docs/methods.md#mdlm). Blocks other than b stay clean: x_t^b alone matters."""
    size, total = m.p.block_size, torch.zeros(x0.shape[0], dtype=torch.float64)
    for r in range(x0.shape[0]):
        for b in range(m.L // size):
            idx = [b * size + j for j in range(size) if counted[r, b * size + j]]
            n = len(idx)
            for k in range(1, n + 1):
                for M in itertools.combinations(idx, k):
                    x_t = x0[r:r + 1].clone()
                    x_t[0, list(M)] = m.mask_id
                    ce = m.block_ce(x_t, x0[r:r + 1])[0].double()
                    total[r] += ce[list(M)].sum() / (k * math.comb(n, k))
    return total


@pytest.mark.parametrize("estimator", ["beta", "time"])
def test_estimators_are_unbiased_for_the_exact_block_nelbo(estimator):
    """The mean over stratified u of ``nll`` lands on the enumerated L_BD within 4 standard
    errors (from two replicates of 2,048 strata each, bench.evaluate's layout)."""
    m = _method("bd3lm", L=8, block_size=4, estimator=estimator)
    x, counted = _batch(B=3, L=8)
    with torch.no_grad():
        exact = _exact_nelbo(m, x, counted)
        K = 4096
        U = draw_u(x.shape[0], K, "stratified", torch.Generator().manual_seed(5))
        torch.manual_seed(6)
        est = torch.stack([m.nll(x.repeat_interleave(K, 0), counted.repeat_interleave(K, 0),
                                 U.reshape(-1)).view(-1, K)]).squeeze(0).double()
    reps = est.view(-1, 2, K // 2).mean(2)
    mean, se = reps.mean(1), reps.std(1) / math.sqrt(2)
    se = torch.maximum(se, est.std(1) / math.sqrt(K))        # two replicates: guard a lucky small spread
    assert ((mean - exact).abs() <= 4 * se).all(), (mean, exact, se)
    assert (exact > 5).all()


@pytest.mark.parametrize("cached", [True, False])
def test_the_sampler_draws_each_block_from_the_trained_conditional(cached):
    from methods.bd3lm import _Prefix

    m = _method("bd3lm", block_size=4)
    x, _ = _batch(B=3, L=28)                      # 7 blocks: the last three beyond L = 16
    x_t = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(12)) < 0.5, m.mask_id, x)
    prefix = _Prefix(m, cached)
    with torch.no_grad():
        for b in range(7):
            prefix.start_block(x[:, :4 * b])
            blk = slice(4 * b, 4 * b + 4)
            got = torch.log_softmax(prefix.logits(x_t[:, blk], first=True).double(), -1)
            got = -got.gather(-1, x[:, blk, None])[..., 0]
            ctx = x[:, max(0, 4 * b - 12):4 * b]   # the window: the last L − L′ = 12 clean tokens
            k, pad = ctx.shape[1], x[:, :12 - ctx.shape[1]]    # blocks after b cannot matter to it
            want = m.block_ce(torch.cat([ctx, x_t[:, blk], pad], 1), torch.cat([ctx, x[:, blk], pad], 1))
            want = want[:, k:k + 4].double()
            assert (got - want).abs().max() <= RTOL * want.abs().max(), (b, (got - want).abs().max())


def test_kv_cached_sampler_draws_the_uncached_tokens():
    m = _method("bd3lm", block_size=4)
    fed = {}

    def count_tokens(_mod, args, kwargs):
        fed["n"] = fed.get("n", 0) + (args[0] if args else kwargs["tokens"]).shape[1]
    h = m.net.register_forward_pre_hook(count_tokens, with_kwargs=True)
    out = {}
    try:
        for cached, reuse, length in itertools.product((True, False), (True, False), (16, 36)):
            fed["n"] = 0
            calls, hc = count_calls(m.net)
            x = m.sample(5, steps=length // 4 * 3, generator=torch.Generator().manual_seed(8), length=length,
                         kv_cache=cached, reuse=reuse)
            hc.remove()
            out[cached, reuse, length] = (x, calls[0] / 5, fed["n"])
    finally:
        h.remove()
    for reuse, length in itertools.product((True, False), (16, 36)):
        (a, nfe_a, fed_a), (b, nfe_b, fed_b) = out[True, reuse, length], out[False, reuse, length]
        assert torch.equal(a, b) and a.shape == (5, length)
        assert nfe_a == nfe_b and fed_a < fed_b              # the same calls, fewer tokens fed
        assert len(set(map(tuple, a.tolist()))) == 5 and (a < V).all()
    # every block takes its 3 steps without reuse; reuse skips the calls whose input did not change
    assert out[True, False, 36][1] == 27 and out[True, True, 36][1] <= 27
    assert torch.equal(out[True, True, 36][0], out[True, False, 36][0])


def test_samples_beyond_L_continue_the_blocks_in_an_L_window():
    m = _method("bd3lm", block_size=4)
    seen = []

    def check(_mod, args, kwargs):
        tokens, cache = (args[0] if args else kwargs["tokens"]), kwargs.get("cache")
        seen.append((cache.length if cache is not None else 0) + tokens.shape[1])
    h = m.net.register_forward_pre_hook(check, with_kwargs=True)
    try:
        long = m.sample(3, steps=40, generator=torch.Generator().manual_seed(9), length=40)
    finally:
        h.remove()
    assert long.shape == (3, 40) and max(seen) == m.L      # it used the whole window, never more
    short = m.sample(3, steps=16, generator=torch.Generator().manual_seed(9))
    assert torch.equal(long[:, :16], short)                # the same per-block steps: a continuation
    odd = m.sample(3, steps=12, generator=torch.Generator().manual_seed(9), length=18)
    assert odd.shape == (3, 18)


def test_training_loss_is_the_time_form_of_the_bound():
    m = _method("bd3lm", block_size=4)
    t = _method("bd3lm", block_size=4, estimator="time")
    x, counted = _batch()
    u = torch.rand(6, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        torch.manual_seed(14)
        loss = m.loss(x, counted, u)
        torch.manual_seed(14)
        want = t.nll(x, counted, u).sum() / counted.sum()
    assert float(want) > 1 and torch.allclose(loss, want, rtol=RTOL), (loss, want)


def test_clip_one_one_at_block_size_one_trains_on_the_exact_ar_nll():
    m = _method("bd3lm", block_size=1, clip=(1.0, 1.0))
    x, counted = _batch()
    u = torch.rand(6, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        loss = m.loss(x, counted, u)
        want = m.nll(x, counted, u).sum() / counted.sum()
    assert torch.allclose(loss, want, rtol=RTOL), (loss, want)


def test_clip_window_bounds_the_training_mask_rate(monkeypatch):
    import methods.bd3lm as bd3

    m = _method("bd3lm", block_size=4, clip=(0.3, 0.5))
    rates = []
    real = bd3.mask_tokens
    monkeypatch.setattr(bd3, "mask_tokens", lambda x0, c, t, mid: (rates.append(t), real(x0, c, t, mid))[1])
    x, counted = _batch()
    m.loss(x, counted, torch.rand(6))
    t = rates[0]
    assert t.min() >= 0.3 and t.max() <= 0.5 and t.max() - t.min() > 0.1


def _block_loss_variance(m, x0, counted, lo, hi, tau, coins):
    size = m.p.block_size
    t = lo + (hi - lo) * tau
    masked = (coins < t.repeat_interleave(size, 1)) & counted
    ce = m.block_ce(torch.where(masked, m.mask_id, x0), x0).double()
    ell = (ce * masked).view(x0.shape[0], -1, size).sum(-1) / t.double() / size
    return float(ell.var(unbiased=False))


def test_clip_search_picks_the_least_variance_window_and_keeps_it():
    from methods.bd3lm import clip_grid

    m = _method("bd3lm", block_size=4, clip_search=(0.3, 0.6), clip_search_every=3)
    x, counted = _batch(B=8)
    torch.manual_seed(11)
    tau = torch.rand((8, 4)).clamp(1e-6, 1 - 1e-6)
    coins = torch.rand(x.shape)
    grid = clip_grid((0.3, 0.6), 0.05)
    with torch.no_grad():
        var = [_block_loss_variance(m, x, counted, lo, hi, tau, coins) for lo, hi in grid]
        torch.manual_seed(11)
        best = m.search_clip(x, counted)
    assert best == grid[int(np.argmin(var))] and best != (0.0, 1.0)
    assert len(grid) == 1 + 15 + 9 and min(var) < 0.5 * var[0]
    # in training it runs every clip_search_every batches; the window rides in the state dict
    fresh = _method("bd3lm", block_size=4, clip_search=(0.3, 0.6), clip_search_every=3)
    fresh.train()
    assert fresh.window() == (0.0, 1.0)
    for k in range(3):
        fresh.loss(x, counted, torch.rand(8)).backward()
    assert fresh.window() != (0.0, 1.0) and fresh.info()["clip"] == list(fresh.window())
    again = _method("bd3lm", block_size=4, clip_search=(0.3, 0.6), clip_search_every=3)
    again.load_state_dict(fresh.state_dict())
    assert again.window() == fresh.window()


def test_a_block_size_that_does_not_divide_seq_len_is_one_line(tmp_path, capsys):
    from bench.cli import main

    suite = tiny_suite(methods=[{"method": "bd3lm", "block_size": 5}])
    f = write_suite(tmp_path / "bad.yaml", suite)
    rc = main(["run", str(f), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "block_size: 5 does not divide data.seq_len 32" in err, err
    assert not (tmp_path / "out").exists()
