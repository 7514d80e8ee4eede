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

from bench.backbone import Backbone
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
        m = blk.mlp[2](F.gelu(blk.mlp[0](h), approximate="tanh"))
        x = x + (1 + g2[:, None]) * m
    sh, sc = net.adaLN_f(c).chunk(2, -1)
    return net.head(ln(x) * (1 + sc[:, None]) + sh[:, None])


@pytest.mark.parametrize("causal", [True, False])
def test_backbone_matches_the_plain_reference(causal):
    torch.manual_seed(0)
    net = Backbone(BackboneConfig(layers=2, hidden=64, heads=4, cond_dim=16), 101, 100, 32, causal=causal)
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
