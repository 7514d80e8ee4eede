"""MDLM: masked (absorbing-state) diffusion in continuous time (Sahoo et al., 2024).

Forward process (per token, independently): q(x_t | x_0) = Cat(α_t·e_{x0} + (1 − α_t)·e_[MASK]),
with the log-linear schedule σ(t) = −log(1 − t), i.e. α_t = e^{−σ(t)} = 1 − t (SEDD/MDLM use
ε = 1e-3 inside the log to keep σ(1) finite in training; ε = 0 here keeps α_1 = 0, so the prior
term KL(q(x_1|x_0) ‖ δ_[MASK]) is exactly zero and the estimator below is a valid bound).

SUBS parameterisation (MDLM §3.2): the denoiser never predicts [MASK] (the network has V
outputs, [MASK] is the extra input id V) and unmasked tokens are carried over unchanged.

Continuous-time NELBO (MDLM eq. 10), per sequence:

    L = ∫_0^1  (α'_t / (1 − α_t)) · Σ_{i : x_t^i = MASK}  log p_θ(x_0^i | x_t)  dt
      = E_{t~U(0,1)} [ (1/t) · Σ_{masked i} −log p_θ(x_0^i | x_t) ]        (α_t = 1 − t)

The reconstruction term at t = 0 is zero (nothing is masked). With the exact conditional
denoiser this bound equals −log p(x_0) (it averages the any-order AR decompositions, Ou et
al. 2024), which the oracle test checks.

Evaluation (``estimator: beta``, the default) estimates the same NELBO with bounded weights.
The probability that t ~ U(0,1) masks a given set M of m of the n counted tokens, times the
weight 1/t, is t^{m−1}(1−t)^{n−m} = B(m, n−m+1)·Beta(t; m, n−m+1), with B(m, n−m+1) =
1/(m·C(n,m)). So the time form is exactly

    L = n · E_{m ~ U{1..n}} E_{M ⊂ counted, |M| = m} E_{t ~ Beta(m, n−m+1)} [ (1/m) · Σ_{i∈M} −log p_θ(x_0^i | x_M masked, t) ]

— an importance reweighting of the time form: draw m, mask a uniform m-subset, draw t from its
posterior given m, feed the network that t. The weights n/m are bounded by n, whereas the time
form's 1/t weight has unbounded variance as t → 0 (E[(w·CE)²] ~ 1/t), so the interval is honest.
The harness's u maps to m = ⌈u·n⌉ (stratified u → stratified m).

``estimator: count`` is the pure masked-count form of earlier versions: the same draw of (m, M)
but the network is fed t = m/n. Its expectation equals L only for a denoiser that ignores t;
ours is t-conditioned (adaLN), so this form bounds −log of the *any-order autoregressive model*
built from the network at t = m/n (Ou et al. 2024; Hoogeboom et al. 2022), not of the diffusion
model that ``sample`` draws from. Rows evaluated with it say so (label and record).
``estimator: time`` is the plain time form (t = u; unbounded weights).

Sampler: ancestral, T steps from t = 1 to 0; between t and s < t each masked token is
revealed with probability (α_s − α_t)/(1 − α_t) = (t − s)/t, drawn from p_θ(x_0 | x_t).

``time_conditioning: false`` (MDLM's option) feeds the network t ≡ 0: the SUBS denoiser then
depends on x_t only, which is all it needs (the number of masks carries the time). Only then
is p_θ(x_0 | x_t) unchanged when no token changed in a step, and the sampler reuses it instead
of calling the network again (MDLM's caching sampler), per sequence: a step calls the network
only on the rows of the batch that changed (none: no call). The same samples, fewer calls.
"""
from __future__ import annotations

from typing import Callable, Literal

from pydantic import Field

import torch
import torch.nn.functional as F

from bench.method import Method, Params, gumbel_argmax
from bench.registry import register

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> log p(x_0|x_t), (B,L,V)


def alpha(t: torch.Tensor) -> torch.Tensor:
    """α_t = 1 − t (log-linear σ(t) = −log(1 − t))."""
    return 1 - t


def elbo_weight(t: torch.Tensor) -> torch.Tensor:
    """−α'_t / (1 − α_t) = 1/t: the continuous-time weight of the masked cross-entropy."""
    return 1 / t


def mask_tokens(x0, counted, t, mask_id):
    """Sample x_t ~ q(x_t | x_0): each counted token becomes [MASK] with probability 1 − α_t."""
    masked = (torch.rand(x0.shape, device=x0.device) < (1 - alpha(t))[:, None]) & counted
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def nelbo(x0, counted, t, denoise: Denoiser, mask_id: int) -> torch.Tensor:
    """Per-sequence one-sample estimate of the continuous-time NELBO (nats), (B,)."""
    x_t, masked = mask_tokens(x0, counted, t, mask_id)
    log_p = denoise(x_t, t)
    ce = -log_p.gather(-1, x0[..., None])[..., 0]
    return elbo_weight(t) * (ce * masked).sum(1)


def count_weight(n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """n/m: the weight of the m masked tokens' loss in the masked-count forms (n counted)."""
    return n / m


def _mask_m_subset(x0, counted, u, mask_id):
    """m = ⌈u·n⌉ of the n counted tokens, a uniform m-subset of them masked: (x_t, masked, n, m)."""
    n = counted.sum(1)                                                   # counted tokens
    m = torch.ceil(u * n).clamp(min=1).minimum(n.clamp(min=1))           # tokens to mask
    score = torch.rand(x0.shape, device=x0.device).masked_fill(~counted, 2.0)
    rank = score.argsort(1).argsort(1)                                   # random order of counted
    masked = (rank < m[:, None]) & counted
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked, n, m


def _weighted_ce(x0, x_t, masked, n, m, t, denoise: Denoiser):
    log_p = denoise(x_t, t)
    ce = -log_p.gather(-1, x0[..., None])[..., 0]
    w = count_weight(n.to(ce.dtype), m.to(ce.dtype))
    return torch.where(n > 0, w * (ce * masked).sum(1), torch.zeros_like(w))


def nelbo_beta(x0, counted, u, denoise: Denoiser, mask_id: int) -> torch.Tensor:
    """Per-sequence one-sample estimate of the NELBO (MDLM eq. 10) with bounded weights n/m:
    m = ⌈u·n⌉, a uniform m-subset masked, t ~ Beta(m, n−m+1) fed to the network, (B,)."""
    x_t, masked, n, m = _mask_m_subset(x0, counted, u, mask_id)
    a, b = m.double(), (n - m + 1).clamp(min=1).double()
    t = torch.distributions.Beta(a, b).sample().clamp(1e-6, 1 - 1e-6).to(u.dtype)
    return _weighted_ce(x0, x_t, masked, n, m, t, denoise)


def nelbo_masked_count(x0, counted, u, denoise: Denoiser, mask_id: int) -> torch.Tensor:
    """The pure masked-count form: as ``nelbo_beta`` but the network is fed t = m/n. Bounds the
    any-order autoregressive model of the network at t = m/n, not the diffusion model (see the
    module docstring), (B,)."""
    x_t, masked, n, m = _mask_m_subset(x0, counted, u, mask_id)
    return _weighted_ce(x0, x_t, masked, n, m, (m / n.clamp(min=1)).to(u.dtype), denoise)


class MDLMParams(Params):
    float64_sampling: bool = True  # Gumbel in float64 (float32 lowers gen. perplexity)
    estimator: Literal["beta", "count", "time"] = Field(
        "beta", description="eval form: beta (bounded weights, the NELBO), time (t = u), or count "
                            "(t = m/n: bounds the any-order AR model, not the diffusion model)")
    time_conditioning: bool = True  # false: the denoiser sees x_t only (t ≡ 0), sampler caches


@register("mdlm")
class MDLM(Method):
    Params = MDLMParams
    likelihood = "bound"
    time = "continuous"
    display = "MDLM"

    ESTIMATORS = {"beta": nelbo_beta, "count": nelbo_masked_count, "time": nelbo}

    @classmethod
    def default_label(cls, params) -> str:
        return "MDLM (any-order AR bound)" if params.estimator == "count" else "MDLM"

    def bounds(self) -> str:
        if self.p.estimator == "count":
            return "any-order autoregressive model of the network at t = m/n (not the diffusion model)"
        return super().bounds()

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t if self.p.time_conditioning else torch.zeros_like(t)
        return F.log_softmax(self.net(x_t, t).float(), dim=-1)

    def loss(self, x0, counted, u):
        """Training: the time form of the NELBO (MDLM eq. 10), per counted token — ``nelbo`` with
        the masked tokens' −log p_θ(x_0^i | x_t) taken from the backbone's fused head +
        cross-entropy (bench/backbone.py), the same value as −denoise(x_t, t)[x_0^i] without
        materialising the (B, L, V) log-probabilities."""
        x_t, masked = mask_tokens(x0, counted, u, self.mask_id)
        t = u if self.p.time_conditioning else torch.zeros_like(u)
        ce = self.net(x_t, t, targets=x0)
        return (elbo_weight(u) * (ce * masked).sum(1)).sum() / counted.sum().clamp(min=1)

    def nll(self, x0, counted, u):
        return self.ESTIMATORS[self.p.estimator](x0, counted, u, self.denoise, self.mask_id)

    @torch.no_grad()
    def sample(self, n, steps=64, generator=None, cache: bool = True):
        """``cache`` reuses p_θ(x_0 | x_t) across steps that changed no token; it is used only
        when the denoiser is time-agnostic (``time_conditioning: false``), where it is exact."""
        cache = cache and not self.p.time_conditioning
        x = torch.full((n, self.L), self.mask_id, dtype=torch.long, device=self.device)
        log_p, stale = None, torch.ones(n, dtype=torch.bool, device=self.device)
        for i in range(steps, 0, -1):
            t, s = i / steps, (i - 1) / steps
            still = x == self.mask_id
            tt = torch.full((n,), t, device=self.device)
            if log_p is None or not cache:
                log_p = self.denoise(x, tt)
            elif stale.any():                 # recompute only the sequences that changed
                log_p[stale] = self.denoise(x[stale], tt[stale])
            x0_hat = gumbel_argmax(log_p, generator, self.p.float64_sampling)
            reveal = still & (torch.rand(x.shape, generator=generator, device=self.device) < (t - s) / t)
            stale = reveal.any(1)
            x = torch.where(reveal, x0_hat, x)
        return x
