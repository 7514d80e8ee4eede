"""Continuous diffusion for text: Diffusion-LM and PLAID (embeddings), SSD-LM (simplex).

Diffusion-LM (Li et al. 2022) and PLAID (Gulrajani & Hashimoto 2023) diffuse learned token
embeddings with Gaussian noise; SSD-LM (Han et al. 2023) diffuses a ±k representation on the
vocabulary simplex. The Gaussian math lives in methods/_gaussian.py; this module writes each
method's objective, bound and sampler.

Notation (VDM, Kingma et al. 2021): w ∈ V^L the tokens, e = Emb(w) ∈ R^{L×d} their embeddings,
γ(t) the schedule, α_t² = sigmoid(−γ), σ_t² = sigmoid(γ), z_t = α_t e + σ_t ε, x̂_θ(z_t; t) the
predicted clean embedding, x̃0 the self-conditioning input (Chen et al. 2022, Analog Bits §3.2).

- Diffusion-LM: sqrt schedule, x0-prediction, L_simple + rounding −log p_θ(w|z_0) + ‖α_1 e‖²;
  its ppl is the full discrete-data ELBO (prior KL + rounding + ½∫γ′e^{−γ}‖e − x̂0‖² dt, with the
  entropy of q(x_0|w) accounted for; VDM eq. 17).
- PLAID: learned monotone γ(t) with learned endpoints, x̂0 = softmax(f_θ)·E, the network's own
  logits at t = 0 as decoder; the VDM bound is both loss and eval (share q of draws at t = 0).
- SSD-LM: S_0 ∈ {−k, +k}^V, input softmax(S_t)·E, cross-entropy; no likelihood (ppl "—").

What a bound row bounds (the predictor, the decoder, T = ∞ or the protocol's ``bound_steps``) and
the ``bounded`` sampler that draws from exactly that model: methods/_vlb.py.

Derivations: docs/methods.md#continuous-diffusion (#diffusion-lm, #plaid, #ssd-lm,
#notation-and-self-conditioning, #what-a-continuous-bound-bounds).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator

from bench.backbone import Backbone, fused_nll
from bench.method import Method, Params, gumbel_argmax
from bench.registry import register
from methods import _vlb
from methods._gaussian import (
    PARAMETERISATIONS,
    SAMPLERS,
    SCHEDULES,
    Learned,
    NormalStream,
    diffuse,
    nearest_embedding,
    prior_kl,
    sample_loop,
    standard_normal,
    train_condition,
)

SC_LABEL = " +SC"


def _time(t, like):
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def _sc_label(name: str, params) -> str:
    return name + (SC_LABEL if params.self_condition else "")


# ----------------------------------------------------------------------------- embedding diffusion
class EmbeddingDiffusion(Method):
    """Gaussian diffusion of learned token embeddings; Diffusion-LM and PLAID differ in how the
    network's output becomes x̂0 (``predict_x0``), the schedule, the decoder p(w | z_0) and so
    the estimate of the bound (``elbo_terms``), and the training objective."""

    likelihood = "bound"
    time = "continuous"
    protocol_settings = frozenset({"bound_steps", "t_proposal"})
    decoder = "p(w | z_0)"               # the decoder in words (bounds())
    decoder_calls = False                # whether it is a call of the network (PLAID's is)
    heuristic_ending = "the nearest embedding of the last x̂0"   # how ddpm/ddim make the word

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        self.embedding = nn.Embedding(vocab_size, params.embed_dim)   # e = Emb(w), N(0, 1) init
        self.schedule = self.make_schedule()
        self.estimator = (None, "uniform")   # the protocol's (bound_steps, t_proposal): use_protocol

    # --- what the two differ in ----------------------------------------------------------------
    def make_schedule(self):
        raise NotImplementedError

    def predict_x0(self, z, t, x_sc):
        raise NotImplementedError

    def elbo_terms(self, w, counted, u, train: bool):
        """(B, L) per-token one-draw estimate of the bound (module docstring) at draws u."""
        raise NotImplementedError

    def decode(self, z0, generator):
        """w ~ p(w | z_0), the bound's decoder, (n, L, d) → (n, L) ids."""
        raise NotImplementedError

    # --- what a bound bounds, how its t is drawn ------------------------------------------------
    def use_protocol(self, protocol):
        self.estimator = (protocol.bound_steps, protocol.t_proposal)

    def time_draw(self, u, train: bool):
        """(t, w): the diffusion term's one-draw estimate at u is w·‖e − x̂(z_t; t)‖² (_vlb.diffusion_draw);
        training draws t = u (T = ∞), evaluation under the protocol's estimator (use_protocol)."""
        T, proposal = (None, "uniform") if train else self.estimator
        return _vlb.diffusion_draw(self.schedule, u, proposal, T)

    def bounds(self):
        return _vlb.describe(self.decoder, self.estimator[0], self.p.self_condition, self.decoder_calls)

    def sampler_info(self, steps):
        return _vlb.sampler_words(self.p, steps, self.decoder_calls, self.heuristic_ending)

    def bound_predictor(self, z, t):
        """The predictor the bound scores: f(z, t, f(z, t, 0)) with self-conditioning, else f(z, t)."""
        return self.predict_x0(z, t, self.first_pass(z, t, train=False))

    # --- shared --------------------------------------------------------------------------------
    def endpoints(self, like):
        one = torch.ones(1, device=like.device)
        return self.schedule.gamma(0 * one), self.schedule.gamma(one)

    def noised(self, e, counted, t):
        """z_t ~ q(z_t | w) on the counted positions; clean e elsewhere; returns (z_t, ε, α, σ)."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma = _time(alpha, e), _time(sigma, e)
        z, eps = diffuse(e, alpha, sigma)
        return torch.where(counted[..., None], z, e), eps, alpha, sigma

    def first_pass(self, z, t, train: bool):
        """x̃0 for the network's second call, or None (self-conditioning; module docstring)."""
        if not self.p.self_condition:
            return None
        first = lambda: self.predict_x0(z, t, None)  # noqa: E731
        return train_condition(first, self.p.self_condition_rate) if train else first()

    def nll(self, x0, counted, u):
        return (self.elbo_terms(x0, counted, u, train=False) * counted).sum(1)

    @torch.no_grad()
    def self_condition_chain(self, w, counted, t: float, K: int):
        """From one z_t ~ q(z_t | w), x̂0^(k) = f(z_t, t, x̂0^(k−1)), x̂0^(0) = 0, k = 1..K; returns
        the mean per-token ‖x̂0^(k)‖ over counted tokens (K values) and the mean ‖e‖ (the
        lecture's self-conditioning magnitude experiment; bench.experiments); None without a
        self-conditioning input."""
        if not self.p.self_condition:
            return None
        e = self.embedding(w)
        tt = torch.full((w.shape[0],), float(t), device=e.device)
        z, _, _, _ = self.noised(e, counted, tt)
        c = counted.float()
        norm = lambda x: float((x.float().norm(dim=-1) * c).sum() / c.sum())  # noqa: E731
        x_sc, out = None, []
        for _ in range(K):
            x_sc = self.predict_x0(z, tt, x_sc)
            out.append(norm(x_sc))
        return out, norm(e)

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None):
        """``sampler: bounded``: the model the bound bounds, to z_0 and the decoder's draw (_vlb);
        ddpm/ddim: to t = 1/steps, the word the nearest embedding of the last x̂0."""
        E = self.embedding.weight
        z = torch.randn((n, self.L, E.shape[1]), generator=generator, device=E.device)
        if self.p.sampler == "bounded":
            T = _vlb.check_budget(steps, self.p.self_condition, self.decoder_calls)
            return self.decode(_vlb.ancestral_to_zero(self.bound_predictor, z, self.schedule, T, generator), generator)
        snap = (lambda x: E[nearest_embedding(x, E)]) if self.p.clamp else None  # noqa: E731
        x0 = sample_loop(self.predict_x0, z, self.schedule, steps, SAMPLERS[self.p.sampler], generator,
                         snap=snap, self_condition=self.p.self_condition)
        return nearest_embedding(x0.float(), E.float())


SC_RATE = Field(0.5, ge=0.0, le=1.0, description="training: probability of the two-pass (x̃0 = first pass) branch")


class EmbeddingParams(Params):
    @model_validator(mode="before")
    @classmethod
    def _bounded_sampler_is_unclamped(cls, v):
        return _vlb.bounded_is_unclamped(v)


class DiffusionLMParams(EmbeddingParams):
    self_condition: bool = False
    self_condition_rate: float = SC_RATE
    embed_dim: PositiveInt = 16
    schedule: Literal["sqrt", "cosine", "tan-d"] = "sqrt"
    parameterisation: Literal["x0", "eps", "v"] = "x0"
    sampler: Literal["ddpm", "ddim", "bounded"] = _vlb.SAMPLER
    clamp: bool = Field(True, description="snap each x̂0 to the nearest embedding while sampling (ddpm/ddim)")


@register("diffusion-lm")
class DiffusionLM(EmbeddingDiffusion):
    Params = DiffusionLMParams
    variants = {"self-cond": {"self_condition": True}}
    decoder = "softmax(z_0 Eᵀ) (the tied rounding head)"

    @classmethod
    def default_label(cls, params):
        return _sc_label("Diffusion-LM", params)

    def build_network(self, cfg):
        # The network outputs a d-vector per position (x̂0, ε̂ or v̂); no token embedding.
        return Backbone(cfg, vocab_in=None, vocab_out=self.p.embed_dim, seq_len=self.L,
                        in_dim=self.p.embed_dim, self_condition=self.p.self_condition)

    def make_schedule(self):
        return SCHEDULES[self.p.schedule]()

    @property
    def parameterisation(self):
        return PARAMETERISATIONS[self.p.parameterisation]

    def predict_x0(self, z, t, x_sc):
        alpha, sigma = (_time(v, z) for v in self.schedule.alpha_sigma(t))
        return self.parameterisation.x0(self.net(t=t, embeds=z, self_cond=x_sc).float(), z, alpha, sigma)

    def rounding_nll(self, e, w):
        """−log p_θ(w_i | z_0) with the tied rounding head p_θ(w | z_0) = softmax(z_0 Eᵀ) (lm_head =
        Emb), z_0 ~ q(z_0 | w) = N(α_0 e, σ_0² I): one sample, (B, L), through the fused head (one
        (B·L, V) fp32 buffer, forward and backward)."""
        g0, _ = self.endpoints(e)
        z0 = torch.sigmoid(-g0).sqrt() * e + torch.sigmoid(g0).sqrt() * torch.randn_like(e)
        return fused_nll(z0, self.embedding.weight, w)

    def decode(self, z0, generator):
        return _vlb.decoder_draw(z0, self.embedding.weight, None, generator)

    def elbo_terms(self, w, counted, u, train: bool):
        """(B, L) per-token terms of the bound (1) at one draw u: every term at every draw; the
        diffusion term at the t the estimator draws from u (time_draw)."""
        t, wt = self.time_draw(u, train)
        e = self.embedding(w)
        z, _, _, _ = self.noised(e, counted, t)
        x0_hat = self.predict_x0(z, t, self.first_pass(z, t, train)).float()
        _, g1 = self.endpoints(e)
        diff = wt[:, None] * ((e.float() - x0_hat) ** 2).sum(-1)
        return diff + prior_kl(e.float(), g1) + self.rounding_nll(e, w)

    def loss(self, x0, counted, u):
        """training_losses_e2e: simple loss in the parameterisation's space + rounding + prior."""
        w, t = x0, u
        e = self.embedding(w)
        z, eps, alpha, sigma = self.noised(e, counted, t)
        out = self.net(t=t, embeds=z, self_cond=self.first_pass(z, t, train=True)).float()
        mse = ((out - self.parameterisation.target(e, eps, alpha, sigma)) ** 2).mean(-1)
        _, g1 = self.endpoints(e)
        prior = torch.sigmoid(-g1) * (e.float() ** 2).mean(-1)          # ‖μ(q(z_1|e))‖² per dim
        per_tok = mse + self.rounding_nll(e, w) + prior
        return (per_tok * counted).sum() / counted.sum().clamp(min=1)


class PLAIDParams(EmbeddingParams):
    self_condition: bool = True
    # plaid/train.py conditions a quarter of each batch on its first pass (selfcond_mask[offset::4])
    self_condition_rate: float = Field(0.25, ge=0.0, le=1.0, description=SC_RATE.description + " (PLAID: ¼)")
    embed_dim: PositiveInt = 16
    gamma_0: float = -3.0
    gamma_1: float = 6.0
    sampler: Literal["ddpm", "ddim", "bounded"] = _vlb.SAMPLER
    clamp: bool = False
    reconstruction_share: float = Field(0.125, gt=0.0, lt=1.0, description=(
        "q: share of draws (rows) that estimate the t = 0 reconstruction term, weighted 1/q; "
        "the rest estimate the diffusion term, weighted 1/(1 − q)"))


@register("plaid")
class PLAID(EmbeddingDiffusion):
    Params = PLAIDParams
    decoder = "softmax(f_θ(z_0, 0)) (the network's own logits at t = 0, self-conditioned as the predictor)"
    decoder_calls = True

    @classmethod
    def default_label(cls, params):
        return "PLAID" if params.self_condition else "PLAID −SC"

    def build_network(self, cfg):
        return Backbone(cfg, vocab_in=None, vocab_out=self.V, seq_len=self.L, in_dim=self.p.embed_dim,
                        self_condition=self.p.self_condition, expect_fp32=True)   # x̂0 in fp32 under autocast

    def make_schedule(self):
        return Learned(self.p.gamma_0, self.p.gamma_1)

    def decode(self, z0, generator):
        t0 = torch.zeros(z0.shape[0], device=z0.device)
        h = self.net(t=t0, embeds=z0, self_cond=self.first_pass(z0, t0, train=False), return_hidden=True)
        return _vlb.decoder_draw(h, self.net.head.weight, self.net.head.bias, generator)

    def predict_x0(self, z, t, x_sc):
        """x̂0 = softmax(f_θ(z_t, t)) E: the expected embedding under the predicted tokens (through
        the backbone's fused head: the (B, L, V) probabilities stay inside it)."""
        return self.net(t=t, embeds=z, self_cond=x_sc, expect=self.embedding.weight).float()

    def elbo_terms(self, w, counted, u, train: bool):
        """(B, L) per-token estimate of the bound from one draw u per row (module docstring):
        rows with u < q estimate the reconstruction term at t = 0 with the network as decoder,
        the others the diffusion term at t = (u − q)/(1 − q); the prior term is exact on all."""
        q = self.p.reconstruction_share
        rec = u < q                                                      # (B,)
        t, wt = self.time_draw(((u - q) / (1 - q)).clamp(0, 1), train)  # the diffusion rows' t and weight
        t = torch.where(rec, torch.zeros_like(u), t)
        e = self.embedding(w)
        z, _, _, _ = self.noised(e, counted, t)
        # x̂0 = softmax(f_θ) E and −log softmax(f_θ)[w] (the decoder's term on rows at t = 0) from
        # one pass of the fused head
        x0_hat, nll = self.net(t=t, embeds=z, self_cond=self.first_pass(z, t, train),
                               expect=self.embedding.weight, targets=w)
        diff = wt[:, None] * ((e.float() - x0_hat.float()) ** 2).sum(-1)
        _, g1 = self.endpoints(e)
        estimate = torch.where(rec[:, None], nll.float() / q, diff / (1 - q))
        return estimate + prior_kl(e.float(), g1)

    def loss(self, x0, counted, u):
        """The bound itself, per counted token (its gradient also trains γ_0, γ_1)."""
        return (self.elbo_terms(x0, counted, u, train=True) * counted).sum() / counted.sum().clamp(min=1)


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
    ROWS_BYTES = 1 << 20        # noised_probs' CPU blocks: 1 MiB (128 rows at V = 2048), in L2

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        self.E = nn.Parameter(torch.randn(vocab_size, backbone.hidden))   # input softmax(S_t)·E
        self.schedule = SCHEDULES[params.schedule]()

    @classmethod
    def default_label(cls, params):
        return _sc_label("SSD-LM", params)

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
        scale = (torch.where(counted, _time(sigma, w), 0.0) * k).reshape(-1, 1)
        shift = (torch.where(counted, _time(alpha, w), 1.0) * 2 * k).reshape(-1, 1)
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
    def sample(self, n, steps=64, generator=None):
        """From S_1 = k·ε, each step t_i = i/steps: ŵ ~ softmax(logits) (Gumbel-argmax), then the
        next input is the forward process of ŵ at t_{i−1} (SSD-LM's logits projection)."""
        k, dev = self.p.simplex_k, self.device
        P = torch.softmax(k * standard_normal((n, self.L, self.V), generator, dev), -1)
        every = torch.ones(n, self.L, dtype=torch.bool, device=dev)
        x_sc, w = None, None
        for i in range(steps, 0, -1):
            t = torch.full((n,), i / steps, device=dev)
            logits = self.logits(self.simplex_input(P), t, x_sc)
            w = gumbel_argmax(logits, generator, self.p.float64_sampling)
            if self.p.self_condition:
                x_sc = self.condition_of(logits)
            if i > 1:
                t_prev = torch.full((n,), (i - 1) / steps, device=dev)
                P = self.noised_probs(w, every, t_prev, generator)
        return w
