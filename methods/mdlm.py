"""MDLM: masked (absorbing-state) diffusion in continuous time (Sahoo et al., 2024).

Forward process q(x_t | x_0) = Cat(α_t·e_{x0} + (1 − α_t)·e_[MASK]), log-linear schedule
σ(t) = −log(1 − t), α_t = 1 − t (ε = 0: the prior term is exactly zero). SUBS
parameterisation (MDLM §3.2): [MASK] is the extra input id V, never predicted; unmasked tokens
are carried over. Continuous-time NELBO (MDLM eq. 10):

    L = E_{t~U(0,1)} [ (1/t) · Σ_{masked i} −log p_θ(x_0^i | x_t) ]

``estimator``: ``beta`` (default) draws m ~ U{1..n}, masks a uniform m-subset and feeds
t ~ Beta(m, n−m+1) with weight n/m — the same NELBO with bounded weights; ``count`` feeds
t = m/n and bounds the any-order autoregressive model instead (Ou et al. 2024); ``time`` is
t = u. Sampler: ancestral, revealing each masked token w.p. (t − s)/t; with
``time_conditioning: false`` it reuses p_θ(x_0 | x_t) for rows that did not change.

``init_from`` (a named model such as ``smollm2``, a hub name or a save_pretrained directory of a
causal LM): the network is that pretrained AR model turned into the denoiser (A2D: DiffuGPT /
DiffuLLaMA, methods/_a2d.py) — bidirectional attention (``anneal_steps``: DiffuLLaMA's
attention-mask annealing), p_θ(x_0^i | x_t) read from the output at i − 1, [MASK] a new input id,
no time input (``time_conditioning`` is false). The suite's sizes do not apply to it.

Derivation: docs/methods.md#mdlm.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_serializer, model_validator

from bench.condition import condition
from bench.errors import UserError
from bench.method import Method, Params
from bench.registry import register
from methods._a2d import anneal_ratio, build_a2d
from methods._discrete import ABSORB, clamp
from methods._masked import (  # noqa: F401 (public here too)
    Denoiser,
    alpha,
    ancestral_sample,
    count_weight,
    elbo_weight,
    mask_m_subset,
    mask_tokens,
    nelbo,
    nelbo_beta,
    nelbo_masked_count,
)


class MDLMParams(Params):
    float64_sampling: bool = True  # Gumbel in float64 (float32 lowers gen. perplexity)
    estimator: Literal["beta", "count", "time"] = Field(
        "beta", description="eval form: beta (bounded weights, the NELBO), time (t = u), or count "
                            "(t = m/n: bounds the any-order AR model, not the diffusion model)")
    time_conditioning: bool = True  # false: the denoiser sees x_t only (t ≡ 0), sampler caches
    init_from: Optional[str] = Field(
        None, min_length=1, max_length=500,
        description="start from this pretrained causal LM (named model, hub name or save_pretrained dir): "
                    "A2D, methods/_a2d.py; the suite's tokenizer must be its own (data.tokenizer: {name: hf, "
                    "model: ...})")
    anneal_steps: int = Field(0, ge=0, description="init_from: attention-mask annealing from causal to full over "
                                                   "the first N training steps (DiffuLLaMA); 0: full from the start")

    @model_validator(mode="before")
    @classmethod
    def _agnostic_when_pretrained(cls, d):
        # a causal LM takes no t: with init_from, time_conditioning defaults to (and must be) false
        if isinstance(d, dict) and d.get("init_from") is not None:
            d = {"time_conditioning": False, **d}
        return d

    @model_validator(mode="after")
    def _check_a2d(self):
        if self.init_from is not None and self.time_conditioning:
            raise ValueError("init_from: a pretrained causal LM takes no time; time_conditioning must be false")
        if self.init_from is None and self.anneal_steps:
            raise ValueError("anneal_steps applies only with init_from (a causal LM's attention annealed to full)")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_a2d(self, handler):
        # init_from and anneal_steps came later: absent from the spec (and the run id) of rows without them
        d = handler(self)
        if isinstance(d, dict) and d.get("init_from") is None:
            d.pop("init_from", None)
            d.pop("anneal_steps", None)
        return d


@register("mdlm")
class MDLM(Method):
    Params = MDLMParams
    likelihood = "bound"
    time = "continuous"
    display = "MDLM"
    conditioning = "any"

    ESTIMATORS = {"beta": nelbo_beta, "count": nelbo_masked_count, "time": nelbo}

    @classmethod
    def default_label(cls, params) -> str:
        return "MDLM (any-order AR bound)" if params.estimator == "count" else "MDLM"

    def bounds(self) -> str:
        if self.p.estimator == "count":
            return "any-order autoregressive model of the network at t = m/n (not the diffusion model)"
        return super().bounds()

    @classmethod
    def check_compatible(cls, params, data, where: str) -> None:
        """With ``init_from``, the suite trains in the model's own ids: ``data.tokenizer`` must be
        ``{name: hf, model: <the same model>}`` (or ``gpt2`` for a GPT-2 model: checked when built)."""
        p = params if isinstance(params, MDLMParams) else cls.Params(**params)
        tok = data.tokenizer
        if p.init_from is not None and not (tok.name == "gpt2" or (tok.name == "hf" and tok.model == p.init_from)):
            raise UserError(f"{where}.init_from: {p.init_from} reads its own token ids; set data.tokenizer: "
                            f"{{name: hf, model: {p.init_from}}}")

    def build_network(self, cfg):
        """The shared backbone, or with ``init_from`` the pretrained causal LM as a denoiser (A2D)."""
        if self.p.init_from is None:
            return super().build_network(cfg)
        net, self.a2d_facts = build_a2d(self.p.init_from, self.V, self.L, "methods[mdlm].init_from",
                                        self.context.tokenizer)
        return net

    @property
    def mask_id(self) -> int:
        """[MASK]: V, or with ``init_from`` the causal LM's vocabulary size (its appended row)."""
        return self.net.mask_id if self.p.init_from is not None else self.V

    def before_step(self, stage: str, step: int) -> None:
        """With ``init_from``: the share of future keys open at this step (anneal_steps, _a2d.anneal_ratio)."""
        if self.p.init_from is not None:
            self.net.ratio = anneal_ratio(step, self.p.anneal_steps)

    def info(self) -> dict:
        """With ``init_from``: what the network started from (methods/_a2d.build_a2d)."""
        out = super().info()
        if self.p.init_from is not None:
            out["a2d"] = {**self.a2d_facts, "anneal_steps": self.p.anneal_steps,
                          "logits": "shifted: x_0^i read at i-1, BOS before position 0"}
        return out

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t if self.p.time_conditioning else torch.zeros_like(t)
        return F.log_softmax(self.net(x_t, t).float(), dim=-1)

    def loss(self, x0, counted, u):
        """Training: the time form of the NELBO (MDLM eq. 10), per counted token — ``nelbo`` with
        the masked tokens' −log p_θ(x_0^i | x_t) taken from the backbone's fused head +
        cross-entropy (bench/backbone.py), the same value as −denoise(x_t, t)[x_0^i] without
        materialising the (B, L, V) log-probabilities. The head runs at the masked rows only: an
        unmasked token is carried over (SUBS) and adds nothing to the bound, so the V-wide product
        and its gradient are spent where the loss is (half the rows on average)."""
        x_t, masked = mask_tokens(x0, counted, u, self.mask_id)
        t = u if self.p.time_conditioning else torch.zeros_like(u)
        h = self.net(x_t, t, return_hidden=True)
        ce = h.new_zeros(masked.shape, dtype=torch.float32).masked_scatter(masked, self.net.head(h[masked], x0[masked]))
        return (elbo_weight(u) * ce.sum(1)).sum() / counted.sum().clamp(min=1)

    def nll(self, x0, counted, u):
        return self.ESTIMATORS[self.p.estimator](x0, counted, u, self.denoise, self.mask_id)

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, cache: bool = True, *, given=None, keep=None):
        """Ancestral sampling, MDLM §3.2's reverse step p_θ(z_s | z_t) = q(z_s | z_t, x_θ(z_t, t))
        (SUBS): from t to s = t − 1/steps each [MASK] is revealed independently w.p.
        (α_s − α_t)/(1 − α_t) = (t − s)/t, as x_0 ~ p_θ(x_0 | x_t) at that position; revealed
        tokens are carried over. The reveal coins are drawn first and the categorical
        (Gumbel-max) only at the revealed positions: the same distribution per position as
        drawing x_0 everywhere and keeping the revealed ones, without a Gumbel draw over the
        whole (n, L, V) tensor every step — and the V-wide head runs only at those rows too.

        ``cache`` reuses p_θ(x_0 | x_t) across steps that changed no token; it is used only
        when the denoiser is time-agnostic (``time_conditioning: false``), where it is exact.
        The loop is the family's ``methods._masked.ancestral_sample``.

        ``given``/``keep`` (bench.condition): the kept positions start unmasked as the given ids
        (methods/_discrete.clamp, absorbing) and, never masked, stay so; every p_θ(x_0 | x_t) sees
        them — the model's any-order conditional of the rest (MDLM's infilling), same NFE."""
        cond = condition(self, n, given, keep)
        x = torch.full((n, self.L), self.mask_id, dtype=torch.long, device=self.device)
        if cond is not None:
            x = clamp(ABSORB, x, cond, 1.0, self.V)
        return ancestral_sample(self.hidden, self.readout, x, self.mask_id, steps, generator, self.p.float64_sampling,
                                cache=cache and not self.p.time_conditioning)

    def hidden(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states at x_t (before the V-wide head): ``denoise`` is
        log_softmax(head(hidden)). The sampler keeps these, (n, L, d), and runs the head only at
        the positions it reveals — never an (n, L, V) tensor (at V = 50,257, L = 1,024 that is
        0.2 GB per sequence, and its log-softmax as much again)."""
        t = t if self.p.time_conditioning else torch.zeros_like(t)
        return self.net(x_t, t, return_hidden=True)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """log p_θ(x_0 | x_t) at the rows ``h`` (R, d) of ``hidden``: the head at those rows only."""
        return F.log_softmax(self.net.head(h).float(), dim=-1)
