"""D3PM: discrete-time diffusion with structured transition matrices (Austin et al., 2021).

Forward process (the paper's §3): q(x_t | x_0) = Cat(x_0 Q̄_t), Q̄_t = Q_1 ⋯ Q_t, with
ᾱ_t = Π_{s≤t}(1−β_s) and two transition families — uniform Q̄_t = ᾱ_t I + (1−ᾱ_t)/|V|·11ᵀ and
absorbing (x_t = x_0 w.p. ᾱ_t, else [MASK] = id V) — and ``linear`` / ``cosine`` schedules
(ᾱ_T = 0). No |V|×|V| matrix is formed: posterior and x0-parameterised reverse
p_θ(x_s | x_t) = Σ_{x̃0} q(x_s | x_t, x̃0) p_θ(x̃0 | x_t) (≡ the paper's eq. 4 with
π ∝ exp(f_θ)·q(x_t|x̃0)) are closed forms in (ᾱ_s, ᾱ_t); the KLs go through the fused
``softmax_stats`` (methods/_discrete.py).

Negative ELBO: L = KL(q(x_T|x_0) ‖ p(x_T)) + Σ_{t=1}^T E KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)),
estimated by T·KL_t + prior at t = ⌈u·T⌉. Training: ``hybrid`` KL_t + λ·CE (the reference
weighting, google-research d3pm) or ``ce``. Sampler: ancestral over strided steps.

Derivation: docs/methods.md#d3pm.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
from pydantic import Field, PositiveInt, model_validator

from bench.condition import condition
from bench.method import Method, Params, gumbel_argmax
from bench.registry import register
from methods._discrete import GRAPHS, clamp, safe_log, softmax_stats

# (x_t, t) -> logits of p_θ(x_0 | x_t) over the V real tokens, (B, L, V); t is the integer step.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
COSINE_S = 0.008


# ----------------------------------------------------------------------------- schedule
def alpha_bar(t: torch.Tensor, T: int, schedule: str) -> torch.Tensor:
    """ᾱ_t for integer t ∈ {0..T} (float64); ᾱ_0 = 1, ᾱ_T = 0."""
    x = t.double() / T
    if schedule == "linear":
        a = 1 - x
    elif schedule == "cosine":
        f = lambda v: torch.cos(math.pi / 2 * (v + COSINE_S) / (1 + COSINE_S)) ** 2  # noqa: E731
        a = f(x) / f(torch.zeros_like(x))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    a = torch.where(t >= T, torch.zeros_like(a), a)
    return torch.where(t <= 0, torch.ones_like(a), a).clamp(0, 1)


def discrete_t(u: torch.Tensor, T: int) -> torch.Tensor:
    """t = ⌈u·T⌉ ∈ {1..T}: uniform on {1..T} when u ~ U(0,1)."""
    return torch.ceil(u.double() * T).long().clamp(1, T)


# ----------------------------------------------------------------------------- KL terms
def kl_absorb(z, x0, x_t, abar_s, abar_t, mask_id):
    """Per-position KL(q(x_s|x_t,x_0) ‖ p_θ(x_s|x_t)) for absorbing, (B, L): nonzero only at
    masked positions, where it is (ᾱ_s − ᾱ_t)/(1 − ᾱ_t) · (−log π_{x_0}). Also returns
    log π_{x_0} (for the auxiliary cross-entropy)."""
    dt = torch.float64 if z.dtype == torch.float64 else torch.float32
    z = z.to(dt)
    lse, z_x0, _, _ = softmax_stats(z, x0)
    lp_x0 = z_x0 - lse
    w = ((abar_s - abar_t) / (1 - abar_t)).to(dt)
    return torch.where(x_t == mask_id, -w[:, None] * lp_x0, torch.zeros_like(lp_x0)), lp_x0


def kl_uniform(z, x0, x_t, abar_s, abar_t):
    """Per-position KL(q(x_s|x_t,x_0) ‖ p_θ(x_s|x_t)) for uniform transitions, (B, L), in closed
    form (module docstring); s = 0 (ᾱ_s = 1) gives −log π_{x_0}, the reconstruction term.
    Also returns log π_{x_0}."""
    dt = torch.float64 if z.dtype == torch.float64 else torch.float32
    z = z.to(dt)
    V = z.shape[-1]
    a, ak = abar_s.double()[:, None], abar_t.double()[:, None]       # (B, 1), float64 scalars
    k = ak / a
    Do, Dx = (1 - ak) / V, ak + (1 - ak) / V                            # D(i) for i ≠ x_t, i = x_t
    Bx0, Bo = a + (1 - a) / V, (1 - a) / V
    Ax, Ao = k + (1 - k) / V, (1 - k) / V
    same = x0 == x_t
    # posterior weights q_i on the three classes {x_0, x_t, other}
    D = torch.where(same, Dx, Do)
    q_x0 = torch.where(same, Ax * Bx0, Ao * Bx0) / D
    q_xt = torch.where(same, Ax * Bx0, Ax * Bo) / D
    q_o = Ao * Bo / D
    c = lambda v: v.to(dt)  # noqa: E731
    # model: M_i = c₁(i)·π_i + c₂, c₁ = a/D(i), c₂ = (1−a)/V · S = α + β·π_{x_t} (S = Σ_j π_j/D(j))
    c1, c1x = c(a / Do).expand_as(x0), c(a / Dx).expand_as(x0)
    alpha, beta = c((1 - a) / V / Do).expand_as(x0), c((1 - a) / V * (1 / Dx - 1 / Do)).expand_as(x0)
    lse, z_x0, z_xt, mix = softmax_stats(z, x0, x_t, mix=(c1, alpha, beta))   # mix = Σ_i log(c₁π_i + c₂)
    lp_x0, lp_xt = z_x0 - lse, z_xt - lse
    log_c2 = safe_log(alpha + beta * lp_xt.exp())
    logM_xt = torch.logaddexp(safe_log(c1x) + lp_xt, log_c2)
    sum_logM_not_xt = mix - torch.logaddexp(safe_log(c1) + lp_xt, log_c2)
    logM_x0 = torch.logaddexp(safe_log(c1) + lp_x0, log_c2)                 # used only when x_0 ≠ x_t
    q_log_M = c(q_o) * sum_logM_not_xt + c(q_xt) * logM_xt + \
        torch.where(same, torch.zeros_like(lp_x0), c(q_x0 - q_o) * logM_x0)
    q_log_B = c(q_x0) * safe_log(c(Bx0)) + c(1 - q_x0) * safe_log(c(Bo))
    kl = q_log_B - safe_log(c(D)) - q_log_M
    recon = a.expand_as(lp_x0) >= 1                                    # s = 0: q(x_0|x_1,x_0) = δ
    return torch.where(recon, -lp_x0, kl), lp_x0


def log_reverse_uniform(z, x_t, abar_s, abar_t):
    """log p_θ(x_s = i | x_t) for all i, (B, L, V) (for sampling and for tests)."""
    V = z.shape[-1]
    a, ak = abar_s.double()[:, None, None], abar_t.double()[:, None, None]
    k = ak / a
    lp = torch.log_softmax(z.double(), -1)
    is_xt = torch.nn.functional.one_hot(x_t, V).bool()
    D = torch.where(is_xt, ak + (1 - ak) / V, (1 - ak) / V)
    A = torch.where(is_xt, k + (1 - k) / V, (1 - k) / V)
    S = (lp.exp() / D).sum(-1, keepdim=True)
    M = a * lp.exp() / D + (1 - a) / V * S
    return safe_log(A) + safe_log(M)


# ----------------------------------------------------------------------------- method
class D3PMParams(Params):
    transition: Literal["absorb", "uniform"] = "absorb"
    T: PositiveInt = Field(1000, description="number of discrete diffusion steps")
    schedule: Optional[Literal["linear", "cosine"]] = Field(
        None, description="ᾱ_t schedule; default linear (absorb) / cosine (uniform)")
    loss: Literal["hybrid", "ce"] = Field("hybrid", description="KL_t + λ·CE (the reference weighting), or plain CE")
    hybrid_lambda: Optional[float] = Field(
        None, ge=0, description="λ of the hybrid loss; default 0.01 (absorb) / 0 (uniform)")
    float64_sampling: bool = True

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_transition(cls, v):
        if isinstance(v, dict):
            v = dict(v)
            uni = v.get("transition", "absorb") == "uniform"
            if v.get("schedule") is None:
                v["schedule"] = "cosine" if uni else "linear"
            if v.get("hybrid_lambda") is None:
                v["hybrid_lambda"] = 0.0 if uni else 0.01
        return v


@register("d3pm")
class D3PM(Method):
    Params = D3PMParams
    variants = {"absorb": {"transition": "absorb"}, "uniform": {"transition": "uniform"}}
    likelihood = "bound"
    time = "discrete"
    conditioning = "any"

    @classmethod
    def default_label(cls, params) -> str:
        return f"D3PM {params.transition.capitalize()}"

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        self.graph = GRAPHS[self.p.transition]   # the transition family: absorb or uniform

    def abar(self, t):
        return alpha_bar(t, self.p.T, self.p.schedule)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits of p_θ(x̃_0 | x_t) ∝ exp(f_θ(x_t, t/T)) · q(x_t | x̃_0) over the V real tokens.

        The likelihood factor makes the issue's x0-form equal D3PM's eq. 4 and is what lets a
        finite network copy the uncorrupted tokens with the confidence that T·KL_t demands (a
        copy error δ per step costs ≈ T·δ nats). uniform: q(x_t|x̃_0) adds log(1 + |V|ᾱ_t/(1−ᾱ_t))
        at x̃_0 = x_t; absorbing: it is the carry-over (applied inside kl_absorb), a constant at
        [MASK]."""
        z = self.net(x_t, t.float() / self.p.T).float()
        if not self.graph.absorbing:
            a = self.abar(t).to(z.device)
            bonus = torch.log1p(self.V * a / (1 - a).clamp_min(1e-300)).to(z.dtype)  # (B,)
            z = z.scatter_add(-1, x_t[..., None], bonus[:, None, None].expand(-1, x_t.shape[1], 1))
        return z

    def terms(self, x0, counted, t, denoise: Denoiser | None = None, x_t=None):
        """Per-sequence (T·KL_t + prior, denoising CE, KL_t) in nats for one draw x_t ~ q(x_t|x_0)
        (or the given x_t: the oracle tests take exact expectations by enumerating it)."""
        denoise = denoise or self.denoise
        T, graph = self.p.T, self.graph
        s = t - 1
        a_s, a_t = self.abar(s).to(x0.device), self.abar(t).to(x0.device)
        if x_t is None:
            x_t = graph.corrupt(x0, counted, a_t, self.V)
        noised = graph.scored(x_t, counted, self.mask_id)
        z = denoise(x_t, t)
        kl, lp_x0 = kl_absorb(z, x0, x_t, a_s, a_t, self.mask_id) if graph.absorbing else \
            kl_uniform(z, x0, x_t, a_s, a_t)
        prior = graph.prior_kl(self.abar(torch.full_like(t, T)).to(x0.device), self.V)
        kl_t = (kl * counted).sum(1)
        bound = T * kl_t + prior.to(kl.dtype) * counted.sum(1)
        ce = -(lp_x0 * noised).sum(1)
        return bound, ce, kl_t

    def nll(self, x0, counted, u, denoise: Denoiser | None = None, x_t=None):
        return self.terms(x0, counted, discrete_t(u, self.p.T).to(x0.device), denoise, x_t)[0]

    def loss(self, x0, counted, u):
        _, ce, kl_t = self.terms(x0, counted, discrete_t(u, self.p.T).to(x0.device))
        n = counted.sum().clamp(min=1)
        if self.p.loss == "ce":
            return ce.sum() / n
        return (kl_t.sum() + self.p.hybrid_lambda * ce.sum()) / n

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, denoise: Denoiser | None = None, *, given=None, keep=None):
        """Ancestral sampling with p_θ(x_s | x_t) (the paper's eq. 4, x0-parameterised) on a grid
        of ``steps`` strided steps from T to 0. absorb: each [MASK] is revealed w.p.
        (ᾱ_s − ᾱ_t)/(1 − ᾱ_t) (1 at s = 0) as x̃_0 ~ p_θ(x̃_0 | x_t); the reveal coins are drawn
        first and the categorical (Gumbel-max) only at the revealed positions — the same
        distribution as drawing x̃_0 everywhere. uniform: x_s is drawn at every position from
        the closed-form reverse (``log_reverse_uniform``).

        ``given``/``keep`` (bench.condition), methods/_discrete.clamp: absorb — the kept
        positions start unmasked and stay; uniform — replacement, the kept positions redrawn from
        q(x_s | given) after every step (Song et al. 2021, App. I.2; RePaint eq. 8), the given ids
        at s = 0 (ᾱ_0 = 1). Same NFE."""
        cond = condition(self, n, given, keep)
        denoise = denoise or self.denoise
        T, V, dev, f64 = self.p.T, self.V, self.device, self.p.float64_sampling
        steps = max(1, min(steps, T))
        grid = torch.round(torch.linspace(T, 0, steps + 1, dtype=torch.float64)).long().unique_consecutive()
        a_T = self.abar(torch.tensor([T]))
        x = self.graph.prior_sample(n, self.L, a_T.item(), V, self.mask_id, generator, dev)
        if cond is not None:
            x = clamp(self.graph, x, cond, a_T.item(), V, generator)
        for t_, s_ in zip(grid[:-1].tolist(), grid[1:].tolist()):
            tt = torch.full((n,), t_, dtype=torch.long, device=dev)
            a_s, a_t = self.abar(torch.tensor([s_])).item(), self.abar(torch.tensor([t_])).item()
            z = denoise(x, tt)
            if self.graph.absorbing:
                p_reveal = 1.0 if s_ == 0 else (a_s - a_t) / (1 - a_t)
                u = torch.rand(x.shape, generator=generator, device=dev, dtype=torch.float64)
                reveal = (x == self.mask_id) & (u < p_reveal)
                x[reveal] = gumbel_argmax(z[reveal], generator, f64)   # x̃_0 drawn only where revealed
            else:
                lp = log_reverse_uniform(z, x, torch.full((n,), a_s, device=dev, dtype=torch.float64),
                                         torch.full((n,), a_t, device=dev, dtype=torch.float64))
                x = gumbel_argmax(lp, generator, f64)
            if cond is not None:
                x = clamp(self.graph, x, cond, a_s, V, generator)
        return x
