"""The ``--modelcheck-markdown`` report: a GitHub-flavoured job summary.

Regressions against a baseline come first (old, new, change), then the model health table.
Point ``--modelcheck-markdown`` at ``$GITHUB_STEP_SUMMARY`` to see it on the run's page.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from ..core.baseline import METRIC_KINDS, MetricKind, format_value
from .terminal import METRIC_LABELS, failed_counts, health_row


#: Characters that start markup in GitHub's renderer: code spans, links and images,
#: emphasis (``*``, ``_``), math. Each is written backslash-escaped in a cell (``~`` is left
#: alone: it marks an estimate, and at worst strikes text through).
_MARKUP = "\\`[]()*$|"
#: An underscore that can open or close emphasis: not between two letters or digits
#: (``test_a_b`` stays as written; ``_x_`` and ``a__b`` are escaped).
_EMPHASIS_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")
_AUTOLINK = re.compile(r"(?<=[A-Za-z0-9])(?=://)|(?<=\bwww)(?=\.)", re.IGNORECASE)


def _cell(text: object) -> str:
    """A table cell: one line, no raw HTML (a test id or a model's error message with
    ``<script>`` stays text in a job summary), and no live markdown: backticks, brackets
    (links, images), parentheses, emphasis (``*``, an ``_`` that is not inside a word), math, pipes and the ``://`` / ``www.`` that GitHub links by
    themselves are escaped, so a test id like ``t[[x](https://e.com)]`` renders as written.

    >>> _cell("a|b\\nc")
    'a\\\\|b c'
    >>> _cell("t[<script>]")
    't\\\\[&lt;script&gt;\\\\]'
    >>> print(_cell("t[`x` [a](https://e.com) www.e.com]"))
    t\\[\\`x\\` \\[a\\]\\(https\\://e.com\\) www\\.e.com\\]
    >>> print(_cell("test_a_b* _x_ a__b"))
    test_a_b\\* \\_x\\_ a\\_\\_b
    """
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = "".join("\\" + ch if ch in _MARKUP else ch for ch in text)
    text = _EMPHASIS_UNDERSCORE.sub(r"\\_", text)
    text = _AUTOLINK.sub("\\\\", text)
    return text.replace("\r", " ").replace("\n", " ").strip()


def _unit(metric: str) -> str:
    check, _, key = metric.partition(".")
    if metric == "memory_under.peak_bytes":
        return "bytes"
    return METRIC_KINDS.get((check, key), MetricKind("")).unit


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


#: what a metric's unit says it is, for the 'kind' column
_KIND_BY_UNIT = {"bytes": "memory", "count": "count", "seconds": "time"}


def metric_label(metric: str, kind: str) -> str:
    """What a compared metric is, for the 'kind' column: ``memory`` (``estimated``, or
    ``measured`` when compared like a timing), ``count``, ``op count``, ``host syncs``,
    ``time``; the comparison's own kind (``deterministic``/``timed``) for others.

    >>> metric_label("memory_under.peak_bytes", "timed"), metric_label("flops_under.flops", "deterministic")
    ('memory (measured)', 'count')
    >>> metric_label("no_host_sync.ops", "deterministic")
    'op count'
    """
    if metric in ("no_host_sync.ops", "vectorized.ops_by_batch_size"):
        return "op count"
    if metric == "no_host_sync.count":
        return "host syncs"
    if metric == "throughput_at_least.calibration_s":
        return "time (calibration)"
    what = _KIND_BY_UNIT.get(_unit(metric))
    if what is None:
        return "shapes" if metric == "shapes_consistent.runs" else kind
    if what == "memory":
        return f"memory ({'measured' if kind == 'timed' else 'estimated'})"
    return what


def comparison_cells(c) -> list:
    """Cells of one comparison: test, metric, old, new, change, kind, detail. The kind says
    what the metric is (:func:`metric_label`); a metric whose key misleads is named beside it
    (``no_host_sync.ops`` counts dispatched ops, not host syncs).

    >>> from pytest_modelcheck.core.baseline import Comparison
    >>> comparison_cells(Comparison("t::a", "memory_under.peak_bytes", "timed", 1024, 2048,
    ...                             1.0, "regressed"))
    ['t::a', 'memory_under.peak_bytes', '1.00 KiB', '2.00 KiB', '+100.0%', 'memory (measured)', '']
    >>> comparison_cells(Comparison("t::a", "no_host_sync.ops", "deterministic", 120, 140,
    ...                             1 / 6, "regressed", "exact"))[1:6]
    ['no_host_sync.ops (dispatched ops: op count, not host syncs)', '120', '140', '+16.7%', 'op count']
    """
    unit = _unit(c.metric)
    change = f"{c.change:+.1%}" if c.change is not None else "-"
    label = METRIC_LABELS.get(c.metric)
    metric = f"{c.metric} ({label})" if label else c.metric
    return [c.nodeid, metric, format_value(c.old, unit), format_value(c.new, unit), change,
            metric_label(c.metric, c.kind), c.detail]


def render_markdown(rows: list, comparisons: Optional[list] = None) -> str:
    """The job summary: regressions (when compared with a baseline), inconclusive timings
    (reported, not failing), then model health.

    >>> rows = [{"nodeid": "t.py::test_a", "model": {"parameters": 1234},
    ...          "results": [{"check": "grads_finite", "passed": False, "metrics": {}}]}]
    >>> print(render_markdown(rows))
    ## Model checks
    <BLANKLINE>
    1 model test, 1 check, 1 failed.
    <BLANKLINE>
    ### Model health
    <BLANKLINE>
    | test | params | peak memory | throughput | checks passed | failed |
    |---|---|---|---|---|---|
    | t.py::test_a | 1.23k | - | - | 0/1 | grads_finite |
    <BLANKLINE>
    """
    rows = sorted(rows, key=lambda r: r["nodeid"])
    n_checks = sum(len(r["results"]) for r in rows)
    n_failed, n_xfailed, n_xpassed = failed_counts(rows)
    expected = (f", {n_xfailed} failed as expected (xfail)" if n_xfailed else "") + (
        f", {n_xpassed} test{'s' if n_xpassed != 1 else ''} passed though marked xfail (xpass)"
        if n_xpassed else "")
    out = ["## Model checks", "",
           f"{len(rows)} model test{'s' if len(rows) != 1 else ''}, {n_checks}"
           f" check{'s' if n_checks != 1 else ''}, {n_failed} failed{expected}.", ""]
    if comparisons is not None:
        regressed = [c for c in comparisons if c.verdict == "regressed"]
        improved = [c for c in comparisons if c.verdict == "improved"]
        unsure = [c for c in comparisons if c.verdict == "inconclusive"]
        skipped = sum(1 for c in comparisons if c.verdict == "skipped: other machine")
        other_par = sum(1 for c in comparisons if c.verdict == "skipped: other parallelism")
        new = sum(1 for c in comparisons if c.verdict == "new")
        header = ["test", "metric", "old", "new", "change", "kind", "how"]
        if regressed:
            out += [f"### :x: {len(regressed)} regression{'s' if len(regressed) != 1 else ''}"
                    " against the baseline", ""]
            out += _table(header, [comparison_cells(c) for c in regressed]) + [""]
        else:
            out += ["### :white_check_mark: no regressions against the baseline", ""]
        if unsure:
            out += [f":warning: {len(unsure)} timed metric{'s' if len(unsure) != 1 else ''}"
                    " inconclusive: a change beyond the threshold that the samples, the load"
                    " or the parallelism do not establish (not failing).", ""]
            out += _table(header, [comparison_cells(c) for c in unsure]) + [""]
        if improved:
            out += [f"<details><summary>{len(improved)} improved</summary>", ""]
            out += _table(header, [comparison_cells(c) for c in improved]) + ["", "</details>", ""]
        notes = [f"{len(comparisons)} metrics compared"]
        if new:
            notes.append(f"{new} new (not in the baseline)")
        if skipped:
            notes.append(f"{skipped} timed metrics skipped (baseline from another machine)")
        if other_par:
            notes.append(f"{other_par} timed metrics skipped (timed under another parallelism"
                         " than the baseline: save it under the same -n / --modelcheck-threads)")
        out += ["; ".join(notes) + ".", ""]
    cells = [health_row(r) for r in rows]
    out += ["### Model health", ""]
    out += _table(["test", "params", "peak memory", "throughput", "checks passed", "failed"],
                  [[c["test"], c["params"], c["peak"], c["throughput"], c["checks"],
                    "; ".join(x for x in (c["failed"], c["note"]) if x) or "-"]
                   for c in cells])
    return "\n".join(out) + "\n"


def write_markdown(path: str, text: str, *, append: bool = False) -> None:
    """Write the summary to ``path``; ``append=True`` adds to it (``$GITHUB_STEP_SUMMARY`` is
    shared by the steps of a job), otherwise the file is replaced atomically.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "summary.md")
    >>> write_markdown(p, "a\\n"); write_markdown(p, "b\\n", append=True)
    >>> with open(p) as fh:
    ...     print(fh.read(), end="")
    a
    b
    """
    from ..core.files import atomic_write_text

    if append:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
    else:
        atomic_write_text(path, text)
