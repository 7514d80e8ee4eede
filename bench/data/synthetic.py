"""Synthetic sources with an exactly known entropy.

``markov``: an order-k Markov chain over ``vocab`` symbols whose next-symbol distributions
P(·|context) are drawn once from Dirichlet(concentration) with numpy seed ``seed``. Each block
of length L starts from the chain's stationary distribution π over contexts, so its exact
entropy is H(X_1..X_k) + (L − k)·h with the entropy rate h = Σ_s π(s) H(P(·|s)) (Cover &
Thomas, Thm 4.2.4). Splits draw from independent streams.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class MarkovParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    vocab: int = Field(32, ge=2)
    order: PositiveInt = 1
    seed: int = 0
    concentration: float = Field(0.3, gt=0)
    train_blocks: PositiveInt = 8192
    test_blocks: PositiveInt = 512

    @model_validator(mode="after")
    def _size(self):
        if self.vocab ** self.order > 4096:
            raise ValueError(f"vocab**order = {self.vocab ** self.order} contexts; at most 4096")
        return self


class MarkovSource:
    def __init__(self, p: MarkovParams):
        self.p = p
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

    def sample(self, n: int, L: int, split: str) -> np.ndarray:
        V, k = self.p.vocab, self.p.order
        rng = np.random.default_rng([self.p.seed, {"train": 1, "valid": 2, "test": 3}[split]])
        out = np.empty((n, L), dtype=np.int32)
        s = rng.choice(len(self.pi), size=n, p=self.pi)
        for j in range(k):  # unpack the initial context into its k symbols
            out[:, j] = (s // V ** (k - 1 - j)) % V
        cdf = np.cumsum(self.P, axis=1)
        for j in range(k, L):
            u = rng.random(n)
            v = np.minimum((cdf[s] < u[:, None]).sum(1), V - 1)
            out[:, j] = v
            s = self._next_state(s, v)
        return out


@lru_cache(maxsize=16)
def markov(p: MarkovParams) -> MarkovSource:
    return MarkovSource(p)


def perplexity(nats_per_token: float) -> float:
    return math.exp(nats_per_token)
