"""Samples scored by the truth: a synthetic source (bench.data.synthetic, hmm, dyck) judges its
models' samples itself, in place of a scorer LM and MAUVE (both meaningless on symbols).

For N samples x_i of L symbols each (a run's samples are blocks of ``seq_len``):

- **true_nll**: Σ_i −log p(x_i) / (N'·L) over the N' samples the source can produce (p > 0),
  nats per token, read beside the source's own per-token entropy h (``Source (true)``). A
  sampler that draws from the source has E[true_nll] = h exactly; below h it concentrates on
  likely strings (too little diversity), above h it puts mass where the source has little.
- **valid** (sources with impossible strings, i.e. dyck): N'/N, the fraction well-formed.
- **ngram_tv**: for each order n, the total variation between the samples' empirical n-gram
  distribution p̂_n (all windows of every sample, never across samples) and the source's exact
  n-gram marginal p_n at a uniformly drawn window position (``Source.ngram_prob``):
  TV_n = ½ Σ_g |p̂_n(g) − p_n(g)| = ½ [Σ_{g seen} |p̂_n(g) − p_n(g)| + (1 − Σ_{g seen} p_n(g))],
  exact from the probabilities of the n-grams seen (the unseen ones only add their mass). The
  value is the mean of TV_n over the orders (each kept in ``per_n``).

  Total variation, not KL(p̂ ‖ p): one n-gram the source cannot produce (a dyck close at depth
  0, a mismatched pair) makes KL(p̂ ‖ p) infinite for every imperfect model — no ranking, no mean
  over seeds — and KL(p ‖ p̂) is infinite whenever the samples miss a possible n-gram, which a
  finite sample always may. TV is bounded in [0, 1], needs no smoothing constant, and its
  unseen part is exact without enumerating V^n n-grams.
- **ceiling**: TV is above 0 for any finite sample, the source's own included (the finite-
  sample floor). The ``Source text`` row scores N fresh true blocks of the source (its own
  stream, seeded by ``metrics.reference.seed``) exactly like the samples: its ngram_tv is the
  floor to compare a model's with, as MAUVE's human set is its ceiling; its true_nll ≈ h.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from bench.metrics.base import MetricSettings

TRUTH_METRICS = ("true_nll", "valid", "ngram_tv")


class TruthSettings(MetricSettings):
    """How a synthetic source scores samples (recorded beside the values)."""

    ngram_orders: tuple[int, ...] = Field((1, 2, 3), min_length=1)

    @field_validator("ngram_orders")
    @classmethod
    def _orders(cls, v):
        if any(not 1 <= n <= 8 for n in v):
            raise ValueError("every n-gram order must lie in 1..8")
        return tuple(sorted(set(v)))


def ngram_counts(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct n-grams (M, n), their counts (M,)) over every window of every row of ``ids``."""
    win = np.lib.stride_tricks.sliding_window_view(ids, n, axis=1).reshape(-1, n)
    return np.unique(win, axis=0, return_counts=True)


def ngram_tv(source, ids: np.ndarray, orders) -> dict[int, float]:
    """{n: TV(p̂_n, p_n)} (module doc); a window with a symbol outside the alphabet has p = 0."""
    L = ids.shape[1]
    out = {}
    for n in orders:
        grams, counts = ngram_counts(ids, n)
        inside = ((grams >= 0) & (grams < source.vocab)).all(1)
        p = np.zeros(len(grams))
        if inside.any():
            p[inside] = source.ngram_prob(grams[inside], L)
        phat = counts / counts.sum()
        out[n] = float(0.5 * (np.abs(phat - p).sum() + max(0.0, 1.0 - p.sum())))
    return out


def log_probs(source, ids: np.ndarray) -> np.ndarray:
    """log p of each row under the source; −inf for a row with a symbol outside the alphabet."""
    inside = ((ids >= 0) & (ids < source.vocab)).all(1)
    lp = np.full(len(ids), -np.inf)
    if inside.any():
        lp[inside] = source.log_prob(ids[inside])
    return lp


@dataclass
class Truth:
    """The synthetic source a run's samples are scored by, and how."""

    source: Any          # a bench.data.synthetic.Source
    dataset: str         # its dataset entry's key, e.g. dyck(seed=1,types=2)
    seq_len: int
    cfg: TruthSettings

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(m for m in TRUTH_METRICS if m != "valid" or self.source.has_zeros)

    def settings(self, n: int) -> dict[str, dict]:
        base = {"source": self.dataset, "seq_len": self.seq_len}
        out = {"true_nll": {**base, "unit": "nats/token", "over": "the samples with p > 0"},
               "valid": {**base, "what": "fraction of samples with p > 0 (well-formed)"},
               "ngram_tv": {**base, "orders": list(self.cfg.ngram_orders), "n": n,
                            "statistic": "total variation to the exact n-gram marginals, mean over orders"}}
        return {k: out[k] for k in self.metrics}

    def score(self, samples: list[dict]) -> dict[str, dict]:
        """{metric: {value, [per_n], [note]}} of one sample set."""
        rows = [s.get("ids") for s in samples]
        if not rows or any(r is None or len(r) != self.seq_len for r in rows):
            note = f"the samples' token ids are not all {self.seq_len} long (seq_len)"
            return {m: {"value": None, "note": note} for m in self.metrics}
        ids = np.asarray(rows, dtype=np.int64)
        lp = log_probs(self.source, ids)
        ok = np.isfinite(lp)
        out = {"true_nll": {"value": float(-lp[ok].sum() / (ok.sum() * self.seq_len)) if ok.any() else None}}
        if not ok.all() and not self.source.has_zeros:   # (where the source has zeros, `valid` says it)
            out["true_nll"]["note"] = f"{int((~ok).sum())} of {len(ok)} samples have p = 0 (not counted)"
        if self.source.has_zeros:
            out["valid"] = {"value": float(ok.mean())}
        tv = ngram_tv(self.source, ids, [n for n in self.cfg.ngram_orders if n <= self.seq_len])
        out["ngram_tv"] = ({"value": float(np.mean(list(tv.values()))), "per_n": {str(n): v for n, v in tv.items()}}
                           if tv else {"value": None, "note": f"every n-gram order exceeds seq_len {self.seq_len}"})
        return out

    def ceiling_set(self, n: int, seed: int, decode) -> list[dict]:
        """``n`` fresh true blocks (the Source row: the finite-sample floor of every metric)."""
        x = self.source.ceiling(n, self.seq_len, seed)
        return [{"ids": [int(i) for i in row], "text": decode(row)} for row in x]
