"""The one transformer family every method builds on.

DiT-style blocks (Peebles & Xie 2023, as in SEDD's DDiT and MDLM's DIT): pre-LayerNorm
attention with rotary position embeddings + MLP, each modulated by adaLN (shift, scale, gate) computed from a conditioning
vector c = MLP(sinusoidal(t)). Bidirectional SDPA attention for diffusion; the same blocks with
causal attention (and t ≡ 0) are the autoregressive GPT-2 baseline, so a "matching size"
comparison compares objectives, not architectures (MDLM's ``small-ar``).

Inputs: token ids (B, L) or precomputed embeddings (B, L, hidden) for continuous methods; the
conditioning scalar per sequence t (B,), a time in [0, 1] (embedded as 1000·t, DiT's range;
zeros when unused, as for the AR baseline).
Output: logits (B, L, vocab_out), or the final hidden states with ``return_hidden=True``.

Continuous input (optional, for Gaussian/simplex diffusion): ``in_dim=d`` adds an input
projection ``inp: R^d → R^hidden`` applied to ``embeds`` (B, L, d); ``vocab_in=None`` then
builds no token embedding at all (no parameter DDP would see unused). With
``self_condition=True`` the forward also takes ``self_cond`` (B, L, d), the previous estimate
x̃0, and the projection reads the concatenation [z_t, x̃0] ∈ R^{2d} (Chen et al. 2022, Analog
Bits §3.2; PLAID's input layer); zeros mean "no estimate yet".

KV cache (causal backbones only): ``forward(tokens, cache=KVCache())`` appends the new tokens'
keys/values (after rotary rotation, at positions ``cache.length …``) and attends over all
cached ones, so autoregressive sampling feeds one new token per call instead of the whole
prefix. Same arithmetic as the uncached causal pass (each query sees exactly the keys at or
before its position); tests/test_sampling.py checks cached and uncached samples are identical.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.config import BackboneConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a scalar per sequence, (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def rotary_tables(L: int, head_dim: int, device, base: float = 10000.0):
    """cos/sin tables (L, head_dim/2) of rotary position embeddings (Su et al. 2021, RoFormer
    eq. 34), as in SEDD's and MDLM's DiT: attention sees relative positions from the start."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(L, device=device, dtype=torch.float32)[:, None] * inv[None]
    return ang.cos(), ang.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs (x_{2i}, x_{2i+1}) of x (B, L, H, d) by position-dependent angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None].to(x.dtype), sin[None, :, None].to(x.dtype)
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


def modulate(x, shift, scale):
    """x · (1 + scale) + shift, per sequence (one fused pass: addcmul)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig, causal: bool):
        super().__init__()
        d = cfg.hidden
        self.heads, self.causal, self.dropout = cfg.heads, causal, cfg.dropout
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * d, d))
        self.adaLN = nn.Linear(cfg.cond_dim, 6 * d)
        nn.init.zeros_(self.adaLN.weight)
        nn.init.zeros_(self.adaLN.bias)

    def forward(self, x, c, rope, kv: dict | None = None):
        B, L, D = x.shape
        H = self.heads
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(c).chunk(6, dim=-1)
        qkv = self.qkv(modulate(self.norm1(x), sh1, sc1)).view(B, L, 3, H, D // H)
        # rotary on q and k in one pass: (B, L, 2, H, d) seen as (B, L, 2H, d) heads
        qk = apply_rotary(qkv[:, :, :2].reshape(B, L, 2 * H, D // H), *rope).view(B, L, 2, H, D // H)
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        causal, mask = self.causal, None
        if kv is not None:                     # prepend the cached keys/values of positions < P
            if "k" in kv:
                P = kv["k"].shape[2]
                k, v = torch.cat([kv["k"], k], 2), torch.cat([kv["v"], v], 2)
                if L > 1:                      # query i (position P+i) sees keys 0..P+i
                    pos = torch.arange(P + L, device=x.device)
                    mask = pos[None, :] <= (P + torch.arange(L, device=x.device))[:, None]
                causal = False
            kv["k"], kv["v"] = k, v
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        a = F.dropout(self.proj(a.transpose(1, 2).reshape(B, L, D)), self.dropout, self.training)
        x = torch.addcmul(x, 1 + g1[:, None], a)  # x + (1 + g1) · a
        m = F.dropout(self.mlp(modulate(self.norm2(x), sh2, sc2)), self.dropout, self.training)
        return torch.addcmul(x, 1 + g2[:, None], m)


class Backbone(nn.Module):
    def __init__(self, cfg: BackboneConfig, vocab_in: int | None, vocab_out: int, seq_len: int,
                 causal: bool = False, in_dim: int | None = None, self_condition: bool = False):
        super().__init__()
        self.cfg, self.causal, self.seq_len = cfg, causal, seq_len
        d = cfg.hidden
        if (d // cfg.heads) % 2:
            raise ValueError(f"head dimension {d // cfg.heads} must be even (rotary embeddings)")
        if vocab_in:
            self.tok = nn.Embedding(vocab_in, d)
            nn.init.normal_(self.tok.weight, std=0.02)
        else:
            self.tok = None
        if self_condition and not in_dim:
            raise ValueError("self_condition needs a continuous input (in_dim)")
        self.self_condition = self_condition
        self.inp = nn.Linear(in_dim * (2 if self_condition else 1), d) if in_dim else None
        self.t_mlp = nn.Sequential(nn.Linear(cfg.cond_dim, cfg.cond_dim), nn.SiLU(),
                                   nn.Linear(cfg.cond_dim, cfg.cond_dim))
        self.blocks = nn.ModuleList(Block(cfg, causal) for _ in range(cfg.layers))
        self.norm_f = nn.LayerNorm(d, elementwise_affine=False)
        self.adaLN_f = nn.Linear(cfg.cond_dim, 2 * d)
        nn.init.zeros_(self.adaLN_f.weight)
        nn.init.zeros_(self.adaLN_f.bias)
        self.head = nn.Linear(d, vocab_out)
        nn.init.zeros_(self.head.weight)  # start from uniform predictions (as MDLM/DiT)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens=None, t=None, embeds=None, return_hidden: bool = False,
                cache: "KVCache | None" = None, self_cond=None):
        x = self.tok(tokens) if embeds is None else embeds
        if self.inp is not None and embeds is not None:
            if self.self_condition:
                x = torch.cat([x, torch.zeros_like(x) if self_cond is None else self_cond], dim=-1)
            x = self.inp(x)
        B, L, _ = x.shape
        P = cache.length if cache is not None else 0
        if cache is not None and not self.causal:
            raise ValueError("a KV cache needs a causal backbone")
        if P + L > self.seq_len:
            raise ValueError(f"sequence of {P + L} tokens exceeds the backbone's seq_len {self.seq_len}")
        cos, sin = rotary_tables(P + L, self.cfg.hidden // self.cfg.heads, x.device)
        rope = (cos[P:], sin[P:])
        if t is None:
            t = torch.zeros(B, device=x.device)
        c = F.silu(self.t_mlp(timestep_embedding(1000 * t, self.cfg.cond_dim).to(x.dtype)))
        for i, blk in enumerate(self.blocks):
            x = blk(x, c, rope, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.length += L
        sh, sc = self.adaLN_f(c).chunk(2, dim=-1)
        x = modulate(self.norm_f(x), sh, sc)
        return x if return_hidden else self.head(x)


class KVCache:
    """Per-block keys/values of the tokens seen so far (``length`` of them)."""

    def __init__(self, layers: int):
        self.layers: list[dict] = [{} for _ in range(layers)]
        self.length = 0


def count_params(module: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    emb = sum(p.numel() for n, p in module.named_parameters() if n.endswith("tok.weight"))
    return {"params": total, "params_non_embedding": total - emb}
