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

How a method turns one u into its estimate is the method's: the continuous methods read the
protocol's ``bound_steps`` (the discrete-time VLB of a T-step sampler) and ``t_proposal`` (t
drawn ∝ the bound's weight, by inverse CDF from u, with exact importance weights) through
``Method.use_protocol``, which ``per_sequence_nll`` calls first; the layouts, replicates and
intervals above are unchanged by either (each draw stays an unbiased estimate of the block's bound).

The conditional NLL of a continuation given a context (``conditional_nll``, the likelihood side of
``sample(..., given, keep)``) is ``nll`` with counted = ~keep under the same draws, with each
sequence's Monte-Carlo standard error from its replicates (``per_sequence_se``).

The learning-curve probe (bench.runner.learning_probe) spends few draws per block (K = 2), where
the per-block layout above is K iid draws: for a uniform-noise model, whose bound integrand
varies several-fold over t, one probe's Monte-Carlo sd is then ~0.4 bits per token on 16 blocks
(docs/protocol.md#the-learning-curve-probe). It uses ``draw_u_joint`` instead: the n·K draws
form one stratified sample of (0, 1) — each draw still U(0, 1) marginally, so each block's
estimate stays unbiased — and ``summarize_joint``'s collapsed-strata variance (pairs of
adjacent strata; conservative) for its interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.condition import continuation
from bench.config import Protocol
from bench.errors import UserError
from bench.tdist import t_quantile


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


def draw_u_joint(n: int, K: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """((n, K) draws, (n, K) strata): the n·K draws form ONE stratified sample of (0, 1) — stratum
    m = [m/M, (m+1)/M), M = n·K, holds exactly one draw — with the strata dealt to the (block,
    draw) slots by a random permutation. Each draw is U(0, 1) marginally (its stratum is uniform
    over the M), so every block's mean of K draws is unbiased, as under ``draw_u``; the set
    covers (0, 1) evenly, so the integrand's variation over t largely cancels in the total."""
    M = n * K
    strata = torch.randperm(M, generator=generator)
    U = (strata.double() + torch.rand(M, generator=generator, dtype=torch.float64)) / M
    return U.reshape(n, K).clamp(1e-6, 1 - 1e-6).float(), strata.reshape(n, K)


def batch_u(B: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Low-discrepancy training draws over a batch: (i + U)/B, one shared U (MDLM)."""
    U = torch.rand((), generator=generator)
    return ((torch.arange(B) + U) / B).clamp(1e-6, 1 - 1e-6)


def apply_t_min(u: torch.Tensor, t_min: float) -> torch.Tensor:
    return t_min + (1 - t_min) * u


@torch.no_grad()
def per_sequence_nll(method, tokens: np.ndarray, counted: np.ndarray, protocol: Protocol,
                     batch_size: int, seed: int, device, desc: str = "eval",
                     u: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) NLL estimates (nats, summed over counted tokens), and (N,) counted tokens. ``u``:
    (N, K) draws in (0, 1) to use instead of the protocol's (``draw_u_joint``); t_min applies."""
    exact = method.likelihood == "exact"
    method.use_protocol(protocol)       # the bound's estimator settings (bound_steps, t_proposal)
    K = 1 if exact else (protocol.t_samples if u is None else u.shape[1])
    N = len(tokens)
    gen = torch.Generator().manual_seed(seed)
    U = apply_t_min(draw_u(N, K, protocol.t_sampling, gen) if u is None or exact else u, protocol.t_min)
    out = np.zeros((N, K))
    method.eval()
    for s in tqdm(range(0, N, batch_size), desc=desc, leave=False, mininterval=2):
        x = torch.as_tensor(np.array(tokens[s:s + batch_size]), dtype=torch.long, device=device)
        c = torch.as_tensor(np.array(counted[s:s + batch_size]), dtype=torch.bool, device=device)
        for k in range(K):
            torch.manual_seed(seed * 1_000_003 + s * 101 + k)  # method noise: deterministic
            out[s:s + batch_size, k] = method.nll(x, c, U[s:s + batch_size, k].to(device)).double().cpu().numpy()
    return out, np.asarray(counted).sum(1).astype(np.float64)


@dataclass(frozen=True)
class ConditionalNLL:
    """``conditional_nll``'s answer for N sequences: ``draws`` (N, K) the estimates of
    −log p(x[~keep] | x[keep]) in nats, one per time draw; ``nll`` (N,) their mean; ``se`` (N,)
    its Monte-Carlo standard error (``per_sequence_se``); ``tokens`` (N,) the scored tokens."""

    draws: np.ndarray
    nll: np.ndarray
    se: np.ndarray
    tokens: np.ndarray


def per_sequence_se(nll: np.ndarray, scheme: str, exact: bool) -> np.ndarray:
    """(N,) the Monte-Carlo standard error of each block's mean of its (N, K) draws: sqrt(s_i²/R),
    s_i² the sample variance of its R replicate means (``layout``; as ``summarize``); 0 for an
    exact likelihood; NaN where R = 1 (not identifiable from one block's draws)."""
    N, K = nll.shape
    if exact:
        return np.zeros(N)
    R, S = layout(K, scheme)
    if R < 2:
        return np.full(N, np.nan)
    return np.sqrt(nll.reshape(N, R, S).mean(2).var(1, ddof=1) / R)


def conditional_nll(method, tokens: np.ndarray, keep: np.ndarray, protocol: Protocol, batch_size: int,
                    seed: int, device, desc: str = "conditional") -> ConditionalNLL:
    """The NLL of a continuation given a context: −log p(x[~keep] | x[keep]) per sequence, the
    likelihood side of ``sample(..., given, keep)`` (bench/condition.py). It is ``nll`` with
    counted = ~keep, whose contract already scores only the counted tokens with the rest as
    clean context, under the protocol's time draws (``per_sequence_nll``): exact for an exact
    method — AR: Σ_{i ∉ keep} −log p(x_i | x_<i), the context a prefix (the rule bench.condition
    checks) — and for a bound method an upper bound in expectation on the model's conditional NLL
    (MDLM: its any-order NELBO of the continuation; a Gaussian method's bound with the context
    clean). UserError (one line) for a method without a likelihood or a ``keep`` it refuses."""
    if method.likelihood == "none":
        raise UserError(f"{method.name}: has no likelihood (conditional NLL); its rows show —")
    keep = np.asarray(keep)
    counted = continuation(method, torch.as_tensor(np.asarray(tokens)), torch.as_tensor(keep)).cpu().numpy()
    draws, ntok = per_sequence_nll(method, tokens, counted, protocol, batch_size, seed, device, desc)
    se = per_sequence_se(draws, protocol.t_sampling, method.likelihood == "exact")
    return ConditionalNLL(draws, draws.mean(1), se, ntok)


def _exp(x: float) -> float:
    """e^x, inf beyond float64's range (an untrained Diffusion-LM's bound is ~800 nats per token:
    its perplexity is no float, its nll_per_token still is)."""
    return math.exp(x) if x < 709.7 else math.inf


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
    return {"value": _exp(r), "ci_low": _exp(r - z * se), "ci_high": _exp(r + z * se),
            "nll_per_token": r, "se_nll_per_token": se, "n_tokens": int(C), "n_seqs": int(N),
            "t_samples": K}


def summarize_joint(nll: np.ndarray, ntok: np.ndarray, strata: np.ndarray, confidence: float) -> dict:
    """Per-token NLL and its interval from (N, K) estimates drawn with ``draw_u_joint`` (its
    ``strata``). The total Σ_i mean_k n_ik = (1/K) Σ_m y_m sums one draw y_m per stratum m; its
    variance (1/K²) Σ_m Var(y_m) is estimated by collapsing adjacent strata into groups G of two
    (three for the last when M is odd): (1/K²) Σ_G |G|/(|G|−1) Σ_{m∈G} (y_m − ȳ_G)². Its
    expectation exceeds the variance by the spread of the groups' own means (the integrand's
    change across two strata, and the two blocks' difference), so the interval is conservative
    (Cochran, Sampling Techniques, 3rd ed., §5A.12); it uses Student's t with M − #groups degrees
    of freedom (16 blocks × 2 draws: 16). M = 1: no variance estimate (se None)."""
    N, K = nll.shape
    C = ntok.sum()
    r = nll.mean(1).sum() / C
    y = nll.reshape(-1)[np.argsort(np.asarray(strata).reshape(-1), kind="stable")]
    M = len(y)
    se, lo, hi = None, r, r
    if M >= 2:
        pairs = M // 2 - M % 2                                # odd M: the last three are one group
        groups = [y[2 * j:2 * j + 2] for j in range(pairs)] + ([y[2 * pairs:]] if 2 * pairs < M else [])
        var = sum(len(g) / (len(g) - 1) * ((g - g.mean()) ** 2).sum() for g in groups) / K ** 2
        se = math.sqrt(var) / C
        q = t_quantile(confidence, M - len(groups))   # M − #groups degrees of freedom
        lo, hi = r - q * se, r + q * se
    return {"nll_per_token": r, "se_nll_per_token": se, "ci_low_nll": lo, "ci_high_nll": hi,
            "n_tokens": int(C), "n_seqs": int(N), "t_samples": K}
