"""The ``--modelcheck-json`` file: every model test with its check results, written atomically."""
from __future__ import annotations

import json
import math
import platform
from typing import Any, Optional

from ..core.files import atomic_write_text
from .terminal import xfail_outcome


def json_safe(value: Any, _found: Optional[list] = None) -> Any:
    """``value`` with every non-finite float replaced by the string ``'nan'``, ``'inf'`` or
    ``'-inf'`` (as check results write them): JSON has no such numbers, and ``json.dumps``
    would write the literals ``NaN`` and ``Infinity`` that JSON readers refuse.

    >>> json_safe({"loss": float("nan"), "xs": [1.0, float("-inf")]})
    {'loss': 'nan', 'xs': [1.0, '-inf']}
    """
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if _found is not None:
            _found.append(value)
        return repr(value)
    if isinstance(value, dict):
        return {k: json_safe(v, _found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, _found) for v in value]
    return value


def results_document(rows: list) -> dict:
    """The JSON document: format version, environment and one entry per model test."""
    import sys

    torch_version = None
    if "torch" in sys.modules:
        torch_version = sys.modules["torch"].__version__
    tests = sorted(rows, key=lambda r: r["nodeid"])
    return {
        "format": "pytest-modelcheck/1",
        "environment": {"python": platform.python_version(), "torch": torch_version,
                        "machine": platform.machine(), "processor": platform.processor()},
        "summary": summary_of(tests),
        "cost_by_check": cost_by_check(tests),
        "tests": tests,
    }


def expected_to_fail(test: dict) -> bool:
    """Whether a test failed as its ``xfail`` marker expected (its failed checks are expected).

    >>> expected_to_fail({"xfail": {"outcome": "xfailed", "reason": "slow loop"}})
    True
    >>> expected_to_fail({"xfail": {"outcome": "xpassed"}}), expected_to_fail({})
    (False, False)
    """
    return xfail_outcome(test) == "xfailed"


def failed_checks(tests: list) -> list:
    """``nodeid::check`` of every failed check, except those of tests that failed as expected.

    >>> failed_checks([{"nodeid": "t.py::a", "results": [{"check": "x", "passed": False}]},
    ...                {"nodeid": "t.py::b", "xfail": {"outcome": "xfailed"},
    ...                 "results": [{"check": "y", "passed": False}]}])
    ['t.py::a::x']
    """
    return [f"{t.get('nodeid')}::{r.get('check')}" for t in tests if not expected_to_fail(t)
            for r in t.get("results", []) if r.get("passed") is False]


def summary_of(tests: list) -> dict:
    """Tests, checks and failed checks; the failed checks of tests that failed as expected
    (xfail) are counted apart, as ``expected_failed_checks``, when there are any.

    >>> summary_of([{"results": [{"passed": False}]},
    ...             {"xfail": {"outcome": "xfailed"}, "results": [{"passed": False}]}])
    {'tests': 2, 'checks': 2, 'failed_checks': 1, 'expected_failed_checks': 1}
    """
    summary = {"tests": len(tests), "checks": sum(len(t.get("results", [])) for t in tests),
               "failed_checks": len(failed_checks(tests))}
    expected = sum(1 for t in tests if expected_to_fail(t)
                   for r in t.get("results", []) if r.get("passed") is False)
    if expected:
        summary["expected_failed_checks"] = expected
    return summary


def cost_by_check(rows: list) -> dict:
    """Seconds spent in each check over all tests, and in how many tests it ran, costliest
    first (ties by name): where a suite's time goes.

    >>> rows = [{"results": [{"check": "a", "duration_s": 1.0}, {"check": "b", "duration_s": 3.0}]},
    ...         {"results": [{"check": "a", "duration_s": 0.5}]}]
    >>> cost_by_check(rows)
    {'b': {'seconds': 3.0, 'tests': 1}, 'a': {'seconds': 1.5, 'tests': 2}}
    """
    totals: dict = {}
    for row in rows:
        seen = set()
        for r in row.get("results", []):
            entry = totals.setdefault(r["check"], {"seconds": 0.0, "tests": 0})
            seconds = r.get("duration_s") or 0.0
            entry["seconds"] += seconds if isinstance(seconds, (int, float)) else 0.0
            if r["check"] not in seen:
                seen.add(r["check"])
                entry["tests"] += 1
    for entry in totals.values():
        entry["seconds"] = round(entry["seconds"], 4)
    return dict(sorted(totals.items(), key=lambda kv: (-kv[1]["seconds"], kv[0])))


def write_json(path: str, rows: list, **extra: Any) -> None:
    """Write the results of a session to ``path`` (atomically)."""
    doc = results_document(rows)
    doc.update(extra)
    found: list = []
    doc = json_safe(doc, found)
    if found:
        doc["non_finite"] = (f"{len(found)} non-finite number(s) written as the strings 'nan',"
                             f" 'inf' or '-inf' (JSON has no such numbers)")
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=False, allow_nan=False,
                                       default=str) + "\n")
