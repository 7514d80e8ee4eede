"""SEDD (score entropy, Lou et al. 2024) and CSM (concrete score matching, Meng et al. 2022).

Continuous-time discrete diffusion learned through the concrete score s_θ(x_t, t)_y ≈
p_t(y)/p_t(x_t) over single-token neighbours. Forward CTMC with rate σ'(t)·Q (SEDD's column
convention), p_{t|0} = exp(σ(t) Q) e_{x_0}, on the ``absorb`` and ``uniform`` graphs; noise
log-linear σ(t) = −log(1 − (1−ε)t) or geometric σ_min^{1−t} σ_max^t.

- Loss and bound: denoising score entropy ℓ_t = Σ_y w_y R_y φ(log s_y − log R_y),
  φ(d) = e^d − d − 1 (SEDD's DWDSE), fused in ``logit_stats`` (methods/_discrete.py); the NLL
  bound is reconstruction + ∫_0^1 ℓ_t dt + KL(p_{1|0} ‖ p_base), extended to σ(0) > 0, with the
  integral estimated at t = t(u) (``time_map``).
- CSM: ½ Σ_y λ(t) (s_y − R_y)², evaluated with SEDD's bound.
- Samplers: ``euler`` and ``analytic`` (SEDD's Tweedie τ-leaping).

Derivation: docs/methods.md#sedd-and-csm; endpoint terms and estimator choices: docs/discrete.md.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
from pydantic import Field, model_validator

from bench.condition import condition
from bench.method import Method, Params, gumbel_argmax
from bench.registry import register
from methods._discrete import GRAPHS, clamp, logit_stats, safe_log

# (x_t, t) -> log s_θ(x_t, t), (B, L, V): log-ratios to the neighbour with token y at each position
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MIX_TIME = 0.1  # share of t-uniform draws in the default ``mix`` estimator (see SEDD.time_map)


# ----------------------------------------------------------------------------- noise
def sigma_of(t: torch.Tensor, noise: str, eps: float, sigma_min: float, sigma_max: float):
    """(σ(t), σ'(t)) in float64."""
    t = t.double()
    if noise == "loglinear":
        return -torch.log1p(-(1 - eps) * t), (1 - eps) / (1 - (1 - eps) * t)
    s = sigma_min ** (1 - t) * sigma_max ** t
    return s, s * math.log(sigma_max / sigma_min)


def t_of_sigma(sigma: torch.Tensor, noise: str, eps: float, sigma_min: float, sigma_max: float):
    """The inverse schedule t(σ), float64."""
    sigma = sigma.double()
    if noise == "loglinear":
        return -torch.expm1(-sigma) / (1 - eps)
    return torch.log(sigma / sigma_min) / math.log(sigma_max / sigma_min)


# ----------------------------------------------------------------------------- primitives
def score_entropy(log_s: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Elementwise s − R log s + K(R) = R·φ(log s − log R) (s for R = 0); ≥ 0, = 0 iff s = R."""
    d = log_s - safe_log(ratio)
    return torch.where(ratio > 0, ratio * (torch.expm1(d) - d), log_s.exp())


def _phi(d):
    return torch.expm1(d) - d


def _gather(x, i):
    return x.gather(-1, i[..., None])[..., 0]


# ----------------------------------------------------------------------------- DWDSE per graph
def dse_absorb(log_s, x0, x_t, sigma, dsigma, mask_id):
    """Per-position σ'-weighted denoising score entropy, absorb graph, (B, L)."""
    dt = torch.float64 if log_s.dtype == torch.float64 else torch.float32
    log_s = log_s.to(dt)
    log_r = -torch.log(torch.expm1(sigma))                          # float64, (B,)
    w = (dsigma * torch.exp(log_r)).to(dt)[:, None]                 # σ' r_t
    lr = log_r.to(dt)[:, None]
    lse, _, l0, _ = logit_stats(log_s, x0)
    tot, l0 = lse - lr, l0 - lr                                     # log Σ_y s_y / r, log s_{x0} / r
    ell = w * (torch.exp(tot) - l0 - 1)
    return torch.where(x_t == mask_id, ell, torch.zeros_like(ell))


def _uniform_ratios(sigma, V):
    """(log c, log ρ): the ratio to every neighbour when x_t = x_0, and to x_0 when x_t ≠ x_0."""
    em1 = torch.expm1(sigma)
    return torch.log(em1) - torch.log(V + em1), torch.log1p(V / em1)


def dse_uniform(log_s, x0, x_t, sigma, dsigma):
    """Per-position σ'-weighted denoising score entropy, uniform graph, (B, L)."""
    dt = torch.float64 if log_s.dtype == torch.float64 else torch.float32
    log_s = log_s.to(dt)
    V = log_s.shape[-1]
    log_c, log_rho = (v.to(dt)[:, None] for v in _uniform_ratios(sigma, V))
    c, rho = log_c.exp(), log_rho.exp()
    same = x0 == x_t
    lse, tot, l0, lx = logit_stats(log_s, x0, x_t, exclude=(x_t, x0))
    E = lse.exp()                                                   # Σ_{y ∉ {x_t, x_0}} s_y
    Lsum = tot - lx                                                 # Σ_{y ≠ x_t} log s_y
    same_term = E - c * Lsum + (V - 1) * c * (log_c - 1)
    diff_term = E - (Lsum - l0) - (V - 2) + rho * _phi(l0 - log_rho)
    return (dsigma.to(dt)[:, None] / V) * torch.where(same, same_term, diff_term)


# ----------------------------------------------------------------------------- CSM per graph
def csm_absorb(log_s, x0, x_t, sigma, mask_id, scaled: bool = True):
    """½ λ(t) Σ_y (s_y − R_y)², absorb graph (masked positions), (B, L); λ = (1+r)^{−2}."""
    dt = torch.float64 if log_s.dtype == torch.float64 else torch.float32
    log_s = log_s.to(dt)
    log_r = -torch.log(torch.expm1(sigma))
    log_n = (torch.log1p(torch.exp(log_r)) if scaled else torch.zeros_like(log_r)).to(dt)[:, None]
    rn = torch.exp(log_r.to(dt)[:, None] - log_n)                    # r/(1+r) (or r)
    lse2, _, l0, _ = logit_stats(log_s, x0, ks=(2.0,))
    s2 = torch.exp(lse2 - 2 * log_n)                                 # Σ ŝ²,  ŝ = s/(1+r)
    s0 = torch.exp(l0 - log_n)
    ell = 0.5 * (s2 - 2 * rn * s0 + rn ** 2)
    return torch.where(x_t == mask_id, ell, torch.zeros_like(ell))


def csm_uniform(log_s, x0, x_t, sigma, scaled: bool = True):
    """½ λ(t) Σ_{y≠x_t} (s_y − R_y)², uniform graph, (B, L); λ = (1 + ρ)^{−2}."""
    dt = torch.float64 if log_s.dtype == torch.float64 else torch.float32
    log_s = log_s.to(dt)
    V = log_s.shape[-1]
    log_c, log_rho = (v.to(dt)[:, None] for v in _uniform_ratios(sigma, V))
    c, rho = log_c.exp(), log_rho.exp()
    lam = torch.exp(-2 * torch.log1p(rho)) if scaled else torch.ones_like(rho)
    same = x0 == x_t
    lse, lse2, _, l0, _ = logit_stats(log_s, x0, ks=(1.0, 2.0), exclude=(x_t, x0))
    E, E2 = lse.exp(), lse2.exp()                                   # Σ s, Σ s² over y ∉ {x_t, x_0}
    same_term = lam * (E2 - 2 * c * E + (V - 1) * c ** 2)
    diff_term = lam * (E2 - 2 * E + (V - 2)) + \
        (rho ** 2 * lam) * torch.expm1(l0 - log_rho) ** 2            # (s_{x_0} − ρ)², stably
    return 0.5 * torch.where(same, same_term, diff_term)


# ----------------------------------------------------------------------------- sampler steps
def step_probs_absorb(log_s, dsig, analytic: bool):
    """p(x_s = y | x_t = [MASK]) for y ∈ V ∪ {[MASK]}, (B, L, V+1), unnormalised; dsig =
    σ(t) − σ(s) (B,). Euler: Δσ·s_y; analytic: (e^{Δσ} − 1)·s_y; [MASK]: 1 − Σ."""
    h = (torch.expm1(dsig) if analytic else dsig).to(log_s.dtype)[:, None, None]
    move = h * log_s.exp()
    stay = (1 - move.sum(-1, keepdim=True)).clamp_min(0)
    return torch.cat([move, stay], -1)


def reveal_probs_absorb(log_s, dsig, analytic: bool, last: bool):
    """``step_probs_absorb``'s categorical over V ∪ {[MASK]} at masked positions (rows log_s,
    (k, V); dsig (k,)) split in two draws: leave [MASK] w.p. p = Σ_y move_y / (Σ_y move_y + stay),
    then y ∝ move_y — the same distribution. Returns (p (k,), move (k, V)); ``last``: p = 1 (the
    last step reveals every remaining [MASK])."""
    probs = step_probs_absorb(log_s[:, None], dsig, analytic)[:, 0]
    move, stay = probs[:, :-1], probs[:, -1]
    total = move.sum(-1)
    return (torch.ones_like(total) if last else total / (total + stay)), move


def step_probs_uniform(log_s, x_t, dsig, analytic: bool):
    """p(x_s = y | x_t), (B, L, V), unnormalised; Euler: Δσ·s_y/|V| (y ≠ x_t); analytic:
    [e^{Δσ} v + (1 − e^{Δσ}) mean(v)]_y · (e^{−Δσ} δ_{x_t y} + (1 − e^{−Δσ})/|V|), v = s with v_{x_t} = 1."""
    V = log_s.shape[-1]
    d = dsig.to(log_s.dtype)[:, None, None]
    is_x = torch.nn.functional.one_hot(x_t, V).bool()
    v = torch.where(is_x, torch.ones_like(log_s), log_s.exp())
    if not analytic:
        move = torch.where(is_x, torch.zeros_like(v), d * v / V)
        return torch.where(is_x, (1 - move.sum(-1, keepdim=True)).clamp_min(0), move)
    u = (torch.exp(d) * v + (-torch.expm1(d)) * v.mean(-1, keepdim=True)).clamp_min(0)
    return u * torch.where(is_x, torch.exp(-d), torch.zeros_like(v)) + u * (-torch.expm1(-d) / V)


# ----------------------------------------------------------------------------- methods
class ScoreParams(Params):
    graph: Literal["absorb", "uniform"] = "absorb"
    noise: Optional[Literal["loglinear", "geometric"]] = Field(
        None, description="default loglinear (absorb) / geometric (uniform)")
    eps: float = Field(1e-3, ge=0, lt=1, description="log-linear ε: σ(1) = −log ε")
    sigma_min: float = Field(1e-4, gt=0)
    sigma_max: float = Field(20.0, gt=0)
    sampler: Literal["analytic", "euler"] = "analytic"
    float64_sampling: bool = True
    estimator: Literal["mix", "alpha", "time"] = Field(
        "mix", description="u → t importance map for the bound (same expectation): see time_map")

    @model_validator(mode="before")
    @classmethod
    def _noise_by_graph(cls, v):
        if isinstance(v, dict) and v.get("noise") is None:
            v = {**v, "noise": "geometric" if v.get("graph", "absorb") == "uniform" else "loglinear"}
        return v

    @model_validator(mode="after")
    def _range(self):
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})")
        return self


@register("sedd")
class SEDD(Method):
    Params = ScoreParams
    variants = {"absorb": {"graph": "absorb"}, "uniform": {"graph": "uniform"}}
    likelihood = "bound"
    time = "continuous"
    conditioning = "any"

    @classmethod
    def default_label(cls, params) -> str:
        return f"SEDD {params.graph.capitalize()}"

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        self.graph = GRAPHS[self.p.graph]   # the corruption graph: absorb or uniform

    def sigma(self, t):
        p = self.p
        return sigma_of(t, p.noise, p.eps, p.sigma_min, p.sigma_max)

    def time_map(self, u):
        """u ∈ (0,1) → (t, σ(t), w): the bound's integral ∫_0^1 σ'(t)·ℓ(σ(t)) dt is estimated by
        w·ℓ(σ(t(u))) with w = σ'(t)/q(t), unbiased for u ~ U(0,1) when t(u) is the inverse CDF of
        the density q on [0, 1] (importance sampling; the bound itself does not change):

        - ``time``:  q = 1, t = u (SEDD's training measure);
        - ``alpha``: q ∝ e^{−σ}σ', i.e. the kept fraction α = e^{−σ} is linear in u;
        - ``mix`` (default): q = (1−λ)·q_alpha + λ·1, λ = MIX_TIME = 0.1.

        For the log-linear schedule all three are t = u (α = 1 − (1−ε)t). For the geometric
        schedule the integrand lives in σ ∈ ~[0.01, 3] (~35% of t), so ``time`` wastes most draws
        and the stratified CI is very wide; ``alpha`` follows that shape but has a heavy tail at
        small σ (rare corrupted tokens with ratio |V|/σ, log-divergent variance); the mixture
        follows ``alpha`` and bounds the weight w ≤ σ'/λ there, so the tail is tamed."""
        p = self.p
        u = u.double()
        if p.estimator == "time":
            return (u, *self.sigma(u))
        ends = self.sigma(torch.tensor([0.0, 1.0], dtype=torch.float64, device=u.device))[0]
        a0, a1 = torch.exp(-ends)
        if p.estimator == "alpha":
            alpha = a0 + (a1 - a0) * u
            sigma = -torch.log(alpha)
            t = t_of_sigma(sigma, p.noise, p.eps, p.sigma_min, p.sigma_max).clamp(0, 1)
            return t, sigma, (a0 - a1) / alpha
        lam = MIX_TIME
        lo, hi = torch.zeros_like(u), torch.ones_like(u)       # invert G(t) = (1−λ)F_alpha(t) + λt
        for _ in range(60):
            mid = (lo + hi) / 2
            G = (1 - lam) * (a0 - torch.exp(-self.sigma(mid)[0])) / (a0 - a1) + lam * mid
            lo, hi = torch.where(G < u, mid, lo), torch.where(G < u, hi, mid)
        t = (lo + hi) / 2
        sigma, dsigma = self.sigma(t)
        q = (1 - lam) * torch.exp(-sigma) * dsigma / (a0 - a1) + lam
        return t, sigma, dsigma / q

    def score(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log s_θ(x_t, t), (B, L, V)."""
        f = self.net(x_t, t).float()
        if not self.graph.absorbing:
            return f
        sigma, _ = self.sigma(t)
        return f + (-torch.log(torch.expm1(sigma)) - math.log(self.V)).float()[:, None, None]

    def endpoint_terms(self, device) -> torch.Tensor:
        """Per counted token: reconstruction at t = 0 + prior KL at t = 1 (nats, float64)."""
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        s = self.sigma(ends)[0]
        a = torch.exp(-s)
        return (self.graph.recon(a[:1], self.V) + self.graph.prior_kl(a[1:], self.V))[0].to(device)

    def _draw(self, x0, counted, u, score, x_t=None):
        t, sigma, dsigma = self.time_map(u.to(x0.device))
        t = t.to(u.dtype)
        if x_t is None:
            x_t = self.graph.corrupt(x0, counted, torch.exp(-sigma), self.V)
        return x_t, (score or self.score)(x_t, t), sigma, dsigma

    def nll(self, x0, counted, u, score: Score | None = None, x_t=None):
        """Per-sequence bound (nats) at t = t(u) (see time_map) for one draw x_t ~ p_{t|0} (or
        the given x_t)."""
        x_t, log_s, sigma, dsigma = self._draw(x0, counted, u, score, x_t)
        if self.graph.absorbing:
            ell = dse_absorb(log_s, x0, x_t, sigma, dsigma, self.mask_id)
        else:
            ell = dse_uniform(log_s, x0, x_t, sigma, dsigma)
        return (ell * counted).sum(1) + self.endpoint_terms(x0.device).to(ell.dtype) * counted.sum(1)

    # ---- sampling
    def _prior_sample(self, n, generator):
        a1 = math.exp(-float(self.sigma(torch.tensor([1.0]))[0]))
        return self.graph.prior_sample(n, self.L, a1, self.V, self.mask_id, generator, self.device)

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, score: Score | None = None, *, given=None, keep=None):
        """The reverse CTMC on a uniform t-grid from 1 to 0 (SEDD's Euler step or Tweedie
        τ-leaping, ``step_probs_*``). absorb: a masked position leaves [MASK] w.p. p
        (``reveal_probs_absorb``) and only the leaving ones draw their token (Gumbel-max) —
        the same distribution as the joint categorical over V ∪ {[MASK]} at every position;
        uniform: every position draws from its step's categorical.

        ``given``/``keep`` (bench.condition), methods/_discrete.clamp: absorb — the kept
        positions start unmasked and stay (SEDD's infilling); uniform — replacement, redrawn
        from p_{s|0}(· | given) (α = e^{−σ(s)}) after every step (Song et al. 2021, App. I.2;
        RePaint eq. 8), and the given ids after the last one (its state is read as x_0). Same NFE."""
        cond = condition(self, n, given, keep)
        score = score or self.score
        dev, f64 = self.device, self.p.float64_sampling
        dt = torch.float64 if f64 else torch.float32
        analytic = self.p.sampler == "analytic"
        t_hi = 1.0 if math.isfinite(float(self.sigma(torch.tensor([1.0]))[0])) else 1 - 1e-5
        grid = torch.linspace(t_hi, 0, steps + 1, dtype=torch.float64)
        x = self._prior_sample(n, generator)
        if cond is not None:
            x = clamp(self.graph, x, cond, math.exp(-float(self.sigma(grid[:1])[0])), self.V, generator)
        for i in range(steps):
            t, s = grid[i], grid[i + 1]
            tt = torch.full((n,), float(t), device=dev)
            dsig = (self.sigma(t[None])[0] - self.sigma(s[None])[0]).expand(n).to(dev)
            log_s = score(x, tt)
            if self.graph.absorbing:             # only masked positions move; draw only there
                masked = x == self.mask_id
                k = int(masked.sum())
                p, move = reveal_probs_absorb(log_s[masked].to(dt), dsig[:1].expand(k), analytic, i == steps - 1)
                reveal = torch.rand(k, generator=generator, device=dev, dtype=torch.float64) < p
                new = torch.full((k,), self.mask_id, dtype=torch.long, device=dev)
                new[reveal] = gumbel_argmax(safe_log(move[reveal]), generator, f64)
                x[masked] = new
            else:
                x = gumbel_argmax(safe_log(step_probs_uniform(log_s.to(dt), x, dsig, analytic)), generator, f64)
            if cond is not None:
                a_s = 1.0 if i == steps - 1 else math.exp(-float(self.sigma(s[None])[0]))
                x = clamp(self.graph, x, cond, a_s, self.V, generator)
        return x


class CSMParams(ScoreParams):
    weighting: Literal["scaled", "none"] = Field(
        "scaled", description="λ(t) = (1 + max ratio)^−2 (same minimiser), or 1 (literal L2)")


@register("csm")
class CSM(SEDD):
    """Concrete score matching: the L2 objective, evaluated with SEDD's bound."""

    Params = CSMParams

    @classmethod
    def default_label(cls, params) -> str:
        return "CSM" if params.graph == "absorb" else "CSM Uniform"

    def loss(self, x0, counted, u):
        x_t, log_s, sigma, _ = self._draw(x0, counted, u, None)
        scaled = self.p.weighting == "scaled"
        if self.graph.absorbing:
            ell = csm_absorb(log_s, x0, x_t, sigma, self.mask_id, scaled)
        else:
            ell = csm_uniform(log_s, x0, x_t, sigma, scaled)
        return (ell * counted).sum() / counted.sum().clamp(min=1)
