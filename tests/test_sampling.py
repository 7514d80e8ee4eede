"""Samplers as the harness drives them: KV-cache exactness, MDLM's time-agnostic cache, NFE
counted from real network calls, samples.jsonl extension without retraining."""
from __future__ import annotations

import torch

from bench.config import BackboneConfig
from tests.conftest import specs_of, tiny_suite

BB = BackboneConfig(layers=2, hidden=32, heads=2, cond_dim=16)


def _method(name, V=50, L=24, seed=0, **params):
    from bench.registry import get_method

    cls = get_method(name)
    torch.manual_seed(seed)
    m = cls(cls.Params(**params), BB, V, L)
    for p in m.parameters():          # the heads start at zero (uniform): give them structure
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else None
    return m.eval()


def test_kv_cache_gives_identical_samples_and_logits():
    m = _method("ar")
    a = m.sample(6, generator=torch.Generator().manual_seed(3), cache=True)
    b = m.sample(6, generator=torch.Generator().manual_seed(3), cache=False)
    assert torch.equal(a, b)
    assert len(set(map(tuple, a.tolist()))) == 6          # not a degenerate constant sampler
    # the cached logits match the full causal pass position by position (float32 round-off)
    from bench.backbone import KVCache

    x = torch.cat([torch.full((6, 1), m.V), a[:, :-1]], 1)
    full = m.net(x)
    kv = KVCache(len(m.net.blocks))
    step = torch.cat([m.net(x[:, i:i + 1], cache=kv) for i in range(x.shape[1])], 1)
    assert torch.allclose(full, step, atol=1e-5, rtol=0)
    # a multi-token chunk after a cached prefix is masked causally, too
    kv = KVCache(len(m.net.blocks))
    two = torch.cat([m.net(x[:, :5], cache=kv), m.net(x[:, 5:], cache=kv)], 1)
    assert torch.allclose(full, two, atol=1e-5, rtol=0)


def test_mdlm_time_agnostic_cache_same_samples_fewer_calls():
    from bench.samples import count_calls

    m = _method("mdlm", time_conditioning=False)
    out = {}
    for cache in (True, False):
        calls, h = count_calls(m.net)
        x = m.sample(4, steps=200, generator=torch.Generator().manual_seed(5), cache=cache)
        h.remove()
        out[cache] = (x, calls[0])
    assert torch.equal(out[True][0], out[False][0])
    # sequences evaluated: 4 per step without the cache; with it only those that changed
    assert out[False][1] == 4 * 200 and out[True][1] < 4 * 200 / 2   # L = 24: most of 200 steps reveal none
    assert (out[True][0] != m.mask_id).all()
    # with time conditioning the prediction depends on t: the cache is never used
    mt = _method("mdlm", time_conditioning=True)
    calls, h = count_calls(mt.net)
    mt.sample(4, steps=50, generator=torch.Generator().manual_seed(5))
    h.remove()
    assert calls[0] == 4 * 50


def test_time_conditioning_false_feeds_t_zero():
    m = _method("mdlm", time_conditioning=False)
    x = torch.randint(0, 50, (2, 24))
    assert torch.equal(m.denoise(x, torch.tensor([0.1, 0.9])), m.denoise(x, torch.tensor([0.5, 0.5])))
    mt = _method("mdlm", time_conditioning=True)
    assert not torch.equal(mt.denoise(x, torch.tensor([0.1, 0.9])), mt.denoise(x, torch.tensor([0.5, 0.5])))


def test_sample_steps_accepts_an_int_or_a_list(tmp_path):
    s1 = specs_of(tiny_suite(eval={"samples": 2, "sample_steps": 8}), tmp_path)[0]
    s2 = specs_of(tiny_suite(eval={"samples": 2, "sample_steps": [8, 32]}), tmp_path)[0]
    assert s1.eval.sample_steps == [8] and s2.eval.sample_steps == [8, 32]


def test_drawn_samples_record_nfe_seed_and_extend_exactly(tmp_path):
    from bench.data import get_tokenizer
    from bench.samples import read_samples, write_run_samples

    spec = specs_of(tiny_suite(eval={"samples": 3, "sample_steps": [4, 7], "batch_size": 2}), tmp_path)[0]
    tok = get_tokenizer(spec.data)
    m = _method("mdlm", V=tok.vocab_size, L=spec.data.seq_len)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert write_run_samples(m, spec, tok, a, n=3) == 6
    assert write_run_samples(m, spec, tok, a, n=5) == 10     # extend: 2 more per budget
    assert write_run_samples(m, spec, tok, b, n=5) == 10     # all at once
    ra, rb = read_samples(a / "samples.jsonl"), read_samples(b / "samples.jsonl")
    key = lambda r: (r["steps"], r["index"])  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_s"}  # noqa: E731
    assert [strip(r) for r in sorted(ra, key=key)] == [strip(r) for r in sorted(rb, key=key)]
    r = ra[0]
    assert r["nfe"] == r["steps"] == 4 and r["float64_sampling"] is True and r["wall_s"] > 0
    assert r["text"] == tok.decode(r["ids"]) and len(r["ids"]) == spec.data.seq_len
    ar = _method("ar", V=tok.vocab_size, L=spec.data.seq_len)
    c = tmp_path / "c"
    c.mkdir()
    write_run_samples(ar, spec, tok, c, n=2)
    rc = read_samples(c / "samples.jsonl")
    assert len(rc) == 2 and rc[0]["steps"] is None and rc[0]["nfe"] == spec.data.seq_len  # one call per token


def test_sampling_batch_comes_from_the_spec_not_from_how_many_are_asked(tmp_path):
    """eval.samples = 3 with eval.batch_size = 32: batches of min(32, 3) = 3 sequences — the
    network evaluates 3 sequences per step, not 32 to keep 3 — and asking for 5 later (a second
    batch of 3) gives the same lines as asking for 5 at once."""
    from bench.data import get_tokenizer
    from bench.samples import count_calls, read_samples, sampling_batch, write_run_samples

    spec = specs_of(tiny_suite(eval={"samples": 3, "sample_steps": [4], "batch_size": 32}), tmp_path)[0]
    assert sampling_batch(spec) == 3
    tok = get_tokenizer(spec.data)
    m = _method("mdlm", V=tok.vocab_size, L=spec.data.seq_len)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    calls, h = count_calls(m.net)
    assert write_run_samples(m, spec, tok, a) == 3
    h.remove()
    assert calls[0] == 3 * 4                                  # 3 sequences × 4 steps
    assert write_run_samples(m, spec, tok, a, n=5) == 5       # extend: a second batch of 3, keep 2
    assert write_run_samples(m, spec, tok, b, n=5) == 5       # all at once
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_s"}  # noqa: E731
    ra, rb = read_samples(a / "samples.jsonl"), read_samples(b / "samples.jsonl")
    assert [strip(r) for r in ra] == [strip(r) for r in rb]
    assert [r["index"] for r in ra] == list(range(5)) and len({r["seed"] for r in ra}) == 2
    assert all(r["nfe"] == 4 for r in ra)
    no_samples = specs_of(tiny_suite(eval={"samples": 0, "batch_size": 32}), tmp_path)[0]
    assert sampling_batch(no_samples) == 32                   # `tdbench sample --n` on a run that kept none
