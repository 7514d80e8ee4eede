"""What a Gaussian (continuous) diffusion bound bounds, and how its t is drawn; shared by the
continuous family (methods/continuous.py). VDM notation (Kingma et al. 2021, methods/_gaussian.py):
SNR(t) = e^{−γ(t)}, x̂(z_t; t) the predictor.

- :func:`diffusion_draw`: from one u ∈ (0, 1) per row, the time t and the weight w with which
  w·‖x − x̂(z_t; t)‖² is an unbiased one-draw estimate of the diffusion term — of the
  continuous-time bound (T = ∞, VDM eq. 17) or of the discrete-time VLB of a T-step ancestral
  sampler (VDM eq. 13) — with t drawn uniformly, ∝ the term's weight, uniformly in log-SNR or
  from the mixture of the last two (importance sampling with exact weights).
- :func:`ancestral_to_zero`: that T-step sampler, z_1 → z_0 (the generative model the T-step
  VLB bounds, with the bound's predictor); :func:`decoder_draw`: w ~ softmax(h Wᵀ + b) a block
  of rows at a time (the decoder's draw at z_0, no (n, L, V) buffer).
- :func:`describe`: the words every bound row records (``Method.bounds``) and every sample
  line (``Method.sampler_info``).

Derivations: docs/methods.md#what-a-continuous-bound-bounds.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from pydantic import Field

from bench.errors import UserError
from bench.method import gumbel_argmax
from methods._gaussian import NN_BYTES, Replacement, Schedule, bcast, ddpm_step

# t proposals beside uniform t, as the share ρ of draws from the density ∝ the weight ½γ′e^{−γ}; the
# other 1 − ρ are uniform in γ = −log SNR (diffusion_draw)
MIXTURES = {"weight": 1.0, "log-snr": 0.0, "mixture": 0.5}
PROPOSALS = ("uniform", *MIXTURES)
SAMPLER = Field("ddpm", description="ddpm / ddim (clamping, previous-step self-conditioning, ending at t = 1/steps "
                                    "by the nearest embedding), or bounded: exactly the model the bound bounds")


def _snr(g: torch.Tensor) -> torch.Tensor:
    return torch.exp(-g.double())


def diffusion_draw(schedule: Schedule, u: torch.Tensor, proposal: str = "uniform",
                   T: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, w), each (B,) in u's dtype, for draws u (B,) in [0, 1): E_u[w·f(t)] is the diffusion
    term for f(t) = E_ε‖x − x̂(z_t; t)‖² (VDM eq. 17 for T = None, eq. 13 for T steps).

    uniform: t = u, w = ½γ′(t)e^{−γ(t)} (T = None); i = ⌈uT⌉, t = i/T, w = (T/2)(SNR(s) − SNR(t)),
    s = (i − 1)/T (T steps).

    The others draw γ = γ(t) from a mixture on [γ(0), γ(1)] (ρ = MIXTURES[proposal]): with
    probability ρ from the density ∝ e^{−γ} — the weight's own, p_w(γ) = e^{−γ}/(SNR(0) − SNR(1)),
    by inverse CDF SNR = (1 − v)·SNR(0) + v·SNR(1) — else uniformly, p_u(γ) = 1/(γ(1) − γ(0)); then
    t = γ⁻¹ (``Schedule.t_of_gamma``). As the density of t is p(γ(t))·γ′(t), the exact importance
    weight of ½γ′e^{−γ} is w = ½e^{−γ} / (ρ p_w(γ) + (1 − ρ) p_u(γ)) (ρ = 1: the constant
    ½(SNR(0) − SNR(1))). With T steps the continuous draw rounded up to its cell, i = ⌈tT⌉, picks
    cell i with probability P(i) = ρ ΔSNR_i/(SNR(0) − SNR(1)) + (1 − ρ) Δγ_i/(γ(1) − γ(0)), and
    w = ½ΔSNR_i / P(i). u selects the component (u < ρ) and is rescaled into it, so stratified u
    stay stratified within each. Under the clamped fixed schedules γ is flat where the clamp
    binds, and neither component draws t there (where the weight is 0)."""
    uu = u.double()
    if proposal == "uniform":
        if T is None:
            g = schedule.gamma(u)
            return u, (0.5 * schedule.dgamma(u) * torch.exp(-g)).to(u.dtype)
        i = torch.ceil(uu * T).clamp(1, T)
        g_t, g_s = schedule.gamma((i / T).to(u.dtype)), schedule.gamma(((i - 1) / T).to(u.dtype))
        w = 0.5 * T * _snr(g_s) * -torch.expm1(g_s.double() - g_t.double())
        return (i / T).to(u.dtype), w.to(u.dtype)
    if proposal not in MIXTURES:
        raise ValueError(f"t proposal {proposal!r}: one of {', '.join(PROPOSALS)}")
    rho = MIXTURES[proposal]
    g0, g1 = schedule.gamma(torch.tensor([0.0, 1.0], device=u.device)).double()
    s0, s1 = torch.exp(-g0), torch.exp(-g1)
    from_w = uu < rho
    v = torch.where(from_w, uu / max(rho, 1e-300), (uu - rho) / max(1 - rho, 1e-300)).clamp(0, 1)
    g = torch.where(from_w, -torch.log((1 - v) * s0 + v * s1), g0 + v * (g1 - g0))
    t = schedule.t_of_gamma(g)
    if T is None:
        t = t.to(u.dtype)
        g = schedule.gamma(t).double()          # the γ of the t the estimate uses
        w = 0.5 * torch.exp(-g) / (rho * torch.exp(-g) / (s0 - s1) + (1 - rho) / (g1 - g0))
        return t, w.to(u.dtype)
    i = torch.ceil(t * T).clamp(1, T)
    g_t, g_s = schedule.gamma((i / T).to(u.dtype)).double(), schedule.gamma(((i - 1) / T).to(u.dtype)).double()
    d_snr = torch.exp(-g_s) * -torch.expm1(g_s - g_t)
    w = 0.5 * d_snr / (rho * d_snr / (s0 - s1) + (1 - rho) * (g_t - g_s) / (g1 - g0))
    return (i / T).to(u.dtype), torch.where(d_snr > 0, w, 0.0).to(u.dtype)   # P(i) = 0: never drawn but at u = 1


@torch.no_grad()
def ancestral_to_zero(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                      schedule: Schedule, T: int, generator=None,
                      replace: Optional[Replacement] = None) -> torch.Tensor:
    """z_0 of T ancestral steps z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x̂(z_t; t)) (VDM eq. 10;
    DDPM's posterior step) on t_i = i/T, from z_1 = ``z`` down to t = 0 — the last step included,
    unlike ``sample_loop``: the generative model whose NLL the T-step VLB bounds, given the
    bound's own predictor ``predict(z_t, t)``. ``replace`` (conditioning): the kept positions
    drawn from q(z_t | e) at t = 1 and after every step (_gaussian.Replacement)."""
    B = z.shape[0]
    if replace is not None:
        z = replace(z, bcast(schedule.gamma(torch.ones(B, device=z.device)), z), generator)
    for i in range(T, 0, -1):
        t = torch.full((B,), i / T, device=z.device)
        s = torch.full((B,), (i - 1) / T, device=z.device)
        g_s = bcast(schedule.gamma(s), z)
        z = ddpm_step(z, predict(z, t), bcast(schedule.gamma(t), z), g_s, generator)
        if replace is not None:
            z = replace(z, g_s, generator)
    return z


@torch.no_grad()
def decoder_draw(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor] = None, generator=None,
                 block_bytes: int = NN_BYTES) -> torch.Tensor:
    """w ~ softmax(h Wᵀ + b) per position, (…, d) → (…) ids, by the Gumbel-max trick in float64,
    a block of rows at a time (never more than ``block_bytes`` of float64 logits at once)."""
    flat = h.reshape(-1, h.shape[-1])
    rows = max(1, block_bytes // (8 * W.shape[0]))
    out = torch.empty(flat.shape[0], dtype=torch.long, device=h.device)
    for r in range(0, flat.shape[0], rows):
        logits = torch.nn.functional.linear(flat[r:r + rows].to(W.dtype), W, b)
        out[r:r + rows] = gumbel_argmax(logits, generator, float64=True)
    return out.view(h.shape[:-1])


def calls_per_step(self_condition: bool) -> int:
    """Network calls of the bound's predictor: f(z, t, f(z, t, 0)) is two, f(z, t) one."""
    return 2 if self_condition else 1


def bounded_steps(steps: int, self_condition: bool, decoder_calls: bool) -> int:
    """T, the reverse steps of the bounded sampler within a budget of ``steps`` network calls:
    each step calls the predictor (``calls_per_step``), and a decoder that is the network at
    z_0 (PLAID) calls it once more."""
    c = calls_per_step(self_condition)
    return steps // c - (1 if decoder_calls else 0)


def bounded_is_unclamped(v):
    """A Params validator (mode before): ``sampler: bounded`` samples the unclamped model the
    bound scores, so clamp is false (its default then; true is an error)."""
    if isinstance(v, dict) and v.get("sampler") == "bounded":
        if v.get("clamp", False):
            raise ValueError("clamp: the bounded sampler draws from the unclamped model the bound scores; "
                             "drop clamp or set it false")
        v = {**v, "clamp": False}
    return v


def describe(decoder: str, T: Optional[int], self_condition: bool, decoder_calls: bool) -> str:
    """The model a bound row bounds, in words (``Method.bounds``)."""
    f = "f(z_t, t, f(z_t, t, 0)) (two-pass self-conditioning)" if self_condition else "f(z_t, t)"
    c = calls_per_step(self_condition)
    if T is None:
        steps = "continuous time (T = ∞)"
        how = "sampler: bounded draws from it as its step budget grows (T → ∞)"
    else:
        steps = f"T = {T} ancestral steps on t = i/{T} (the discrete-time VLB, VDM eq. 13)"
        how = f"sampler: bounded draws exactly from it at a step budget of {c * (T + (1 if decoder_calls else 0))}"
    return (f"NLL of the model z_1 ~ N(0, I), {steps}, z_s ~ q(z_s | z_t, x̂) with the unclamped predictor "
            f"x̂ = {f}, w ~ {decoder} at t = 0; {how}; the ddpm/ddim samplers (clamping, previous-step "
            f"self-conditioning, ending at t = 1/steps) are not this model")


def sampler_words(p, steps: Optional[int], decoder_calls: bool, ending: str) -> dict:
    """What ``sample(n, steps)`` draws from (``Method.sampler_info``, on every sample line), for
    Params ``p`` (sampler, clamp, self_condition)."""
    if p.sampler == "bounded":
        T = bounded_steps(steps or 0, p.self_condition, decoder_calls)
        return {"name": "bounded", "T": T, "ends": "t = 0", "word": "drawn from the bounded decoder at z_0",
                "bounded_by": f"eval.bound_steps: {T}"}
    return {"name": p.sampler, "steps": steps, "clamp": p.clamp, "ends": f"t = 1/{steps}", "word": ending,
            "self_condition": "previous step's x̂0" if p.self_condition else None}


def check_budget(steps: int, self_condition: bool, decoder_calls: bool) -> int:
    """T for the bounded sampler, or UserError when the budget holds no step."""
    T = bounded_steps(steps, self_condition, decoder_calls)
    if T < 1:
        need = calls_per_step(self_condition) * (2 if decoder_calls else 1)
        raise UserError(f"eval.sample_steps: {steps} network calls hold no step of the bounded sampler "
                        f"(it needs at least {need})")
    return T

