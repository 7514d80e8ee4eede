"""Continuous diffusion of token embeddings: Diffusion-LM and PLAID.

Diffusion-LM (Li et al. 2022) and PLAID (Gulrajani & Hashimoto 2023) diffuse learned token
embeddings with Gaussian noise. The Gaussian math lives in methods/_gaussian.py, PLAID's own
parameterisation in methods/_plaid.py; this module writes each method's objective, bound and
sampler. SSD-LM, diffusion on the vocabulary simplex, is methods/simplex.py.

Notation (VDM, Kingma et al. 2021): w ∈ V^L the tokens, e = Emb(w) ∈ R^{L×d} their embeddings,
γ(t) the schedule, α_t² = sigmoid(−γ), σ_t² = sigmoid(γ), z_t = α_t e + σ_t ε, x̂_θ(z_t; t) the
predicted clean embedding, x̃0 the self-conditioning input (Chen et al. 2022, Analog Bits §3.2).

- Diffusion-LM: sqrt schedule, x0-prediction, L_simple + rounding −log p_θ(w|z_0) + ‖α_1 e‖²;
  its ppl is the full discrete-data ELBO (prior KL + rounding + ½∫γ′e^{−γ}‖e − x̂0‖² dt, with the
  entropy of q(x_0|w) accounted for; VDM eq. 17).
- PLAID: learned monotone γ(t) with learned endpoints, x̂0 = softmax(f_θ)·E, the network's own
  logits at t = 0 as decoder; the VDM bound is both loss and eval (share q of draws at t = 0).

What a bound row bounds (the predictor, the decoder, T = ∞ or the protocol's ``bound_steps``) and
the ``bounded`` sampler that draws from exactly that model: methods/_vlb.py.

Derivations: docs/methods.md#continuous-diffusion (#diffusion-lm, #plaid,
#notation-and-self-conditioning, #what-a-continuous-bound-bounds).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, PositiveInt, model_validator

from bench.backbone import Backbone, fused_nll
from bench.condition import Condition, condition
from bench.evaluate import layout
from bench.method import Method, Params
from bench.registry import register
from methods import _plaid, _vlb
from methods._gaussian import (
    PARAMETERISATIONS,
    SAMPLERS,
    SC_RATE,
    SCHEDULES,
    Learned,
    Replacement,
    bcast,
    diffuse,
    nearest_embedding,
    prior_kl,
    sample_loop,
    sc_label,
    train_condition,
)


# ----------------------------------------------------------------------------- embedding diffusion
class EmbeddingDiffusion(Method):
    """Gaussian diffusion of learned token embeddings; Diffusion-LM and PLAID differ in how the
    network's output becomes x̂0 (``predict_x0``), the schedule, the decoder p(w | z_0) and so
    the estimate of the bound (``elbo_terms``), and the training objective."""

    likelihood = "bound"
    time = "continuous"
    conditioning = "any"
    protocol_settings = frozenset({"bound_steps", "t_proposal"})
    decoder = "p(w | z_0)"               # the decoder in words (bounds())
    decoder_calls = False                # whether it is a call of the network (PLAID's is)
    heuristic_ending = "the nearest embedding of the last x̂0"   # how ddpm/ddim make the word

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        self.embedding = nn.Embedding(vocab_size, params.embed_dim)   # e = Emb(w), N(0, 1) init
        self.schedule = self.make_schedule()
        self.estimator = (None, "uniform")   # the protocol's (bound_steps, t_proposal): use_protocol
        self.fitted = None                   # t_proposal adaptive: the BinnedProposal of this evaluation's pilot

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
        self.fitted = None          # each evaluation fits its own adaptive proposal (nll's pilot)

    def time_draw(self, u, train: bool):
        """(t, w): the diffusion term's one-draw estimate at u is w·‖e − x̂(z_t; t)‖² (_vlb.diffusion_draw);
        training draws t = u (T = ∞), evaluation under the protocol's estimator (use_protocol)."""
        T, proposal = (None, "uniform") if train else self.estimator
        if proposal == "adaptive":
            proposal = self.fitted
        return _vlb.diffusion_draw(self.schedule, u, proposal, T)

    @torch.no_grad()
    def sq_error(self, w, counted, t):
        """Σ over counted tokens of ‖e − x̂(z_t; t)‖² (B,) float64 at t (B,), x̂ the bound's predictor:
        the diffusion term's integrand without its weight."""
        e = self.embedding(w)
        z, _, _, _ = self.noised(e, counted, t)
        x0_hat = self.bound_predictor(z, t)
        return (((e.double() - x0_hat.double()) ** 2).sum(-1) * counted).sum(1)

    @torch.no_grad()
    def pilot(self, w, counted):
        """The adaptive t proposal (_vlb.BinnedProposal.fit) from a pilot pass: PILOT_ROWS draws of
        γ, an equal number in each of ADAPTIVE_BINS bins of [γ(0), γ(1)] (∝ e^{−γ} within a bin),
        on the blocks of ``w`` in turn, each with its own z_t. Its randomness is its own: a stream
        seeded from torch's global state, which is then restored, so the evaluation's u and ε are
        what they would be without the pilot and independent of it — given the fitted proposal,
        every later draw is an exact importance-sampling draw of the bound. Costs PILOT_ROWS
        bound-predictor evaluations (each 1 or 2 network calls, _vlb.calls_per_step)."""
        devices = [w.device] if w.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=w.device.type):
            seed = int(torch.randint(0, 1 << 62, ()))
            torch.manual_seed(seed ^ 0x5EED)
            gen = torch.Generator().manual_seed(seed)
            g0, g1 = (g.detach().reshape(()).double() for g in self.endpoints(w))
            n, B = _vlb.PILOT_ROWS, len(w)
            t = self.schedule.t_of_gamma(_vlb.BinnedProposal.pilot_gammas(g0, g1, n, generator=gen)).float()
            rows = torch.arange(n, device=w.device) % B
            err = torch.cat([self.sq_error(w[rows[s:s + B]], counted[rows[s:s + B]], t[s:s + B])
                             for s in range(0, n, B)])
        return _vlb.BinnedProposal.fit(g0, g1, self.schedule.gamma(t).double(), err)

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
        alpha, sigma = bcast(alpha, e), bcast(sigma, e)
        z, eps = diffuse(e, alpha, sigma)
        return torch.where(counted[..., None], z, e), eps, alpha, sigma

    def first_pass(self, z, t, train: bool):
        """x̃0 for the network's second call, or None (self-conditioning; module docstring)."""
        if not self.p.self_condition:
            return None
        first = lambda: self.predict_x0(z, t, None)  # noqa: E731
        return train_condition(first, self.p.self_condition_rate) if train else first()

    def nll(self, x0, counted, u):
        if self.estimator[1] == "adaptive" and self.fitted is None:
            self.fitted = self.pilot(x0, counted)
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

    def replacement(self, n, given, keep) -> tuple[Replacement | None, Condition | None]:
        """(the sampler's :class:`Replacement` of the kept positions, the checked Condition), or
        (None, None) for an unconditional draw (bench.condition.condition)."""
        cond = condition(self, n, given, keep)
        return (None, None) if cond is None else (Replacement(self.embedding(cond.given), cond.keep), cond)

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, *, given=None, keep=None):
        """``sampler: bounded``: the model the bound bounds, to z_0 and the decoder's draw (_vlb);
        ddpm/ddim: to t = 1/steps, the word the nearest embedding of the last x̂0.

        ``given``/``keep`` (bench.condition): the replacement method (_gaussian.Replacement; Song
        et al. 2021, App. I.2; RePaint eq. 8) — the kept positions of z redrawn from
        q(z_t | Emb(given)) after every step — and the given ids as their words. Same NFE."""
        E = self.embedding.weight
        replace, cond = self.replacement(n, given, keep)
        z = torch.randn((n, self.L, E.shape[1]), generator=generator, device=E.device)
        if self.p.sampler == "bounded":
            T = _vlb.check_budget(steps, self.p.self_condition, self.decoder_calls)
            z0 = _vlb.ancestral_to_zero(self.bound_predictor, z, self.schedule, T, generator, replace)
            w = self.decode(z0, generator)
        else:
            snap = (lambda x: E[nearest_embedding(x, E)]) if self.p.clamp else None  # noqa: E731
            x0 = sample_loop(self.predict_x0, z, self.schedule, steps, SAMPLERS[self.p.sampler], generator,
                             snap=snap, self_condition=self.p.self_condition, replace=replace)
            w = nearest_embedding(x0.float(), E.float())
        return w if cond is None else cond.fix(w)


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
        return sc_label("Diffusion-LM", params)

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
        alpha, sigma = (bcast(v, z) for v in self.schedule.alpha_sigma(t))
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
    """PLAID as igul222/plaid by default; each choice of its lib/models.py an option (PLAID.default_label)."""
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
    unit_embeddings: bool = Field(True, description="rows of E of unit length (lib/models.py:91–98)")
    logit_bias: bool = Field(True, description="(α/σ²)·z_t·Eᵀ added to the logits, fp32 (lib/models.py:194–209)")
    rescale_input: bool = Field(True, description="the network reads z_t/√(α²/d + σ²), x̃0·√d (lib/models.py:169–177)")
    condition: Literal["gamma", "t"] = Field("gamma", description="the network's condition (lib/models.py:179–183)")
    float64_sampling: bool = Field(True, description="the sampling chain in float64 (sample.py:44–47)")


@register("plaid")
class PLAID(EmbeddingDiffusion):
    """PLAID's parameterisation (methods/_plaid.py, docs/methods.md#plaid): unit-norm rows of E,
    logits f_θ + (α/σ²)·z_t·Eᵀ (fp32), x̂0 = softmax(logits)·E, the network reading z_t/√(α²/d + σ²)
    and conditioned on γ(t); schedule, bound and sampling chain in float64; samples are the argmax
    of the logits at z_0."""

    Params = PLAIDParams
    LABEL_TAGS = (("self_condition", "−SC"), ("unit_embeddings", "−unit-norm"), ("logit_bias", "−logit-bias"),
                  ("rescale_input", "−rescale"))
    decoder = ("softmax(f_θ(z_0, 0) + (α_0/σ_0²)·z_0·Eᵀ) (the network's own logits at t = 0 with PLAID's bias, "
               "self-conditioned as the predictor)")
    decoder_calls = True
    heuristic_ending = "the argmax of the logits at z_0, t = 0"

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        if params.unit_embeddings:
            self.embedding = _plaid.UnitEmbedding(vocab_size, params.embed_dim)
        self.eval_share = params.reconstruction_share      # q of evaluation's draws (use_protocol)

    def use_protocol(self, protocol):
        """As EmbeddingDiffusion's; with ``t_proposal: adaptive`` under stratified draws of S ≥ 2
        strata per replicate (bench.evaluate.layout), evaluation's q is 1/S: u < q is exactly the
        first stratum, so each replicate has one reconstruction draw and S − 1 diffusion draws,
        themselves stratified in (u − q)/(1 − q). With any q every draw estimates the bound without
        bias; the trained q = 1/8 under S = 4 strata splits the first stratum between the two
        terms, whose values differ several-fold — the larger part of the interval's width
        (docs/performance.md#importance-sampling-in-t-the-continuous-intervals)."""
        super().use_protocol(protocol)
        self.eval_share = self.p.reconstruction_share
        if protocol.t_proposal == "adaptive" and protocol.t_sampling == "stratified":
            S = layout(protocol.t_samples, protocol.t_sampling)[1]
            self.eval_share = 1 / S if S >= 2 else self.eval_share

    @classmethod
    def default_label(cls, params):
        """"PLAID", then a tag for each of PLAID's choices switched off ("PLAID −SC −logit-bias")."""
        tags = [tag for field, tag in cls.LABEL_TAGS if not getattr(params, field)]
        return " ".join(["PLAID", *tags, *(["−γ-cond"] if params.condition != "gamma" else [])])

    def build_network(self, cfg):
        return Backbone(cfg, vocab_in=None, vocab_out=self.V, seq_len=self.L, in_dim=self.p.embed_dim,
                        self_condition=self.p.self_condition)

    def make_schedule(self):
        return Learned(self.p.gamma_0, self.p.gamma_1)

    def gamma(self, t):
        """γ(t) in float64 (plaid/train.py:67–70, 214–236: schedule and loss in float64)."""
        return self.schedule.gamma(t.double())

    def hidden(self, z, t, x_sc):
        """The backbone's last hidden states for z_t (B, L, d) at t (B,) with x̃0 (or None), and
        the bias input (α/σ²)·z_t or None (what the network reads: _plaid.network_inputs)."""
        z_in, x_sc, cond, side = _plaid.network_inputs(self.p, z, t, self.gamma(t), x_sc)
        return self.net(t=cond, embeds=z_in, self_cond=x_sc, return_hidden=True), side

    def readout(self, z, t, x_sc, targets=None):
        """x̂0 = softmax(logits)·E (B, L, d) fp32, and with ``targets`` also −log softmax(logits)[w]
        (B, L), logits = f_θ(·) + (α/σ²)·z_t·Eᵀ (``hidden``; _plaid.biased_readout)."""
        h, side = self.hidden(z, t, x_sc)
        return _plaid.biased_readout(self.net.head, h, side, self.embedding.weight, targets)

    def decode(self, z0, generator):
        """The bounded sampler's last step: w ~ the decoder at z_0 (the biased logits at t = 0)."""
        t0 = torch.zeros(z0.shape[0], device=z0.device, dtype=z0.dtype)
        h, side = self.hidden(z0, t0, self.first_pass(z0, t0, train=False))
        return _plaid.decoder_draw(self.net.head, h, side, self.embedding.weight, generator)

    def predict_x0(self, z, t, x_sc):
        return self.readout(z, t, x_sc).to(z.dtype)

    def elbo_terms(self, w, counted, u, train: bool):
        """(B, L) per-token estimate of the bound from one draw u per row (module docstring), in
        float64: rows with u < q estimate the reconstruction term at t = 0 with the network as
        decoder, the others the diffusion term at t = (u − q)/(1 − q); the prior term is exact on all."""
        q = self.p.reconstruction_share if train else self.eval_share
        rec = u < q                                                      # (B,)
        # the diffusion rows' t and weight ½γ′e^{−γ}/p(t), in float64 (plaid/train.py: loss in float64)
        t, wt = self.time_draw(((u - q) / (1 - q)).clamp(0, 1).double(), train)
        t = torch.where(rec, torch.zeros_like(t), t).to(u.dtype)
        e = self.embedding(w)
        z, _, _, _ = self.noised(e, counted, t)
        # x̂0 and −log softmax(logits)[w] (the decoder's term on rows at t = 0) from one fused pass
        x0_hat, nll = self.readout(z, t, self.first_pass(z, t, train), targets=w)
        diff = wt[:, None] * ((e.double() - x0_hat.double()) ** 2).sum(-1)
        g1 = self.schedule.endpoints()[1].double()
        estimate = torch.where(rec[:, None], nll.double() / q, diff / (1 - q))
        return estimate + prior_kl(e.double(), g1)

    def loss(self, x0, counted, u):
        """The bound itself, per counted token (its gradient also trains γ_0, γ_1)."""
        return (self.elbo_terms(x0, counted, u, train=True) * counted).sum() / counted.sum().clamp(min=1)

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, *, given=None, keep=None):
        """z_1 ~ N(0, I), steps − 1 DDPM/DDIM steps down to z_0 (_plaid.sample_to_zero, float64 with
        ``float64_sampling``), then the argmax of the logits at (z_0, t = 0) (sample.py:176–183):
        ``steps`` network calls. ``sampler: bounded``: the bound's own model (EmbeddingDiffusion).
        ``given``/``keep``: the replacement method, as EmbeddingDiffusion.sample."""
        if self.p.sampler == "bounded":
            return super().sample(n, steps, generator, given=given, keep=keep)
        E = self.embedding.weight
        replace, cond = self.replacement(n, given, keep)
        dt = torch.float64 if self.p.float64_sampling else torch.float32
        z = torch.randn((n, self.L, E.shape[1]), generator=generator, device=E.device, dtype=dt)
        snap = (lambda x: E[nearest_embedding(x.float(), E)].to(dt)) if self.p.clamp else None  # noqa: E731
        z0, x_sc = _plaid.sample_to_zero(self.predict_x0, z, self.gamma, steps - 1, SAMPLERS[self.p.sampler],
                                         generator, snap=snap, self_condition=self.p.self_condition, replace=replace)
        h, side = self.hidden(z0, torch.zeros(n, device=E.device, dtype=dt), x_sc)
        w = _plaid.argmax_logits(self.net.head, h, side, E)
        return w if cond is None else cond.fix(w)
