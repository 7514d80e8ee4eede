"""Math shared by the masked (absorbing-state) diffusion family: MDLM (methods/mdlm.py) and
BD3-LM (methods/bd3lm.py), which is MDLM inside each block.

- The log-linear schedule: α_t = 1 − t (σ(t) = −log(1 − t)), so a token is [MASK] at time t
  with probability 1 − α_t = t, and the continuous-time NELBO's weight −α'_t / (1 − α_t) = 1/t
  (MDLM eq. 10; BD3-LM's L_BD per block).
- The forward sample q(x_t | x_0), with t per sequence or per token (per block in BD3-LM).
- The masked-count form of the same NELBO (docs/methods.md#mdlm): m = ⌈u·n⌉ of the n counted
  tokens masked as a uniform m-subset, weight n/m — per sequence, or per block of a sequence.
"""
from __future__ import annotations

import torch


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
