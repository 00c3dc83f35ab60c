"""Comparing this run's metrics with a :class:`~.baseline.Baseline`: one :class:`Comparison`
per test metric (:func:`compare`), the regressions a merge gate fails on (:func:`regressions`)
and the short human form of a metric value (:func:`format_value`).

Deterministic metrics are compared exactly or within a relative tolerance; timed ones
statistically (:func:`~.stats.timed_regression`), only on the same machine and under the same
parallelism, and 'inconclusive' where the sessions' loads or an unknown parallelism could
explain the change. All of these names are also importable from :mod:`.baseline`.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Optional

__all__ = ["Comparison", "compare", "regressions", "format_value"]


@dataclass
class Comparison:
    """One metric of one test, baseline against now.

    ``verdict`` is 'regressed', 'improved', 'same', 'new', 'inconclusive' (a timed change
    beyond the threshold that is not established: its interval reaches inside the threshold,
    or the load or an unknown parallelism may explain it; reported, does not fail the gate),
    'skipped: other machine' or 'skipped: other parallelism' (timed under other torch threads
    or xdist workers: not judged); ``change`` is the relative change of the value (of the
    median for timed metrics); ``detail`` says how it was decided.

    >>> c = Comparison("t.py::a", "flops_under.flops", "deterministic", 100, 110, 0.1, "regressed")
    >>> c.line()
    't.py::a flops_under.flops: 100 -> 110 (+10.0%) regressed'
    """

    nodeid: str
    metric: str
    kind: str
    old: Any
    new: Any
    change: Optional[float]
    verdict: str
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for a terminal or a log."""
        check, _, key = self.metric.partition(".")
        unit = (metric_kind(check, key) or MetricKind(_DET)).unit
        if self.metric == "memory_under.peak_bytes":
            unit = "bytes"
        change = f" ({self.change:+.1%})" if self.change is not None else ""
        text = (f"{self.nodeid} {self.metric}: {format_value(self.old, unit)} ->"
                f" {format_value(self.new, unit)}{change} {self.verdict}")
        return text + (f"; {self.detail}" if self.detail else "")


def format_value(value: Any, unit: str = "") -> str:
    """A short human form of a metric value.

    >>> format_value(1536, "bytes"), format_value(2.5e9, "count"), format_value(0.0123, "seconds")
    ('1.50 KiB', '2.50G', '12.30 ms')
    """
    from .units import format_bytes, format_count, format_duration

    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
        return text if len(text) <= 60 else text[:57] + "..."
    try:
        if unit == "bytes":
            return format_bytes(value)
        if unit == "count":
            return format_count(value)
        if unit == "seconds":
            return format_duration(value)
    except (ValueError, TypeError):
        pass
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _relative(old: Any, new: Any) -> Optional[float]:
    if isinstance(old, bool) or isinstance(new, bool):
        return None
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and old:
        return (new - old) / abs(old)
    return None


def _leaves(value: Any, prefix: str = "") -> dict:
    """Numbers in nested dicts, by dotted path (``{"4": 10, "8": 10}`` -> two leaves)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _deterministic(old: Any, new: Any, kind: MetricKind, tol: float) -> str:
    if kind.better == "equal" or not (isinstance(old, (int, float, dict))
                                      and isinstance(new, (int, float, dict))):
        return "same" if old == new else "regressed"
    lo, ln = _leaves(old), _leaves(new)
    if set(lo) != set(ln):
        return "regressed"
    worse = better = False
    for k, a in lo.items():
        b = ln[k]
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
            if a != b:
                worse = True
            continue
        bound = tol * abs(a)
        if kind.better == "higher":
            a, b = -a, -b
        worse |= b > a + bound
        better |= b < a - bound
    return "regressed" if worse else "improved" if better else "same"


def _not_comparable(old: Any, new: Any) -> str:
    """Why ``old`` and ``new`` cannot be compared (a non-finite number, an integer beyond a
    float's range, too deep), or ``""``: such a metric is a regression, never 'same'."""
    for side, value in (("baseline", old), ("this run", new)):
        problem = _value_problem(value)
        if problem:
            return f"not comparable: the {side} value {problem}"
    return ""


def _tolerance(tolerances: Optional[dict], name: str, kind: MetricKind) -> float:
    if not tolerances:
        return kind.tolerance
    for key in (name, tuple(name.split(".", 1)), kind.kind):
        if key in tolerances:
            return float(tolerances[key])
    return kind.tolerance


def _kind_of(name: str, entry: dict) -> MetricKind:
    check, _, key = name.partition(".")
    kind = METRIC_KINDS.get((check, key), MetricKind(_DET))
    if entry.get("kind") == "timed" and kind.kind != "timed":
        return MEASURED_MEMORY if name == "memory_under.peak_bytes" else MetricKind("timed")
    return kind


def _ratio_text(v: Any) -> str:
    return (f"x{v.ratio:.3f} (99% CI {v.ci[0]:.3f}..{v.ci[1]:.3f}), Mann-Whitney"
            f" p={v.p_value:.2g}, n={v.n_old}/{v.n_new}")


def _calibrated(name: str, old_entry: dict, entry: dict, mine: dict, metrics: dict) -> tuple:
    """(old samples, new samples, scale, note): each side's times divided by the median of
    the calibration run of its own session when both sides have one (``scale`` is the old
    median, 1.0 otherwise), so a machine that is slower or faster today as a whole does not
    read as a regression of the model."""
    calib = CALIBRATED_BY.get(name)
    old_c, new_c = mine.get(calib, {}).get("samples"), metrics.get(calib, {}).get("samples")
    if not calib or not old_c or not new_c:
        return old_entry["samples"], entry["samples"], 1.0, ""
    mo, mn = statistics.median(old_c), statistics.median(new_c)
    if not (mo > 0 and mn > 0):
        return old_entry["samples"], entry["samples"], 1.0, ""
    return ([t / mo for t in old_entry["samples"]], [t / mn for t in entry["samples"]], mo,
            f"; relative to each session's calibration run (this machine at"
            f" x{mo / mn:.2f} the baseline session's speed)")


def _parallelism_text(par: dict) -> str:
    """``'2 xdist workers x 1 thread'`` (``?`` for what is unknown)."""
    parts = []
    for key, noun in (("xdist_workers", "xdist worker"), ("threads", "thread")):
        n = par.get(key)
        parts.append(f"? {noun}s" if n is None else f"{n} {noun}{'' if n == 1 else 's'}")
    return " x ".join(parts)


def _other_parallelism(old_entry: dict, entry: dict) -> str:
    """Why a timing is not judged against its baseline: both sides know a parallelism fact
    (torch threads, xdist workers) and it differs; ``""`` otherwise.

    Refused rather than normalised: the calibration run measures the session's speed with one
    thread at one moment, while xdist workers on shared cores and another thread count change
    each timing by an amount that varies from run to run (a worker's neighbour is busy, then
    idle); a serial baseline compared under ``-n 2`` on 2 loaded cores read x3.1 on an
    unchanged model. No correction of it is safe from false alarms.

    >>> _other_parallelism({"parallelism": {"threads": 2, "xdist_workers": 1}},
    ...                    {"parallelism": {"threads": 1, "xdist_workers": 2}})[:70]
    'baseline timed with 1 xdist worker x 2 threads, this run 2 xdist worke'
    >>> _other_parallelism({}, {"parallelism": {"threads": 1, "xdist_workers": 2}})
    ''
    """
    po, pn = old_entry.get("parallelism") or {}, entry.get("parallelism") or {}
    if not any(po.get(k) is not None and pn.get(k) is not None and po[k] != pn[k]
               for k in PARALLELISM):
        return ""
    return (f"baseline timed with {_parallelism_text(po)}, this run {_parallelism_text(pn)};"
            f" not comparable: save a baseline under the same -n / --modelcheck-threads")


def _doubts(old_entry: dict, entry: dict, v: Any, tol: float) -> str:
    """Why a would-be 'regressed' or 'improved' timing (``v``) is not trusted, ``""`` when it
    is: the compare is then 'inconclusive', which does not fail the gate.

    * one side's xdist workers are unknown (a baseline saved by an older version) and the
      other side ran under more than one: the difference may be the parallelism (a side with
      unknown parallelism beside a serial one is compared as before: older baselines keep
      gating serial runs);
    * a session was oversubscribed (load per core >= :data:`OVERSUBSCRIBED_LOAD`), or the two
      sessions' loads per core differ by more than :data:`LOAD_MARGIN`; unless the ratio's
      interval is beyond what the load can explain. A timing loop that shares its core with
      the other runnable tasks is stretched by up to ``1 + load per core`` (each of them
      takes its time slice), and the calibration run, taken at another moment, need not see
      the same share. So a slowdown whose 99% lower bound exceeds ``(1 + threshold) *
      (1 + the larger load per core)`` cannot be the load alone and stays 'regressed' (at
      load 1.0 and a 20% threshold: beyond x2.4); anything less is 'inconclusive'.

    >>> from pytest_modelcheck.core.stats import timed_regression
    >>> v = timed_regression([1.0, 1.01] * 5, [1.5, 1.51] * 5, threshold=0.2)
    >>> _doubts({"load_per_core": 0.2}, {"load_per_core": 0.3}, v, 0.2)
    ''
    >>> print(_doubts({"load_per_core": 0.2}, {"load_per_core": 1.4}, v, 0.2)[:90])
    loaded machine: load per core 0.20 for the baseline, 1.40 for this run (this run oversubsc
    >>> _doubts({"load_per_core": 0.2}, {"load_per_core": 1.4}, v, 0.2).endswith(
    ...     "a slowdown within x2.88 may be the load")  # (1 + 0.2) * (1 + 1.4)
    True
    """
    if not (v.regressed or v.improved):
        return ""
    reasons = []
    po, pn = old_entry.get("parallelism") or {}, entry.get("parallelism") or {}
    wo, wn = po.get("xdist_workers"), pn.get("xdist_workers")
    if (wo is None) != (wn is None) and (wo or wn or 0) > 1:
        known, unknown, par = (("this run", "the baseline", pn) if wo is None
                               else ("the baseline", "this run", po))
        reasons.append(f"{unknown} did not record its parallelism (an older version) and"
                       f" {known} ran with {_parallelism_text(par)}; save a baseline"
                       f" under the same -n / --modelcheck-threads")
    lo, ln = old_entry.get("load_per_core"), entry.get("load_per_core")
    why = [f"{who} oversubscribed" for who, load in (("the baseline", lo), ("this run", ln))
           if load is not None and load >= OVERSUBSCRIBED_LOAD]
    if lo is not None and ln is not None and abs(ln - lo) > LOAD_MARGIN:
        why.append(f"the sessions differ by more than {LOAD_MARGIN:g}")
    if why:
        worst = max(load for load in (lo, ln) if load is not None)
        allowance = (1 + tol) * (1 + worst)
        beyond = v.ci[0] > allowance if v.regressed else v.ci[1] < 1 / allowance
        if not beyond:
            shown = lambda x: "unknown" if x is None else f"{x:.2f}"  # noqa: E731
            reasons.append(f"loaded machine: load per core {shown(lo)} for the baseline,"
                           f" {shown(ln)} for this run ({'; '.join(why)}); a"
                           f" {'slowdown' if v.regressed else 'speed-up'} within"
                           f" x{allowance:.2f} may be the load")
    return "; ".join(reasons)


def _shown(entry: dict) -> Any:
    """The value of a stored metric as shown: the median of its samples (when they are all
    finite), else the value or the samples."""
    samples = entry.get("samples")
    if samples is not None and _value_problem(samples) is None:
        return statistics.median(samples)
    return entry.get("value", samples)


def compare(baseline: Baseline, rows: list, fingerprint: dict, *,
            tolerances: Optional[dict] = None) -> list:
    """Compare the rows of this run with ``baseline``: one :class:`Comparison` per test metric.

    Deterministic metrics are compared against this machine's entry, or else the most recently
    saved entry of any machine; timed ones only against this machine (else 'skipped: other
    machine') and under the same parallelism (else 'skipped: other parallelism'); a timed
    change beyond the threshold that its interval, the sessions' loads or an unknown
    parallelism leave open is 'inconclusive' (see :func:`_doubts`). A non-finite value (NaN,
    Infinity) on either side is 'regressed', with the reason in ``detail``: the gate cannot
    vouch for it. ``tolerances`` maps ``"check.key"``
    (or ``(check, key)``, or a kind ``"deterministic"`` / ``"timed"``) to a relative
    tolerance (timed: the ratio threshold).

    >>> fp = {"key": "m"}
    >>> old = Baseline.from_rows([{"nodeid": "t::a", "model": {"parameters": 100},
    ...                            "results": []}], fp)
    >>> [c.verdict for c in compare(old, [{"nodeid": "t::a", "model": {"parameters": 120},
    ...                                    "results": []}], fp)]
    ['regressed']
    """
    from .stats import timed_regression

    here = fingerprint["key"]
    others = sorted((k for k in baseline.entries if k != here),
                    key=lambda k: baseline.saved.get(k, 0), reverse=True)
    out = []
    for row in sorted(rows, key=lambda r: r["nodeid"]):
        nodeid = row["nodeid"]
        mine = baseline.entries.get(here, {}).get(nodeid, {})
        metrics = _row_metrics(row)
        for name, entry in sorted(metrics.items()):
            if entry.get("kind") == "calibration":
                continue  # used below to normalize the timed metric it belongs to
            kind = _kind_of(name, entry)
            tol = _tolerance(tolerances, name, kind)
            new = entry.get("value", entry.get("samples"))
            if kind.kind == "timed":
                old_entry = mine.get(name)
                if old_entry is None:
                    elsewhere = any(name in baseline.entries[k].get(nodeid, {}) for k in others)
                    verdict = "skipped: other machine" if elsewhere else "new"
                    shown = _shown(entry)
                    out.append(Comparison(nodeid, name, "timed", None, shown, None, verdict))
                    continue
                bad = _not_comparable(old_entry.get("value", old_entry.get("samples")), new)
                if bad:
                    out.append(Comparison(nodeid, name, "timed", _shown(old_entry),
                                          _shown(entry), None, "regressed", bad))
                elif "samples" in entry and "samples" in old_entry:
                    old_m = statistics.median(old_entry["samples"])
                    new_m = statistics.median(entry["samples"])
                    other = _other_parallelism(old_entry, entry)
                    if other:  # not judged: see _other_parallelism
                        out.append(Comparison(nodeid, name, "timed", old_m, new_m, None,
                                              "skipped: other parallelism", other))
                        continue
                    old_s, new_s, scale, note = _calibrated(name, old_entry, entry, mine, metrics)
                    v = timed_regression(old_s, new_s, threshold=tol,
                                         min_delta=TIMED_RESOLUTION_S / scale
                                         if kind.unit == "seconds" else 0.0)
                    verdict, detail = v.verdict, (_ratio_text(v) if note else v.describe()) + note
                    doubt = v.reason or _doubts(old_entry, entry, v, tol)
                    if doubt:
                        verdict, detail = "inconclusive", f"{doubt}; {detail}"
                    out.append(Comparison(nodeid, name, "timed", old_m, new_m, v.ratio - 1,
                                          verdict, detail))
                else:  # one measured value each: a relative tolerance, same machine only
                    old = old_entry.get("value")
                    verdict = _deterministic(old, new, kind, tol)
                    out.append(Comparison(nodeid, name, "timed", old, new, _relative(old, new),
                                          verdict, f"single measurement, tolerance {tol:.0%}"))
                continue
            old_entry = mine.get(name)
            if old_entry is None:
                old_entry = next((baseline.entries[k][nodeid][name] for k in others
                                  if name in baseline.entries[k].get(nodeid, {})), None)
            if old_entry is None:
                out.append(Comparison(nodeid, name, _DET, None, new, None, "new"))
                continue
            old = old_entry.get("value", old_entry.get("samples"))
            bad = _not_comparable(old, new)
            if bad:
                out.append(Comparison(nodeid, name, _DET, old, new, None, "regressed", bad))
                continue
            verdict = _deterministic(old, new, kind, tol)
            detail = "exact" if tol == 0 else f"tolerance {tol:.0%}"
            out.append(Comparison(nodeid, name, _DET, old, new, _relative(old, new), verdict,
                                  detail))
    return out


def regressions(baseline: Baseline, rows: list, fingerprint: dict, *,
                tolerances: Optional[dict] = None) -> list:
    """The comparisons whose verdict is 'regressed' (what a merge gate fails on).

    >>> fp = {"key": "m"}
    >>> old = Baseline.from_rows([{"nodeid": "t::a", "model": {"parameters": 100},
    ...                            "results": []}], fp)
    >>> regressions(old, [{"nodeid": "t::a", "model": {"parameters": 100}, "results": []}], fp)
    []
    """
    return [c for c in compare(baseline, rows, fingerprint, tolerances=tolerances)
            if c.verdict == "regressed"]


# Imported last: baseline.py re-exports the names above from its bottom, so either module can be
# imported first without a cycle (nothing above needs these until it is called).
from .baseline import (_DET, CALIBRATED_BY, LOAD_MARGIN, MEASURED_MEMORY,  # noqa: E402
                       METRIC_KINDS, OVERSUBSCRIBED_LOAD, PARALLELISM, TIMED_RESOLUTION_S,
                       Baseline, MetricKind, _row_metrics, _value_problem, metric_kind)
