"""Math shared by the masked (absorbing-state) diffusion family: MDLM (methods/mdlm.py) and
BD3-LM (methods/bd3lm.py), which is MDLM inside each block.

- The log-linear schedule: α_t = 1 − t (σ(t) = −log(1 − t)), so a token is [MASK] at time t
  with probability 1 − α_t = t, and the continuous-time NELBO's weight −α'_t / (1 − α_t) = 1/t
  (MDLM eq. 10; BD3-LM's L_BD per block).
- The forward sample q(x_t | x_0), with t per sequence or per token (per block in BD3-LM).
- The masked-count form of the same NELBO (docs/methods.md#mdlm): m = ⌈u·n⌉ of the n counted
  tokens masked as a uniform m-subset, weight n/m — per sequence, or per block of a sequence.
- The NELBO's one-draw estimators given a denoiser (x_t, t) → log p_θ(x_0 | x_t): ``nelbo``
  (time form, MDLM eq. 10), ``nelbo_beta`` (bounded weights), ``nelbo_masked_count`` — MDLM's,
  and hf-masked-diffusion's for a pretrained masked LM.
- SUBS (MDLM §3.2) for a network that outputs the [MASK] column too (``subs``), and the two
  samplers of the family: ``ancestral_sample`` (MDLM's reverse process) and
  ``confidence_sample`` (confidence-ordered unmasking, LLaDA / Dream).
"""
from __future__ import annotations

from typing import Callable

import torch

from bench.method import gumbel_argmax

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> log p(x_0|x_t), (B,L,V)


def alpha(t: torch.Tensor) -> torch.Tensor:
    """α_t = 1 − t (log-linear σ(t) = −log(1 − t))."""
    return 1 - t


def elbo_weight(t: torch.Tensor) -> torch.Tensor:
    """−α'_t / (1 − α_t) = 1/t: the continuous-time weight of the masked cross-entropy."""
    return 1 / t


def count_weight(n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """n/m: the weight of the m masked tokens' loss in the masked-count forms (n counted)."""
    return n / m


def mask_tokens(x0, counted, t, mask_id):
    """Sample x_t ~ q(x_t | x_0): each counted token becomes [MASK] with probability 1 − α_t;
    ``t`` is (B,) per sequence or (B, L) per token. Returns (x_t, masked)."""
    rate = 1 - alpha(t)
    if rate.dim() == 1:
        rate = rate[:, None]
    masked = (torch.rand(x0.shape, device=x0.device) < rate) & counted
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def mask_m_subset(x0, counted, u, mask_id, block: int | None = None):
    """Per block of ``block`` tokens (None: the whole sequence is one block), m = ⌈u·n⌉ of the
    block's n counted tokens, a uniform m-subset of them masked. ``u`` is (B,) for one block or
    (B, L/block), one draw per block. Returns (x_t, masked, n, m), n and m (B,) for one block
    and (B, L/block) otherwise."""
    B, L = x0.shape
    size = L if block is None else block
    c = counted.view(B, L // size, size)
    n = c.sum(-1)                                                        # counted tokens per block
    m = torch.ceil(u.reshape(B, -1) * n).clamp(min=1).minimum(n.clamp(min=1))   # tokens to mask
    score = torch.rand(x0.shape, device=x0.device).masked_fill(~counted, 2.0).view(c.shape)
    rank = score.argsort(-1).argsort(-1)                                 # random order of counted
    masked = ((rank < m[..., None]) & c).view(B, L)
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return (x_t, masked, n[:, 0], m[:, 0]) if block is None else (x_t, masked, n, m)


# ----------------------------------------------------------------------------- the NELBO's estimators
def nelbo(x0, counted, t, denoise: Denoiser, mask_id: int) -> torch.Tensor:
    """Per-sequence one-sample estimate of the continuous-time NELBO (nats), (B,):
    (1/t) Σ_{masked i} −log p_θ(x_0^i | x_t), x_t ~ q(x_t | x_0) (MDLM eq. 10)."""
    x_t, masked = mask_tokens(x0, counted, t, mask_id)
    log_p = denoise(x_t, t)
    ce = -log_p.gather(-1, x0[..., None])[..., 0]
    return elbo_weight(t) * (ce * masked).sum(1)


def weighted_masked_ce(x0, x_t, masked, n, m, t, denoise: Denoiser):
    """(n/m) Σ_{masked i} −log p_θ(x_0^i | x_t) per sequence (0 for a sequence with nothing counted)."""
    log_p = denoise(x_t, t)
    ce = -log_p.gather(-1, x0[..., None])[..., 0]
    w = count_weight(n.to(ce.dtype), m.to(ce.dtype))
    return torch.where(n > 0, w * (ce * masked).sum(1), torch.zeros_like(w))


def nelbo_beta(x0, counted, u, denoise: Denoiser, mask_id: int) -> torch.Tensor:
    """Per-sequence one-sample estimate of the NELBO (MDLM eq. 10) with bounded weights n/m:
    m = ⌈u·n⌉, a uniform m-subset masked, t ~ Beta(m, n−m+1) fed to the network, (B,). For a
    time-agnostic denoiser its expectation is Σ_{m=1}^{n} (1/m)·mean_{|S|=m} Σ_{i∈S} −log p_θ(x_0^i |
    x_{S masked}), the NELBO's integral over t done in closed form (docs/methods.md#mdlm)."""
    x_t, masked, n, m = mask_m_subset(x0, counted, u, mask_id)
    a, b = m.double(), (n - m + 1).clamp(min=1).double()
    t = torch.distributions.Beta(a, b).sample().clamp(1e-6, 1 - 1e-6).to(u.dtype)
    return weighted_masked_ce(x0, x_t, masked, n, m, t, denoise)


def nelbo_masked_count(x0, counted, u, denoise: Denoiser, mask_id: int) -> torch.Tensor:
    """The pure masked-count form: as ``nelbo_beta`` but the network is fed t = m/n. Bounds the
    any-order autoregressive model of the network at t = m/n, not the diffusion model, (B,)."""
    x_t, masked, n, m = mask_m_subset(x0, counted, u, mask_id)
    return weighted_masked_ce(x0, x_t, masked, n, m, (m / n.clamp(min=1)).to(u.dtype), denoise)


def subs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS (MDLM §3.2) on raw logits (B, L, V') that include the [MASK] column: log p_θ(x_0 | x_t)
    with the [MASK] logit at −∞ (x_0 is never [MASK]) and every unmasked position carried over
    (log-probability 0 at its own token x_t^i, −∞ elsewhere)."""
    logits = logits.float().clone()
    logits[..., mask_id] = -torch.inf
    log_p = torch.log_softmax(logits, dim=-1)
    keep = x_t != mask_id
    carried = torch.full_like(log_p[keep], -torch.inf).scatter_(-1, x_t[keep][:, None], 0.0)
    log_p[keep] = carried
    return log_p


# ----------------------------------------------------------------------------- samplers
def ancestral_sample(features: Callable, readout: Callable, x: torch.Tensor, mask_id: int, steps: int,
                     generator=None, float64: bool = True, cache: bool = False) -> torch.Tensor:
    """MDLM §3.2's reverse step p_θ(z_s | z_t) = q(z_s | z_t, x_θ(z_t, t)) (SUBS) from t = 1 in
    ``steps`` equal steps: from t to s = t − 1/steps each [MASK] of ``x`` (B, L) is revealed
    independently w.p. (α_s − α_t)/(1 − α_t) = (t − s)/t, as x_0 ~ p_θ(x_0 | x_t) at that
    position; revealed (and given) tokens are carried over. The reveal coins are drawn first and
    the categorical (Gumbel-max) only at the revealed positions: the same distribution per
    position as drawing x_0 everywhere and keeping the revealed ones.

    The network is split in two: ``features(x_t, t)`` → per-position features (B, L, …) (MDLM:
    the backbone's hidden states; a pretrained model: its logits) and ``readout(rows)`` → log
    p_θ(x_0 | x_t) (R, V) at R rows of them, called at the revealed positions only — so a
    V-wide head runs only where a token is drawn. ``cache`` reuses the features across steps
    that changed no token of a sequence — exact only for a time-agnostic denoiser (the caller
    decides)."""
    dt = torch.float64 if float64 else torch.float32
    n, dev = x.shape[0], x.device
    h, stale = None, torch.ones(n, dtype=torch.bool, device=dev)
    for i in range(steps, 0, -1):
        t, s = i / steps, (i - 1) / steps
        tt = torch.full((n,), t, device=dev)
        if h is None or not cache:
            h = features(x, tt)
        elif stale.any():                 # recompute only the sequences that changed
            h[stale] = features(x[stale], tt[stale])
        u = torch.rand(x.shape, generator=generator, device=dev, dtype=dt)
        reveal = (x == mask_id) & (u < (t - s) / t)
        x[reveal] = gumbel_argmax(readout(h[reveal]), generator, float64)   # x_0 drawn only where revealed
        stale = reveal.any(1)
    return x


def confidence_sample(denoise: Denoiser, x: torch.Tensor, mask_id: int, steps: int, generator=None,
                      float64: bool = True) -> torch.Tensor:
    """Confidence-ordered unmasking (LLaDA's low-confidence remasking, Nie et al. 2025 §2.4 and
    App. A; Dream's ``maskgit_plus``): at the step from t to s = t − 1/steps a candidate
    x̂_0^i ~ p_θ(x_0^i | x_t) is drawn at every [MASK] (Gumbel-max, temperature 1) and the k most
    confident candidates — largest p_θ(x̂_0^i | x_t) — are revealed, k = (masked now) − ⌊M·s⌋ with
    M the row's masks at the start, so the masked share follows α_t = 1 − t as in the ancestral
    sampler and every position is revealed after ``steps`` calls; the others stay [MASK] and
    are drawn again next step. Not MDLM's reverse process (it is no sample of the model's
    joint); named ``confidence`` in the records."""
    n, L = x.shape
    dev = x.device
    total = (x == mask_id).sum(1)
    for i in range(steps, 0, -1):
        t, s = i / steps, (i - 1) / steps
        masked = x == mask_id
        if not masked.any():
            break
        log_p = denoise(x, torch.full((n,), t, device=dev))
        cand = gumbel_argmax(log_p[masked], generator, float64)
        conf = torch.full((n, L), -torch.inf, dtype=log_p.dtype, device=dev)
        conf[masked] = log_p[masked].gather(-1, cand[:, None])[:, 0]
        k = masked.sum(1) - torch.floor(total * s).long()
        rank = conf.argsort(dim=1, descending=True, stable=True).argsort(dim=1)   # 0 = the most confident
        reveal = masked & (rank < k[:, None])
        full = torch.full_like(x, mask_id)
        full[masked] = cand
        x = torch.where(reveal, full, x)
    return x
