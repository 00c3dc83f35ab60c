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
    peak, est = _metric(results, "memory_under", "peak_bytes")
    rate, _ = _metric(results, "throughput_at_least", "samples_per_s")
    passed = sum(1 for r in results if r["passed"] is True)
    failed = [r["check"] for r in results if r["passed"] is False]
    skipped = sum(1 for r in results if r["passed"] is None)
    return {
        "test": row["nodeid"],
        "params": format_count(params) if params is not None else "-",
        "peak": (format_bytes(peak) + ("~" if est else "")) if peak is not None else "-",
        "throughput": format_rate(rate).replace(" samples/s", "/s") if rate else "-",
        "checks": f"{passed}/{len(results)}" + (f" ({skipped} skipped)" if skipped else ""),
        "failed": ", ".join(failed),
    }


def health_table(rows: list, width: int = 100) -> list:
    """Lines of the summary table, fitted to ``width`` columns (long test ids are shortened).

    >>> rows = [{"nodeid": "t.py::test_a", "model": {"parameters": 1234},
    ...          "results": [{"check": "grads_finite", "passed": True, "metrics": {}}]}]
    >>> print("\\n".join(health_table(rows)))  # doctest: +NORMALIZE_WHITESPACE
    test          params  peak mem  throughput  checks  failed
    t.py::test_a  1.23k   -         -           1/1
    """
    cells = [health_row(r) for r in sorted(rows, key=lambda r: r["nodeid"])]
    cols = [("test", "test"), ("params", "params"), ("peak", "peak mem"),
            ("throughput", "throughput"), ("checks", "checks"), ("failed", "failed")]
    widths = {k: max(len(h), *(len(c[k]) for c in cells)) for k, h in cols}
    fixed = sum(widths[k] + 2 for k, _ in cols if k not in ("test", "failed"))
    widths["test"] = min(widths["test"], max(20, width - fixed - 12))
    widths["failed"] = max(6, width - fixed - widths["test"] - 2)

    def fit(text: str, w: int, left: bool = True) -> str:
        if len(text) > w:
            text = ("…" + text[-(w - 1):]) if left else (text[: w - 1] + "…")
        return text.ljust(w)

    lines = ["  ".join(fit(h, widths[k]) for k, h in cols).rstrip()]
    for c in cells:
        lines.append("  ".join(fit(c[k], widths[k], k == "test" or k != "failed")
                               if k != "failed" else fit(c[k], widths[k], False)
                               for k, _ in cols).rstrip())
    return lines
