"""Session state of a pytest-modelcheck run: options as parsed, the stash keys, running one
check of a test (threads, time budget, isolation, model facts) and the result collector that
writes the health summary, JSON, markdown, HTML and the baseline at the end.

Importing this module does not import torch.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional

import pytest

from .checks.registry import CheckSpec
from .core.errors import InconclusiveTimingWarning
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


session_key = pytest.StashKey[SessionState]()
bound_key = pytest.StashKey[list]()


def _option(config: pytest.Config, name: str) -> Any:
    value = config.getoption(name)
    return value if value is not None else config.getini(name)


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
        facts: Any = next((v for k, v in item.user_properties if k == MODEL_PROPERTY), {})
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
    limit = max(budget_left or 0.0, 0.001) if by_budget else state.timeout
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


# -- collecting results and reporting ------------------------------------------------------
def _xfail_info(report: Any) -> Optional[dict]:
    """``{"outcome": "xfailed"|"xpassed", "reason", "strict"}`` for a test marked xfail (the
    row's optional ``xfail`` entry: readers of older rows see no such key), else None."""
    reason = getattr(report, "wasxfail", None)
    if reason is not None:
        return {"outcome": "xfailed" if report.skipped else "xpassed", "reason": str(reason),
                "strict": False}
    longrepr = report.longrepr if isinstance(report.longrepr, str) else ""
    if report.failed and longrepr.startswith("[XPASS(strict)]"):
        return {"outcome": "xpassed", "reason": longrepr[len("[XPASS(strict)]"):].strip(),
                "strict": True}
    return None


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
        xfail = _xfail_info(report)
        if xfail is not None:
            row["xfail"] = xfail
        self.state.rows.append(row)
        for k, v in report.user_properties:
            if k == COMPARISON_PROPERTY:
                self.state.comparisons.extend(v)  # type: ignore[arg-type]

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
                state.baseline_notes = Baseline.from_rows(state.rows, state.fingerprint or {}).save(
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


def _usage_failure(who: str, exc: Any) -> NoReturn:
    """Fail the test with a one-line usage message and no traceback or exception chain."""
    failure = pytest.fail.Exception(f"{who}: {exc}", pytrace=False)
    failure.__suppress_context__ = True
    raise failure


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
        for c in v:  # type: ignore[attr-defined]
            if c.get("verdict") == "inconclusive":
                from .core.baseline import Comparison

                line = Comparison(**c).line()
                warnings.warn(InconclusiveTimingWarning(
                    f"{item.nodeid}: baseline comparison inconclusive:"
                    f" {line[len(item.nodeid) + 1:] if line.startswith(item.nodeid) else line}"),
                    stacklevel=2)


def _wrap_comparison(c: Any, width: int) -> list:
    """A comparison for the terminal: the test id on its own line when the whole does not fit,
    a long id shortened with its file name kept (or whole), the metric and its change never
    lost."""
    from .report.terminal import comparison_line, short_nodeid

    text = comparison_line(c)
    if len(text) <= width:
        return [text]
    rest = text[len(c.nodeid) + 1:]
    short, whole = short_nodeid(c.nodeid, width)
    node = short if whole else c.nodeid
    return [node, *("  " + rest[i:i + width - 2] for i in range(0, len(rest), width - 2))]
