"""The evaluation protocol: t draws, the per-sequence NLL bound, perplexity and its CI.

Estimator. For each test block i and each of K time draws u_ik, the method returns an
unbiased (in u) estimate n_ik of its NLL bound for the block. The block's estimate is
n_i = mean_k n_ik, the per-token NLL is r = Σ_i n_i / Σ_i c_i (c_i = counted tokens) and the
perplexity is exp(r).

Confidence interval. The interval is for the Monte-Carlo error of the t-estimator on this
fixed test set (the only randomness in evaluating a fixed model on fixed data):
Var(Σ_i n_i) = Σ_i s_i² / K with s_i² the sample variance of n_i1..n_iK; with stratified draws
this overestimates the variance, so the interval is conservative. The interval on r is
r ± z·sqrt(Var)/Σc_i (normal approximation, z for the protocol's confidence level) and is
mapped through exp. With K = 1 the within-block variance is not identifiable and the
between-block ratio-estimator variance is used instead (also conservative). Exact
likelihoods (AR) have no t and report ci_low = ci_high = value.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.config import Protocol


def draw_u(n: int, K: int, scheme: str, generator: torch.Generator) -> torch.Tensor:
    """(n, K) time draws in (0, 1). stratified: u_ik ∈ [k/K, (k+1)/K); antithetic: pairs
    (u, 1−u); iid: independent uniforms."""
    U = torch.rand(n, K, generator=generator, dtype=torch.float64)
    if scheme == "stratified":
        U = (torch.arange(K, dtype=torch.float64)[None] + U) / K
    elif scheme == "antithetic":
        half = (K + 1) // 2
        U = torch.cat([U[:, :half], 1 - U[:, : K - half]], dim=1)
    return U.clamp(1e-6, 1 - 1e-6).float()


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


def summarize(nll: np.ndarray, ntok: np.ndarray, confidence: float, exact: bool) -> dict:
    """Perplexity, CI and bookkeeping from (N, K) estimates; see the module docstring."""
    N, K = nll.shape
    C = ntok.sum()
    n_i = nll.mean(1)
    r = n_i.sum() / C
    if exact:
        se = 0.0
    elif K > 1:
        se = math.sqrt((nll.var(1, ddof=1) / K).sum()) / C
    else:
        resid = n_i - r * ntok
        se = math.sqrt(N / max(N - 1, 1) * (resid ** 2).sum()) / C
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return {"value": math.exp(r), "ci_low": math.exp(r - z * se), "ci_high": math.exp(r + z * se),
            "nll_per_token": r, "se_nll_per_token": se, "n_tokens": int(C), "n_seqs": int(N),
            "t_samples": K}
