"""``hmm``: a hidden Markov model with an exact likelihood and no closed-form entropy rate.

``{name: hmm, states: K, vocab: V, seed: S, concentration: a}``: K hidden states, V symbols;
each row of the transition matrix A (K×K) and of the emission matrix B (K×V) is drawn once from
Dirichlet(a) with numpy seed S (A first, then B). A block of L symbols starts from the
stationary distribution μ of A (μA = μ; Dirichlet rows are positive, so μ is unique), so every
window of a block has the same law.

- Sampling: z_1 ~ μ, x_t ~ B[z_t], z_{t+1} ~ A[z_t].
- log p(x) by the forward algorithm in log space (Rabiner 1989, eq. 19–21):
  log α_1(j) = log μ_j + log B_j(x_1),
  log α_{t+1}(j) = log Σ_i α_t(i) A_ij + log B_j(x_{t+1}), evaluated as
  m_t + log Σ_i exp(log α_t(i) − m_t) A_ij with m_t = max_i log α_t(i) (no underflow),
  log p(x) = log Σ_j α_L(j).
- n-gram marginals exactly: P(g_1..g_n) = μᵀ diag(B_{g_1}) A diag(B_{g_2}) ⋯ A diag(B_{g_n}) 1.
- Entropy: H(X_1..X_L) has no closed form for an HMM (the entropy rate of a hidden Markov
  process is not a finite formula of A and B; Blackwell 1957). ``entropy(L)`` estimates
  H/L = E[−log p(X)]/L by the exact NLL of ``entropy_blocks`` fresh true blocks, with the
  normal 95% interval of that mean; the exact NLL of the very test blocks is what the
  ``Source (test blocks)`` row and the paired gap use (bench.runner).
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
from pydantic import Field, model_validator

from bench.data.synthetic import STREAMS, Source, SyntheticParams, categorical


class HMMParams(SyntheticParams):
    states: int = Field(8, ge=1)
    vocab: int = Field(32, ge=2)
    concentration: float = Field(0.3, gt=0)
    entropy_blocks: int = Field(4096, ge=2)   # true blocks behind the entropy estimate

    @model_validator(mode="after")
    def _size(self):
        if self.states * (self.states + self.vocab) > 1 << 22:
            raise ValueError(f"states·(states + vocab) = {self.states * (self.states + self.vocab)} "
                             f"parameters; at most {1 << 22}")
        return self


class HMMSource(Source):
    Params = HMMParams

    def __init__(self, p: HMMParams):
        super().__init__(p)
        rng = np.random.default_rng(p.seed)
        self.A = rng.dirichlet(np.full(p.states, p.concentration), size=p.states)   # (K, K)
        self.B = rng.dirichlet(np.full(p.vocab, p.concentration), size=p.states)    # (K, V)
        self.mu = self._stationary()
        with np.errstate(divide="ignore"):
            self.logB, self.logmu = np.log(self.B), np.log(self.mu)

    def _stationary(self) -> np.ndarray:
        """μ with μA = μ, Σμ = 1 (least squares on the stacked system; exact for a unique μ)."""
        K = self.p.states
        M = np.vstack([self.A.T - np.eye(K), np.ones((1, K))])
        mu = np.linalg.lstsq(M, np.r_[np.zeros(K), 1.0], rcond=None)[0]
        mu = np.clip(mu, 0.0, None)
        return mu / mu.sum()

    def draw(self, n: int, L: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((n, L), dtype=np.int32)
        cA, cB = np.cumsum(self.A, 1), np.cumsum(self.B, 1)
        z = categorical(np.broadcast_to(np.cumsum(self.mu), (n, self.p.states)), rng.random(n))
        for t in range(L):
            out[:, t] = categorical(cB[z], rng.random(n))
            z = categorical(cA[z], rng.random(n))
        return out

    def posterior(self):
        from bench.data.posterior import HMMPosterior

        return HMMPosterior(self.A, self.B, self.mu)

    def log_prob(self, blocks: np.ndarray) -> np.ndarray:
        """Exact log p(block) by the forward algorithm in log space (module doc), (N,)."""
        x = np.asarray(blocks, dtype=np.int64)
        a = self.logmu[None, :] + self.logB[:, x[:, 0]].T          # log α_1, (N, K)
        for t in range(1, x.shape[1]):
            a = _logsumexp_matmul(a, self.A) + self.logB[:, x[:, t]].T
        return _logsumexp_matmul(a, np.ones((self.p.states, 1)))[:, 0]

    def ngram_prob(self, grams: np.ndarray, L: int) -> np.ndarray:
        g = np.asarray(grams, dtype=np.int64)
        a = self.mu[None, :] * self.B[:, g[:, 0]].T
        for j in range(1, g.shape[1]):
            a = (a @ self.A) * self.B[:, g[:, j]].T
        return a.sum(1)

    def entropy(self, L: int, confidence: float = 0.95) -> dict:
        """An estimate of H(X_1..X_L)/L: the mean exact NLL per symbol of ``entropy_blocks``
        fresh true blocks (their own stream), with its normal ``confidence`` interval."""
        n = self.p.entropy_blocks
        nll = -self.log_prob(self.draw(n, L, self.rng(STREAMS["entropy"]))) / L
        mean, half = float(nll.mean()), NormalDist().inv_cdf(0.5 + confidence / 2) * float(nll.std(ddof=1)) / n ** 0.5
        return {"value": mean, "ci_low": mean - half, "ci_high": mean + half, "estimate": "sampled",
                "n_blocks": n, "confidence": confidence}


def _logsumexp_matmul(a: np.ndarray, W: np.ndarray) -> np.ndarray:
    """log(exp(a) @ W) for log-space rows ``a`` (N, K) and a nonnegative W (K, J), stably:
    m + log(exp(a − m) @ W) with m the row max; a row of −inf stays −inf."""
    m = a.max(1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m + np.log(np.exp(a - m) @ W)
