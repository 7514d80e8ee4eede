"""A synthetic source's law of the hidden positions of a block given the others (the infill truth).

For a block x of L symbols, a set S of hidden positions and the rest R (``keep`` true on R):

- ``log_marginal``: log p(x_R) = log Σ_{x_S} p(x_S, x_R), by the forward algorithm with the
  emission of every hidden position summed out (Rabiner 1989, eq. 19–21, with b_j ≡ 1 at j ∈ S);
- so the conditional NLL of any fill y_S given both sides is −log p(y_S | x_R) =
  −log p(y_S, x_R) + log p(x_R) (``log_prob`` of the filled block, minus the marginal);
- ``cond_entropy``: H(X_S | X_R = x_R) = E[−log p(X_S | x_R)] under the exact posterior — the
  expected conditional NLL of a filler that draws from the source's own conditional, the value
  ``true_cond_nll`` is read against (bench/metrics/infill.py).

``markov`` (order k, V symbols, S = V^k contexts): the state at position j ≥ k−1 is the context
s_j = (x_{j−k+1}, …, x_j), a Markov chain with s_{k−1} ~ π and s_{j−1} → s_j = next(s_{j−1}, x_j)
with probability P(x_j | s_{j−1}); x is a function of the state path and back, so
H(X_S | x_R) = H(s_{k−1..L−1} | x_R) = E_post[−log p(X)] + log p(x_R) with
E_post[−log p(X)] = −Σ_s γ(s) log π(s) − Σ_{j≥k} Σ_{s,v} ξ_j(s, v) log P(v | s),
γ and ξ_j the posterior marginals of the first context and of (s_{j−1}, x_j), from the scaled
forward α̂ and backward β̂ passes: ξ_j(s, v) ∝ α̂_{j−1}(s) P(v|s) e_j(v) β̂_j(next(s, v))
(e_j(v) = 1[v = x_j] at a kept position, 1 at a hidden one), normalised per j. Exact.

``hmm`` (K hidden states): log p(x_R) by the forward algorithm over the hidden states with
b_j ≡ 1 at hidden positions (exact). H(X_S | x_R) has no closed form (the posterior over x_S
is not Markov in x); ``cond_entropy`` estimates it by M exact posterior draws per block —
forward filtering, backward sampling of z (Chib 1996), then x_j ~ B(z_j) at the hidden
positions — as the mean of −log p(y_S | x_R) over the draws, with its normal interval.
``dyck``: neither (None; the infill table shows "—").
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np


def _emit(x: np.ndarray, keep: np.ndarray, j: int, V: int) -> np.ndarray:
    """(N, V) e_j(v): one-hot of x_j where position j is kept, ones where it is hidden."""
    e = np.ones((len(x), V))
    k = keep[:, j]
    e[k] = 0.0
    e[np.nonzero(k)[0], x[k, j]] = 1.0
    return e


class MarkovPosterior:
    """The forward–backward passes of an order-k chain (module doc) on blocks with hidden positions."""

    def __init__(self, P: np.ndarray, pi: np.ndarray, V: int, k: int):
        self.V, self.k, self.S = V, k, V ** k
        self.R = V ** (k - 1)
        self.PP = P.reshape(V, self.R, V)        # P(v | s = m·R + r) as [m, r, v]
        with np.errstate(divide="ignore"):
            self.logPP = np.where(self.PP > 0, np.log(np.where(self.PP > 0, self.PP, 1.0)), 0.0)
            self.logpi = np.where(pi > 0, np.log(np.where(pi > 0, pi, 1.0)), 0.0)
        self.pi = pi

    def _start(self, x, keep) -> np.ndarray:
        """(N, S) π(s) times 1[the kept symbols among positions 0..k−1 agree with s's digits]."""
        a = np.broadcast_to(self.pi, (len(x), self.S)).copy()
        s = np.arange(self.S)
        for i in range(self.k):
            digit = (s // self.V ** (self.k - 1 - i)) % self.V
            a *= np.where(keep[:, i:i + 1], digit[None, :] == x[:, i:i + 1], True)
        return a

    def forward(self, x, keep) -> tuple[list[np.ndarray], np.ndarray]:
        """(scaled α̂_j for j = k−1..L−1, each (N, S) summing to 1 per row; log p(x_R), (N,))."""
        a = self._start(x, keep)
        c = a.sum(1)
        alphas, logz = [a / c[:, None]], np.log(c)
        for j in range(self.k, x.shape[1]):
            A = alphas[-1].reshape(-1, self.V, self.R)
            a = np.einsum("nmr,mrv->nrv", A, self.PP) * _emit(x, keep, j, self.V)[:, None, :]
            c = a.sum((1, 2))
            alphas.append(a.reshape(-1, self.S) / c[:, None])
            logz = logz + np.log(c)
        return alphas, logz

    def cond_entropy(self, x, keep) -> np.ndarray:
        """(N,) H(X_S | X_R = x_R) in nats (module doc), exactly."""
        alphas, logz = self.forward(x, keep)
        L, N = x.shape[1], len(x)
        beta = np.ones((N, self.S))
        e_logp = np.zeros(N)
        for j in range(L - 1, self.k - 1, -1):
            ej = _emit(x, keep, j, self.V)
            Bv = beta.reshape(N, self.R, self.V) * ej[:, None, :]            # β̂_j(r·V + v) e_j(v), [r, v]
            xi = alphas[j - self.k].reshape(N, self.V, self.R)[..., None] * self.PP[None] * Bv[:, None]
            xi /= xi.sum((1, 2, 3), keepdims=True)
            e_logp -= (xi * self.logPP[None]).sum((1, 2, 3))
            beta = np.einsum("mrv,nrv->nmr", self.PP, Bv).reshape(N, self.S)
            beta /= beta.sum(1, keepdims=True)
        g = alphas[0] * beta
        g /= g.sum(1, keepdims=True)
        e_logp -= (g * self.logpi[None]).sum(1)
        return e_logp + logz


class HMMPosterior:
    """Forward filtering and backward sampling over an HMM's hidden states (module doc)."""

    def __init__(self, A: np.ndarray, B: np.ndarray, mu: np.ndarray):
        self.A, self.B, self.mu = A, B, mu

    def _emit(self, x, keep, j) -> np.ndarray:
        """(N, K) b_j(z) = B(x_j | z) at a kept position, 1 at a hidden one."""
        return np.where(keep[:, j:j + 1], self.B[:, x[:, j]].T, 1.0)

    def forward(self, x, keep) -> tuple[list[np.ndarray], np.ndarray]:
        a = self.mu[None, :] * self._emit(x, keep, 0)
        c = a.sum(1)
        alphas, logz = [a / c[:, None]], np.log(c)
        for j in range(1, x.shape[1]):
            a = (alphas[-1] @ self.A) * self._emit(x, keep, j)
            c = a.sum(1)
            alphas.append(a / c[:, None])
            logz = logz + np.log(c)
        return alphas, logz

    def draw(self, x, keep, rng: np.random.Generator) -> np.ndarray:
        """x with its hidden positions drawn from the exact posterior p(x_S | x_R), (N, L)."""
        alphas, _ = self.forward(x, keep)
        N, L = x.shape
        out = np.array(x, dtype=np.int64, copy=True)
        w, z = alphas[-1], None
        for j in range(L - 1, -1, -1):
            if z is not None:   # p(z_j | z_{j+1}, x_{≤j}) ∝ α̂_j(z_j) A(z_j, z_{j+1})
                w = alphas[j] * self.A[:, z].T
            cdf = np.cumsum(w / w.sum(1, keepdims=True), 1)
            z = np.minimum((cdf < rng.random(N)[:, None]).sum(1), w.shape[1] - 1)
            h = ~keep[:, j]
            if h.any():
                cb = np.cumsum(self.B[z[h]], 1)
                out[h, j] = np.minimum((cb < rng.random(int(h.sum()))[:, None]).sum(1), cb.shape[1] - 1)
        return out


def log_marginal(source, x: np.ndarray, keep: np.ndarray) -> np.ndarray | None:
    """(N,) log p(x_R) under ``source`` (markov, hmm), or None where there is no such pass (dyck)."""
    post = posterior(source)
    if post is None:
        return None
    return post.forward(np.asarray(x, dtype=np.int64), np.asarray(keep, dtype=bool))[1]


def cond_entropy(source, x: np.ndarray, keep: np.ndarray, draws: int = 64, seed: int = 0,
                 confidence: float = 0.95) -> dict | None:
    """H(X_S | x_R) per block: ``{values (N,), estimate: exact}`` (markov), or the estimate from
    ``draws`` posterior draws per block with the interval of the blocks' total (hmm,
    ``{values, estimate: sampled, se_total, draws}``); None for a source without either (dyck)."""
    post = posterior(source)
    x, keep = np.asarray(x, dtype=np.int64), np.asarray(keep, dtype=bool)
    if isinstance(post, MarkovPosterior):
        return {"values": post.cond_entropy(x, keep), "estimate": "exact"}
    if not isinstance(post, HMMPosterior):
        return None
    logz = post.forward(x, keep)[1]
    rng = np.random.default_rng([seed, 7])
    nll = np.stack([-source.log_prob(post.draw(x, keep, rng)) + logz for _ in range(draws)], 1)   # (N, M)
    se_total = float(np.sqrt((nll.var(1, ddof=1) / draws).sum()))
    return {"values": nll.mean(1), "estimate": "sampled", "se_total": se_total, "draws": draws,
            "z": NormalDist().inv_cdf(0.5 + confidence / 2)}


def posterior(source) -> MarkovPosterior | HMMPosterior | None:
    """The source's posterior passes (``Source.posterior``; None for a source without them)."""
    return source.posterior()
