"""Student's t quantile for integer degrees of freedom, in the standard library only.

The tables' intervals over seeds need t_{ν, (1+c)/2}; importing ``scipy.special`` for it cost
0.15 s of every ``tdbench leaderboard`` (docs/performance.md, "The results store at scale").

- ν ≤ ``SERIES_MAX``: the exact finite series for A(t | ν) = P(|T| ≤ t) of Abramowitz & Stegun
  26.7.3 (ν odd) and 26.7.4 (ν even), with θ = atan(t/√ν), inverted by Newton's method on
  A(t | ν) = c with the t density (26.7.1) as the derivative, kept inside a bisection bracket.
- ν > ``SERIES_MAX``: the Cornish–Fisher expansion of A&S 26.7.5 around the normal quantile z,
  t = z + g₁/ν + g₂/ν² + g₃/ν³ + g₄/ν⁴, whose error is O(ν⁻⁵) (below 1e-12 relative here).

Agreement with ``scipy.special.stdtrit``: 1e-10 relative (tests/test_tdist.py).
"""
from __future__ import annotations

import math
from statistics import NormalDist

SERIES_MAX = 1000


def two_sided_mass(t: float, nu: int) -> float:
    """A(t | ν) = P(|T| ≤ t) for t ≥ 0 and integer ν ≥ 1 (A&S 26.7.3, 26.7.4)."""
    theta = math.atan(t / math.sqrt(nu))
    s, co = math.sin(theta), math.cos(theta)
    c2 = co * co
    if nu % 2 == 0:   # sinθ · Σ_{k<ν/2} Π_{j≤k} (2j−1)/(2j) · cos^{2k}θ
        term = total = 1.0
        for k in range(1, nu // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return s * total
    if nu == 1:
        return 2 * theta / math.pi
    term = total = 1.0   # (2/π)(θ + sinθ cosθ · Σ_{k<(ν−1)/2} Π_{j≤k} 2j/(2j+1) · cos^{2k}θ)
    for k in range(1, (nu - 1) // 2):
        term *= (2 * k) / (2 * k + 1) * c2
        total += term
    return 2 / math.pi * (theta + s * co * total)


def _density(t: float, nu: int) -> float:
    """f(t | ν) = Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) · (1 + t²/ν)^{−(ν+1)/2} (A&S 26.7.1)."""
    log_norm = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
    return math.exp(log_norm - (nu + 1) / 2 * math.log1p(t * t / nu))


def _cornish_fisher(z: float, nu: int) -> float:
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / nu + g2 / nu ** 2 + g3 / nu ** 3 + g4 / nu ** 4


def t_quantile(conf: float, nu: int) -> float:
    """The half-width factor of a two-sided ``conf`` interval: t with P(|T| ≤ t) = conf, T ~ t_ν
    (scipy: ``stdtrit(ν, (1 + conf)/2)``)."""
    if not 0.0 < conf < 1.0:
        raise ValueError(f"conf must be in (0, 1), got {conf}")
    if int(nu) != nu or nu < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {nu}")
    nu = int(nu)
    z = NormalDist().inv_cdf(0.5 + conf / 2)
    if nu > SERIES_MAX:
        return _cornish_fisher(z, nu)
    lo, hi = 0.0, 1.0
    while two_sided_mass(hi, nu) < conf:   # a bracket [lo, hi] with A(lo) < conf ≤ A(hi)
        lo, hi = hi, hi * 2
    t = min(max(_cornish_fisher(z, nu), lo), hi)
    for _ in range(100):
        gap = two_sided_mass(t, nu) - conf
        if gap > 0:
            hi = t
        else:
            lo = t
        step = gap / (2 * _density(t, nu))   # dA/dt = 2 f(t)
        nxt = t - step
        if not lo < nxt < hi:                # Newton left the bracket: bisect instead
            nxt = (lo + hi) / 2
        if abs(nxt - t) <= 1e-15 * max(1.0, abs(t)):
            return nxt
        t = nxt
    return t
