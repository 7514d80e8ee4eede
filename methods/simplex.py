"""Simplex diffusion for text: SSD-LM (Han et al. 2023).

SSD-LM represents each token as a ±k vector on the vocabulary simplex, S_0 = k(2·onehot(w) − 1)
∈ {−k, +k}^V, and diffuses it with Gaussian noise, S_t = α_t S_0 + σ_t·k·ε (the schedules of
methods/_gaussian.py); the network reads the expected embedding softmax(S_t)·E and is trained by
cross-entropy on w. It has no likelihood (its ppl is "—"); its sampler draws from the logits at
each step and re-noises the ±k projection. Derivation: docs/methods.md#ssd-lm.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from bench.backbone import Backbone
from bench.condition import condition
from bench.method import Method, Params, gumbel_argmax
from bench.registry import register
from methods._gaussian import (
    SC_RATE,
    SCHEDULES,
    NormalStream,
    bcast,
    sc_label,
    standard_normal,
    train_condition,
)


# ----------------------------------------------------------------------------- simplex diffusion
class SSDLMParams(Params):
    self_condition: bool = False
    self_condition_rate: float = SC_RATE
    simplex_k: float = Field(5.0, gt=0)
    schedule: Literal["cosine", "sqrt", "tan-d"] = "cosine"
    float64_sampling: bool = True


class _ExpectedEmbedding(torch.autograd.Function):
    """softmax(S_t)·E = P E for simplex probabilities P (N, V), which need no gradient, and
    ∂E = Pᵀ ḡ. On CPU Pᵀ ḡ is summed over blocks of BLOCK rows of P (addmm into one (V, d)
    buffer) rather than one transposed product — the same arithmetic in another summation order,
    faster on one CPU thread at the smoke size (timings: docs/performance.md#ssd-lm-where-its-step-goes).
    Elsewhere one product."""

    BLOCK = 128

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, P, E):
        ctx.save_for_backward(P)
        ctx.E_dtype = E.dtype
        return P @ E

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        (P,) = ctx.saved_tensors
        g = g.to(P.dtype)
        if P.device.type != "cpu":
            return None, (P.t() @ g).to(ctx.E_dtype)
        b = _ExpectedEmbedding.BLOCK
        grad = torch.mm(P[:b].t(), g[:b])
        for s in range(b, P.shape[0], b):
            grad.addmm_(P[s:s + b].t(), g[s:s + b])
        return None, grad.to(ctx.E_dtype)


@register("ssd-lm")
class SSDLM(Method):
    Params = SSDLMParams
    likelihood = "none"
    time = "continuous"
    conditioning = "any"
    ROWS_BYTES = 1 << 20        # noised_probs' CPU blocks: 1 MiB (128 rows at V = 2048), in L2

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        self.E = nn.Parameter(torch.randn(vocab_size, backbone.hidden))   # input softmax(S_t)·E
        self.schedule = SCHEDULES[params.schedule]()

    @classmethod
    def default_label(cls, params):
        return sc_label("SSD-LM", params)

    def build_network(self, cfg):
        # softmax(S_t)·E enters the blocks directly, as SSD-LM's inputs_embeds enter RoBERTa (a
        # projection after E would be a second linear map of the same input); with
        # self-conditioning the backbone's input projection reads [softmax(S_t)·E, x̃0]
        return Backbone(cfg, vocab_in=None, vocab_out=self.V, seq_len=self.L,
                        in_dim=cfg.hidden if self.p.self_condition else None,
                        self_condition=self.p.self_condition)

    def noised_probs(self, w, counted, t, generator=None):
        """softmax(S_t) of the forward process S_t = α_t S_0 + σ_t·k·ε on counted positions (S_0
        elsewhere), S_0 = k(2·onehot(w) − 1) ∈ {−k, +k}^V, ε ~ N(0, I) from a
        _gaussian.NormalStream on ``generator`` (the global one when None). S_t is computed up to
        a constant per position: S_0 is −k plus 2k at w, so S_t = k(σ_t ε − α_t) + 2kα_t·onehot(w),
        and the −kα_t term, the same for every v, is left out — the softmax over v does not see it.

        On CPU the (B, L, V) tensor is made ROWS_BYTES at a time — noise, scale, shift and an
        in-place softmax while the rows are in cache (rather than one pass each over all of it;
        timings: docs/performance.md#ssd-lm-where-its-step-goes). The block size is fixed, not derived from
        the thread count: Box–Muller pairs words within a block, so the draws depend on it.
        Elsewhere in one block, the softmax out of place."""
        k, V = self.p.simplex_k, self.V
        alpha, sigma = self.schedule.alpha_sigma(t)
        scale = (torch.where(counted, bcast(sigma, w), 0.0) * k).reshape(-1, 1)
        shift = (torch.where(counted, bcast(alpha, w), 1.0) * 2 * k).reshape(-1, 1)
        on_cpu = w.device.type == "cpu"
        S = torch.empty(*w.shape, V, device=w.device)
        rows, index = S.view(-1, V), w.reshape(-1, 1)
        noise = NormalStream(generator, w.device)
        block = max(1, self.ROWS_BYTES // (4 * V)) if on_cpu else rows.shape[0]
        for r in range(0, rows.shape[0], block):
            S_r = noise.fill_(rows[r:r + block])
            S_r.mul_(scale[r:r + block]).scatter_add_(-1, index[r:r + block], shift[r:r + block])
            if on_cpu:
                torch.softmax(S_r, -1, out=S_r)
        return S if on_cpu else torch.softmax(S, -1)

    def simplex_input(self, P):
        """The network's input softmax(S_t)·E: the expected embedding under the simplex."""
        lead = P.shape[:-1]
        return _ExpectedEmbedding.apply(P.reshape(-1, self.V), self.E).view(*lead, -1)

    def logits(self, inp, t, x_sc):
        return self.net(t=t, embeds=inp, self_cond=x_sc).float()

    def condition_of(self, logits):
        return F.softmax(logits, -1) @ self.E

    def loss(self, x0, counted, u):
        inp = self.simplex_input(self.noised_probs(x0, counted, u))   # shared by both passes
        x_sc = None
        if self.p.self_condition:
            # softmax(f_θ)·E of the first pass straight from the fused head (no V-wide probabilities)
            first = lambda: self.net(t=u, embeds=inp, expect=self.E).float()  # noqa: E731
            x_sc = train_condition(first, self.p.self_condition_rate)
        ce = self.net(t=u, embeds=inp, self_cond=x_sc, targets=x0)        # fused head + cross-entropy
        return (ce * counted).sum() / counted.sum().clamp(min=1)

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, *, given=None, keep=None):
        """From S_1 = k·ε, each step t_i = i/steps: ŵ ~ softmax(logits) (Gumbel-argmax), then the
        next input is the forward process of ŵ at t_{i−1} (SSD-LM's logits projection).

        ``given``/``keep`` (bench.condition): the replacement method (Song et al. 2021, App. I.2;
        RePaint eq. 8) on the simplex — the kept positions' ŵ is the given id before each
        projection, so their S_t is drawn from the forward process of the given token at every
        step (at t = 1 too), and their words are the given ids. Same NFE."""
        cond = condition(self, n, given, keep)
        k, dev = self.p.simplex_k, self.device
        P = torch.softmax(k * standard_normal((n, self.L, self.V), generator, dev), -1)
        every = torch.ones(n, self.L, dtype=torch.bool, device=dev)
        if cond is not None:
            one = torch.ones(n, device=dev)
            P = torch.where(cond.keep[..., None], self.noised_probs(cond.given, every, one, generator), P)
        x_sc, w = None, None
        for i in range(steps, 0, -1):
            t = torch.full((n,), i / steps, device=dev)
            logits = self.logits(self.simplex_input(P), t, x_sc)
            w = gumbel_argmax(logits, generator, self.p.float64_sampling)
            if cond is not None:
                w = cond.fix(w)
            if self.p.self_condition:
                x_sc = self.condition_of(logits)
            if i > 1:
                t_prev = torch.full((n,), (i - 1) / steps, device=dev)
                P = self.noised_probs(w, every, t_prev, generator)
        return w
