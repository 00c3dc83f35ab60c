"""Statistics for comparing timings: Mann-Whitney U, a bootstrap CI of a ratio of medians, and
the timed-regression rule used to gate merges.

The rule is airspeed velocity's (asv): a timing has regressed when the ratio of the medians is
beyond ``1 + threshold`` *and* a Mann-Whitney U test says the two samples differ (p below a
small level). The ratio alone is fooled by noise; the test alone flags tiny, irrelevant changes.
On top of asv's rule, the bootstrap interval of the ratio must lie wholly beyond the threshold:
a test can say "the samples differ" while the size of the difference is unknown (a few outliers,
a bimodal sample), and then the ratio's interval reaches back inside the threshold. Such a ratio
is beyond the threshold but not established: ``'inconclusive'``, never ``'regressed'``.

Only numpy and the standard library are used (no scipy). Nothing here imports torch or pytest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .errors import UsageError

__all__ = ["mann_whitney_u", "bootstrap_ratio_ci", "timed_regression", "Verdict",
           "EXACT_LIMIT"]

#: Largest ``len(a) * len(b)`` for which the exact distribution of U is computed.
EXACT_LIMIT = 2500


def _floats(name: str, values: Sequence[float]) -> list:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UsageError(f"{name}: expected a sequence of numbers, got {values!r:.60}") from None
    if not out:
        raise UsageError(f"{name}: expected at least one sample, got none")
    if not all(math.isfinite(v) for v in out):
        raise UsageError(f"{name}: expected finite numbers, got {out!r:.60}")
    return out


def _midranks(values: list) -> tuple:
    """Ranks 1..N (ties share their mean rank) and the sizes of the tie groups."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    ties = []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        mid = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = mid
        ties.append(j - i + 1)
        i = j + 1
    return ranks, ties


def _exact_cdf_counts(doubled_ranks: list, k: int):
    """``counts[s]``: how many size-``k`` subsets of the ranks have doubled rank sum ``s``."""
    import numpy as np

    total = sum(doubled_ranks)
    exact_ints = math.comb(len(doubled_ranks), k) < 2 ** 62
    counts = np.zeros((k + 1, total + 1), dtype=np.int64 if exact_ints else np.float64)
    counts[0, 0] = 1
    for r in doubled_ranks:
        # add item r to every subset of size j-1 (descending j: each item used once)
        counts[1:, r:] += counts[:-1, : total + 1 - r].copy()
    return counts[k]


def mann_whitney_u(a: Sequence[float], b: Sequence[float]) -> tuple:
    """Mann-Whitney U of ``a`` against ``b`` and its two-sided p-value.

    ``U`` counts the pairs ``(a_i, b_j)`` with ``a_i > b_j`` (ties count 1/2), as scipy's
    ``mannwhitneyu(a, b).statistic`` does. For ``len(a) * len(b) <= EXACT_LIMIT`` the p-value
    is exact: the permutation distribution of the rank sum (ties as mid-ranks) is counted by
    dynamic programming. Beyond, the normal approximation with tie and continuity correction.

    >>> mann_whitney_u([1, 2, 3], [4, 5, 6])  # 1 ordering of C(6, 3) = 20 is this extreme
    (0.0, 0.1)
    >>> u, p = mann_whitney_u([1.1, 2.0], [1.1, 3.0])
    >>> u
    1.5
    """
    a = _floats("a", a)
    b = _floats("b", b)
    n, m = len(a), len(b)
    ranks, ties = _midranks(a + b)
    rank_sum_a = sum(ranks[:n])
    u = rank_sum_a - n * (n + 1) / 2
    if n * m <= EXACT_LIMIT:
        # the smaller sample as the subset keeps the table small; its doubled rank sum
        k = min(n, m)
        doubled = [int(round(2 * r)) for r in ranks]
        observed = int(round(2 * (rank_sum_a if k == n else sum(ranks[n:]))))
        counts = _exact_cdf_counts(doubled, k)
        total = counts.sum()
        lower = counts[: observed + 1].sum() / total
        upper = counts[observed:].sum() / total
        p = min(1.0, 2.0 * min(float(lower), float(upper)))
        return float(u), p
    mu = n * m / 2
    tie_term = sum(t ** 3 - t for t in ties) / ((n + m) * (n + m - 1))
    var = n * m / 12 * ((n + m + 1) - tie_term)
    if var <= 0:
        return float(u), 1.0
    z = (abs(u - mu) - 0.5) / math.sqrt(var)
    p = math.erfc(max(z, 0.0) / math.sqrt(2))
    return float(u), min(1.0, p)


def _median_rows(x):
    import numpy as np

    return np.median(x, axis=-1)


def bootstrap_ratio_ci(a: Sequence[float], b: Sequence[float], *, n: int = 2000,
                       alpha: float = 0.01, seed: int = 0) -> tuple:
    """Percentile bootstrap ``(lo, hi)`` of ``median(b) / median(a)`` at level ``1 - alpha``.

    Both samples are resampled with replacement ``n`` times with a seeded
    ``numpy.random.Generator``, so the interval is reproducible.

    >>> lo, hi = bootstrap_ratio_ci([1.0, 1.1, 0.9, 1.0], [2.0, 2.2, 1.8, 2.0])
    >>> 1.5 < lo <= 2.0 <= hi < 2.5
    True
    """
    import numpy as np

    xa = np.asarray(_floats("a", a))
    xb = np.asarray(_floats("b", b))
    if not (isinstance(n, int) and n >= 1):
        raise UsageError(f"n: expected a positive int, got {n!r}")
    if not (0 < alpha < 1):
        raise UsageError(f"alpha: expected a level between 0 and 1, got {alpha!r}")
    rng = np.random.default_rng(seed)
    ma = _median_rows(xa[rng.integers(0, len(xa), size=(n, len(xa)))])
    mb = _median_rows(xb[rng.integers(0, len(xb), size=(n, len(xb)))])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = mb / ma
    lo, hi = np.quantile(ratios, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


@dataclass
class Verdict:
    """The outcome of comparing two timing samples (seconds, lower is better).

    ``ratio`` is ``median(new) / median(old)``; ``ci`` its bootstrap interval; ``p_value`` the
    two-sided Mann-Whitney p. ``regressed`` / ``improved`` follow the rule of
    :func:`timed_regression`; ``inconclusive`` is a ratio beyond the threshold that the rule
    does not establish, and ``reason`` says why (``""`` otherwise).

    >>> v = timed_regression([1.0] * 5 + [1.1] * 5, [1.0] * 5 + [1.1] * 5)
    >>> (v.regressed, v.improved, v.ratio)
    (False, False, 1.0)
    """

    regressed: bool
    improved: bool
    ratio: float
    p_value: float
    ci: tuple
    u: float
    old_median: float
    new_median: float
    n_old: int
    n_new: int
    inconclusive: bool = False
    reason: str = ""

    @property
    def verdict(self) -> str:
        """'regressed', 'improved', 'inconclusive' or 'same'."""
        if self.regressed:
            return "regressed"
        if self.improved:
            return "improved"
        return "inconclusive" if self.inconclusive else "same"

    def describe(self) -> str:
        """One line: ratio, its interval and the test's p-value."""
        return (f"median {self.old_median:.4g} -> {self.new_median:.4g} s (x{self.ratio:.3f},"
                f" 99% CI {self.ci[0]:.3f}..{self.ci[1]:.3f}), Mann-Whitney p={self.p_value:.2g},"
                f" n={self.n_old}/{self.n_new}")


def timed_regression(old_samples: Sequence[float], new_samples: Sequence[float], *,
                     threshold: float = 0.10, p: float = 0.002,
                     min_delta: float = 0.0) -> Verdict:
    """Has ``new_samples`` (times, lower is better) regressed against ``old_samples``?

    Regressed when all of these hold: ``median(new) / median(old) > 1 + threshold``; the
    Mann-Whitney p-value is below ``p``; the lower bound of the 99% bootstrap interval of the
    ratio (:func:`bootstrap_ratio_ci`) is above ``1 + threshold`` too, so the slowdown is
    established and not only its existence (an interval such as 0.83..3.23 says the samples
    differ but not by how much); and the medians differ by more than ``min_delta`` (the
    resolution of the clock and the machine: a few microseconds of a tiny forward move with the
    load of a shared runner from one session to the next, and the test cannot see a
    between-session shift). Improved is the mirror image: ratio below ``1 / (1 + threshold)``,
    the same test, the interval's upper bound below ``1 / (1 + threshold)``.

    A ratio beyond the threshold (and beyond ``min_delta``) that misses the test or whose
    interval reaches back inside the threshold is ``'inconclusive'``, with the reason.
    With few samples the test cannot reach a small ``p`` (3 against 3 gives at best p=0.1), so
    a gate needs enough runs: 10 against 10 reach p=1.1e-5.

    >>> old = [1.00, 1.01, 0.99, 1.02, 0.98, 1.00, 1.01, 0.99, 1.00, 1.02]
    >>> timed_regression(old, [t * 1.3 for t in old]).verdict
    'regressed'
    >>> timed_regression(old, [t * 1.05 for t in old]).verdict  # significant but within 10%
    'same'
    >>> timed_regression(old, [t * 1.3 for t in old], min_delta=0.5).verdict  # 0.3 s: below it
    'same'
    >>> v = timed_regression(old, [t * 1.3 for t in old[:5]] + [t * 1.02 for t in old[5:]])
    >>> v.verdict, v.ci[0] < 1.1  # half the runs slower: significant, size unknown
    ('inconclusive', True)
    """
    import statistics

    if not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise UsageError(f"threshold: expected a fraction >= 0 such as 0.10, got {threshold!r}")
    if not (isinstance(p, (int, float)) and 0 < p < 1):
        raise UsageError(f"p: expected a significance level between 0 and 1, got {p!r}")
    old = _floats("old_samples", old_samples)
    new = _floats("new_samples", new_samples)
    mo, mn = statistics.median(old), statistics.median(new)
    ratio = mn / mo if mo > 0 else math.inf
    u, pv = mann_whitney_u(old, new)
    ci = bootstrap_ratio_ci(old, new)
    significant = pv < p
    up, down = 1 + threshold, 1 / (1 + threshold)
    slower = ratio > up and mn - mo > min_delta
    faster = ratio < down and mo - mn > min_delta
    regressed = slower and significant and ci[0] > up
    improved = faster and significant and ci[1] < down
    reason = ""
    if (slower and not regressed) or (faster and not improved):
        if not significant:
            reason = f"Mann-Whitney p={pv:.2g} is not below {p:g}"
        else:
            bound = up if slower else down
            reason = (f"the 99% CI of the ratio {ci[0]:.3f}..{ci[1]:.3f} includes the"
                      f" threshold x{bound:.3f}")
    return Verdict(regressed=regressed, improved=improved, ratio=ratio, p_value=pv, ci=ci, u=u,
                   old_median=mo, new_median=mn, n_old=len(old), n_new=len(new),
                   inconclusive=bool(reason), reason=reason)
