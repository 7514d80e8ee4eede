"""The evaluation protocol: t draws, the per-sequence NLL bound, perplexity and its CI.

Estimator. For each test block i and each of K time draws u_ik, the method returns an
unbiased (in u) estimate n_ik of its NLL bound for the block. The block's estimate is
n_i = mean_k n_ik, the per-token NLL is r = Σ_i n_i / Σ_i c_i (c_i = counted tokens) and the
perplexity is exp(r).

Confidence interval. The interval is for the Monte-Carlo error of the t-estimator on this
fixed test set (the only randomness in evaluating a fixed model on fixed data). The K draws of
a block form R independent *replicates* of S draws each (``layout``): stratified sampling uses
R = 2 replicates of S = K/2 strata each (replicated stratified sampling), antithetic uses
R = K/2 pairs (u, 1−u), iid uses R = K single draws. The variance of the block's estimate n_i
is estimated without bias by s_i²/R, s_i² the sample variance of its R replicate means, and
Var(Σ_i n_i) = Σ_i s_i²/R. The interval on r is r ± z·sqrt(Var)/Σc_i (normal approximation,
z for the protocol's confidence level), mapped through exp. When R = 1 (K = 1, or odd K
with stratification) the within-block variance is not identifiable and the between-block
ratio-estimator variance is used instead (conservative: it also contains the data's
variance). Exact likelihoods (AR) have no t and report ci_low = ci_high = value.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.config import Protocol


def layout(K: int, scheme: str) -> tuple[int, int]:
    """(R replicates, S draws per replicate) for K draws per block; see the module docstring."""
    if scheme == "stratified":
        return (2, K // 2) if K >= 2 and K % 2 == 0 else (1, K)
    if scheme == "antithetic":
        return (K // 2, 2) if K >= 2 and K % 2 == 0 else (1, K)
    return K, 1


def draw_u(n: int, K: int, scheme: str, generator: torch.Generator) -> torch.Tensor:
    """(n, K) time draws in (0, 1), laid out as R replicates × S draws (``layout``).
    stratified: each replicate has one draw in each of S strata [k/S, (k+1)/S);
    antithetic: each replicate is a pair (u, 1−u); iid: independent uniforms."""
    R, S = layout(K, scheme)
    U = torch.rand(n, R, S, generator=generator, dtype=torch.float64)
    if scheme == "stratified":
        U = (torch.arange(S, dtype=torch.float64) + U) / S
    elif scheme == "antithetic" and S == 2:
        U[:, :, 1] = 1 - U[:, :, 0]
    return U.reshape(n, K).clamp(1e-6, 1 - 1e-6).float()


def batch_u(B: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Low-discrepancy training draws over a batch: (i + U)/B, one shared U (MDLM)."""
    U = torch.rand((), generator=generator)
    return ((torch.arange(B) + U) / B).clamp(1e-6, 1 - 1e-6)


def apply_t_min(u: torch.Tensor, t_min: float) -> torch.Tensor:
    return t_min + (1 - t_min) * u


@torch.no_grad()
def per_sequence_nll(method, tokens: np.ndarray, counted: np.ndarray, protocol: Protocol,
                     batch_size: int, seed: int, device, desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """(N, K) NLL estimates (nats, summed over counted tokens), and (N,) counted tokens."""
    exact = method.likelihood == "exact"
    K = 1 if exact else protocol.t_samples
    N = len(tokens)
    gen = torch.Generator().manual_seed(seed)
    U = apply_t_min(draw_u(N, K, protocol.t_sampling, gen), protocol.t_min)
    out = np.zeros((N, K))
    method.eval()
    for s in tqdm(range(0, N, batch_size), desc=desc, leave=False, mininterval=2):
        x = torch.as_tensor(np.array(tokens[s:s + batch_size]), dtype=torch.long, device=device)
        c = torch.as_tensor(np.array(counted[s:s + batch_size]), dtype=torch.bool, device=device)
        for k in range(K):
            torch.manual_seed(seed * 1_000_003 + s * 101 + k)  # method noise: deterministic
            out[s:s + batch_size, k] = method.nll(x, c, U[s:s + batch_size, k].to(device)).double().cpu().numpy()
    return out, np.asarray(counted).sum(1).astype(np.float64)


def summarize(nll: np.ndarray, ntok: np.ndarray, confidence: float, exact: bool,
              scheme: str = "iid") -> dict:
    """Perplexity, CI and bookkeeping from (N, K) estimates; see the module docstring."""
    N, K = nll.shape
    R, S = layout(K, scheme)
    C = ntok.sum()
    n_i = nll.mean(1)
    r = n_i.sum() / C
    if exact:
        se = 0.0
    elif R > 1:
        reps = nll.reshape(N, R, S).mean(2)
        se = math.sqrt((reps.var(1, ddof=1) / R).sum()) / C
    else:
        resid = n_i - r * ntok
        se = math.sqrt(N / max(N - 1, 1) * (resid ** 2).sum()) / C
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return {"value": math.exp(r), "ci_low": math.exp(r - z * se), "ci_high": math.exp(r + z * se),
            "nll_per_token": r, "se_nll_per_token": se, "n_tokens": int(C), "n_seqs": int(N),
            "t_samples": K}
