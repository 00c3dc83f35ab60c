"""Baselines of model metrics, saved from one run and compared against a later one.

A baseline file holds, per machine fingerprint and per test, the metrics that the checks
reported. Metrics are of two kinds (see :data:`METRIC_KINDS`):

* **deterministic** (parameters, FLOPs/MACs, dispatched op counts, host syncs, estimated peak
  memory, output shapes): the same code gives the same number on any machine, so they are
  compared exactly, or within an explicit relative tolerance;
* **timed** (per-run latencies, memory measured on the device): they vary from run to run and
  from machine to machine, so they are compared statistically (:func:`~.stats.timed_regression`)
  and only against a baseline saved on a machine with the same fingerprint. Each timed metric
  also records the parallelism it was measured under (torch threads, pytest-xdist workers) and
  the machine's load per core; a timing from another parallelism is not judged ('skipped:
  other parallelism'), and one that a loaded session or an unknown parallelism could explain is
  'inconclusive' instead of 'regressed' (:func:`compare`).

Saving merges into an existing file under an exclusive lock (``fcntl.flock`` on a lock file
in the temporary directory named after the baseline's real path, so that none is left beside
the committed file) and replaces the file atomically: concurrent writers (pytest-xdist,
several CI jobs on one runner) lose nothing, and a writer killed mid-write leaves the old file
intact. A lock file that cannot be used (a directory, another user's file) never costs the
run's results: another lock is taken, or the file is saved without one, with a warning.
A baseline path that is a symbolic link is followed: the link's target is updated.

Loading checks the whole structure: a malformed entry, a non-finite number (``NaN``,
``Infinity``) or nesting deeper than :data:`MAX_DEPTH` is refused with one line naming the
file and the entry. Saving never fails on such an entry of the existing file: it is dropped,
with a warning, and this run's results are written.
The comparison itself (:class:`Comparison`, :func:`compare`, :func:`regressions`,
:func:`format_value`) lives in :mod:`.baseline_compare` and is re-exported here.
Nothing here imports pytest; torch is imported only by :func:`machine_fingerprint`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import UsageError

__all__ = ["MetricKind", "METRIC_KINDS", "metric_kind", "machine_fingerprint", "Baseline",
           "BaselineError", "BaselineWarning", "Comparison", "compare", "regressions",
           "format_value", "FORMAT", "MAX_DEPTH"]

FORMAT = "pytest-modelcheck-baseline/1"
MODEL = "model"  # pseudo check name for the per-test model facts (row["model"])



def lock_path(path: str) -> str:
    """The lock file that serialises writers of the baseline at ``path``: in the temporary
    directory, named after the baseline's real path (every writer on this machine agrees on
    it; nothing is left beside the baseline).

    >>> import os, tempfile
    >>> lock_path("a/baseline.json") == lock_path(os.path.abspath("a/baseline.json"))
    True
    >>> os.path.dirname(lock_path("a/baseline.json")) == tempfile.gettempdir()
    True
    """
    import tempfile

    real = os.path.realpath(os.fspath(path))
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(tempfile.gettempdir(), f"modelcheck-baseline-{digest}.lock")


def _open_lock(path: str) -> tuple:
    """``(fd, None)`` for a regular file at ``path`` that can be locked (created when absent,
    opened read-only when it is another user's), or ``(None, why)``."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)
    except OSError as first:
        try:  # another user's lock file: flock needs no write access
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError:
            return None, first.strerror or str(first)
    import stat

    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None, "not a regular file"
    return fd, None


@contextlib.contextmanager
def _locked(real: str, notes: list):
    """Hold an exclusive lock for writing the baseline whose real path is ``real``; yields
    True when it is the lock every writer of this file shares (:func:`lock_path`). A lock
    file that cannot be used falls back to one of this user's, and at worst to none; each
    fallback adds a line to ``notes``."""
    import fcntl

    shared = lock_path(real)
    candidates = [(shared, True)]
    if hasattr(os, "getuid"):
        candidates.append((shared[:-len(".lock")] + f"-uid{os.getuid()}.lock", False))
    for path, is_shared in candidates:
        fd, why = _open_lock(path)
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                os.close(fd)
                fd, why = None, exc.strerror or str(exc)
        if fd is None:
            notes.append(f"lock file {path} cannot be used ({why})")
            continue
        try:
            yield is_shared
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    notes.append("saved without a lock: a concurrent writer may lose its results")
    yield False

class BaselineError(UsageError):
    """A baseline file that cannot be read; the message is one line naming the file."""


class BaselineWarning(UserWarning):
    """A baseline was saved, but not as asked: malformed entries of the existing file were
    dropped, or the lock file could not be used."""


#: The deepest nesting of lists and objects accepted inside one metric value of a baseline.
MAX_DEPTH = 32
_KINDS = ("deterministic", "timed", "calibration")


def _show(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


#: How results write a non-finite number (``repr``: :meth:`~.result.CheckResult.to_dict`)
#: and how a JSON report writes one: never a value to compare.
NON_FINITE_TEXT = frozenset({"nan", "inf", "-inf", "NaN", "Infinity", "-Infinity"})


def _value_problem(value: Any, depth: int = 0) -> Optional[str]:
    """Why a metric value cannot be compared (None when it can): a non-finite number (or
    its text, as results write it), an integer beyond a float's range, nesting deeper than
    :data:`MAX_DEPTH`.

    >>> _value_problem(3), _value_problem(float("nan")), _value_problem("-inf")
    (None, 'holds a non-finite number (nan)', "holds a non-finite number ('-inf')")
    """
    if isinstance(value, str):
        return f"holds a non-finite number ({value!r})" if value in NON_FINITE_TEXT else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            return "holds an integer too large to compare"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"holds a non-finite number ({value!r})"
    if isinstance(value, (list, dict)):
        if depth >= MAX_DEPTH:
            return f"is nested more than {MAX_DEPTH} levels deep"
        items = value.values() if isinstance(value, dict) else value
        for v in items:
            problem = _value_problem(v, depth + 1)
            if problem:
                return problem
        return None
    return f"holds a {type(value).__name__}"


def _context_problem(entry: dict) -> Optional[str]:
    """Why the optional measuring context of a timed metric (``parallelism``,
    ``load_per_core``) is malformed, or None. Absent keys are fine: older files lack them.

    >>> _context_problem({"parallelism": {"threads": 2, "xdist_workers": None}})
    >>> _context_problem({"parallelism": {"threads": 0}, "load_per_core": 0.5})
    'has parallelism threads 0, expected a count >= 1 or null'
    """
    par = entry.get("parallelism")
    if par is not None:
        if not isinstance(par, dict):
            return f"has parallelism {_show(par)}, expected an object"
        for key, v in par.items():
            if key not in PARALLELISM:
                return f"has parallelism key {_show(key)}, expected {' or '.join(PARALLELISM)}"
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                return f"has parallelism {key} {_show(v)}, expected a count >= 1 or null"
    load = entry.get("load_per_core")
    if load is not None and (isinstance(load, bool) or not isinstance(load, (int, float))
                             or not math.isfinite(load) or load < 0):
        return f"has load_per_core {_show(load)}, expected a number >= 0 or null"
    return None


def _metric_problem(entry: Any) -> Optional[str]:
    """Why one stored metric (``{"kind", "value" | "samples"}``) is malformed, or None."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, expected an object"
    if entry.get("kind") not in _KINDS:
        return f"has kind {_show(entry.get('kind'))}, expected one of {', '.join(_KINDS)}"
    problem = _context_problem(entry)
    if problem:
        return problem
    if "samples" in entry:
        samples = entry["samples"]
        if not (isinstance(samples, list) and samples and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in samples)):
            return "has samples that are not a non-empty list of numbers"
        return _value_problem(samples)
    if "value" not in entry:
        return "has neither 'value' nor 'samples'"
    return _value_problem(entry["value"])


def _checked(data: dict, where: str = "") -> tuple:
    """``(machines, entries, saved, problems)``: the well-formed parts of a baseline document
    and one line per malformed entry that was left out.

    >>> m, e, s, problems = _checked({"machines": {"a": {}}, "saved": {"a": 1.0},
    ...     "entries": {"a": {"t::x": {"model.parameters": {"kind": "deterministic",
    ...                                                    "value": float("nan")}}}, "b": []}})
    >>> e
    {'a': {}}
    >>> for line in problems:
    ...     print(line)
    entries['a']['t::x']['model.parameters'] holds a non-finite number (nan)
    entries['b'] is a list, expected an object
    """
    problems: list = []
    machines: dict = {}
    saved: dict = {}
    entries: dict = {}
    for key, fp in data.get("machines", {}).items():
        if isinstance(fp, dict) and _value_problem(fp) is None:
            machines[key] = fp
        else:
            problems.append(f"{where}machines[{_show(key)}] "
                            + (_value_problem(fp) or f"is a {type(fp).__name__},"
                                                     f" expected an object"))
    for key, when in data.get("saved", {}).items():
        if isinstance(when, (int, float)) and not isinstance(when, bool) and \
                _value_problem(when) is None:
            saved[key] = when
        else:
            problems.append(f"{where}saved[{_show(key)}] is {_show(when)}, expected a time")
    for key, tests in data.get("entries", {}).items():
        if not isinstance(tests, dict):
            problems.append(f"{where}entries[{_show(key)}] is a {type(tests).__name__},"
                            f" expected an object")
            continue
        kept = entries[key] = {}
        for nodeid, metrics in tests.items():
            if not isinstance(metrics, dict):
                problems.append(f"{where}entries[{_show(key)}][{_show(nodeid)}] is a"
                                f" {type(metrics).__name__}, expected an object")
                continue
            good = {}
            for name, entry in metrics.items():
                problem = _metric_problem(entry)
                if problem:
                    problems.append(f"{where}entries[{_show(key)}][{_show(nodeid)}]"
                                    f"[{_show(name)}] {problem}")
                else:
                    good[name] = entry
            if good:
                kept[nodeid] = good
    return machines, entries, saved, problems


@dataclass(frozen=True)
class MetricKind:
    """How one metric is compared.

    ``kind`` is ``'deterministic'`` or ``'timed'``; ``better`` is ``'lower'``, ``'higher'`` or
    ``'equal'`` (any change is a regression); ``tolerance`` is the relative change allowed for a
    deterministic metric and the ratio threshold for a timed one; ``unit`` says how to print.

    >>> METRIC_KINDS[("flops_under", "flops")].kind
    'deterministic'
    """

    kind: str
    better: str = "lower"
    tolerance: float = 0.0
    unit: str = ""


_DET = "deterministic"
#: (check name, metric key) -> how it is compared. Keys absent here are not baselined.
METRIC_KINDS: dict = {
    (MODEL, "parameters"): MetricKind(_DET, unit="count"),
    ("params_under", "params"): MetricKind(_DET, unit="count"),
    ("flops_under", "flops"): MetricKind(_DET, unit="count"),
    ("flops_under", "macs"): MetricKind(_DET, unit="count"),
    ("flops_under", "forward_flops"): MetricKind(_DET, unit="count"),
    ("flops_under", "backward_flops"): MetricKind(_DET, unit="count"),
    ("no_host_sync", "count"): MetricKind(_DET, unit="count"),
    ("no_host_sync", "ops"): MetricKind(_DET, unit="count"),
    ("vectorized", "ops_by_batch_size"): MetricKind(_DET, unit="count"),
    ("memory_under", "peak_bytes"): MetricKind(_DET, unit="bytes"),  # measured: see metric_kind
    ("shapes_consistent", "runs"): MetricKind(_DET, better="equal"),
    ("throughput_at_least", "times_s"): MetricKind("timed", tolerance=0.20, unit="seconds"),
    # the session's speed (core.timing.calibration_times): kept to normalize times_s, not compared
    ("throughput_at_least", "calibration_s"): MetricKind("calibration", unit="seconds"),
}
#: timed metric -> the calibration metric recorded beside it in the same result
CALIBRATED_BY = {"throughput_at_least.times_s": "throughput_at_least.calibration_s"}

#: measured (not estimated) peak memory: compared on the same machine, 5% allowed.
MEASURED_MEMORY = MetricKind("timed", tolerance=0.05, unit="bytes")
#: Timed medians closer than this (seconds per run) are never a regression: below it, a tiny
#: forward's time follows the load of a shared runner from one session to the next.
TIMED_RESOLUTION_S = 50e-6
#: The parallelism a timed metric records (``{"threads": n, "xdist_workers": n}``, null when
#: unknown): torch intra-op threads and pytest-xdist workers of the session that timed it.
PARALLELISM = ("threads", "xdist_workers")
#: Loads per core (mean of the 1-minute load average before and after the timing, divided by
#: the cores) of the two sessions that differ by more than this make a timed regression
#: 'inconclusive': half a core's worth of other runnable work per core changes how often a
#: timing loop is descheduled, by more than the calibration run (taken at another moment)
#: can correct. An idle runner's sessions differ by far less (a pytest process alone is
#: 1/cores); one extra busy process on a 2-core machine is exactly 0.5, and with the pytest
#: process it reaches :data:`OVERSUBSCRIBED_LOAD`.
LOAD_MARGIN = 0.5
#: A session whose load per core reached this had more runnable tasks than cores: every
#: timing of it may have waited for a core, so its regressions are 'inconclusive'.
OVERSUBSCRIBED_LOAD = 1.0


def metric_kind(check: str, key: str, estimated: bool = True) -> Optional[MetricKind]:
    """The :class:`MetricKind` of a metric, or None when it is not baselined.

    Peak memory is deterministic when estimated (fake tensors) and timed when measured.

    >>> metric_kind("memory_under", "peak_bytes", estimated=False).kind
    'timed'
    >>> metric_kind("grads_finite", "loss") is None
    True
    """
    kind = METRIC_KINDS.get((check, key))
    if kind is not None and (check, key) == ("memory_under", "peak_bytes") and not estimated:
        return MEASURED_MEMORY
    return kind


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_fingerprint() -> dict:
    """Facts that decide whether timings are comparable, and a stable short hash ``key``.

    >>> fp = machine_fingerprint()
    >>> sorted(fp) == ['cores', 'cpu', 'cuda', 'gpu', 'key', 'machine', 'python', 'system', 'torch']
    True
    >>> len(fp["key"]), fp["key"] == machine_fingerprint()["key"]
    (12, True)
    """
    facts = {"cpu": _cpu_model(), "cores": os.cpu_count() or 0, "machine": platform.machine(),
             "system": platform.system(), "python": platform.python_version(), "torch": None,
             "cuda": None, "gpu": None}
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    if torch is not None:
        facts["torch"] = torch.__version__.split("+")[0]
        facts["cuda"] = torch.version.cuda
        try:
            if torch.cuda.is_available():
                facts["gpu"] = torch.cuda.get_device_name(0)
        except Exception:  # a broken driver must not break the test session
            facts["gpu"] = None
    blob = json.dumps(facts, sort_keys=True).encode()
    facts["key"] = hashlib.sha256(blob).hexdigest()[:12]
    return facts


def _count(value: Any) -> Optional[int]:
    """A count >= 1 from a metric (an int, or its text as an environment variable gives it),
    else None."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


def _measured_under(metrics: dict) -> dict:
    """The context a timing was measured under, from the same result's metrics:
    ``parallelism`` (torch threads, xdist workers; null when not reported) and
    ``load_per_core`` (mean of ``load_before`` and ``load_after`` over ``cores``). Keys the
    result does not report are left out (unknown).

    >>> _measured_under({"threads": 2, "xdist_workers": "1", "load_before": 0.5,
    ...                  "load_after": 1.5, "cores": 4})
    {'parallelism': {'threads': 2, 'xdist_workers': 1}, 'load_per_core': 0.25}
    >>> _measured_under({"times_s": [0.1]})
    {}
    """
    out: dict = {}
    par = {key: _count(metrics.get(key)) for key in PARALLELISM}
    if any(v is not None for v in par.values()):
        out["parallelism"] = par
    loads = [v for v in (metrics.get("load_before"), metrics.get("load_after"))
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             and v >= 0]
    cores = _count(metrics.get("cores"))
    if loads and cores:
        out["load_per_core"] = round(sum(loads) / len(loads) / cores, 4)
    return out


def _flatten(check: str, metrics: dict, estimated: bool) -> dict:
    """``{"check.key": {"kind", "value" | "samples"}}`` for the baselined metrics of a result."""
    out = {}
    for key, value in metrics.items():
        kind = metric_kind(check, key, estimated)
        if kind is None or value is None:
            continue
        name = f"{check}.{key}"
        if kind.kind == "calibration" and isinstance(value, list):
            samples = [float(v) for v in value if isinstance(v, (int, float))]
            if samples:
                out[name] = {"kind": "calibration", "samples": samples}
        elif kind.kind == "timed" and isinstance(value, list):
            # a non-finite time (written 'inf' by the result) is kept: compare reports it
            samples = [float(v) for v in value if isinstance(v, (int, float))
                       or v in NON_FINITE_TEXT]
            if samples:
                out[name] = {"kind": "timed", "samples": samples, **_measured_under(metrics)}
        elif kind.kind == "timed":
            out[name] = {"kind": "timed", "value": value}
        else:
            out[name] = {"kind": _DET, "value": value}
    return out


def _row_metrics(row: dict) -> dict:
    out = {}
    out.update(_flatten(MODEL, row.get("model") or {}, True))
    for r in row.get("results", []):
        if r.get("passed") is None:
            continue
        out.update(_flatten(r["check"], r.get("metrics") or {}, bool(r.get("estimated", False))))
    return out


@dataclass
class Baseline:
    """Saved metrics: ``machines[key] = fingerprint`` and ``entries[key][nodeid][metric]``.

    >>> rows = [{"nodeid": "t.py::test_a", "model": {"parameters": 10}, "results": []}]
    >>> b = Baseline.from_rows(rows, {"key": "abc"})
    >>> b.entries["abc"]["t.py::test_a"]["model.parameters"]["value"]
    10
    """

    machines: dict = field(default_factory=dict)
    entries: dict = field(default_factory=dict)
    saved: dict = field(default_factory=dict)  # machine key -> unix time of its last save

    @classmethod
    def from_rows(cls, rows: list, fingerprint: dict) -> "Baseline":
        """A baseline of the collected rows (``{"nodeid", "model", "results"}``) of one run."""
        key = fingerprint["key"]
        tests = {row["nodeid"]: _row_metrics(row) for row in rows}
        return cls(machines={key: dict(fingerprint)},
                   entries={key: {k: v for k, v in tests.items() if v}},
                   saved={key: time.time()})

    def to_dict(self) -> dict:
        return {"format": FORMAT, "machines": self.machines, "saved": self.saved,
                "entries": self.entries}

    def merged_into(self, older: "Baseline") -> "Baseline":
        """``older`` updated with this baseline: same machine and test replaced, rest kept.

        >>> old = Baseline({"m": {}}, {"m": {"a": {"x": 1}, "b": {"x": 2}}}, {"m": 1.0})
        >>> new = Baseline({"m": {}}, {"m": {"b": {"x": 3}}}, {"m": 2.0})
        >>> new.merged_into(old).entries
        {'m': {'a': {'x': 1}, 'b': {'x': 3}}}
        """
        out = Baseline(dict(older.machines), {k: dict(v) for k, v in older.entries.items()},
                       dict(older.saved))
        for key, tests in self.entries.items():
            out.machines[key] = self.machines.get(key, out.machines.get(key, {}))
            out.entries.setdefault(key, {}).update(tests)
            out.saved[key] = self.saved.get(key, time.time())
        return out

    def save(self, path: str, *, warn: bool = True) -> list:
        """Merge into the file at ``path`` (kept: other machines, other tests) atomically,
        under an exclusive lock (:func:`lock_path`); returns the notes on what was not as
        asked (also issued as one :class:`BaselineWarning` when ``warn``), else ``[]``.

        A symbolic link at ``path`` is followed. Malformed entries of the existing file and
        non-finite values of this baseline are left out, with a note; a lock file that cannot
        be used gives another lock, or none, with a note. A file that is not a baseline at
        all raises :class:`BaselineError` and is kept.

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "baseline.json")
        >>> Baseline({"m": {}}, {"m": {"a": {"x": {"kind": "deterministic", "value": 1}}}}).save(p)
        []
        >>> Baseline({"m": {}}, {"m": {"b": {"x": {"kind": "deterministic", "value": 2}}}}).save(p)
        []
        >>> sorted(Baseline.load(p).entries["m"])
        ['a', 'b']
        """
        from .files import atomic_write_text, remove_stale_temps, _tmp_prefix

        path = os.fspath(path)
        real = os.path.realpath(path)
        os.makedirs(os.path.dirname(real), exist_ok=True)
        notes: list = []
        with _locked(real, notes) as shared:
            if shared:  # every writer of this file holds this lock: its temps are leftovers
                remove_stale_temps(os.path.dirname(real), _tmp_prefix(real), older_than=0)
            older, dropped = Baseline._load(real, lenient=True)
            *parts, bad = _checked(self.to_dict(), "this run's ")
            merged = Baseline(*parts).merged_into(older)
            dropped += bad
            atomic_write_text(real, json.dumps(merged.to_dict(), indent=1, sort_keys=True,
                                               allow_nan=False) + "\n")
        if dropped:
            shown = "; ".join(dropped[:3]) + (f"; and {len(dropped) - 3} more"
                                              if len(dropped) > 3 else "")
            notes.append(f"left out {len(dropped)} malformed entr"
                         f"{'y' if len(dropped) == 1 else 'ies'} ({shown})")
        if notes and warn:
            warnings.warn(BaselineWarning(f"baseline {path}: this run's results were saved;"
                                          f" {'; '.join(notes)}"), stacklevel=2)
        return notes

    @classmethod
    def load(cls, path: str) -> "Baseline":
        """The baseline in ``path``; an empty one when the file does not exist. A file that
        is not a well-formed baseline raises :class:`BaselineError`, one line naming the file
        and the first bad entry.

        >>> Baseline.load("/nonexistent/baseline.json").entries
        {}
        """
        return cls._load(os.fspath(path), lenient=False)[0]

    @classmethod
    def _load(cls, path: str, lenient: bool) -> tuple:
        """``(baseline, problems)``; with ``lenient`` malformed entries are left out and
        listed in ``problems`` instead of raising."""
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            return cls(), []
        except UnicodeDecodeError:
            raise BaselineError(f"baseline {path}: not a text (UTF-8 JSON) file; delete it or"
                                f" save a new baseline") from None
        except OSError as exc:
            raise BaselineError(f"baseline {path}: cannot be read ({exc.strerror})") from None
        try:
            data = json.loads(text)
        except RecursionError:
            raise BaselineError(f"baseline {path}: nested too deeply to be a baseline; delete"
                                f" it or save a new baseline") from None
        except ValueError as exc:
            raise BaselineError(f"baseline {path}: not valid JSON ({exc}); delete it or save a"
                                f" new baseline") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not all(
                isinstance(data.get(k, {}), dict) for k in ("machines", "entries", "saved")):
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise BaselineError(f"baseline {path}: expected a {FORMAT!r} file, found"
                                f" {_show(found)}; delete it or save a new baseline")
        machines, entries, saved, problems = _checked(data)
        if problems and not lenient:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BaselineError(f"baseline {path}: {problems[0]}{more}; fix or delete that"
                                f" entry, or delete the file and save a new baseline")
        return cls(machines, entries, saved), problems


# The comparison lives in baseline_compare.py (it imports from here); its names stay
# importable from this module.
from .baseline_compare import (Comparison, compare, format_value,  # noqa: E402,F401
                               regressions)
