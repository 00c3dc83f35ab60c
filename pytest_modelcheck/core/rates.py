"""Order statistics of run times: the summary of a sample and the ranks behind the rate interval.

:class:`TimingStats` summarises run times (median, quartiles, spread);
:func:`median_ranks` and :func:`fast_rank` give the distribution-free ranks of
the sorted run times that bound the median run time and the fast-run quantile,
from which :class:`~pytest_modelcheck.core.timing.ThroughputMeasurement` builds
its interval for the sustained rate.  Pure Python: no torch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = ["TimingStats", "median_ranks", "fast_rank", "CONFIDENCE", "FAST_QUANTILE"]

#: Confidence of the throughput interval: two-sided for the median run time, one-sided for the
#: fast-run bound.
CONFIDENCE = 0.95
#: The quantile of run times that stands for the model's speed when nothing else is in the way.
FAST_QUANTILE = 0.10


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Quantile of sorted data by linear interpolation (numpy's default)."""
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` with ``x / 0`` as infinity and ``0 / 0`` as 0."""
    if denominator == 0:
        return 0.0 if numerator == 0 else math.inf
    return numerator / denominator


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``, ``0 < p < 1`` (log-space terms: no overflow)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    return min(1.0, math.fsum(
        math.exp(base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
        for i in range(k + 1)))


def median_ranks(n: int, confidence: float = CONFIDENCE) -> tuple[int, int]:
    """1-based ranks ``(j, n + 1 - j)`` of the sorted run times that bracket the median run time.

    Distribution-free (order statistics): whatever the distribution of run times,
    ``P(t(j) <= median <= t(n+1-j)) = 1 - 2 * P(Binomial(n, 1/2) <= j - 1)``.  ``j`` is the
    largest rank whose coverage is at least ``confidence``; with too few runs for that (fewer
    than 6 at 95%) the extremes ``(1, n)`` are returned, whose coverage ``1 - 2**(1 - n)`` is
    then below ``confidence``.

    >>> median_ranks(10)       # 1 - 2 * 11/1024 = 97.9% >= 95%; (3, 8) would be 89%
    (2, 9)
    >>> median_ranks(100), median_ranks(3)
    ((40, 61), (1, 3))
    """
    j = 1
    while j + 1 <= (n + 1) // 2 and 1 - 2 * _binomial_cdf(j, n, 0.5) >= confidence:
        j += 1
    return j, n + 1 - j


def fast_rank(n: int, q: float = FAST_QUANTILE, confidence: float = CONFIDENCE) -> tuple[int, float]:
    """``(r, coverage)``: the sorted run time ``t(r)`` is a lower confidence bound of the
    ``q``-quantile of run time, ``P(t(r) <= x_q) = P(Binomial(n, q) >= r) = coverage``.

    ``r`` is the largest rank with ``coverage >= confidence``; when even the fastest run does
    not reach it (``n < 29`` for the 10th percentile at 95%), ``r`` is 1 and ``coverage`` is
    ``1 - (1 - q)**n``, below ``confidence``.

    >>> fast_rank(10)[0], round(fast_rank(10)[1], 3)     # 1 - 0.9**10
    (1, 0.651)
    >>> fast_rank(29)[0], fast_rank(50)[0], fast_rank(200)[0]
    (1, 2, 13)
    """
    r = 1
    while r + 1 <= n and 1 - _binomial_cdf(r, n, q) >= confidence:
        r += 1
    return r, 1 - _binomial_cdf(r - 1, n, q)

@dataclass
class TimingStats:
    """Summary statistics of a list of run times, in seconds.

    ``std`` is the sample standard deviation (0 for a single run); quantiles
    (``q1``, ``median``, ``q3``, ``p90``) use linear interpolation between
    the closest ranks, as numpy's default does; ``iqr`` is ``q3 - q1``.

    >>> stats = TimingStats.from_times([4.0, 1.0, 3.0, 2.0])
    >>> stats.median, stats.q1, stats.q3, stats.iqr
    (2.5, 1.75, 3.25, 1.5)
    >>> stats.min, stats.max, stats.p90
    (1.0, 4.0, 3.7)
    """

    times: list[float]
    median: float
    mean: float
    std: float
    min: float
    max: float
    p90: float
    q1: float
    q3: float
    iqr: float

    @classmethod
    def from_times(cls, times: Iterable[float]) -> "TimingStats":
        """Compute the statistics of ``times`` (seconds, in run order).

        Raises :class:`ValueError` if ``times`` is empty or holds a negative
        or non-finite value.

        >>> TimingStats.from_times([2.0, 1.0, 3.0]).median
        2.0
        """
        values = [float(t) for t in times]
        if not values:
            raise ValueError("expected at least one run time, got none")
        for index, value in enumerate(values):
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"expected run times that are finite and not negative, got {value!r} for run {index + 1}"
                )
        ordered = sorted(values)
        q1 = _quantile(ordered, 0.25)
        q3 = _quantile(ordered, 0.75)
        return cls(
            times=values,
            median=_quantile(ordered, 0.5),
            mean=statistics.fmean(values),
            std=statistics.stdev(values) if len(values) > 1 else 0.0,
            min=ordered[0],
            max=ordered[-1],
            p90=_quantile(ordered, 0.9),
            q1=q1,
            q3=q3,
            iqr=q3 - q1,
        )

    @property
    def spread(self) -> float:
        """Relative spread ``iqr / median`` (infinite if the median is 0 but the IQR is not)."""
        return _ratio(self.iqr, self.median)

    def to_dict(self) -> dict[str, Any]:
        """The statistics as a dict of builtin types.

        >>> TimingStats.from_times([1.0, 3.0]).to_dict()["median"]
        2.0
        """
        return {
            "times": [float(t) for t in self.times],
            "median": float(self.median),
            "mean": float(self.mean),
            "std": float(self.std),
            "min": float(self.min),
            "max": float(self.max),
            "p90": float(self.p90),
            "q1": float(self.q1),
            "q3": float(self.q3),
            "iqr": float(self.iqr),
        }
