"""hf-masked-diffusion's BD3-LM rows (``block_size``): a released BD3-LM checkpoint is scored with
BD3-LM's own bound — for the same weights and the same random draws its number is, draw for
draw, the one methods/bd3lm.py computes, and its sampler draws the tokens BD3-LM's sampler
draws — and the row's settings are checked against the checkpoint's config in one line.

The checkpoint is tests/bd3_standin.py: kuleshov-group's BD3LM forward interface (``input_ids`` =
[x_t, x_0], exactly 2·model_length ids, the block-diff mask inside; ``timesteps`` required; the
raw logits of the x_t half with the [MASK] column) holding a ``bd3lm`` method's network, saved
with save_pretrained under tmp_path (offline, no remote code). tests/test_bd3lm.py proves what
bd3lm's numbers and samples are (the exact AR chain rule at L′ = 1, MDLM at L′ = L, unbiased for
the enumerated L_BD; each block drawn from the trained conditional), so equality carries it over.

Tolerance: both numbers come from the same float32 network on the same ids and masks and differ
only in how the cross-entropy is summed (bench.backbone's fused head against logsumexp − logit
in methods._masked.subs_ce): 1e-5 relative to per-sequence totals of ~10² nats (measured: equal
to the last bit on this CPU). Feeding [x_0, x_t], keeping the stand-in's [MASK] logit (8 above
the others, as an unconstrained head can have it) or scoring the sequence as one block moves them
by O(1).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.config import BackboneConfig, Protocol
from bench.errors import UserError
from bench.evaluate import per_sequence_nll
from bench.method import Context
from bench.registry import get_method
from bench.samples import count_calls
from tests import bd3_standin as S

BB = BackboneConfig(layers=2, hidden=32, heads=2, cond_dim=16)
V, L = 40, 16
RTOL = 1e-5


def bd3(size: int, seed: int = 0):
    """A ``bd3lm`` method with structured random weights (its head and adaLN start at zero)."""
    cls = get_method("bd3lm")
    torch.manual_seed(seed)
    m = cls(cls.Params(block_size=size), BB, V, L)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def row(path, seq_len: int = L, **params):
    """hf-masked-diffusion on the checkpoint at ``path``, as suites/published.yaml's BD3-LM rows set it."""
    cls = get_method("hf-masked-diffusion")
    p = {"model": str(path), "mask_id": V, "trust_remote_code": True, "time_kwarg": "timesteps",
         "time_value": "zero", **params}
    return cls(cls.Params(**p), BB, V, seq_len, Context())


def protocol(K: int) -> Protocol:
    return Protocol(tokenizer="-", seq_len=L, packing="-", counted="-", t_samples=K, t_sampling="stratified",
                    t_min=0.0, confidence=0.95, max_blocks=None)


def batch(B: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, L), generator=g).numpy()
    counted = np.ones_like(x, dtype=bool)
    counted[0, :3] = False                       # clean context, never scored
    counted[1, 5:7] = False
    return x, counted


@pytest.mark.parametrize("size", [1, 4, 16])
def test_block_row_is_bd3lms_bound_for_the_same_weights(tmp_path, size):
    """The protocol's estimate (bench.evaluate.per_sequence_nll: stratified u, K = 8 draws per
    sequence, the method noise seeded alike) of the checkpoint under a ``block_size`` row equals
    bd3lm's for the same network, every sequence and draw: L′ = 1 (the exact AR likelihood),
    4, and 16 = L (MDLM), with uncounted clean context."""
    m = bd3(size)
    S.save_from_bd3lm(m, tmp_path / "ckpt")
    r = row(tmp_path / "ckpt", block_size=size)
    x, counted = batch()
    S.SEEN.clear()
    theirs, n_r = per_sequence_nll(r, x, counted, protocol(8), batch_size=3, seed=0, device="cpu")
    ours, n_m = per_sequence_nll(m, x, counted, protocol(8), batch_size=3, seed=0, device="cpu")
    assert np.array_equal(n_r, n_m)
    assert ours.std(axis=1).min() > 0 or size == 1      # real Monte-Carlo draws (at L′ = 1 the bound is exact)
    np.testing.assert_allclose(theirs, ours, rtol=RTOL, atol=0)
    assert S.SEEN and all((t == 0).all() for t in S.SEEN)   # trained with σ ≡ 0: the keyword carries 0
    info = r.info()
    assert info["block_size"] == size and "L_BD" in info["estimator"] and info["mask_id"] == V


@pytest.mark.parametrize("steps", [2, 8, 30])
def test_block_sampler_draws_bd3lms_tokens(tmp_path, steps):
    """With the same generator the row's sampler draws exactly the tokens of bd3lm's (KV-cached)
    sampler on the same weights — fewer steps than blocks, a few per block, many per block — in
    at most max(steps, blocks) network calls per sequence (a call per block at least)."""
    m = bd3(4)
    S.save_from_bd3lm(m, tmp_path / "ckpt")
    r = row(tmp_path / "ckpt", block_size=4)
    n, blocks = 5, L // 4
    with torch.no_grad():
        want = m.sample(n, steps=steps, generator=torch.Generator().manual_seed(7))
        calls, hook = count_calls(r.net)
        got = r.sample(n, steps=steps, generator=torch.Generator().manual_seed(7))
        hook.remove()
    assert got.shape == (n, L) and (got < V).all()
    assert torch.equal(got, want)
    assert blocks <= calls[0] / n <= max(steps, blocks)
    assert r.sampler_info(steps)["block_size"] == 4


def test_block_row_settings_are_checked_in_one_line(tmp_path):
    """A row whose block_size or seq_len disagrees with the checkpoint's config, a block_size not
    dividing seq_len, or a block row asking for time, another sampler or shifted logits: one line
    naming the key."""
    S.save_standin(tmp_path / "c", block_size=4, model_length=L, vocab_size=V + 1)
    cls = get_method("hf-masked-diffusion")
    cases = [(lambda: row(tmp_path / "c", block_size=8),
              r"^methods\[hf-masked-diffusion\]\.block_size: 8, but .* was trained with block_size 4"),
             (lambda: row(tmp_path / "c", seq_len=2 * L, block_size=4),
              rf"^data\.seq_len: {2 * L}, but .* takes \[x_t, x_0\] of exactly 2·{L} ids"),
             (lambda: cls.check_compatible({"model": str(tmp_path / "c"), "block_size": 5}, SimpleNamespace(seq_len=L),
                                           "methods[2]"),
              rf"^methods\[2\]\.block_size: 5 does not divide data\.seq_len {L}")]
    for make, pattern in cases:
        with pytest.raises(UserError, match=pattern) as e:
            make()
        assert "\n" not in str(e.value)
    for bad in ({"time_value": "sigma"}, {"sampler": "confidence"}, {"logits": "shifted-subs"}):
        with pytest.raises(ValueError, match="block_size: a BD3-LM row takes no time"):
            cls.Params(model="m", block_size=4, time_kwarg="timesteps", **{"time_value": "zero", **bad})
    assert row(tmp_path / "c", block_size=4).info()["block_size"] == 4
    # a row without block_size dumps (hence hashes into its run id) as before the setting existed
    assert "block_size" not in cls.Params(model="m").model_dump() and cls.Params(model="m", block_size=4).model_dump()[
        "block_size"] == 4


def test_modelling_code_older_than_transformers_5_is_one_line(tmp_path):
    """BD3-LM's modelling code (written for transformers 4.49) never calls post_init(), which
    transformers 5's from_pretrained needs: under transformers >= 5 the row is one line saying so
    and what to run it under; under 4.x it loads."""
    import transformers

    S.save_standin(tmp_path / "c", block_size=4, model_length=L, vocab_size=V + 1, legacy_init=True)
    if int(transformers.__version__.split(".")[0]) < 5:
        assert row(tmp_path / "c", block_size=4).info()["block_size"] == 4
        return
    with pytest.raises(UserError, match=r"^methods\[hf-masked-diffusion\]\.model: .*never calls post_init\(\): "
                                        r"run it under transformers<5\)$") as e:
        row(tmp_path / "c", block_size=4)
    assert "\n" not in str(e.value)
