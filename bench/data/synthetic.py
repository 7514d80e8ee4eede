"""Synthetic sources with an exactly known truth, and what they share.

Every source is a class with ``Params`` (the schema of its dataset entry, e.g. ``{name: markov,
vocab: 16, seed: 7}``) and, for blocks of L symbols:

- ``log_prob(blocks)``: the exact log p(block), (N,); −inf exactly where p = 0;
- ``draw(n, L, rng)``: n blocks by exact ancestral sampling; ``sample(n, L, split)`` draws a
  split (train / valid / test) from its own stream ``rng(seed, split)``; ``stream(n, L, seed,
  step)`` the training batch of ``step`` of a run with seed ``seed`` (``train_blocks: stream``);
  ``ceiling(n, L, seed)`` a fresh true sample set (the sample metrics' Source row);
- ``entropy(L)``: the per-symbol entropy of a block, H(X_1..X_L)/L — exact
  (``block_entropy``), or an estimate with its interval where there is no closed form (hmm);
- ``ngram_prob(grams, L)``: the exact probability of each n-gram at a window position drawn
  uniformly from the L − n + 1 of a block (the marginal the samples' pooled n-gram counts
  estimate; for a stationary source it is the same at every position);
- ``length_error(L)``: why blocks of L symbols cannot be drawn (dyck: odd L), else None.

``markov`` (here): an order-k Markov chain over ``vocab`` symbols whose next-symbol
distributions P(·|context) are drawn once from Dirichlet(concentration) with numpy seed
``seed``. Each block of length L starts from the chain's stationary distribution π over
contexts, so its exact entropy is H(X_1..X_k) + (L − k)·h with the entropy rate
h = Σ_s π(s) H(P(·|s)) (Cover & Thomas, Thm 4.2.4). ``hmm`` and ``dyck``: bench.data.hmm,
bench.data.dyck. Splits and streams draw from independent generators.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import ClassVar, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

# the generator streams of a source: rng([seed, STREAMS[name], ...])
STREAMS = {"train": 1, "valid": 2, "test": 3, "stream": 4, "ceiling": 5, "entropy": 6}


class SyntheticParams(BaseModel):
    """What every synthetic source's entry has: the seed of its parameters and streams, and
    its splits' sizes. ``train_blocks: stream`` draws fresh training blocks every step
    (no epochs: a block is never seen twice), from (seed, the run's seed, the step)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = Field(0, ge=0)
    train_blocks: Union[PositiveInt, Literal["stream"]] = 8192
    test_blocks: PositiveInt = 512


class Source:
    """The interface every synthetic source implements (see the module doc)."""

    Params: ClassVar[type[SyntheticParams]]
    has_zeros: ClassVar[bool] = False   # some strings of the alphabet have p = 0 (scored as `valid`)

    def __init__(self, p: SyntheticParams):
        self.p = p

    @property
    def vocab(self) -> int:
        return self.p.vocab

    def rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.p.seed, *stream])

    def draw(self, n: int, L: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def log_prob(self, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def ngram_prob(self, grams: np.ndarray, L: int) -> np.ndarray:
        raise NotImplementedError

    def block_entropy(self, L: int) -> float | None:
        return None

    def sample(self, n: int, L: int, split: str) -> np.ndarray:
        return self.draw(n, L, self.rng(STREAMS[split]))

    def stream(self, n: int, L: int, seed: int, step: int) -> np.ndarray:
        """The ``n`` training blocks of step ``step`` of a run (stage) seeded ``seed``: a function
        of (source seed, seed, step) only, so a resumed run draws what it would have drawn."""
        return self.draw(n, L, self.rng(STREAMS["stream"], seed, step))

    def ceiling(self, n: int, L: int, seed: int) -> np.ndarray:
        return self.draw(n, L, self.rng(STREAMS["ceiling"], seed))

    def entropy(self, L: int) -> dict:
        """{value: H(X_1..X_L)/L in nats, estimate: "exact"}; sources without a closed form
        override it with an estimate and its interval."""
        return {"value": self.block_entropy(L) / L, "estimate": "exact"}

    def length_error(self, L: int) -> str | None:
        return None

    def posterior(self):
        """The forward–backward passes over blocks with hidden positions (bench.data.posterior),
        or None where the source has none (the infill truth then shows "—")."""
        return None


def categorical(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One draw per row of a row-wise CDF (n, V), by inversion with uniforms ``u`` (n,)."""
    return np.minimum((cdf < u[:, None]).sum(1), cdf.shape[1] - 1)


class MarkovParams(SyntheticParams):
    vocab: int = Field(32, ge=2)
    order: PositiveInt = 1
    concentration: float = Field(0.3, gt=0)

    @model_validator(mode="after")
    def _size(self):
        if self.vocab ** self.order > 4096:
            raise ValueError(f"vocab**order = {self.vocab ** self.order} contexts; at most 4096")
        return self


class MarkovSource(Source):
    Params = MarkovParams

    def __init__(self, p: MarkovParams):
        super().__init__(p)
        V, k = p.vocab, p.order
        rng = np.random.default_rng(p.seed)
        self.P = rng.dirichlet(np.full(V, p.concentration), size=V ** k)  # (V^k, V)
        self.pi = self._stationary()

    def _next_state(self, s: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (s * self.p.vocab + v) % (self.p.vocab ** self.p.order)

    def _stationary(self) -> np.ndarray:
        S, V = self.P.shape
        T = np.zeros((S, S))
        states = np.arange(S)
        for v in range(V):
            np.add.at(T, (states, self._next_state(states, np.full(S, v))), self.P[:, v])
        pi = np.full(S, 1.0 / S)
        for _ in range(10000):
            new = pi @ T
            if np.abs(new - pi).sum() < 1e-15:
                break
            pi = new
        return new / new.sum()

    @property
    def entropy_rate(self) -> float:
        """h in nats per symbol."""
        H = -(self.P * np.log(np.clip(self.P, 1e-300, None))).sum(1)
        return float(self.pi @ H)

    def block_entropy(self, L: int) -> float:
        """Exact entropy (nats) of one block of L symbols."""
        k = self.p.order
        if L <= k:
            raise ValueError("block shorter than the chain's order")
        pi = self.pi[self.pi > 0]
        return float(-(pi * np.log(pi)).sum() + (L - k) * self.entropy_rate)

    def log_prob(self, blocks: np.ndarray) -> np.ndarray:
        """Exact log p(block) under the source, (N,)."""
        V, k = self.p.vocab, self.p.order
        s = np.zeros(len(blocks), dtype=np.int64)
        for j in range(k):
            s = s * V + blocks[:, j]
        lp = np.log(self.pi[s])
        for j in range(k, blocks.shape[1]):
            v = blocks[:, j]
            lp += np.log(self.P[s, v])
            s = self._next_state(s, v)
        return lp

    def ngram_prob(self, grams: np.ndarray, L: int) -> np.ndarray:
        """P(window = g) = π(g_1..g_k) Π_{j>k} P(g_j | g_{j−k}..g_{j−1}) for n ≥ k, the marginal of
        π over n consecutive coordinates for n < k: every window of a block is stationary."""
        V, k = self.p.vocab, self.p.order
        g = np.asarray(grams, dtype=np.int64)
        n = g.shape[1]
        if n < k:
            marg = self.pi.reshape((V,) * k).sum(axis=tuple(range(n, k))).reshape(-1)
            return marg[(g * V ** np.arange(n - 1, -1, -1)).sum(1)]
        s = (g[:, :k] * V ** np.arange(k - 1, -1, -1)).sum(1)
        p = self.pi[s]
        for j in range(k, n):
            p = p * self.P[s, g[:, j]]
            s = self._next_state(s, g[:, j])
        return p

    def posterior(self):
        from bench.data.posterior import MarkovPosterior

        return MarkovPosterior(self.P, self.pi, self.p.vocab, self.p.order)

    def draw(self, n: int, L: int, rng: np.random.Generator) -> np.ndarray:
        V, k = self.p.vocab, self.p.order
        out = np.empty((n, L), dtype=np.int32)
        s = rng.choice(len(self.pi), size=n, p=self.pi)
        for j in range(k):  # unpack the initial context into its k symbols
            out[:, j] = (s // V ** (k - 1 - j)) % V
        cdf = np.cumsum(self.P, axis=1)
        for j in range(k, L):
            v = categorical(cdf[s], rng.random(n))
            out[:, j] = v
            s = self._next_state(s, v)
        return out


@lru_cache(maxsize=16)
def markov(p: MarkovParams) -> MarkovSource:
    return MarkovSource(p)


def perplexity(nats_per_token: float) -> float:
    return math.exp(nats_per_token)
