"""The model health summary printed at the end of a ``--modelcheck`` session."""
from __future__ import annotations

from typing import Any

from ..core.units import format_bytes, format_count, format_rate


def _metric(results: list, check: str, key: str):
    for r in results:
        if r["check"] == check and key in r.get("metrics", {}):
            return r["metrics"][key], r.get("estimated", False)
    return None, False


def xfail_outcome(row: dict) -> str:
    """How a test marked ``xfail`` ended: ``'xfailed'`` (failed as expected), ``'xpassed'``
    (passed though marked xfail; with ``strict`` the test fails) or ``''`` (not an xfail
    test, or a row recorded before the ``xfail`` entry existed).

    >>> xfail_outcome({"xfail": {"outcome": "xfailed", "reason": "known NaN"}})
    'xfailed'
    >>> xfail_outcome({"nodeid": "t.py::test_a", "outcome": "passed"})
    ''
    """
    info = row.get("xfail")
    outcome = info.get("outcome") if isinstance(info, dict) else None
    return outcome if outcome in ("xfailed", "xpassed") else ""


def xfail_note(row: dict, failing: list) -> str:
    """One line on an xfail test's row: ``failing`` (the checks that failed) were expected to
    fail, or the test passed though marked xfail; ``""`` for other tests.

    >>> xfail_note({"xfail": {"outcome": "xfailed", "reason": "known NaN"}}, ["grads_finite"])
    'xfail (expected failure: known NaN): grads_finite'
    >>> xfail_note({"xfail": {"outcome": "xpassed", "reason": "", "strict": True}}, [])
    'XPASS(strict): marked xfail, but passed (strict: the test fails)'
    """
    outcome = xfail_outcome(row)
    if not outcome:
        return ""
    info = row["xfail"]
    reason = " ".join(str(info.get("reason") or "").split())
    if outcome == "xfailed":
        text = "xfail (expected failure" + (f": {reason}" if reason else "") + ")"
        return text + (": " + ", ".join(failing) if failing else "")
    if info.get("strict"):
        return ("XPASS(strict): marked xfail" + (f" ({reason})" if reason else "")
                + ", but passed (strict: the test fails)")
    return "XPASS: marked xfail" + (f" ({reason})" if reason else "") + ", but passed"


def health_row(row: dict) -> dict:
    """Cells of one summary row from a collected test row (see ``ResultCollector``).

    ``failed`` names the checks that failed; those of a test that failed as expected
    (``xfail``) are under ``xfailed`` instead, and ``status`` (``'xfailed'``, ``'xpassed'``
    or ``''``) and ``note`` (:func:`xfail_note`) say so.

    >>> row = {"nodeid": "t.py::test_a", "xfail": {"outcome": "xfailed", "reason": ""},
    ...        "results": [{"check": "grads_finite", "passed": False, "metrics": {}}]}
    >>> c = health_row(row)
    >>> c["checks"], c["failed"], c["xfailed"], c["note"]
    ('0/1 (xfail)', '', 'grads_finite', 'xfail (expected failure): grads_finite')
    """
    results = row["results"]
    params = row.get("model", {}).get("parameters")
    flops = row.get("model", {}).get("flops")
    peak, est = _metric(results, "memory_under", "peak_bytes")
    rate, _ = _metric(results, "throughput_at_least", "samples_per_s")
    passed = sum(1 for r in results if r["passed"] is True)
    failing = [r["check"] for r in results if r["passed"] is False]
    skipped = sum(1 for r in results if r["passed"] is None)
    status = xfail_outcome(row)
    notes = [f"{skipped} skipped"] if skipped else []
    notes += {"xfailed": ["xfail"], "xpassed": ["xpass"]}.get(status, [])
    return {
        "test": row["nodeid"],
        "params": format_count(params) if params is not None else "-",
        "flops": format_count(flops) if flops is not None else "-",
        "peak": (format_bytes(peak) + ("~" if est else "")) if peak is not None else "-",
        "throughput": format_rate(rate).replace(" samples/s", "/s") if rate else "-",
        "checks": f"{passed}/{len(results)}" + (f" ({', '.join(notes)})" if notes else ""),
        "failed": "" if status == "xfailed" else ", ".join(failing),
        "xfailed": ", ".join(failing) if status == "xfailed" else "",
        "status": status,
        "note": xfail_note(row, failing),
    }


def failed_counts(rows: list) -> tuple:
    """(failed checks, checks that failed in tests marked xfail, xpassed tests): an expected
    failure is not counted as a failure.

    >>> bad = {"check": "grads_finite", "passed": False}
    >>> failed_counts([{"results": [bad]},
    ...                {"xfail": {"outcome": "xfailed"}, "results": [bad]}])
    (1, 1, 0)
    """
    failed = xfailed = xpassed = 0
    for row in rows:
        n = sum(1 for r in row["results"] if r["passed"] is False)
        status = xfail_outcome(row)
        if status == "xfailed":
            xfailed += n
        else:
            failed += n
        xpassed += status == "xpassed"
    return failed, xfailed, xpassed


def short_nodeid(nodeid: str, room: int) -> tuple:
    """``(text, whole)``: ``nodeid`` fitted to ``room`` characters, its file name kept
    readable, and whether all of the file name is in it. The directories go first (``…/``,
    then without the ``…/``), then the middle of the test name; when the file name itself does not fit, its middle goes
    (the test name is kept) and ``whole`` is False: print the full id on its own line then.

    >>> short_nodeid("tests/models/test_fno.py::test_fno_default_checks", 40)
    ('…/test_fno.py::test_fno_default_checks', True)
    >>> short_nodeid("tests/models/test_fno.py::test_fno_default_checks", 30)
    ('…/test_fno.py::test_fn…_checks', True)
    >>> short_nodeid("tests/test_summary_and_json.py::test_bad", 24)
    ('test_summary_…::test_bad', False)
    """
    if len(nodeid) <= room:
        return nodeid, True
    path, sep, name = nodeid.partition("::")
    base = path.rsplit("/", 1)[-1]
    heads = [("…/" if base != path else "") + base + sep, base + sep]
    for head in heads:
        if len(head) + len(name) <= room:
            return head + name, True
    for head in heads:
        keep = room - len(head) - 1  # characters of the test name around the "…"
        if keep >= _MIN_NAME:
            front = (keep + 1) // 2
            return head + name[:front] + "…" + name[len(name) - (keep - front):], True
    tail = sep + name
    if len(tail) + 1 + _MIN_NAME <= room:  # the start of the file name and the test name
        return base[:room - 1 - len(tail)] + "…" + tail, False
    text = base + tail
    front = max(1, (room - 1) // 2)
    return text[:front] + "…" + text[len(text) - max(1, room - 1 - front):], False


_MIN_NAME = 8  # characters of a test name worth showing around an ellipsis


def comparison_line(c: Any) -> str:
    """``c.line()`` of a baseline comparison, with op counts named as such (the dispatched
    ops that ``no_host_sync`` counts are not host syncs).

    >>> from pytest_modelcheck.core.baseline import Comparison
    >>> comparison_line(Comparison("t::a", "no_host_sync.ops", "deterministic", 120, 140,
    ...                            1 / 6, "regressed", "exact"))
    't::a no_host_sync.ops (dispatched ops: op count, not host syncs): 120 -> 140 (+16.7%) regressed; exact'
    """
    text = c.line()
    label = METRIC_LABELS.get(c.metric)
    lead = f"{c.nodeid} {c.metric}:"
    if label and text.startswith(lead):
        text = f"{c.nodeid} {c.metric} ({label}):" + text[len(lead):]
    return text


#: Human names of compared metrics whose key alone misleads (op counts under no_host_sync).
METRIC_LABELS = {
    "no_host_sync.ops": "dispatched ops: op count, not host syncs",
    "no_host_sync.count": "host syncs",
    "vectorized.ops_by_batch_size": "dispatched ops per batch size: op count",
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

    The test id comes last; a long one keeps its file name (directories and then the middle
    of the test name are shortened, see :func:`short_nodeid`); when even the file name does not
    fit, the row keeps its start and the test name, and the whole id follows on its own line
    (``test:``). Failed checks are listed on an indented line
    under their row so nothing is cut off; a test marked xfail says so (``xfail`` / ``XPASS``)
    and its expected failures are not listed as failed.

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
    indent = " " * (widths["params"] + 2)

    lines = ["  ".join(h.ljust(widths[k]) for k, h in cols) + "  test"]
    for c in cells:
        short, whole = short_nodeid(c["test"], room)
        lines.append("  ".join(c[k].ljust(widths[k]) for k, _ in cols) + "  " + short)
        if not whole:
            lines.append(indent + "test: " + c["test"])
        if c["failed"]:
            lines.append(indent + "failed: " + c["failed"])
        if c["note"]:
            lines.append(indent + c["note"])
    return lines
