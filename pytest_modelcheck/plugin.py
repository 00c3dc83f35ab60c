"""pytest glue: options, ini keys, markers, fixtures, hooks and the health summary.

Nothing here computes a metric; checks live in ``pytest_modelcheck.checks`` and the library in
``pytest_modelcheck.core``. Importing this module does not import torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import pytest

from .checks.registry import CheckSpec, all_checks
from .core.errors import UsageError
from .core.result import CheckResult
from .fixture import ModelCheck, modelcheck  # noqa: F401 - the fixture pytest finds here
from .session import (COMPARISON_PROPERTY, DEFAULT_BASELINE, MODEL_PROPERTY,  # noqa: F401
                      PLUGIN_KEYS, PROPERTY, THREADS_PROPERTY, BoundMarker, ResultCollector,
                      SessionState, _budget, _device, _failure_text, _fixture, _loss_fixture,
                      _option, _record, _report_details, _run_check, _strict_timing, _threads,
                      _usage_failure, _warn_inconclusive, _wrap_comparison, bound_key,
                      session_key)
from .xdist import (EXCLUSIVE_HELP, EXCLUSIVE_MARKER, _configure_exclusive,  # noqa: F401
                    _mark_exclusive, _suffix_exclusive_ids, pytest_configure_node)

HEALTH_MARKER = "model_health"
HEALTH_HELP = (f"{HEALTH_MARKER}(checks='default', **declared): run check_model's default set"
               " (or the named checks) with the facts you declare, e.g. out=('B', 10),"
               " memory_under={'limit': '2 GiB'}")


# -- options -------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("modelcheck", "model checks (pytest-modelcheck)")
    group.addoption("--modelcheck", action="store_true", default=None, dest="modelcheck",
                    help="Run the model checks requested by markers and print the model health"
                         " summary. Default: off (ini: modelcheck).")
    group.addoption("--modelcheck-json", default=None, dest="modelcheck_json", metavar="PATH",
                    help="Write every check result to PATH as JSON. Default: none"
                         " (ini: modelcheck_json).")
    group.addoption("--modelcheck-device", default=None, dest="modelcheck_device",
                    metavar="DEVICE", help="Device the checks run on (cpu, cuda, cuda:1)."
                    " Default: the model's own device (ini: modelcheck_device).")
    group.addoption("--modelcheck-timeout", default=None, dest="modelcheck_timeout",
                    metavar="DURATION", help="Time budget of one check ('90s', '5 min'); a check"
                    " that overruns fails and the session goes on. Default: none"
                    " (ini: modelcheck_timeout).")
    parser.addini("modelcheck_timeout", "Time budget of one check. Default: none.", default="")
    group.addoption("--modelcheck-isolate", nargs="?", const="auto", default=None,
                    dest="modelcheck_isolate", metavar="MODE",
                    help="Run each check in a child process, so that a model that segfaults,"
                         " exits, aborts or hangs fails that check and the session goes on:"
                         " 'auto' (the bare option) forks where safe and spawns a fresh"
                         " interpreter once CUDA is initialised, 'spawn' always spawns, 'off'"
                         " runs in the test process. Write it as --modelcheck-isolate=MODE."
                         " Default: off (ini: modelcheck_isolate).")
    parser.addini("modelcheck_isolate", "Crash isolation of checks: off, auto or spawn."
                  " Default: off.", default="")
    group.addoption("--modelcheck-threads", default=None, dest="modelcheck_threads",
                    metavar="N", help="torch CPU threads while a test's checks run: 'auto' (one"
                    " thread for a small model or a loaded machine, else the cores divided among"
                    " the xdist workers), 'keep' (the process setting) or a number; the setting"
                    " is restored after each test. Default: auto (ini: modelcheck_threads).")
    parser.addini("modelcheck_threads", "torch CPU threads for the checks: auto, keep or a"
                  " number. Default: auto.", default="")
    group.addoption("--modelcheck-budget", default=None, dest="modelcheck_budget",
                    metavar="DURATION", help="Time budget of all the checks of one test ('60s');"
                    " once spent, the test's remaining checks are skipped and say so. Default:"
                    " none (ini: modelcheck_budget).")
    parser.addini("modelcheck_budget", "Time budget of all the checks of one test."
                  " Default: none.", default="")
    group.addoption("--modelcheck-strict-timing", action="store_true", default=None,
                    dest="modelcheck_strict_timing", help="Fail a throughput check whose"
                    " measurement is inconclusive (too noisy to tell) instead of passing it with"
                    " a warning. Default: off (ini: modelcheck_strict_timing).")
    parser.addini("modelcheck_strict_timing", "Fail inconclusive throughput checks."
                  " Default: false.", type="bool", default=False)
    group.addoption("--modelcheck-save-baseline", nargs="?", const=DEFAULT_BASELINE, default=None,
                    dest="modelcheck_save_baseline", metavar="PATH",
                    help="Record every model test's metrics into PATH (JSON, meant to be"
                         f" committed; merged under a lock). Default PATH: {DEFAULT_BASELINE}"
                         " (ini: modelcheck_save_baseline).")
    group.addoption("--modelcheck-baseline", default=None, dest="modelcheck_baseline",
                    metavar="PATH", help="Compare with the baseline at PATH and fail the tests"
                    " that regressed. Default: none (ini: modelcheck_baseline).")
    group.addoption("--modelcheck-markdown", default=None, dest="modelcheck_markdown",
                    metavar="PATH", help="Write a job-summary table (regressions first) to PATH;"
                    " appends when PATH is $GITHUB_STEP_SUMMARY. Default: none"
                    " (ini: modelcheck_markdown).")
    group.addoption("--modelcheck-html", default=None, dest="modelcheck_html", metavar="PATH",
                    help="Write one self-contained HTML report to PATH. Default: none"
                         " (ini: modelcheck_html).")
    group.addoption("--modelcheck-logdir", default=None, dest="modelcheck_logdir", metavar="DIR",
                    help="Write per-step CSV and TensorBoard event files of training-dynamics"
                         " checks under DIR, one run per test. Default: none"
                         " (ini: modelcheck_logdir).")
    for key, text in (("modelcheck_logdir", "Directory of per-step CSV/TensorBoard logs."),
                      ("modelcheck_save_baseline", "Baseline file to write."),
                      ("modelcheck_baseline", "Baseline file to compare with."),
                      ("modelcheck_markdown", "Markdown job summary to write."),
                      ("modelcheck_html", "HTML report to write.")):
        parser.addini(key, f"{text} Default: none.", default="")
    parser.addini("modelcheck", "Run model checks without --modelcheck. Default: false.",
                  type="bool", default=False)
    parser.addini("modelcheck_json", "Path of the JSON results file. Default: none.", default="")
    parser.addini("modelcheck_device", "Device the checks run on. Default: the model's device.",
                  default="")
    parser.addini("modelcheck_model_fixture", "Fixture that provides the model. Default: model.",
                  default="model")
    parser.addini("modelcheck_batch_fixture", "Fixture that provides the example batch."
                  " Default: batch.", default="batch")
    parser.addini("modelcheck_loss_fixture", "Fixture that provides the loss, used when a marker"
                  " gives no loss=. Default: loss_fn.", default="loss_fn")


def pytest_configure(config: pytest.Config) -> None:
    for spec in all_checks().values():
        config.addinivalue_line("markers", spec.marker_help())
    config.addinivalue_line("markers", HEALTH_HELP)
    _configure_exclusive(config)
    json_path = _option(config, "modelcheck_json") or None
    timeout = _option(config, "modelcheck_timeout") or None
    if timeout is not None:
        from .core.units import parse_duration

        try:
            timeout = parse_duration(timeout)
        except UsageError as exc:
            raise pytest.UsageError(f"--modelcheck-timeout / modelcheck_timeout: {exc}") from None
        if not 0 < timeout <= 1e7:
            raise pytest.UsageError(f"--modelcheck-timeout: expected a positive duration up to"
                                    f" 1e7 s (about 115 days), such as '90s', got {timeout!r}")
    state = SessionState(bool(_option(config, "modelcheck")), json_path, timeout)
    _configure_threads_budget(config, state)
    from .checks.sandbox import validate_isolate

    try:
        state.isolate = validate_isolate(_option(config, "modelcheck_isolate"))
    except UsageError as exc:
        raise pytest.UsageError(f"--modelcheck-isolate / modelcheck_isolate: {exc} (write"
                                f" --modelcheck-isolate=MODE before the test paths)") from None
    state.save_baseline = _option(config, "modelcheck_save_baseline") or None
    state.markdown_path = _option(config, "modelcheck_markdown") or None
    state.html_path = _option(config, "modelcheck_html") or None
    logdir = _option(config, "modelcheck_logdir") or None
    state.logdir = os.path.abspath(logdir) if logdir else None
    device = _option(config, "modelcheck_device") or None
    if device:
        from .checks.registry import validate_device

        try:
            validate_device(device)
        except UsageError as exc:
            raise pytest.UsageError(f"--modelcheck-device / modelcheck_device: {exc}") from None
    for option, path in (("--modelcheck-json", json_path),
                         ("--modelcheck-markdown", state.markdown_path),
                         ("--modelcheck-html", state.html_path),
                         ("--modelcheck-save-baseline", state.save_baseline)):
        _check_output_path(option, path)
    baseline_path = _option(config, "modelcheck_baseline") or None
    if baseline_path or state.save_baseline:
        from .core.baseline import Baseline, BaselineError, machine_fingerprint

        state.fingerprint = machine_fingerprint()
        if baseline_path:
            if not os.path.exists(baseline_path) and not _same_path(baseline_path,
                                                                     state.save_baseline):
                raise pytest.UsageError(
                    f"--modelcheck-baseline={baseline_path}: no such file; record one first"
                    f" with --modelcheck-save-baseline={baseline_path}")
            try:
                state.baseline = Baseline.load(baseline_path)
            except BaselineError as exc:
                raise pytest.UsageError(f"--modelcheck-baseline: {exc}") from None
        if state.save_baseline and isinstance(state.save_baseline, str) and (
                state.save_baseline.endswith(".py") or "::" in state.save_baseline):
            raise pytest.UsageError(
                f"--modelcheck-save-baseline took {state.save_baseline!r}, a test path, as the"
                f" baseline file; write --modelcheck-save-baseline=PATH (with '=') or put the"
                f" option after the test paths")
        if state.save_baseline and isinstance(state.save_baseline, str):
            try:  # the file is merged into at the end: a corrupt one is refused now
                Baseline.load(state.save_baseline)
            except BaselineError as exc:
                raise pytest.UsageError(f"--modelcheck-save-baseline: {exc}") from None
    config.stash[session_key] = state
    config.pluginmanager.register(ResultCollector(config), "modelcheck-results")


def _configure_threads_budget(config: pytest.Config, state: SessionState) -> None:
    """Validate --modelcheck-threads, --modelcheck-budget and --modelcheck-strict-timing."""
    from .checks.registry import validate_budget
    from .core.threads import validate_threads

    threads = _option(config, "modelcheck_threads")
    try:
        state.threads = validate_threads(threads)
    except UsageError as exc:
        raise pytest.UsageError(f"--modelcheck-threads / modelcheck_threads: {exc}") from None
    budget = _option(config, "modelcheck_budget") or None
    try:
        state.budget = validate_budget(budget)
    except UsageError as exc:
        raise pytest.UsageError(f"--modelcheck-budget / modelcheck_budget: {exc}") from None
    state.strict_timing = bool(_option(config, "modelcheck_strict_timing"))


def _same_path(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and \
        os.path.abspath(a) == os.path.abspath(b)


def _check_output_path(option: str, path: Any) -> None:
    """A report or baseline path must name a file under a writable directory (missing
    directories are made when the file is written)."""
    if not path or not isinstance(path, str):
        return
    if os.path.isdir(path):
        raise pytest.UsageError(f"{option}={path}: is a directory; expected a file path such as"
                                f" {os.path.join(path, 'report')}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # missing directories are created when it is written
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise pytest.UsageError(f"{option}={path}: {parent} is a file, not a directory; choose"
                                f" another path")
    if not os.access(parent, os.W_OK):
        raise pytest.UsageError(f"{option}={path}: the directory {parent} is not writable")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list) -> Any:
    _mark_exclusive(config, items)  # before xdist's own hook reads the groups
    result = yield
    _suffix_exclusive_ids(config, items)
    return result


# -- marker binding (setup, before any expensive work) -------------------------------------
def _markers(item: pytest.Item) -> list:
    names = set(all_checks()) | {HEALTH_MARKER}
    seen, found = set(), []
    for mark in item.iter_markers():
        if mark.name in names and mark.name not in seen:
            seen.add(mark.name)
            found.append(mark)
    return found


def _plans(mark: Any, kwargs: dict) -> list:
    if mark.name == HEALTH_MARKER:
        from .api import plan_checks

        if mark.args:
            raise UsageError(f"takes keyword arguments only, got {mark.args!r}")
        return plan_checks(kwargs.pop("checks", "default"), **kwargs)
    spec = all_checks()[mark.name]
    return [(spec, spec.bind(mark.args, kwargs))]


def _bind(item: pytest.Item) -> list:
    bound = []
    for mark in reversed(_markers(item)):  # top-down, as written
        kwargs = dict(mark.kwargs)
        try:
            model_fx = _fixture_name(kwargs, "model_fixture", item.config)
            batch_fx = _fixture_name(kwargs, "batch_fixture", item.config)
            plans = _plans(mark, kwargs)
        except UsageError as exc:
            _usage_failure(f"@pytest.mark.{mark.name}", exc)
        bound.append(BoundMarker(mark.name, _strict_timing(item.config, plans), model_fx,
                                 batch_fx))
    return bound


def _fixture_name(kwargs: dict, key: str, config: pytest.Config) -> str:
    """``model_fixture=`` / ``batch_fixture=`` from the marker, else the ini key's name."""
    if key not in kwargs:
        return config.getini(f"modelcheck_{key}")
    name = kwargs.pop(key)
    if not isinstance(name, str) or not name.isidentifier():
        raise UsageError(f"{key}={name!r}: expected the name of a fixture, such as"
                         f" {key.split('_')[0]!r}")
    return name


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if not _markers(item):
        return
    item.stash[bound_key] = _bind(item)
    if not item.config.stash[session_key].enabled:
        pytest.skip("model checks are off: run pytest with --modelcheck (or set modelcheck = true"
                    " in the ini file)")


# -- running the marked checks --------------------------------------------------------------


@dataclass
class _Subject:
    marker: BoundMarker
    model: Any
    batch: Any
    loss: Any


subjects_key = pytest.StashKey[list]()


@pytest.fixture(autouse=True)
def _modelcheck_subjects(request: pytest.FixtureRequest) -> None:
    """Resolve the model, batch and loss fixtures named by the test's check markers."""
    bound = request.node.stash.get(bound_key, None)
    if not bound:
        return
    subjects = []
    loss = _loss_fixture(request)
    for bm in bound:
        who = f"@pytest.mark.{bm.name}"
        subjects.append(_Subject(bm, _fixture(request, bm.model_fixture, who),
                                 _fixture(request, bm.batch_fixture, who), loss))
    request.node.stash[subjects_key] = subjects


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    subjects = item.stash.get(subjects_key, None)
    if not subjects:
        return (yield)
    from .checks.registry import run_plans
    from .core.threads import torch_threads

    device = _device(item.config)
    # the test's checks in order, under one thread choice and one time budget
    plans = [(spec, (s, values)) for s in subjects for spec, values in s.marker.plans]

    def run(spec: CheckSpec, job: tuple, left: Optional[float]) -> CheckResult:
        s, values = job
        try:
            return _run_check(item, spec, values, s.model, s.batch, s.loss, device, left)
        except UsageError as exc:
            _usage_failure(f"@pytest.mark.{s.marker.name}", exc)

    choice = _threads(item, subjects[0].model, subjects[0].batch)
    with torch_threads(choice.count):
        results = run_plans(plans, run, _budget(item))
    for result in results:
        result.metrics.setdefault("threads", choice.count)
        _record(item, result)
    regressed = _compare_with_baseline(item, results)
    _warn_inconclusive(item, results)
    from .report.benchmark_bridge import add_result_timings

    add_result_timings(item.config, item.nodeid, results)  # into pytest-benchmark when active
    if item.config.stash[session_key].logdir:
        from .report.runlog import write_run_logs

        write_run_logs(item.config.stash[session_key].logdir or "", item.nodeid, results)
    outcome = yield
    failed = [r for r in results if r.passed is False]
    if failed or regressed:
        _report_details(item, failed)
        text = _failure_text(failed) if failed else ""
        if regressed:
            from .report.terminal import comparison_line

            text += ("\n" if text else "") + f"{len(regressed)} metric(s) regressed against the" \
                " baseline:\n" + "\n".join(f"  {comparison_line(c)}" for c in regressed)
        pytest.fail(text, pytrace=False)
    return outcome


def _compare_with_baseline(item: pytest.Item, results: list) -> list:
    """Compare this test's metrics with the loaded baseline; returns the regressions."""
    state = item.config.stash[session_key]
    if state.baseline is None:
        return []
    from .core.baseline import compare

    model = next((v for k, v in item.user_properties if k == MODEL_PROPERTY), {})
    row = {"nodeid": item.nodeid, "model": model, "results": [r.to_dict() for r in results]}
    comparisons = compare(state.baseline, [row], state.fingerprint or {})
    item.user_properties.append((COMPARISON_PROPERTY, [c.to_dict() for c in comparisons]))
    return [c for c in comparisons if c.verdict == "regressed"]


@pytest.hookimpl(wrapper=True, optionalhook=True)
def pytest_benchmark_group_stats(config: pytest.Config, benchmarks: list, group_by: str) -> Any:
    """pytest-benchmark's table is left to the user's --benchmark-* options: when the only
    entries are our own timings and no such option was given, no group is displayed."""
    groups = yield
    from .report.benchmark_bridge import show_benchmark_table

    return groups if show_benchmark_table(config, benchmarks) else []
