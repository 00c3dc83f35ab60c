"""The model health summary printed at the end of a ``--modelcheck`` session."""
from __future__ import annotations

from ..core.units import format_bytes, format_count, format_rate


def _metric(results: list, check: str, key: str):
    for r in results:
        if r["check"] == check and key in r.get("metrics", {}):
            return r["metrics"][key], r.get("estimated", False)
    return None, False


def health_row(row: dict) -> dict:
    """Cells of one summary row from a collected test row (see ``ResultCollector``)."""
    results = row["results"]
    params = row.get("model", {}).get("parameters")
    flops = row.get("model", {}).get("flops")
    peak, est = _metric(results, "memory_under", "peak_bytes")
    rate, _ = _metric(results, "throughput_at_least", "samples_per_s")
    passed = sum(1 for r in results if r["passed"] is True)
    failed = [r["check"] for r in results if r["passed"] is False]
    skipped = sum(1 for r in results if r["passed"] is None)
    return {
        "test": row["nodeid"],
        "params": format_count(params) if params is not None else "-",
        "flops": format_count(flops) if flops is not None else "-",
        "peak": (format_bytes(peak) + ("~" if est else "")) if peak is not None else "-",
        "throughput": format_rate(rate).replace(" samples/s", "/s") if rate else "-",
        "checks": f"{passed}/{len(results)}" + (f" ({skipped} skipped)" if skipped else ""),
        "failed": ", ".join(failed),
    }


def _reason_kind(reason: str) -> str:
    """A thread choice's reason without its per-test figures, for grouping tests."""
    import re

    kind = re.sub(r" \(.*\)$", "", reason)  # "auto: small model (3.1 MFLOP per forward)"
    return re.sub(r"machine load [0-9.e+]+ on", "machine load >= 1 per core on", kind)


def threads_line(rows: list) -> str:
    """The torch thread counts the tests' checks ran with, and why (``""`` when unknown).
    Tests are grouped by count and by reason without its per-test figures.

    >>> a = {"count": 1, "reason": "auto: machine load 3.2 on 2 cores", "setting": "auto"}
    >>> threads_line([{"threads": a}, {"threads": a}])
    'torch threads: 1 per test (auto: machine load 3.2 on 2 cores)'
    >>> b = {"count": 1, "reason": "auto: small model (48 FLOP per forward)", "setting": "auto"}
    >>> c = {"count": 2, "reason": "auto: 2 cores", "setting": "auto"}
    >>> threads_line([{"threads": a}, {"threads": b}, {"threads": b}, {"threads": c}])
    'torch threads: 1 in 2 tests (auto: small model), 1 in 1 test (auto: machine load >= 1 per core on 2 cores), 2 in 1 test (auto: 2 cores)'
    """
    choices = [row["threads"] for row in rows if row.get("threads")]
    if not choices:
        return ""
    exact = {(t.get("count"), t.get("reason", "")) for t in choices}
    if len(exact) == 1:
        (count, reason), = exact
        return f"torch threads: {count} per test ({reason})"
    counts: dict = {}
    for t in choices:
        key = (t.get("count"), _reason_kind(t.get("reason", "")))
        counts[key] = counts.get(key, 0) + 1
    if len(counts) == 1:
        (count, reason), = counts
        return f"torch threads: {count} per test ({reason})"
    parts = [f"{c} in {n} test{'s' if n > 1 else ''} ({why})"
             for (c, why), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1],
                                                                       kv[0][1]))]
    return "torch threads: " + ", ".join(parts)


def health_table(rows: list, width: int = 100) -> list:
    """Lines of the summary table, one row per model test, fitted to ``width`` columns.

    The test id comes last and is shortened from the left when too long; failed checks are
    listed on an indented line under their row so nothing is cut off.

    >>> rows = [{"nodeid": "t.py::test_a", "model": {"parameters": 1234},
    ...          "results": [{"check": "grads_finite", "passed": False, "metrics": {}}]}]
    >>> print("\\n".join(health_table(rows)))
    params  FLOPs  peak mem  throughput  checks  test
    1.23k   -      -         -           0/1     t.py::test_a
            failed: grads_finite
    """
    cells = [health_row(r) for r in sorted(rows, key=lambda r: r["nodeid"])]
    cols = [("params", "params"), ("flops", "FLOPs"), ("peak", "peak mem"),
            ("throughput", "throughput"), ("checks", "checks")]
    widths = {k: max(len(h), *(len(c[k]) for c in cells)) for k, h in cols}
    lead = sum(widths[k] + 2 for k, _ in cols)
    room = max(20, width - lead)

    def short(text: str) -> str:
        return text if len(text) <= room else "…" + text[-(room - 1):]

    lines = ["  ".join(h.ljust(widths[k]) for k, h in cols) + "  test"]
    for c in cells:
        lines.append("  ".join(c[k].ljust(widths[k]) for k, _ in cols) + "  " + short(c["test"]))
        if c["failed"]:
            lines.append(" " * (widths["params"] + 2) + "failed: " + c["failed"])
    return lines
