"""Hand our timings to pytest-benchmark, so they join its table, JSON, saved runs and compares.

pytest-benchmark keeps one ``BenchmarkSession`` per run; it registers it with pytest's plugin
manager under the name ``"pytest-benchmark"`` and turns its ``benchmarks`` list (of
``pytest_benchmark.stats.Metadata``) into the terminal table, ``--benchmark-json``,
``--benchmark-save`` files and ``--benchmark-compare``/``--benchmark-compare-fail`` verdicts at
session finish. :func:`add_timings` appends one ``Metadata`` built from per-run times that a
check already measured (``throughput_at_least`` records ``metrics["times_s"]``), so nothing is
timed twice. Without pytest-benchmark, or with it disabled (``--benchmark-disable``, or under
pytest-xdist, where it disables itself), nothing happens.

pytest-benchmark's terminal table is left to the user's pytest-benchmark options: when every
entry is one of ours and no ``--benchmark-*`` option was given (command line, ``addopts``,
``PYTEST_ADDOPTS``), :func:`show_benchmark_table` says no and the plugin's
``pytest_benchmark_group_stats`` wrapper hands pytest-benchmark no group to display.

Nothing here imports pytest or torch; pytest-benchmark is imported only when its session exists.
"""
from __future__ import annotations

import math
from typing import Any, Optional

PLUGIN_NAME = "pytest-benchmark"   # name pytest-benchmark registers its session under
DEFAULT_GROUP = "modelcheck"


class _Source:
    """The fixture-like object ``Metadata`` reads its identity from (name, group, params...)."""

    def __init__(self, name: str, fullname: str, group: Optional[str], extra: dict):
        self.name = name
        self.fullname = fullname
        self.group = group
        self.param = None
        self.params = None
        self.extra_info = extra
        self.cprofile_stats = None
        self.has_error = False


def benchmark_session(config_or_session: Any) -> Any:
    """pytest-benchmark's live session for a pytest ``Config`` (or the session itself), or None.

    None when the plugin is not installed, not registered, or disabled for this run.

    >>> benchmark_session(None) is None
    True
    """
    if config_or_session is None:
        return None
    if hasattr(config_or_session, "benchmarks") and hasattr(config_or_session, "disabled"):
        bs = config_or_session
    else:
        manager = getattr(config_or_session, "pluginmanager", None)
        bs = manager.get_plugin(PLUGIN_NAME) if manager is not None else None
    if bs is None or getattr(bs, "disabled", True) or not hasattr(bs, "benchmarks"):
        return None
    return bs


def benchmark_names(nodeid: str, name: str) -> tuple:
    """(short name, full name) of the entry for check ``name`` of test ``nodeid``.

    The full name is the key ``--benchmark-compare`` matches saved runs by, so it is stable.

    >>> benchmark_names("tests/test_m.py::test_speed[cpu]", "throughput_at_least")
    ('test_speed[cpu]::throughput_at_least', 'tests/test_m.py::test_speed[cpu]::throughput_at_least')
    """
    short = nodeid.rsplit("::", 1)[-1]
    return f"{short}::{name}", f"{nodeid}::{name}"


def _clean_times(times_s: Any) -> list:
    out = []
    for t in times_s or ():
        try:
            v = float(t)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and v >= 0:
            out.append(v)
    return out


def add_timings(config_or_session: Any, nodeid: str, name: str, times_s: Any, *,
                group: Optional[str] = DEFAULT_GROUP, extra: Optional[dict] = None) -> Any:
    """Append a benchmark entry made of per-run ``times_s`` (seconds) to pytest-benchmark.

    ``config_or_session`` is a pytest ``Config`` (or pytest-benchmark's session). The entry is
    named ``<test name>::<name>`` (full name ``<nodeid>::<name>``), sits in ``group``, and carries
    ``extra`` as its ``extra_info``. Returns the entry, or None when pytest-benchmark is absent or
    disabled, or no time is finite. Calling it twice for the same full name replaces the entry.

    >>> add_timings(None, "t.py::test_a", "throughput_at_least", [0.01, 0.02]) is None
    True
    """
    bs = benchmark_session(config_or_session)
    if bs is None:
        return None
    times = _clean_times(times_s)
    if not times:
        return None
    from pytest_benchmark.stats import Metadata

    short, full = benchmark_names(nodeid, name)
    source = _Source(short, full, group, dict(extra or {}))
    entry = Metadata(source, iterations=1, options={"source": SOURCE,
                                                    "rounds": len(times)})
    for t in times:
        entry.update(t)
    bs.benchmarks[:] = [b for b in bs.benchmarks if getattr(b, "fullname", None) != full]
    bs.benchmarks.append(entry)
    return entry


def add_result_timings(config_or_session: Any, nodeid: str, results: list, *,
                       group: Optional[str] = DEFAULT_GROUP) -> list:
    """Call :func:`add_timings` for every result (``CheckResult`` or its dict) with ``times_s``.

    ``extra`` is the result's scalar metrics (samples/s, batch size, phase...). Returns the
    entries added.

    >>> add_result_timings(None, "t.py::test_a", [{"check": "throughput_at_least",
    ...                    "metrics": {"times_s": [0.1]}}])
    []
    """
    added = []
    for r in results:
        d = r.to_dict() if hasattr(r, "to_dict") else r
        metrics = d.get("metrics") or {}
        times = metrics.get("times_s")
        if not isinstance(times, list):
            continue
        extra = {k: v for k, v in metrics.items()
                 if isinstance(v, (int, float, str, bool)) and k != "times_s"}
        entry = add_timings(config_or_session, nodeid, d.get("check", "timing"), times,
                            group=group, extra=extra)
        if entry is not None:
            added.append(entry)
    return added


SOURCE = "pytest-modelcheck"  # options["source"] of our entries


def _is_ours(bench: Any) -> bool:
    options = bench.get("options") if isinstance(bench, dict) else getattr(bench, "options", None)
    return isinstance(options, dict) and options.get("source") == SOURCE


def benchmark_options_given(config: Any) -> bool:
    """Whether the user passed a ``--benchmark-*`` option: on the command line, in the ini
    file's ``addopts`` or in ``PYTEST_ADDOPTS``.

    >>> class Config:
    ...     class invocation_params:
    ...         args = ("--modelcheck", "--benchmark-columns=min,max")
    ...     def getini(self, name):
    ...         return []
    >>> benchmark_options_given(Config())
    True
    """
    import os
    import shlex

    args = list(getattr(getattr(config, "invocation_params", None), "args", ()) or ())
    try:
        args += list(config.getini("addopts") or ())
    except (ValueError, AttributeError):
        pass
    try:
        args += shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    except ValueError:
        pass
    return any(isinstance(a, str) and a.startswith("--benchmark") for a in args)


def show_benchmark_table(config: Any, benchmarks: Any) -> bool:
    """Whether pytest-benchmark should print its table: yes when some entry is not one of our
    timings (the user benchmarks something) or the user gave a ``--benchmark-*`` option.

    >>> ours = {"options": {"source": "pytest-modelcheck"}}
    >>> show_benchmark_table(None, [ours]), show_benchmark_table(None, [ours, {"options": {}}])
    (False, True)
    """
    if any(not _is_ours(b) for b in benchmarks or ()):
        return True
    return config is not None and benchmark_options_given(config)
