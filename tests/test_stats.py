"""kdzoo.stats: Student-t intervals against tabulated quantiles and scipy, and the rank rule."""
from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from kdzoo import KDZooError
from kdzoo.stats import Interval, ranks, t_interval

# Two-sided 95% (and one 90%) Student-t quantiles from printed tables, not from scipy.
T975 = {1: 12.706204736, 2: 4.30265273, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163}
T95_2 = 2.91998558  # t_{0.95, 2}: the 90% two-sided quantile with 2 degrees of freedom


def by_hand(values, t):
    """mean ± t·s/√n, written out from the definitions (sample variance with n − 1)."""
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, mean - t * s / math.sqrt(n), mean + t * s / math.sqrt(n)


@pytest.mark.parametrize("values", [
    [71.2, 72.9],                         # n = 2: the widest quantile
    [1.0, 2.0, 3.0],                      # s = 1 exactly: half-width 4.30265273/√3
    [0.31, -0.12, 0.55, 0.08],
    [-1.5, -0.7, -1.1, -0.9, -1.3],
    [70.1, 70.4, 69.8, 70.9, 70.2, 70.0, 70.6, 69.9, 70.3, 70.5],
])
def test_interval_matches_tabulated_quantiles(values):
    iv = t_interval(values)
    mean, low, high = by_hand(values, T975[len(values) - 1])
    assert iv.n == len(values) and iv.level == 0.95 and iv.reason is None
    assert iv.mean == pytest.approx(mean, abs=1e-12)
    assert iv.low == pytest.approx(low, abs=1e-7) and iv.high == pytest.approx(high, abs=1e-7)


def test_known_half_width_and_other_level():
    iv = t_interval([1.0, 2.0, 3.0])
    assert (iv.high - iv.low) / 2 == pytest.approx(4.30265273 / math.sqrt(3), abs=1e-8)  # 2.48414...
    assert iv.low == pytest.approx(2 - 2.484137, abs=1e-6)
    iv90 = t_interval([1.0, 2.0, 3.0], level=0.90)
    assert iv90.level == 0.90 and (iv90.high - iv90.low) / 2 == pytest.approx(T95_2 / math.sqrt(3), abs=1e-8)
    assert iv90.high - iv90.low < iv.high - iv.low


def test_interval_matches_scipy():
    values = [0.42, 1.31, -0.27, 0.88, 0.61, 1.02]
    iv = t_interval(values)
    low, high = sps.t.interval(0.95, len(values) - 1, loc=sps.tmean(values), scale=sps.sem(values))
    assert iv.low == pytest.approx(low, rel=1e-12) and iv.high == pytest.approx(high, rel=1e-12)
    for df, t in T975.items():  # the table and scipy agree, so both references check the same thing
        assert sps.t.ppf(0.975, df) == pytest.approx(t, abs=1e-8)


def test_no_values_and_one_value_have_no_interval():
    none = t_interval([])
    assert none == Interval(None, None, None, 0, 0.95, "no values") and not none.excludes_zero
    one = t_interval([1.7])
    assert (one.mean, one.low, one.high, one.n) == (1.7, None, None, 1)
    assert one.reason == "one seed: no interval" and not one.excludes_zero


def test_identical_values_give_a_zero_width_interval():
    iv = t_interval([0.1, 0.1, 0.1])
    assert (iv.mean, iv.low, iv.high, iv.n, iv.reason) == (0.1, 0.1, 0.1, 3, None)
    assert iv.excludes_zero
    zero = t_interval([0.0, 0.0])
    assert (zero.low, zero.high) == (0.0, 0.0) and not zero.excludes_zero


def test_excludes_zero_on_either_side():
    assert t_interval([1.0, 1.2, 0.9]).excludes_zero  # clearly positive
    assert t_interval([-1.0, -1.2, -0.9]).excludes_zero  # clearly negative
    assert not t_interval([0.5, -0.3, 0.2]).excludes_zero  # straddles zero
    # mean 1, s = √2 over two values: half-width 12.7062·√2/√2 = 12.7 → includes zero despite the mean
    assert not t_interval([0.0, 2.0]).excludes_zero
    assert Interval(0.2, 0.0, 0.4, 3).excludes_zero is False  # touching zero is not excluding it


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.95])
def test_bad_level_is_refused(bad):
    with pytest.raises(KDZooError, match="between 0 and 1"):
        t_interval([1.0, 2.0], level=bad)


def test_non_finite_values_are_refused():
    with pytest.raises(KDZooError, match="finite"):
        t_interval([1.0, float("nan")])


def iv(mean, low=None, high=None, n=3):
    return Interval(mean, low, high, n)


def test_ranks_without_ties():
    got = ranks({"b": iv(70, 69, 71), "a": iv(80, 79, 81), "c": iv(60, 59, 61)})
    assert got == {"a": "1", "b": "2", "c": "3"}
    assert list(got) == ["a", "b", "c"]  # listed by mean, highest first


def test_ranks_with_a_tie_in_the_middle():
    got = ranks({"a": iv(80, 79, 81), "b": iv(75, 73, 77), "c": iv(74, 72.5, 75.5), "d": iv(60, 59, 61)})
    assert got == {"a": "1", "b": "=2", "c": "=2", "d": "4"}


def test_ranks_when_overlap_is_not_transitive():
    got = ranks({"a": iv(80, 79, 81), "b": iv(79, 78, 80), "c": iv(77, 76, 78.5)})
    assert got == {"a": "=1", "b": "=1", "c": "2"}  # only a lies entirely above c


def test_ranks_points_without_interval_and_none_means():
    # one-seed cells are points: 74 lies inside b's interval (tie) but above d's
    got = ranks({"d": iv(70, 69, 71), "x": iv(None, n=0), "p": iv(74, n=1), "b": iv(75, 73, 77)})
    assert got == {"b": "=1", "p": "=1", "d": "3", "x": ""}
    assert list(got) == ["b", "p", "d", "x"]
    assert ranks({"p": iv(74, n=1), "q": iv(73, n=1)}) == {"p": "1", "q": "2"}
    assert ranks({"p": iv(74, n=1), "q": iv(74, n=1)}) == {"p": "=1", "q": "=1"}
    assert ranks({"x": iv(None, n=0)}) == {"x": ""} and ranks({}) == {}
