"""The shared backbone computes what its docstring says: a plain, unoptimised reference of
the same DiT block (written out here formula by formula) gives the same logits and gradients
up to float32 rounding. Guards speed work on bench/backbone.py (fused ops, rotary layout).

Tolerance: 1e-5 relative to the largest output; the two differ only in summation/FMA order
(measured ~4e-7 here), while a real change (a sign, a dropped gate, a wrong rotary pair) moves
them by O(1)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.backbone import Backbone, Head, _HeadNLL
from bench.config import BackboneConfig


def reference(net: Backbone, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    cfg = net.cfg
    x = net.tok.weight[tokens]
    B, L, D = x.shape
    H, d = cfg.heads, D // cfg.heads
    half = cfg.cond_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (1000 * t)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    c = F.silu(net.t_mlp(emb))
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(L, dtype=torch.float32)[:, None] * inv[None]  # (L, d/2)

    def rotate(v):  # v (B, L, H, d): pairs (2i, 2i+1) rotated by angle ang[pos, i]
        out = torch.empty_like(v)
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
        out[..., 0::2] = v[..., 0::2] * cos - v[..., 1::2] * sin
        out[..., 1::2] = v[..., 0::2] * sin + v[..., 1::2] * cos
        return out

    def ln(v):
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-5)

    for blk in net.blocks:
        sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN(c).chunk(6, -1)
        h = ln(x) * (1 + sc1[:, None]) + sh1[:, None]
        qkv = h @ blk.qkv.weight.T
        q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, L, H, d) for i in range(3))
        q, k = rotate(q), rotate(k)
        s = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(d)
        if blk.causal:
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        a = torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v).reshape(B, L, D) @ blk.proj.weight.T
        x = x + (1 + g1[:, None]) * a
        h = ln(x) * (1 + sc2[:, None]) + sh2[:, None]
        u = blk.mlp[0](h)
        if cfg.activation == "gelu_tanh":   # GPT-2's gelu_new
            u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        else:                               # exact: u Φ(u)
            u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
        m = blk.mlp[2](u)
        x = x + (1 + g2[:, None]) * m
    sh, sc = net.adaLN_f(c).chunk(2, -1)
    return net.head(ln(x) * (1 + sc[:, None]) + sh[:, None])


@pytest.mark.parametrize("causal,activation", [(True, "gelu_tanh"), (False, "gelu_tanh"), (True, "gelu")])
def test_backbone_matches_the_plain_reference(causal, activation):
    """The two activations differ by up to 4.7e-4 (tanh-approximate against exact GELU, at
    u ≈ 2.7), which moves the logits here by more than the 1e-5 tolerance: the test tells them
    apart (checked: the exact-GELU case fails with the tanh kernel)."""
    torch.manual_seed(0)
    cfg = BackboneConfig(layers=2, hidden=64, heads=4, cond_dim=16, activation=activation)
    net = Backbone(cfg, 101, 100, 32, causal=causal)
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised adaLN/head would hide their paths
            p.normal_(std=0.1)
    x, t = torch.randint(0, 101, (3, 32)), torch.rand(3)
    got, want = net(x, t), reference(net, x, t)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale
    g1 = torch.autograd.grad(got.square().sum(), list(net.parameters()))
    g2 = torch.autograd.grad(want.square().sum(), list(net.parameters()))
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1e-12)


def test_the_activation_is_in_the_run_id_only_when_not_the_default():
    """At its default the field is absent from the dump (so every run id made before it stays);
    set to the exact GELU it is recorded."""
    assert "activation" not in BackboneConfig(layers=2, hidden=64, heads=4).model_dump()
    assert BackboneConfig(layers=2, hidden=64, heads=4, activation="gelu").model_dump()["activation"] == "gelu"


@pytest.mark.parametrize("bias", [True, False])
def test_fused_head_nll_is_log_softmax_cross_entropy_with_its_gradients(bias, monkeypatch):
    """Head(x, targets) = −log softmax(Head(x))[targets], value and gradients (x, W, b) under a
    non-uniform incoming gradient per row; float64, so the two differ only in summation order
    (1e-10). Chunks of 4 rows make the log-sum-exp loop run over several chunks and a ragged end."""
    monkeypatch.setattr(_HeadNLL, "CHUNK", 4)
    torch.manual_seed(0)
    head = Head(16, 50, bias=bias).double()
    torch.nn.init.normal_(head.weight)
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 7))
    g = torch.rand(3, 7, dtype=torch.float64)

    def grads(nll):
        params = [x, head.weight] + ([head.bias] if bias else [])
        return nll, torch.autograd.grad((nll * g).sum(), params)

    ref, ref_grads = grads(-F.log_softmax(head(x), -1).gather(-1, y[..., None])[..., 0])
    out, out_grads = grads(head(x, y))
    assert out.shape == (3, 7)
    assert torch.allclose(out, ref, rtol=0, atol=1e-10)
    for a, b in zip(out_grads, ref_grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_fused_head_backward_runs_once():
    head = Head(8, 10)
    nll = head(torch.randn(4, 8, requires_grad=True), torch.randint(0, 10, (4,))).sum()
    nll.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        nll.backward()


@pytest.mark.parametrize("with_targets", [True, False])
def test_fused_head_expectation_and_nll_with_their_gradients(with_targets, monkeypatch):
    """Head(x, targets, expect=E) = (softmax(Head(x))·E, −log softmax(Head(x))[targets]), values
    and gradients (x, W, b, E) under non-uniform incoming gradients on both outputs; float64,
    1e-10 as above; chunks of 4 rows so the in-place backward loop runs over several chunks."""
    monkeypatch.setattr(_HeadNLL, "CHUNK", 4)
    torch.manual_seed(1)
    head = Head(16, 50).double()
    torch.nn.init.normal_(head.weight)
    E = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 7))
    gx, gn = torch.randn(3, 7, 6, dtype=torch.float64), torch.rand(3, 7, dtype=torch.float64)
    params = [x, head.weight, head.bias, E]

    def grads(x_hat, nll):
        obj = (x_hat * gx).sum() + ((nll * gn).sum() if with_targets else 0)
        return [x_hat] + ([nll] if with_targets else []), torch.autograd.grad(obj, params)

    logits = head(x)
    ref = grads(torch.softmax(logits, -1) @ E, -F.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0])
    out = head(x, y if with_targets else None, expect=E)
    out = grads(*out) if with_targets else grads(out, None)
    assert out[0][0].shape == (3, 7, 6)
    for a, b in zip(out[0] + list(out[1]), ref[0] + list(ref[1])):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["ar", "mdlm", "plaid", "ssd-lm"])
def test_fused_heads_under_bf16_autocast_track_fp32(name):
    """The fused heads' backward casts between the autocast dtype and fp32 by hand: under CPU
    bf16 autocast each method's loss and gradients must track its fp32 run. bf16 keeps 8
    mantissa bits (relative rounding 2^-8 ≈ 0.4% per op); through a 1-layer network the
    gradients measured 1.1–1.6% apart, the loss < 0.03%: bounds 5% and 0.3%."""
    from bench.registry import get_method
    cls = get_method(name)
    torch.manual_seed(0)
    m = cls(cls.Params(), BackboneConfig(layers=1, hidden=32, heads=2), 50, 16)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.1)
    x, c, u = torch.randint(0, 50, (4, 16)), torch.ones(4, 16, dtype=torch.bool), torch.rand(4)
    runs = []
    for bf16 in (False, True):
        m.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = m.loss(x, c, u)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (l32, g32), (l16, g16) = runs
    assert abs(float(l16 - l32)) <= 3e-3 * abs(float(l32))
    for a, b in zip(g16, g32):
        assert a.dtype == torch.float32 and float((a - b).norm()) <= 0.05 * float(b.norm()) + 1e-6


def _structured(net):
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(std=0.1)
    return net.eval()


def test_an_explicit_mask_is_the_pattern_it_states():
    """The attention-mask API (bench/backbone.py): a bidirectional backbone under a lower-
    triangular mask is the causal backbone; two sequences side by side under a block-diagonal
    mask, at the same positions, are each one fed alone. Same weights, 1e-5 of the largest logit."""
    torch.manual_seed(0)
    cfg = BackboneConfig(layers=2, hidden=32, heads=2, cond_dim=16)
    bi = _structured(Backbone(cfg, 21, 20, 12, causal=False))
    ca = Backbone(cfg, 21, 20, 12, causal=True).eval()
    ca.load_state_dict(bi.state_dict())
    x, y = torch.randint(0, 21, (3, 12)), torch.randint(0, 21, (3, 12))
    with torch.no_grad():
        want = ca(x)
        got = bi(x, attn_mask=torch.ones(12, 12, dtype=torch.bool).tril())
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        assert (bi(x) - want).abs().max() > 1e-2 * want.abs().max()      # the mask did something
        diag = torch.block_diag(torch.ones(12, 12), torch.ones(12, 12)).bool()
        both = bi(torch.cat([x, y], 1), attn_mask=diag, positions=torch.arange(12).repeat(2))
        for half, alone in ((both[:, :12], bi(x)), (both[:, 12:], bi(y))):
            assert (half - alone).abs().max() <= 1e-5 * alone.abs().max()
    with pytest.raises(ValueError, match="seq_len"):
        bi(torch.cat([x, y], 1))                                   # 24 positions > seq_len 12
    with pytest.raises(ValueError, match="attn_mask"):
        bi(x, attn_mask=diag)


def test_kv_cache_store_keeps_only_what_it_is_told():
    """store=k keeps the first k new tokens' keys/values (the rest are queries only); store=0
    leaves the cache as it was; a mask spans the cached keys, then the new ones. A bidirectional
    cache: new tokens see all of it. Against the same blocks fed one call each: 1e-5."""
    from bench.backbone import KVCache

    torch.manual_seed(0)
    net = _structured(Backbone(BackboneConfig(layers=2, hidden=32, heads=2, cond_dim=16), 21, 20, 16))
    x = torch.randint(0, 21, (2, 12))
    with torch.no_grad():
        ref = KVCache(2)
        net(x[:, :4], cache=ref)
        two = net(x[:, 4:8], cache=ref)                        # block 2 against block 1
        three = net(x[:, 8:12], cache=ref)                     # block 3 against blocks 1, 2
        kv = KVCache(2)
        net(x[:, :4], cache=kv)
        probe = net(x[:, 4:8], cache=kv, store=0)              # block 2 queried, not stored
        assert kv.length == 4 and all(d["k"].shape[2] == 4 for d in kv.layers)
        mask = torch.ones(8, 12, dtype=torch.bool)
        mask[:4, 8:] = False                                   # block 2 does not see block 3
        mixed = net(x[:, 4:12], cache=kv, attn_mask=mask, store=4)   # block 2 stored, block 3 a query
        assert kv.length == 8 and all(d["k"].shape[2] == 8 for d in kv.layers)
        after = net(x[:, 8:12], cache=kv, store=0)
        bare = KVCache(2)
        net(x[:, :4], cache=bare)
        unmasked = net(x[:, 4:12], cache=bare, store=0)        # no mask: blocks 2 and 3 see each other
    for got, want in ((probe, two), (mixed[:, :4], two), (mixed[:, 4:], three), (after, three)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (unmasked[:, :4] - two).abs().max() > 1e-3 * two.abs().max()  # without a mask block 2 sees more
