"""``dyck``: a probabilistic bracket language with an exact likelihood and block entropy.

``{name: dyck, types: k, max_depth: D, seed: S, concentration: a}``: symbols 0..k−1 open
brackets of types 0..k−1, symbols k..2k−1 the matching closes. With numpy seed S the source
draws, once, the type probabilities q ~ Dirichlet(a·1_k) and, for each depth d = 1..D−1, the
probability p_d ~ Uniform(0.25, 0.75) of opening rather than closing.

**Blocks.** Each block is a complete well-formed string of exactly L = seq_len symbols,
generated left to right from an empty stack by a pushdown process (L must be even). At
position t (0-based), with depth d (the stack's height) and r = L − t symbols to go:

- d = 0: open (the only move), o_t(d) = 1;
- d = r or d = D: close (forced), o_t(d) = 0;
- else open with probability o_t(d) = p_d, close with 1 − p_d.

An open draws its type from q and pushes it; a close emits the close of the stack's top type
and pops it. r − d is always even, so forcing the close at d = r ends every block with an
empty stack.

**log p.** Replaying x with a stack, log p(x) = Σ_{t: open} [log o_t(d_t) + log q_{type}] +
Σ_{t: close} log(1 − o_t(d_t)); it is −∞ exactly when some move has probability 0: a close at
depth 0 or of the wrong type, an open where the close is forced, a symbol outside 0..2k−1, an
odd L.

**Block entropy (exact).** By the chain rule H(X_1..X_L) = Σ_t H(X_t | X_<t). X_<t fixes the
stack, and the law of X_t given it depends on the depth d_t only up to *which* close symbol a
close emits (the top's, with probability 1), so H(X_t | X_<t = s) = h_t(d_t) with
h_t(d) = H_b(o_t(d)) + o_t(d)·H(q) (H_b the binary entropy). Hence
H(X_1..X_L) = Σ_t Σ_d P(d_t = d)·h_t(d), with the depth law from the dynamic programme
P(d_0 = 0) = 1, P(d_{t+1} = d+1) += P(d_t = d)·o_t(d), P(d_{t+1} = d−1) += P(d_t = d)·(1 − o_t(d)).

**n-gram marginals (exact).** The open/close moves depend on (t, d) only and each open's type
is a fresh draw from q, so given d_t the d_t types on the stack are i.i.d. q. The probability
of the window g at position t is Σ_d P(d_t = d)·P(g | t, d), where P(g | t, d) replays g from
depth d: an open contributes o·q_type, a close 1 − o times 1 if it matches a type pushed
inside the window, else (it pops a level below the window's start, each such level
independent) q_type. ``ngram_prob`` averages this over the L − n + 1 positions.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from bench.data.synthetic import Source, SyntheticParams, categorical


class DyckParams(SyntheticParams):
    types: int = Field(2, ge=1, le=1024)
    max_depth: int = Field(8, ge=1, le=512)
    concentration: float = Field(1.0, gt=0)   # Dirichlet of the type probabilities q

    @property
    def vocab(self) -> int:
        return 2 * self.types


class DyckSource(Source):
    Params = DyckParams
    has_zeros = True

    def __init__(self, p: DyckParams):
        super().__init__(p)
        rng = np.random.default_rng(p.seed)
        self.q = rng.dirichlet(np.full(p.types, p.concentration))
        self.p_open = np.r_[1.0, rng.uniform(0.25, 0.75, size=p.max_depth - 1), 0.0]   # by depth 0..D
        with np.errstate(divide="ignore"):
            self.logq = np.log(self.q)
        self._tables: dict[tuple[str, int], np.ndarray] = {}

    def length_error(self, L: int) -> str | None:
        return None if L % 2 == 0 else f"dyck blocks are complete bracket strings; an odd length ({L}) has none"

    def open_table(self, L: int) -> np.ndarray:
        """o_t(d), (L, D+1): the probability of an open at position t and depth d."""
        if ("open", L) not in self._tables:
            o = np.tile(self.p_open, (L, 1))
            o[np.arange(self.p.max_depth + 1)[None, :] >= (L - np.arange(L))[:, None]] = 0.0   # d ≥ r: close
            self._tables["open", L] = o
        return self._tables["open", L]

    def depth_law(self, L: int) -> np.ndarray:
        """P(d_t = d), (L+1, D+1): row t is the depth before symbol t."""
        if ("depth", L) not in self._tables:
            o = self.open_table(L)
            P = np.zeros((L + 1, self.p.max_depth + 1))
            P[0, 0] = 1.0
            for t in range(L):
                P[t + 1, 1:] += P[t, :-1] * o[t, :-1]
                P[t + 1, :-1] += P[t, 1:] * (1 - o[t, 1:])
            self._tables["depth", L] = P
        return self._tables["depth", L]

    def block_entropy(self, L: int) -> float | None:
        if self.length_error(L):
            return None
        o = self.open_table(L)
        with np.errstate(divide="ignore", invalid="ignore"):
            hb = -np.nan_to_num(o * np.log(o)) - np.nan_to_num((1 - o) * np.log1p(-o))
            Hq = -float(np.nan_to_num(self.q * self.logq).sum())
        return float((self.depth_law(L)[:L] * (hb + o * Hq)).sum())

    def draw(self, n: int, L: int, rng: np.random.Generator, logp: bool = False):
        """n blocks by the pushdown process; with ``logp`` also the log-probability of the moves
        the generator took, (N,)."""
        k, D = self.p.types, self.p.max_depth
        o, cq, rows = self.open_table(L), np.broadcast_to(np.cumsum(self.q), (n, k)), np.arange(n)
        out, stack = np.empty((n, L), dtype=np.int32), np.zeros((n, D + 1), dtype=np.int64)
        d, lp = np.zeros(n, dtype=np.int64), np.zeros(n)
        for t in range(L):
            pt = o[t, d]
            op = rng.random(n) < pt
            typ = categorical(cq, rng.random(n))
            out[:, t] = np.where(op, typ, k + stack[rows, np.maximum(d - 1, 0)])
            with np.errstate(divide="ignore"):
                lp += np.where(op, np.log(pt) + self.logq[typ], np.log1p(-pt))
            stack[rows[op], d[op]] = typ[op]
            d = np.where(op, d + 1, d - 1)
        return (out, lp) if logp else out

    def log_prob(self, blocks: np.ndarray) -> np.ndarray:
        """Exact log p(block) by replaying the process (module doc); −inf exactly for a string
        the process cannot produce."""
        x = np.asarray(blocks, dtype=np.int64)
        N, L = x.shape
        k, D = self.p.types, self.p.max_depth
        if self.length_error(L):
            return np.full(N, -np.inf)
        o, rows = self.open_table(L), np.arange(N)
        ok = ((x >= 0) & (x < 2 * k)).all(1)
        stack, d, lp = np.zeros((N, D + 1), dtype=np.int64), np.zeros(N, dtype=np.int64), np.zeros(N)
        for t in range(L):
            v, pt = x[:, t], o[t, d]
            op = v < k
            top = stack[rows, np.maximum(d - 1, 0)]
            ok &= np.where(op, pt > 0, (d > 0) & (pt < 1) & (top == v - k))
            with np.errstate(divide="ignore"):
                lp += np.where(op, np.log(pt) + self.logq[v % k], np.log1p(-pt))
            push = op & ok
            stack[rows[push], d[push]] = v[push]
            d = np.where(ok, np.where(op, d + 1, d - 1), 0)   # a rejected row stays at depth 0 (its lp is −inf)
        return np.where(ok, lp, -np.inf)

    def ngram_prob(self, grams: np.ndarray, L: int) -> np.ndarray:
        """Exact P(window = g), the window's position uniform over the L − n + 1 (module doc)."""
        g = np.asarray(grams, dtype=np.int64)
        (M, n), k, D = g.shape, self.p.types, self.p.max_depth
        T = L - n + 1
        if T <= 0 or self.length_error(L):
            return np.zeros(M)
        o, law = self.open_table(L), self.depth_law(L)
        total = np.zeros(M)
        for t in range(T):
            w, d = np.tile(law[t], (M, 1)), np.tile(np.arange(D + 1), (M, 1))
            known, nk = np.zeros((M, D + 1, n), dtype=np.int64), np.zeros((M, D + 1), dtype=np.int64)
            for j in range(n):
                v = g[:, j:j + 1]
                pt, op = o[t + j][np.clip(d, 0, D)], np.broadcast_to(v < k, d.shape)
                top = np.take_along_axis(known, np.maximum(nk - 1, 0)[..., None], 2)[..., 0]
                close = np.where(nk > 0, (top == v - k).astype(float), self.q[(v - k) % k]) * (d > 0)
                w = w * np.where(op, pt * self.q[v % k], (1 - pt) * close)
                known = np.where(op[..., None] & (np.arange(n) == nk[..., None]), v[..., None], known)
                nk, d = np.where(op, nk + 1, np.maximum(nk - 1, 0)), np.where(op, d + 1, d - 1)
            total += w.sum(1)
        return np.where(((g >= 0) & (g < 2 * k)).all(1), total / T, 0.0)
