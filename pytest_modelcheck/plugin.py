"""pytest glue: options, ini keys, markers, fixtures, hooks and the health summary.

Nothing here computes a metric; checks live in ``pytest_modelcheck.checks`` and the library in
``pytest_modelcheck.core``. Importing this module does not import torch.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from .checks.registry import CheckSpec, all_checks
from .core.errors import InconclusiveTimingWarning, UsageError
from .core.result import CheckResult

PROPERTY = "modelcheck"            # user_properties key of one CheckResult dict
MODEL_PROPERTY = "modelcheck_model"  # user_properties key of per-test model facts
COMPARISON_PROPERTY = "modelcheck_comparisons"  # baseline comparisons of one test
THREADS_PROPERTY = "modelcheck_threads"  # the torch thread choice of one test
PLUGIN_KEYS = ("model_fixture", "batch_fixture")
DEFAULT_BASELINE = ".modelcheck/baseline.json"


@dataclass
class SessionState:
    enabled: bool
    json_path: Optional[str]
    timeout: Optional[float] = None
    isolate: str = "off"            # crash isolation: off, auto (fork where safe) or spawn
    baseline: Any = None            # the loaded Baseline to compare against
    fingerprint: Optional[dict] = None
    save_baseline: Optional[str] = None
    markdown_path: Optional[str] = None
    html_path: Optional[str] = None
    comparisons: list = field(default_factory=list)
    logdir: Optional[str] = None
    rows: list = field(default_factory=list)  # one dict per model test (nodeid, results, model)
    baseline_notes: list = field(default_factory=list)  # what the baseline save did not do
    threads: Any = "auto"           # --modelcheck-threads: 'auto', 'keep' or a count
    budget: Optional[float] = None  # --modelcheck-budget: seconds for all checks of a test
    strict_timing: bool = False     # --modelcheck-strict-timing


@dataclass
class BoundMarker:
    """One marker with its checks bound: a check marker binds one check, ``model_health`` the
    default set (plus what it declares)."""

    name: str
    plans: list  # [(CheckSpec, bound values), ...]
    model_fixture: str
    batch_fixture: str


HEALTH_MARKER = "model_health"
HEALTH_HELP = (f"{HEALTH_MARKER}(checks='default', **declared): run check_model's default set"
               " (or the named checks) with the facts you declare, e.g. out=('B', 10),"
               " memory_under={'limit': '2 GiB'}")


session_key = pytest.StashKey[SessionState]()
bound_key = pytest.StashKey[list]()


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


def _option(config: pytest.Config, name: str) -> Any:
    value = config.getoption(name)
    return value if value is not None else config.getini(name)


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


def _usage_failure(who: str, exc: Exception) -> None:
    """Fail the test with a one-line usage message and no traceback or exception chain."""
    failure = pytest.fail.Exception(f"{who}: {exc}", pytrace=False)
    failure.__suppress_context__ = True
    raise failure


# -- tests that must have the accelerator to themselves (one xdist worker) ------------------
EXCLUSIVE_MARKER = "modelcheck_exclusive"
EXCLUSIVE_GROUP = "modelcheck-exclusive"
EXCLUSIVE_HELP = (f"{EXCLUSIVE_MARKER}: run on a single xdist worker: GPU-bound model tests"
                  " that must not share the device (needs --dist loadgroup, which"
                  " pytest-modelcheck picks when -n is given without --dist)")
WORKER_FLAG = "modelcheck_loadgroup"


def _dist_chosen_by_user(config: pytest.Config) -> bool:
    """Whether --dist / -d / --distload was given (command line, addopts, PYTEST_ADDOPTS)."""
    import shlex

    args = [str(a) for a in config.invocation_params.args]
    args += list(config.getini("addopts"))
    args += shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    return any(a in ("--dist", "-d", "--distload") or a.startswith("--dist=") for a in args)


def _configure_exclusive(config: pytest.Config) -> None:
    """Register the marker; on the xdist controller, turn the default ``load`` (what -n
    gives) into ``loadgroup`` so that the group is honoured. An explicit --dist is kept."""
    config.addinivalue_line("markers", EXCLUSIVE_HELP)
    if hasattr(config, "workerinput"):
        return
    if config.getoption("dist", None) == "load" and not _dist_chosen_by_user(config):
        config.option.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    # workers re-parse the command line, so they do not see a dist switched above
    node.workerinput[WORKER_FLAG] = node.config.getoption("dist", None) == "loadgroup"


def _mark_exclusive(config: pytest.Config, items: list) -> None:
    """Put every ``modelcheck_exclusive`` test in one xdist group."""
    if getattr(config, "workerinput", {}).get(WORKER_FLAG):
        config.option.loadgroup = True  # read by xdist's own modifyitems, which runs after
    if not config.pluginmanager.hasplugin("xdist"):
        return  # nothing to group; xdist_group is not even a registered marker then
    for item in items:
        if item.get_closest_marker(EXCLUSIVE_MARKER) is not None:
            item.add_marker(pytest.mark.xdist_group(EXCLUSIVE_GROUP))


def _suffix_exclusive_ids(config: pytest.Config, items: list) -> None:
    """Give exclusive tests the ``@group`` node-id suffix that ``--dist loadgroup`` schedules
    by, where pytest-xdist could not: xdist 3.8 writes ``item._nodeid``, which pytest 9's
    structured node ids ignore (pytest-dev/pytest-xdist#1386). A no-op where xdist did it."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        if item.get_closest_marker(EXCLUSIVE_MARKER) is None or "@" in item.nodeid:
            continue
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        new = f"{item.nodeid}@{'_'.join(names)}"
        if hasattr(item, "_id"):
            item._id = type(item._id).parse(new)
        else:
            item._nodeid = new


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


STRICT_CHECKS = ("throughput_at_least",)  # checks whose inconclusive timing strict= fails


def _strict_timing(config: pytest.Config, plans: list) -> list:
    """With --modelcheck-strict-timing, ``strict=True`` for the timed checks that take it and
    were not given ``strict=`` by the marker."""
    state = config.stash.get(session_key, None)
    if state is None or not state.strict_timing:
        return plans
    for spec, values in plans:
        if spec.name in STRICT_CHECKS and "strict" not in values and \
                any(p.name == "strict" for p in spec.user_params):
            values["strict"] = True
    return plans


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
def _fixture(request: pytest.FixtureRequest, name: str, who: str) -> Any:
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        missing = True
    if missing:
        _usage_failure(who, f"no fixture named {name!r}; define it, or name another with"
                            " model_fixture=/batch_fixture= on the marker or the ini keys"
                            " modelcheck_model_fixture/modelcheck_batch_fixture")


def _loss_fixture(request: pytest.FixtureRequest) -> Any:
    name = request.config.getini("modelcheck_loss_fixture")
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        return None


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


def _record(item: pytest.Item, result: CheckResult) -> None:
    item.user_properties.append((PROPERTY, result.to_dict()))


def _record_model(item: pytest.Item, model: Any, batch: Any = None) -> None:
    if any(k == MODEL_PROPERTY for k, _ in item.user_properties):
        return
    from .core.facts import model_facts

    timeout = item.config.stash[session_key].timeout
    item.user_properties.append((MODEL_PROPERTY, model_facts(model, batch, timeout=timeout)))


threads_key = pytest.StashKey[Any]()  # the test's ThreadChoice
budget_key = pytest.StashKey[Any]()   # the test's CheckBudget
tally_key = pytest.StashKey[list]()   # modelcheck fixture: [checks asked, checks run]


def _budget(item: pytest.Item) -> Any:
    """The test's time budget (one CheckBudget per test, shared by all its checks)."""
    budget = item.stash.get(budget_key, None)
    if budget is None:
        from .checks.registry import CheckBudget

        budget = item.stash[budget_key] = CheckBudget(item.config.stash[session_key].budget)
    return budget


def _threads(item: pytest.Item, model: Any, batch: Any) -> Any:
    """The test's thread choice, made once, before its first check: in the test process the
    model facts (forward FLOPs) are taken first, at the thread budget the machine allows, and
    decide; under --modelcheck-isolate the forward runs only in children, so the parameter
    count decides. Recorded as the ``modelcheck_threads`` user property."""
    choice = item.stash.get(threads_key, None)
    if choice is not None:
        return choice
    from .core.threads import choose_threads, machine_load, torch_threads

    state = item.config.stash[session_key]
    load = machine_load() if state.threads == "auto" else None
    first = choose_threads(state.threads, load=load)  # auto: the budget, size not yet known
    if state.isolate == "off":  # the facts are not a check: not charged to the time budget
        with torch_threads(first.count):
            _record_model(item, model, batch)
        facts = next((v for k, v in item.user_properties if k == MODEL_PROPERTY), {})
    elif state.threads == "auto":
        from .core.facts import model_facts

        facts = model_facts(model)  # no forward in the test process
    choice = first
    if state.threads == "auto":
        choice = choose_threads("auto", flops=facts.get("flops"),
                                parameters=facts.get("parameters"), load=load)
    if state.isolate != "off" and choice.count != 1:
        from .checks.sandbox import start_method

        if start_method(state.isolate) == "fork":  # OpenMP cannot be used after a fork
            choice = type(choice)(1, f"{choice.reason}; isolated checks run forked, on 1"
                                     f" thread", choice.setting)
    item.stash[threads_key] = choice
    item.user_properties.append((THREADS_PROPERTY, choice.to_dict()))
    return choice


def _run_check(item: pytest.Item, spec: CheckSpec, values: dict, model: Any, batch: Any,
               loss: Any, device: Any, budget_left: Optional[float] = None) -> CheckResult:
    """One check of a test, in a child process under ``--modelcheck-isolate`` (the model facts
    of the summary are taken there too, so that the forward never runs in the test process);
    the first one also records the model facts. ``budget_left`` (seconds left of the test's
    budget) bounds it too. UsageError propagates."""
    state = item.config.stash[session_key]
    if state.isolate == "off":
        _record_model(item, model, batch)
        return spec.run(values, model=model, batch=batch, loss=loss, device=device,
                        timeout=state.timeout, budget_left=budget_left)
    from .checks.sandbox import run_check_isolated
    from .core.threads import child_threads

    by_budget = budget_left is not None and (state.timeout is None or budget_left < state.timeout)
    limit = max(budget_left, 0.001) if by_budget else state.timeout
    want = not any(k == MODEL_PROPERTY for k, _ in item.user_properties)
    choice = item.stash.get(threads_key, None)
    with child_threads(choice.count if choice is not None else None):  # a spawned child's
        result, facts = run_check_isolated(spec, values, model=model, batch=batch, loss=loss,
                                           device=device, timeout=limit, mode=state.isolate,
                                           facts=want, where=item.nodeid)
    if by_budget and result.passed is False and "timeout_s" in result.metrics:
        from .checks.registry import budget_skip

        skipped = budget_skip(spec.name)  # stopped by the test's budget: not a failure
        skipped.duration_s, skipped.arguments = result.duration_s, result.arguments
        result = skipped
    if want:
        if facts is None:  # the child died first: what needs no forward
            from .core.facts import model_facts

            facts = model_facts(model)
            if batch is not None:
                facts.update(flops=None, macs=None)
        item.user_properties.append((MODEL_PROPERTY, facts))
    return result


def _device(config: pytest.Config) -> Optional[str]:
    return _option(config, "modelcheck_device") or None


def _failure_text(failed: list) -> str:
    lines = [f"{len(failed)} model check{'s' if len(failed) > 1 else ''} failed:"]
    lines += [f"  [{r.check}] {r.headline}" for r in failed]
    return "\n".join(lines)


def _report_details(item: pytest.Item, results: list) -> None:
    text = "\n\n".join(r.format() for r in results if r.passed is False and r.details)
    if text:
        item.add_report_section("call", "modelcheck", text)


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

        write_run_logs(item.config.stash[session_key].logdir, item.nodeid, results)
    outcome = yield
    failed = [r for r in results if r.passed is False]
    if failed or regressed:
        _report_details(item, failed)
        text = _failure_text(failed) if failed else ""
        if regressed:
            text += ("\n" if text else "") + f"{len(regressed)} metric(s) regressed against the" \
                " baseline:\n" + "\n".join(f"  {c.line()}" for c in regressed)
        pytest.fail(text, pytrace=False)
    return outcome


def _warn_inconclusive_results(item: pytest.Item, results: list) -> None:
    for r in results:
        if r.metrics.get("inconclusive"):
            warnings.warn(InconclusiveTimingWarning(
                f"{item.nodeid}: {r.check}: timing inconclusive: {r.headline}"), stacklevel=3)


def _warn_inconclusive(item: pytest.Item, results: list) -> None:
    """An InconclusiveTimingWarning per timed result or baseline comparison that could not
    tell (a noisy, loaded machine): it passed without a verdict, and the user should know."""
    _warn_inconclusive_results(item, results)
    for k, v in item.user_properties:
        if k != COMPARISON_PROPERTY:
            continue
        for c in v:
            if c.get("verdict") == "inconclusive":
                from .core.baseline import Comparison

                line = Comparison(**c).line()
                warnings.warn(InconclusiveTimingWarning(
                    f"{item.nodeid}: baseline comparison inconclusive:"
                    f" {line[len(item.nodeid) + 1:] if line.startswith(item.nodeid) else line}"),
                    stacklevel=2)


def _wrap_comparison(c: Any, width: int) -> list:
    """A comparison for the terminal: the test id on its own line when the whole does not fit,
    long ids cut from the left (``...``), the metric and its change never lost."""
    text = c.line()
    if len(text) <= width:
        return [text]
    rest = text[len(c.nodeid) + 1:]
    node = c.nodeid if len(c.nodeid) <= width else "..." + c.nodeid[-(width - 3):]
    return [node, *("  " + rest[i:i + width - 2] for i in range(0, len(rest), width - 2))]


def _compare_with_baseline(item: pytest.Item, results: list) -> list:
    """Compare this test's metrics with the loaded baseline; returns the regressions."""
    state = item.config.stash[session_key]
    if state.baseline is None:
        return []
    from .core.baseline import compare

    model = next((v for k, v in item.user_properties if k == MODEL_PROPERTY), {})
    row = {"nodeid": item.nodeid, "model": model, "results": [r.to_dict() for r in results]}
    comparisons = compare(state.baseline, [row], state.fingerprint)
    item.user_properties.append((COMPARISON_PROPERTY, [c.to_dict() for c in comparisons]))
    return [c for c in comparisons if c.verdict == "regressed"]


# -- the modelcheck fixture ----------------------------------------------------------------
class ModelCheck:
    """Run checks from inside a test: ``modelcheck.grads_finite()``, ``modelcheck.check_model()``.

    Every check is a method with the check's own arguments; ``model=``, ``batch=``, ``loss=``
    default to the test's ``model``, ``batch`` and ``loss_fn`` fixtures. A failing check fails
    the test with its headline; the result is returned otherwise and always recorded for the
    health summary and JSON report.
    """

    def __init__(self, request: pytest.FixtureRequest):
        self._request = request

    def _subject(self, model: Any, batch: Any, loss: Any) -> tuple:
        cfg = self._request.config
        if model is None:
            model = _fixture(self._request, cfg.getini("modelcheck_model_fixture"), "modelcheck")
        if batch is None:
            batch = _fixture(self._request, cfg.getini("modelcheck_batch_fixture"), "modelcheck")
        if loss is None:
            loss = _loss_fixture(self._request)
        elif loss is False:  # not needed by the caller
            loss = None
        return model, batch, loss

    def _run(self, spec: CheckSpec, args: tuple, kwargs: dict) -> CheckResult:
        from .core.threads import torch_threads

        model, batch, loss = (kwargs.pop(k, None) for k in ("model", "batch", "loss"))
        device = kwargs.pop("device", None) or _device(self._request.config)
        model, batch, loss = self._subject(model, batch, loss)
        node = self._request.node
        budget = _budget(node)
        tally = node.stash.setdefault(tally_key, [0, 0])  # checks asked, checks run
        try:
            values = spec.bind(args, kwargs)
            _strict_timing(self._request.config, [(spec, values)])
            choice = _threads(node, model, batch)
            tally[0] += 1
            if budget.spent_out():
                result = budget.skipped(spec.name, tally[1], tally[0])
            else:
                with torch_threads(choice.count), budget.charge():
                    result = _run_check(node, spec, values, model, batch, loss, device,
                                        budget.left())
                if result.passed is None and result.metrics.get("budget_spent"):
                    skipped = budget.skipped(spec.name, tally[1], tally[0])
                    result.headline, result.details = skipped.headline, skipped.details
                    result.metrics.update(skipped.metrics)
                else:
                    tally[1] += 1
        except UsageError as exc:
            _usage_failure(f"modelcheck.{spec.name}", exc)
        result.metrics.setdefault("threads", choice.count)
        _record(node, result)
        _warn_inconclusive_results(node, [result])
        if result.passed is False:
            _report_details(self._request.node, [result])
            pytest.fail(_failure_text([result]), pytrace=False)
        return result

    def __getattr__(self, name: str) -> Any:
        specs = all_checks()
        if name not in specs:
            raise AttributeError(f"modelcheck has no check {name!r}; known: {', '.join(sorted(specs))}")
        spec = specs[name]

        def method(*args: Any, **kwargs: Any) -> CheckResult:
            return self._run(spec, args, kwargs)

        method.__doc__ = spec.impl.__doc__
        method.__name__ = name
        return method

    def __dir__(self) -> list:
        return sorted(set(super().__dir__()) | set(all_checks()))

    # -- library tools on the test's fixtures (return data; never fail the test) -----------
    def _inputs(self, model: Any, batch: Any) -> tuple:
        from .core.batch import Batch

        model, batch, _ = self._subject(model, batch, False)
        return model, Batch.from_user(batch, model=model)

    def inspect(self, model: Any = None) -> Any:
        """``inspect_model`` on the test's model: parameter counts, module types, tensor stats."""
        from .core.inspect import inspect_model

        return inspect_model(self._subject(model, False, False)[0])

    def trace(self, model: Any = None, batch: Any = None) -> Any:
        """The forward data flow (module calls, shapes, dtypes, ranges) on the test's batch."""
        from .core.batch import copy_model
        from .core.trace import trace_batch

        model, data = self._inputs(model, batch)
        return trace_batch(copy_model(model).eval(), data.clone())

    def count_flops(self, model: Any = None, batch: Any = None, *, backward: bool = False) -> Any:
        """MACs and FLOPs (FLOPs = 2 x MACs) of one forward (and backward) on the test's batch."""
        from .core.batch import copy_model
        from .core.flops import count_flops

        model, data = self._inputs(model, batch)
        return count_flops(copy_model(model), *data.args, backward=backward, **data.kwargs)

    def estimate_memory(self, model: Any = None, batch: Any = None, **kwargs: Any) -> Any:
        """``estimate_memory`` of a training step (no real allocation) on the test's batch."""
        from .core.memory import estimate_memory

        model, data = self._inputs(model, batch)
        return estimate_memory(model, data, **kwargs)

    def profile(self, model: Any = None, make_batch: Any = None, **kwargs: Any) -> Any:
        """``profile_model`` over batch sizes; ``make_batch`` defaults to the batch fixture
        when it is a factory."""
        from .core.profiler import profile_model

        model, batch, _ = self._subject(model, make_batch, False)
        if not callable(batch):
            _usage_failure("modelcheck.profile", "needs a make_batch(batch_size) factory: pass"
                                                 " make_batch= or make the batch fixture return one")
        return profile_model(model, batch, **kwargs)

    def check_model(self, model: Any = None, batch: Any = None, *, loss: Any = None,
                    checks: Any = "default", device: Any = None, fail: bool = True,
                    **declared: Any) -> Any:
        """``pytest_modelcheck.check_model`` on the test's fixtures; fails on any failed check."""
        from .api import check_model

        model, batch, loss = self._subject(model, batch, loss)
        node = self._request.node
        budget = _budget(node)
        try:
            choice = _threads(node, model, batch)
            if budget.spent_out():
                from .api import plan_checks
                from .core.result import HealthReport

                names = [spec.name for spec, _ in plan_checks(checks, **declared)]
                report = HealthReport([budget.skipped(n, 0, len(names)) for n in names],
                                      type(model).__name__)
            else:
                with budget.charge():
                    report = check_model(model, batch, loss=loss, checks=checks,
                                         device=device or _device(self._request.config),
                                         threads=choice.count, budget=budget.left(),
                                         **declared)
        except UsageError as exc:
            _usage_failure("modelcheck.check_model", exc)
        _record_model(self._request.node, model, batch)
        for r in report.results:
            _record(self._request.node, r)
        _warn_inconclusive_results(node, report.results)
        if fail and report.failed:
            _report_details(self._request.node, report.failed)
            pytest.fail(_failure_text(report.failed), pytrace=False)
        return report


@pytest.fixture
def modelcheck(request: pytest.FixtureRequest) -> ModelCheck:
    """Run model checks from a test body: ``modelcheck.grads_finite()``, ``modelcheck.check_model()``."""
    return ModelCheck(request)


# -- collecting results and reporting ------------------------------------------------------
class ResultCollector:
    """Registered per session: gathers results from reports (xdist workers included) and writes
    the health summary and the JSON file on the controller."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.state = config.stash[session_key]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        results = [v for k, v in report.user_properties if k == PROPERTY]
        if not results:
            return
        model = next((v for k, v in report.user_properties if k == MODEL_PROPERTY), {})
        row = {"nodeid": report.nodeid, "outcome": report.outcome, "model": model,
               "results": results}
        threads = next((v for k, v in report.user_properties if k == THREADS_PROPERTY), None)
        if threads is not None:
            row["threads"] = threads
        self.state.rows.append(row)
        for k, v in report.user_properties:
            if k == COMPARISON_PROPERTY:
                self.state.comparisons.extend(v)

    def _baseline_tests_not_run(self) -> list:
        """Test ids the baseline holds (for any machine) that this session did not report."""
        if self.state.baseline is None:
            return []
        ran = {row["nodeid"] for row in self.state.rows}
        saved = {n for tests in self.state.baseline.entries.values() for n in tests}
        return sorted(saved - ran)

    def _comparisons(self) -> Optional[list]:
        if self.state.baseline is None:
            return None
        from .core.baseline import Comparison

        # xdist workers report in arrival order: sort, so -n 2 and a serial run agree
        return sorted((Comparison(**c) for c in self.state.comparisons),
                      key=lambda c: (c.nodeid, c.metric))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):
            return
        state = self.state
        state.comparisons.sort(key=lambda c: (c.get("nodeid", ""), c.get("metric", "")))
        if state.json_path:
            from .report.json_report import write_json

            write_json(state.json_path, state.rows,
                       comparisons=state.comparisons if state.baseline is not None else None)
        if state.save_baseline and state.rows:
            from .core.baseline import Baseline, BaselineError

            try:  # at session end: a line in the summary, never a traceback
                state.baseline_notes = Baseline.from_rows(state.rows, state.fingerprint).save(
                    state.save_baseline, warn=False)
            except (BaselineError, OSError) as exc:
                state.baseline_notes = [f"NOT saved to {state.save_baseline}: {exc}"]
                state.save_baseline = None
        if state.markdown_path:
            from .report.markdown import render_markdown, write_markdown

            write_markdown(state.markdown_path, render_markdown(state.rows, self._comparisons()),
                           append=state.markdown_path == os.environ.get("GITHUB_STEP_SUMMARY"))
        if state.html_path:
            from .report.html import write_html

            write_html(state.html_path, state.rows, self._comparisons())

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.state.rows:
            return
        from .report.terminal import health_table, threads_line

        width = min(self.config.get_terminal_writer().fullwidth, 100)
        terminalreporter.write_sep("=", "model health summary")
        line = threads_line(self.state.rows)
        if line:
            terminalreporter.write_line(line[:2 * width])
        for line in health_table(self.state.rows, width=width):
            terminalreporter.write_line(line)
        comparisons = self._comparisons()
        if comparisons:
            bad = [c for c in comparisons if c.verdict == "regressed"]
            good = [c for c in comparisons if c.verdict == "improved"]
            compared = [c for c in comparisons
                        if c.verdict in ("same", "regressed", "improved", "inconclusive")]
            unsure = sum(c.verdict == "inconclusive" for c in comparisons)
            other = sum(c.verdict == "skipped: other machine" for c in comparisons)
            par = sum(c.verdict == "skipped: other parallelism" for c in comparisons)
            new = sum(c.verdict == "new" for c in comparisons)
            terminalreporter.write_line(
                f"baseline: {len(compared)} metrics compared, {len(bad)} regressed,"
                f" {len(good)} improved" + (f"; {unsure} inconclusive (not failing)"
                                            if unsure else "")
                + (f"; {other} timed metrics not compared (recorded on another machine)"
                   if other else "")
                + (f"; {par} timed metrics not compared (other parallelism: save the baseline"
                   f" under the same -n / --modelcheck-threads)" if par else "")
                + (f"; {new} new" if new else ""))
            for c in bad + good:
                for line in _wrap_comparison(c, width - 2):
                    terminalreporter.write_line("  " + line)
        missing = self._baseline_tests_not_run()
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                              else "")
            terminalreporter.write_line(
                f"baseline: {len(missing)} test(s) in the baseline did not run here (renamed,"
                f" removed or deselected): {shown}"[:4 * width])
        for path, what in ((self.state.json_path, "results"),
                           (self.state.save_baseline, "baseline"),
                           (self.state.markdown_path, "markdown summary"),
                           (self.state.html_path, "HTML report")):
            if path:
                terminalreporter.write_line(f"modelcheck {what} written to {os.path.abspath(path)}")
        for note in self.state.baseline_notes:
            terminalreporter.write_line(f"modelcheck baseline: {note}", yellow=True)
