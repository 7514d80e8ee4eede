"""Gaussian diffusion machinery shared by the continuous family (methods/continuous.py).

VDM notation (Kingma et al. 2021): a schedule is γ(t) = −log SNR(t), increasing on [0, 1],
ᾱ_t = α_t² = sigmoid(−γ(t)), σ_t² = sigmoid(γ(t)), SNR(t) = e^{−γ(t)}.

- :func:`diffuse`: q(z_t | x) = N(α_t x, σ_t² I) (DDPM eq. 4 / VDM eq. 1).
- :func:`posterior`: q(z_s | z_t, x), s < t (VDM eq. 3, App. A); DDPM ancestral and DDIM (Song
  et al. 2021, eq. 12, η = 0) steps on any grid (:func:`sample_loop`).
- :func:`prior_kl`, :func:`diffusion_term`: the continuous-time bound (VDM eq. 17), valid for
  any monotone γ with finite endpoints and any predictor x̂_θ.
- :class:`Schedule`: cosine (Nichol & Dhariwal 2021, eq. 17), sqrt (Li et al. 2022, App. A),
  tan-d (Shabalin et al. 2024), learned γ(t) (VDM §3.4 / PLAID), each with γ and γ′ in closed
  form; :class:`Parameterisation`: x0, ε (DDPM), v (Salimans & Ho 2022).
- :class:`NormalStream`: N(0, 1) draws by Box–Muller on CPU, decided by the torch seed.
- :class:`Replacement`: conditioning (bench/condition.py) in the samplers — the kept positions
  of z redrawn from q(z_s | e(given)) after every step (Song et al. 2021, App. I.2; RePaint).

Derivation: docs/methods.md#the-gaussian-machinery.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

GAMMA_MIN, GAMMA_MAX = -13.0, 13.0   # ᾱ ∈ [2.3e-6, 1 − 2.3e-6] for the fixed schedules


# ----------------------------------------------------------------------------- schedules
class Schedule(nn.Module):
    """γ(t) = −log SNR(t), increasing in t; subclasses give γ and γ' in closed form."""

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return self.raw_gamma(t).clamp(GAMMA_MIN, GAMMA_MAX)

    def dgamma(self, t: torch.Tensor) -> torch.Tensor:
        """dγ/dt (0 where the clamp binds)."""
        g = self.raw_gamma(t)
        return self.raw_dgamma(t) * ((g > GAMMA_MIN) & (g < GAMMA_MAX)).to(t.dtype)

    def raw_gamma(self, t):
        raise NotImplementedError

    def raw_dgamma(self, t):
        raise NotImplementedError

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) = (√sigmoid(−γ), √sigmoid(γ))."""
        g = self.gamma(t)
        return torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-self.gamma(t))

    def t_of_gamma(self, g: torch.Tensor) -> torch.Tensor:
        """The t ∈ [0, 1] with γ(t) = g, for g between γ(0) and γ(1) (float64): by bisection on
        the increasing γ (52 halvings: to float64's resolution of [0, 1]); the fixed schedules
        override it with their closed-form inverse of the raw γ."""
        lo, hi = torch.zeros_like(g, dtype=torch.float64), torch.ones_like(g, dtype=torch.float64)
        for _ in range(52):
            mid = (lo + hi) / 2
            below = self.gamma(mid).double() < g
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2


class Cosine(Schedule):
    """ᾱ_t = cos²(φ_t)/cos²(φ_0), φ_t = (π/2)(t + s)/(1 + s), s = 0.008 (Nichol & Dhariwal eq. 17).
    γ = log((1 − ᾱ)/ᾱ); we drop the normaliser cos²(φ_0) = 1 − 1.6e-4, so γ = 2 log tan φ_t and
    γ' = 2π / ((1 + s) sin 2φ_t)."""

    def __init__(self, s: float = 0.008):
        super().__init__()
        self.s = s

    def _phi(self, t):
        return (math.pi / 2) * (t + self.s) / (1 + self.s)

    def raw_gamma(self, t):
        return 2 * torch.log(torch.tan(self._phi(t).clamp(max=math.pi / 2 - 1e-7)))

    def raw_dgamma(self, t):
        return 2 * math.pi / ((1 + self.s) * torch.sin(2 * self._phi(t)).clamp(min=1e-12))

    def t_of_gamma(self, g):
        """φ = atan(e^{γ/2}), t = φ(1 + s)/(π/2) − s."""
        return (torch.atan(torch.exp(g.double() / 2)) * (1 + self.s) / (math.pi / 2) - self.s).clamp(0, 1)


class Sqrt(Schedule):
    """Diffusion-LM's sqrt schedule ᾱ_t = 1 − √(t + s), s = 1e-4: noise rises fast at small t
    ("text needs more noise"). With r = √(t + s): γ = log r − log(1 − r),
    γ' = (1/(2r)) · (1/r + 1/(1 − r))."""

    def __init__(self, s: float = 1e-4):
        super().__init__()
        self.s = s

    def _r(self, t):
        return torch.sqrt(t + self.s).clamp(max=1 - 1e-7)

    def raw_gamma(self, t):
        r = self._r(t)
        return torch.log(r) - torch.log1p(-r)

    def raw_dgamma(self, t):
        r = self._r(t)
        return (1 / (2 * r)) * (1 / r + 1 / (1 - r))

    def t_of_gamma(self, g):
        """γ = logit(r): r = sigmoid(γ), t = r² − s."""
        return (torch.sigmoid(g.double()) ** 2 - self.s).clamp(0, 1)


class TanD(Schedule):
    """TEncDM's tan-d schedule α_t = 1/√(1 + d² tan²(πt/2)), d = 9: SNR = 1/(d² tan²(πt/2)),
    γ = 2 log(d tan(πt/2)), γ' = 2π / sin(πt)."""

    def __init__(self, d: float = 9.0):
        super().__init__()
        self.d = d

    def raw_gamma(self, t):
        return 2 * torch.log(self.d * torch.tan((math.pi / 2) * t.clamp(1e-12, 1 - 1e-7)))

    def raw_dgamma(self, t):
        return 2 * math.pi / torch.sin(math.pi * t.clamp(1e-12, 1 - 1e-7))

    def t_of_gamma(self, g):
        """t = (2/π) atan(e^{γ/2}/d)."""
        return (2 / math.pi) * torch.atan(torch.exp(g.double() / 2) / self.d)


class Learned(Schedule):
    """A learned monotone γ(t) = γ_0 + (γ_1 − γ_0)·h̃(t) with learned endpoints (VDM §3.4, PLAID).

    h̃(t) = (h(t) − h(0)) / (h(1) − h(0)) with h(t) = t + Σ_k a_k·sigmoid(w_k (t − b_k)),
    a_k, w_k > 0 (softplus), so h̃ is increasing with h̃(0) = 0, h̃(1) = 1; γ_1 − γ_0 =
    softplus(·) > 0. Not clamped: γ_0, γ_1 are whatever the bound trains them to (PLAID
    initialises them at −3 and 6). γ' = (γ_1 − γ_0)·h'(t)/(h(1) − h(0))."""

    def __init__(self, gamma_0: float = -3.0, gamma_1: float = 6.0, hidden: int = 4):
        super().__init__()
        if gamma_1 <= gamma_0:
            raise ValueError(f"gamma_1 ({gamma_1}) must exceed gamma_0 ({gamma_0})")
        # one-element tensors, not 0-dim: DeepSpeed broadcasts parameters as byte views, which a
        # 0-dim tensor cannot give
        self.gamma_0 = nn.Parameter(torch.tensor([float(gamma_0)]))
        gap = gamma_1 - gamma_0
        self.raw_gap = nn.Parameter(torch.tensor([gap + math.log(-math.expm1(-gap))]))  # softplus⁻¹
        self.a = nn.Parameter(torch.full((hidden,), -4.0))     # softplus(−4) ≈ 0.018: ~linear at init
        self.w = nn.Parameter(torch.full((hidden,), 1.0))
        self.b = nn.Parameter(torch.linspace(0.1, 0.9, hidden))

    def _h(self, t):
        a, w = F.softplus(self.a), F.softplus(self.w) * 4
        return t + (a * torch.sigmoid(w * (t[..., None] - self.b))).sum(-1)

    def _dh(self, t):
        a, w = F.softplus(self.a), F.softplus(self.w) * 4
        sg = torch.sigmoid(w * (t[..., None] - self.b))
        return 1 + (a * w * sg * (1 - sg)).sum(-1)

    def _norm(self, t):
        one = torch.ones_like(t)
        return self._h(one) - self._h(torch.zeros_like(t))

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ_0, γ_1) as 0-dim tensors."""
        g0 = self.gamma_0[0]
        return g0, g0 + F.softplus(self.raw_gap[0])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("gamma_0", "raw_gap"):     # checkpoints before 2026-12-04 hold 0-dim tensors
            v = state_dict.get(prefix + name)
            if v is not None and v.dim() == 0:
                state_dict[prefix + name] = v.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def gamma(self, t):
        g0, g1 = self.endpoints()
        return g0 + (g1 - g0) * (self._h(t) - self._h(torch.zeros_like(t))) / self._norm(t)

    def dgamma(self, t):
        g0, g1 = self.endpoints()
        return (g1 - g0) * self._dh(t) / self._norm(t)


SCHEDULES: dict[str, Callable[[], Schedule]] = {"cosine": Cosine, "sqrt": Sqrt, "tan-d": TanD,
                                                "learned": Learned}


# ----------------------------------------------------------------------------- parameterisations
class Parameterisation:
    """What the network predicts; every one converts to x̂0 (samplers and bounds use x̂0)."""

    name = "?"

    def x0(self, out, z, alpha, sigma):
        raise NotImplementedError

    def target(self, x0, eps, alpha, sigma):
        """What the simple loss regresses the output on (DDPM's L_simple in this space)."""
        raise NotImplementedError


class PredictX0(Parameterisation):
    name = "x0"

    def x0(self, out, z, alpha, sigma):
        return out

    def target(self, x0, eps, alpha, sigma):
        return x0


class PredictEps(Parameterisation):
    """x̂0 = (z − σ ε̂)/α; ill-conditioned as α → 0 (callers clamp/round x̂0 when sampling)."""

    name = "eps"

    def x0(self, out, z, alpha, sigma):
        return (z - sigma * out) / alpha

    def target(self, x0, eps, alpha, sigma):
        return eps


class PredictV(Parameterisation):
    """v = α ε − σ x; x̂0 = α z − σ v̂ (α² + σ² = 1)."""

    name = "v"

    def x0(self, out, z, alpha, sigma):
        return alpha * z - sigma * out

    def target(self, x0, eps, alpha, sigma):
        return alpha * eps - sigma * x0


PARAMETERISATIONS: dict[str, Parameterisation] = {p.name: p for p in (PredictX0(), PredictEps(), PredictV())}


# ----------------------------------------------------------------------------- forward process
# Self-conditioning (Chen et al. 2022, Analog Bits §3.2), shared by the continuous methods: the
# training rate of the two-pass branch and the label tag.
SC_RATE = Field(0.5, ge=0.0, le=1.0, description="training: probability of the two-pass (x̃0 = first pass) branch")
SC_LABEL = " +SC"


def sc_label(name: str, params) -> str:
    """``name`` with " +SC" when the method self-conditions."""
    return name + (SC_LABEL if params.self_condition else "")


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, …) to broadcast against ``like``."""
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


class NormalStream:
    """ε ~ N(0, I) for the V-wide noise of the simplex (SSD-LM): one draw per vocabulary entry per
    position, 4.2 M per training step at the smoke size, for which torch.randn (a serial Mersenne
    twister) is slow on CPU (timings: docs/performance.md#ssd-lm-where-its-step-goes).

    On CPU, Box–Muller (Box & Muller 1958): for independent U₁, U₂ ~ U(0, 1],
    √(−2 ln U₁)·(cos 2πU₂, sin 2πU₂) are two independent N(0, 1). The uniforms are 32-bit words
    of numpy's SFC64 generator seeded with one 62-bit draw from ``generator`` (torch's default
    generator when None) when the stream is made, so a seed, a checkpointed torch RNG state and
    the training loop's per-(step, rank) reseeding decide these draws exactly as they decide
    torch.randn's. Each word w, a signed int32 read as float32, gives U₁ = ½ + w·2⁻³² (steps of
    2⁻²⁵ near 0; U₁ = 0, probability 1.5·10⁻⁸, is lifted to 2⁻²⁶, so |ε| ≤ √(52 ln 2) = 6.0 —
    torch.randn's 24-bit uniforms stop at 5.8) or 2πU₂ = w·2π·2⁻³² ∈ [−π, π]; :meth:`fill_`
    takes U₁ from the first half of its tensor's words and U₂ from the second. Off the CPU
    (CUDA's Philox is fast) it is Tensor.normal_."""

    def __init__(self, generator: Optional[torch.Generator] = None, device: Optional[torch.device | str] = None):
        self.generator = generator
        self.on_cpu = torch.device(device or "cpu").type == "cpu"
        if self.on_cpu:
            self.words = np.random.SFC64(int(torch.randint(0, 1 << 62, (), generator=generator)))

    def fill_(self, out: torch.Tensor) -> torch.Tensor:
        """Overwrite ``out`` (contiguous float32) with the stream's next N(0, 1) draws."""
        if not self.on_cpu:
            return out.normal_(generator=self.generator)
        n = out.numel()
        if n % 2:                                           # Box–Muller makes pairs
            out.view(-1).copy_(self.fill_(torch.empty(n + 1))[:n])
            return out
        half, flat = n // 2, out.view(-1)
        flat.copy_(torch.from_numpy(self.words.random_raw(half).view(np.int32)))
        radius = flat[:half].mul_(2.0 ** -32).add_(0.5).clamp_(min=2.0 ** -26).log_().mul_(-2.0).sqrt_()
        angle = flat[half:].mul_(2 * math.pi * 2.0 ** -32)
        cos = torch.cos(angle)
        angle.sin_().mul_(radius)                           # second half: r sin θ
        radius.mul_(cos)                                    # first half: r cos θ
        return out


def standard_normal(shape: tuple[int, ...], generator: Optional[torch.Generator] = None,
                    device: Optional[torch.device | str] = None) -> torch.Tensor:
    """A fresh tensor of N(0, 1) from a new :class:`NormalStream`."""
    return NormalStream(generator, device).fill_(torch.empty(shape, device=device))


def diffuse(x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
            eps: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t = α_t x0 + σ_t ε (α, σ broadcastable); returns (z_t, ε)."""
    eps = torch.randn_like(x0) if eps is None else eps
    return alpha * x0 + sigma * eps, eps


def posterior(z_t, x0_hat, gamma_t, gamma_s):
    """Mean and variance of q(z_s | z_t, x = x̂0) for s < t (see the module docstring)."""
    c = -torch.expm1(gamma_s - gamma_t)
    a_t, a_s = torch.sigmoid(-gamma_t).sqrt(), torch.sigmoid(-gamma_s).sqrt()
    mean = (a_s / a_t) * (1 - c) * z_t + a_s * c * x0_hat
    return mean, torch.sigmoid(gamma_s) * c


def ddpm_step(z_t, x0_hat, gamma_t, gamma_s, generator=None):
    """Ancestral step z_s ~ q(z_s | z_t, x̂0)."""
    mean, var = posterior(z_t, x0_hat, gamma_t, gamma_s)
    noise = torch.randn(z_t.shape, generator=generator, device=z_t.device, dtype=z_t.dtype)
    return mean + var.sqrt() * noise


def ddim_step(z_t, x0_hat, gamma_t, gamma_s, generator=None):
    """Deterministic DDIM step (η = 0): z_s = α_s x̂0 + σ_s (z_t − α_t x̂0)/σ_t."""
    a_t, s_t = torch.sigmoid(-gamma_t).sqrt(), torch.sigmoid(gamma_t).sqrt()
    a_s, s_s = torch.sigmoid(-gamma_s).sqrt(), torch.sigmoid(gamma_s).sqrt()
    eps_hat = (z_t - a_t * x0_hat) / s_t
    return a_s * x0_hat + s_s * eps_hat


SAMPLERS = {"ddpm": ddpm_step, "ddim": ddim_step}


class Replacement:
    """The "replacement" method of conditional sampling (Song et al. 2021, score SDE, App. I.2;
    RePaint, Lugmayr et al. 2022, eq. 8): after every reverse step to s, the kept positions of
    z_s are redrawn from the forward process, z_s = α_s e + σ_s ε, e the given tokens'
    embeddings (n, L, d); the unkept ones keep the reverse step's value. The network so sees
    the given tokens at the noise level it was trained on, at every step, and the word of a
    kept position is its given id (the caller sets it: rounding need not give it back). An
    approximation of the conditional: the unkept positions are never corrected for the kept
    ones' later values (RePaint's resampling would)."""

    def __init__(self, e: torch.Tensor, keep: torch.Tensor):
        self.e, self.keep = e, keep[..., None]

    def __call__(self, z: torch.Tensor, gamma_s: torch.Tensor, generator=None) -> torch.Tensor:
        """z with its kept positions drawn from q(z_s | e) at γ(s) (broadcastable to z)."""
        g = gamma_s.to(z.dtype)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return torch.where(self.keep, torch.sigmoid(-g).sqrt() * self.e.to(z.dtype) + torch.sigmoid(g).sqrt() * noise,
                           z)

# (z_t, t (B,), x̃0 or None) -> x̂0
Predictor = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@torch.no_grad()
def sample_loop(predict: Predictor, z: torch.Tensor, schedule: Schedule, steps: int, step_fn,
                generator=None, snap: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                self_condition: bool = False, replace: Optional[Replacement] = None) -> torch.Tensor:
    """Run ``steps`` equal steps from t = 1 (z ~ the prior, given) to t = 0; returns the last x̂0.

    ``snap`` is the clamping trick (Diffusion-LM §4.2): each x̂0 is replaced by the nearest
    embedding before the step. With ``self_condition`` each prediction is fed the previous
    step's x̂0 (zeros at the first step; Analog Bits Alg. 2), one network call per step.
    ``replace`` (conditioning): the kept positions of z drawn from q(z_t | e) at t = 1 and after
    every step (:class:`Replacement`)."""
    B = z.shape[0]
    x_sc = None
    x0_hat = z
    if replace is not None:
        z = replace(z, bcast(schedule.gamma(torch.ones(B, device=z.device)), z), generator)
    for i in range(steps, 0, -1):
        t = torch.full((B,), i / steps, device=z.device)
        s = torch.full((B,), (i - 1) / steps, device=z.device)
        x0_hat = predict(z, t, x_sc)
        if snap is not None:
            x0_hat = snap(x0_hat)
        if self_condition:
            x_sc = x0_hat
        if i > 1:
            g_t, g_s = bcast(schedule.gamma(t), z), bcast(schedule.gamma(s), z)
            z = step_fn(z, x0_hat, g_t, g_s, generator)
            if replace is not None:
                z = replace(z, g_s, generator)
    return x0_hat


NN_BYTES = 1 << 26    # nearest_embedding's distance block: 64 MiB of fp32 (333 rows at V = 50,257)


def nearest_embedding(x: torch.Tensor, E: torch.Tensor, block_bytes: int = NN_BYTES) -> torch.Tensor:
    """argmin_v ‖x − E_v‖² per position, (…, d) → (…) ids (Diffusion-LM's rounding), as
    ‖x‖² − 2x·E_v + ‖E_v‖², a block of rows at a time: never more than ``block_bytes`` of
    distances (rows × V) at once, whatever the number of positions (an (n, L, V) buffer at once
    would be 13 GB at n = 64, L = 1,024, V = 50,257)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = max(1, block_bytes // (flat.element_size() * E.shape[0]))
    e2 = (E * E).sum(-1)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=x.device)
    for r in range(0, flat.shape[0], rows):
        xr = flat[r:r + rows]
        out[r:r + rows] = ((xr * xr).sum(-1, keepdim=True) - 2 * xr @ E.t() + e2).argmin(-1)
    return out.view(x.shape[:-1])


# ----------------------------------------------------------------------------- the bound
def diffusion_term(x0, x0_hat, gamma_t, dgamma_t):
    """½ γ'(t) e^{−γ(t)} ‖x0 − x̂0‖² summed over the last (feature) axis (VDM eq. 17); the
    one-sample estimate of the continuous-time diffusion loss at t ~ U(0, 1)."""
    return 0.5 * dgamma_t * torch.exp(-gamma_t) * ((x0 - x0_hat) ** 2).sum(-1)


def prior_kl(x0, gamma_1):
    """KL(N(α_1 x0, σ_1² I) ‖ N(0, I)) summed over the last axis:
    ½ Σ_j (α_1² x_j² + σ_1² − 1 − log σ_1²)."""
    a2, s2 = torch.sigmoid(-gamma_1), torch.sigmoid(gamma_1)
    d = x0.shape[-1]
    return 0.5 * (a2 * (x0 ** 2).sum(-1) + d * (s2 - 1 - F.logsigmoid(gamma_1)))


# ----------------------------------------------------------------------------- self-conditioning
def train_condition(first_pass: Callable[[], torch.Tensor], p_two_pass: float = 0.5,
                    generator=None) -> Optional[torch.Tensor]:
    """x̃0 for one training step (Chen et al. 2022, Analog Bits Alg. 1): with probability
    1 − p none (the network sees zeros), else the network's own first prediction under
    stop-gradient (no gradient flows through x̃0). One coin per micro-batch."""
    if float(torch.rand((), generator=generator)) < p_two_pass:
        with torch.no_grad():
            return first_pass().detach()
    return None
