"""Small-sample statistics for the benchmark report: Student-t confidence intervals and ranks.

``t_interval`` gives the two-sided confidence interval of the mean of a few values (one per seed):
``mean ± t_{(1+level)/2, n−1} · s/√n`` with ``s`` the sample standard deviation (ddof=1) and the
quantile from ``scipy.stats.t.ppf``. With fewer than two values there is no interval (``low`` and
``high`` are None and ``reason`` says why). Identical values (s = 0) give the zero-width interval
``[m, m]``: the formula's answer, kept rather than hidden; it excludes zero iff m ≠ 0.

``ranks`` orders methods by mean and ties those whose intervals overlap (see its docstring).
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kdzoo import KDZooError


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided Student-t confidence interval at ``level``.

    ``low``/``high`` are None when no interval exists (n < 2), with ``reason`` saying why;
    ``mean`` is None only when there are no values."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    level: float = 0.95
    reason: str | None = None

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or entirely below zero (False without an interval)."""
        if self.low is None or self.high is None:
            return False
        return self.low > 0 or self.high < 0


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` and its two-sided Student-t confidence interval at ``level`` (0 < level < 1)."""
    if not 0 < level < 1:
        raise KDZooError(f"The confidence level must lie strictly between 0 and 1 (0.95 for 95%); got {level!r}.")
    vals = [float(v) for v in values]
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise KDZooError(f"Confidence intervals need finite numbers; got {bad[0]!r} among {vals!r}. "
                         "Check the run records the values came from.")
    n = len(vals)
    if n == 0:
        return Interval(None, None, None, 0, level, "no values")
    if n == 1:
        return Interval(vals[0], None, None, 1, level, "one seed: no interval")
    if all(v == vals[0] for v in vals):  # exact, so that the zero-width interval is [m, m] to the bit
        return Interval(vals[0], vals[0], vals[0], n, level)
    from scipy.stats import t  # lazy: scipy.stats takes a while to import and most commands never need it

    mean = statistics.fmean(vals)
    half = float(t.ppf((1 + level) / 2, n - 1)) * statistics.stdev(vals) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def ranks(intervals: Mapping[str, Interval]) -> dict[str, str]:
    """Rank methods by mean, tying those that the intervals cannot separate.

    A method's rank is 1 + the number of methods whose interval lies entirely above its own (their
    ``low`` > its ``high``); a method without an interval counts as the point ``[mean, mean]``. Two
    methods share a rank when neither is above the other, and every shared rank is written with a
    leading "=" (``"1", "=2", "=2", "4"``). Because overlap is not transitive, a rank can repeat a
    number skipped by another tie or follow it closely: e.g. A [79, 81], B [78, 80], C [76, 78.5]
    rank "=1", "=1", "2" (only A lies above C). Methods whose mean is None are unranked: ``""``.

    The returned dict lists the methods by mean, highest first (unranked last; equal means keep the
    input order)."""
    def bounds(iv: Interval) -> tuple[float, float]:
        low = iv.mean if iv.low is None else iv.low
        high = iv.mean if iv.high is None else iv.high
        return low, high

    ranked = [k for k, iv in intervals.items() if iv.mean is not None]
    ranked.sort(key=lambda k: -intervals[k].mean)
    number = {k: 1 + sum(bounds(intervals[o])[0] > bounds(intervals[k])[1] for o in ranked if o != k)
              for k in ranked}
    shared = Counter(number.values())
    out = {k: ("=" if shared[number[k]] > 1 else "") + str(number[k]) for k in ranked}
    out.update({k: "" for k, iv in intervals.items() if iv.mean is None})
    return out
