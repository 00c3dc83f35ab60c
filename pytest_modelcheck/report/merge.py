"""One ``--modelcheck-json`` report from the reports of the shards of a split test suite.

Each shard (a runner of a CI matrix) writes its own report; :func:`merge_reports` makes the one
document the whole suite would have written: the tests of every shard, sorted, with the summary
and the cost by check computed again. A test that two shards both report must have the same
results in both (durations aside); otherwise :class:`~..core.shards.ShardConflict` names it.
"""
from __future__ import annotations

from typing import Any

from ..core.shards import ShardConflict
from .json_report import cost_by_check, summary_of

FORMAT = "pytest-modelcheck/1"


def merge_reports(documents: list, names: Any = None) -> dict:
    """The merged report of the shards' JSON documents (dicts as ``json.load`` gives them).

    >>> a = {"format": "pytest-modelcheck/1", "environment": {"torch": "2.13.0"},
    ...      "tests": [{"nodeid": "t.py::b", "results": [{"check": "x", "passed": True,
    ...                 "duration_s": 1.0}]}]}
    >>> b = {"format": "pytest-modelcheck/1", "environment": {"torch": "2.13.0"},
    ...      "tests": [{"nodeid": "t.py::a", "results": [{"check": "x", "passed": False,
    ...                 "duration_s": 2.0}]}]}
    >>> doc = merge_reports([a, b])
    >>> [t["nodeid"] for t in doc["tests"]], doc["summary"], doc["shards"]
    (['t.py::a', 't.py::b'], {'tests': 2, 'checks': 2, 'failed_checks': 1}, 2)
    """
    names = list(names or [f"shard {i + 1}" for i in range(len(documents))])
    if not documents:
        raise ShardConflict("expected at least one report to merge, got none")
    tests: dict = {}
    origin: dict = {}
    environments: list = []
    for name, doc in zip(names, documents):
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ShardConflict(f"{name}: expected a {FORMAT} report (--modelcheck-json),"
                                f" got format {found!r}")
        environments.append(doc.get("environment", {}))
        for test in doc.get("tests", []):
            nodeid = test.get("nodeid")
            if nodeid in tests and _verdicts(tests[nodeid]) != _verdicts(test):
                raise ShardConflict(f"{nodeid}: reported by {origin[nodeid]} and {name} with"
                                    " different results; each test belongs to one shard")
            tests.setdefault(nodeid, test)
            origin.setdefault(nodeid, name)
    return _document(sorted(tests.values(), key=lambda t: t["nodeid"]), environments)


def _verdicts(test: dict) -> list:
    """A test's results without their durations (which differ from run to run)."""
    return [{k: v for k, v in r.items() if k != "duration_s"} for r in test.get("results", [])]


def _document(tests: list, environments: list) -> dict:
    first = environments[0] if environments else {}
    doc = {
        "format": FORMAT,
        "environment": first,
        "summary": summary_of(tests),
        "cost_by_check": cost_by_check(tests),
        "tests": tests,
        "shards": len(environments),
    }
    others = [e for e in environments[1:] if e != first]
    if others:
        doc["shard_environments"] = environments
    return doc
