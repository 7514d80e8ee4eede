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
- The same NELBO per block of L′ tokens given the clean earlier blocks (BD3-LM's L_BD; its
  methods/bd3lm.py and a released BD3-LM checkpoint read by hf-masked-diffusion):
  ``block_times`` (one draw per block from the harness's one per sequence), ``nelbo_blocks``.
- SUBS (MDLM §3.2) for a network that outputs the [MASK] column too (``subs``, and ``subs_ce``:
  its cross-entropy without the (B, L, V) log-probabilities), and the samplers of the family:
  ``ancestral_sample`` (MDLM's reverse process), ``block_ancestral`` (the same inside one block,
  BD3-LM's Algorithm 2, with ``block_steps`` spreading a step budget over the blocks) and
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


# ----------------------------------------------------------------------------- per block (BD3-LM)
def block_times(u: torch.Tensor, blocks: int) -> torch.Tensor:
    """(B, blocks): u_b = (u + b/blocks) mod 1 per block from one u (B,) per sequence, kept in
    [1e-6, 1 − 1e-6] (the harness's own range) — a rotation of the block grid: each u_b is
    U(0, 1), so each block's term is unbiased, and a stratified u stratifies every block."""
    shift = torch.arange(blocks, device=u.device, dtype=u.dtype) / blocks
    return torch.remainder(u[:, None] + shift, 1.0).clamp(1e-6, 1 - 1e-6)


def nelbo_blocks(x0, counted, u, block_ce: Callable, mask_id: int, size: int, estimator: str = "beta"):
    """Σ_b of one-draw estimates of block b's NELBO given the clean blocks before it (BD3-LM §3.1:
    L_BD = Σ_b E_t (1/t) Σ_{masked ℓ in b} −log p_θ(x^{b,ℓ} | x_t^b, x^{<b})), (B,) nats, from one
    draw t_b per block (``block_times`` of ``u``, (B,)). ``beta``: MDLM's bounded-weight form per
    block — m_b = ⌈t_b·n_b⌉ of the block's n_b counted tokens masked as a uniform subset, weight
    n_b/m_b (a denoiser that ignores t: no t is drawn); ``time``: each token masked w.p. t_b,
    weight 1/t_b. ``block_ce(x_t, x0)`` → (B, L) −log p_θ(x_0 | x_t^b, x_0^{<b}) at every
    position (all blocks from one pass over [x_t, x_0])."""
    B, L = x0.shape
    t = block_times(u, L // size)
    if estimator == "beta":
        x_t, masked, n, m = mask_m_subset(x0, counted, t, mask_id, block=size)
        w = count_weight(n.to(t.dtype), m.to(t.dtype))
    else:
        x_t, masked = mask_tokens(x0, counted, t.repeat_interleave(size, dim=1), mask_id)
        w = elbo_weight(t)
    ce = block_ce(x_t, x0)
    return (w * (ce * masked).view(B, -1, size).sum(-1)).sum(1)


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


def subs_ce(logits: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B, L) −log p_θ(x_0 | x_t) under SUBS from raw logits (B, L, V') that include the [MASK]
    column — ``-subs(logits, x_t, mask_id).gather(-1, x0)`` without the (B, L, V') log-probability
    tensor: logsumexp over the columns but [MASK] minus the logit of x_0 at a [MASK] position, 0
    at a carried-over one. ``logits`` is overwritten (pass a tensor nothing else reads)."""
    logits[..., mask_id] = -torch.inf   # x_0 is never [MASK]
    ce = torch.logsumexp(logits, dim=-1) - logits.gather(-1, x0[..., None])[..., 0]
    return torch.where(x_t == mask_id, ce, torch.zeros_like(ce))


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


def block_steps(steps: int, blocks: int) -> list[int]:
    """The step budget spread over the blocks (the first ``steps mod blocks`` get one more); at
    least one call per block, so a budget below the block count takes one per block."""
    base, extra = divmod(int(steps), blocks)
    return [max(1, base + (b < extra)) for b in range(blocks)]


def block_ancestral(logits_fn: Callable, x_t: torch.Tensor, mask_id: int, steps: int, generator=None,
                    float64: bool = True, reuse: bool = True) -> torch.Tensor:
    """MDLM's ancestral sampler on one block (BD3-LM §3.2, Algorithm 2) in ``steps`` steps,
    t = i/steps → s = (i−1)/steps: each [MASK] of ``x_t`` (n, L′) revealed w.p. (t − s)/t = 1/i,
    as a Gumbel-max draw from ``logits_fn(x_t, first)`` → (n, L′, V) logits of p_θ(x_0 | x_t^b,
    x^{<b}) (``first``: the block's first call); kept positions stay. ``reuse``: a call whose
    input did not change since the last one is skipped (exact: the denoiser ignores t)."""
    logits, changed = None, True
    for i in range(steps, 0, -1):
        if logits is None or changed or not reuse:
            logits = logits_fn(x_t, logits is None)
        coin = torch.rand(x_t.shape, generator=generator, device=x_t.device,
                          dtype=torch.float64 if float64 else torch.float32)
        reveal = (x_t == mask_id) & (coin < 1 / i)
        x_t[reveal] = gumbel_argmax(logits[reveal], generator, float64)
        changed = bool(reveal.any())
    return x_t


def block_sample(block_logits: Callable, x: torch.Tensor, size: int, mask_id: int, steps: int, generator=None,
                 float64: bool = True) -> torch.Tensor:
    """BD3-LM's sampler (§3.2, Algorithm 2) without a cache: ``x`` (n, L) all [MASK] filled block
    by block, ``block_ancestral`` inside each block over its share of ``steps`` (``block_steps``);
    ``block_logits(x, s)`` → (n, L′, V) logits of p_θ(x_0 | x_t^b, x^{<b}) for the block at slice
    ``s``, x holding the clean blocks before it and its current x_t there."""
    for b, T in enumerate(block_steps(steps, x.shape[1] // size)):
        s = slice(b * size, (b + 1) * size)

        def logits(x_blk, first, s=s):
            x[:, s] = x_blk
            return block_logits(x, s)
        x[:, s] = block_ancestral(logits, x[:, s].clone(), mask_id, steps=T, generator=generator, float64=float64)
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
