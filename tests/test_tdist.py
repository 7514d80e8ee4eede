"""bench.tdist.t_quantile is Student's t quantile: against scipy.special.stdtrit (the reference it
replaces in the tables and the evaluation's intervals) over the degrees of freedom the series and
the Cornish–Fisher branch cover and the confidences a suite may set. Tolerance 1e-10 relative:
the series is exact up to float rounding (measured worst 3.5e-13) and the expansion's error is
O(ν⁻⁵), below 1e-12 past ν = 1000; a wrong term or coefficient moves the quantile by > 1e-6."""
from __future__ import annotations

import pytest
from scipy.special import stdtrit

from bench.tdist import SERIES_MAX, t_quantile, two_sided_mass

DFS = list(range(1, 40)) + [99, 100, 101, 500, SERIES_MAX - 1, SERIES_MAX, SERIES_MAX + 1, 4999, 10 ** 5, 10 ** 7]
CONFS = [0.5, 0.8, 0.9, 0.95, 0.99, 0.999]


@pytest.mark.parametrize("conf", CONFS)
def test_quantile_matches_scipy(conf):
    for nu in DFS:
        want = float(stdtrit(nu, 0.5 + conf / 2))
        assert t_quantile(conf, nu) == pytest.approx(want, rel=1e-10), nu


def test_two_sided_mass_is_the_cdf():
    """A(t | ν) = 2·F(t) − 1 with F the t CDF (scipy.special.stdtr), odd and even ν."""
    from scipy.special import stdtr

    for nu in (1, 2, 3, 4, 7, 10, 31, 200):
        for t in (0.0, 0.3, 1.0, 2.5, 10.0):
            assert two_sided_mass(t, nu) == pytest.approx(2 * float(stdtr(nu, t)) - 1, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("conf,nu", [(0.0, 3), (1.0, 3), (0.95, 0), (0.95, 2.5)])
def test_bad_arguments(conf, nu):
    with pytest.raises(ValueError):
        t_quantile(conf, nu)
