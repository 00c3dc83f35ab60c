"""Crash and hang isolation: a model that segfaults, exits, aborts or hangs fails a check, and
the session goes on and writes every report (issue 11, items 1 and 2)."""
from __future__ import annotations

import json
import signal
import sys
import time

import pytest
import torch
from torch import nn

from pytest_modelcheck.checks.registry import get_check
from pytest_modelcheck.core.guard import BudgetOverrun, CheckTimeout, budget_watchdog, time_budget
from pytest_modelcheck.checks.sandbox import crash_result, run_check_isolated, start_method
from tests.conftest import HEALTHY_CONFTEST

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="fork-based isolation is exercised on Linux")

BUDGET = 3.0

# The four models of the acceptance suite, as a conftest for pytester projects.
CRASHY_CONFTEST = """
import ctypes, os, signal, time
import pytest, torch

class Exits(torch.nn.Linear):
    def forward(self, x):
        os._exit(3)

class Segfaults(torch.nn.Linear):
    def forward(self, x):
        ctypes.string_at(0)

class OwnAlarm(torch.nn.Linear):
    def forward(self, x):
        signal.signal(signal.SIGALRM, lambda *a: None)  # defeats a SIGALRM-only budget
        time.sleep(60)
        return super().forward(x)

@pytest.fixture
def exits(): return Exits(8, 5)
@pytest.fixture
def segfaults(): return Segfaults(8, 5)
@pytest.fixture
def own_alarm(): return OwnAlarm(8, 5)
""" + HEALTHY_CONFTEST  # the model and batch fixtures

CRASHY_TESTS = """
import pytest

@pytest.mark.grads_finite(model_fixture="exits")
def test_exits(): pass

@pytest.mark.grads_finite(model_fixture="segfaults")
def test_segfaults(): pass

@pytest.mark.grads_finite(model_fixture="own_alarm")
def test_own_alarm(): pass

@pytest.mark.grads_finite
def test_healthy(): pass
"""


@linux_only
def test_acceptance_four_tests_three_failed_checks_one_pass_and_every_report(pytester):
    pytester.makeconftest(CRASHY_CONFTEST)
    pytester.makepyfile(test_crashy=CRASHY_TESTS)
    start = time.monotonic()
    result = pytester.runpytest("--modelcheck", f"--modelcheck-timeout={BUDGET:g}s",
                                "--modelcheck-isolate=auto", "--modelcheck-json=report.json")
    elapsed = time.monotonic() - start
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines([
        "*expected the check to finish, observed the process exit with status 3 while running"
        " grads_finite*",
        "*expected the check to finish, observed the process killed by SIGSEGV while running"
        " grads_finite*",
        "*expected the check to finish in 3 s, observed it still running after 4.3 s while"
        " running grads_finite*",
    ])
    result.stdout.fnmatch_lines(["*model health summary*"])
    result.stdout.fnmatch_lines(["*modelcheck results written to*report.json"])
    # the hang's failure holds the stacks: the model's own frame, where it slept
    result.stdout.fnmatch_lines(["*stacks when it was stopped*", "*Timeout*",
                                 "*conftest.py*in forward*"])
    doc = json.loads((pytester.path / "report.json").read_text())
    assert doc["summary"] == {"tests": 4, "checks": 4, "failed_checks": 3}
    by_test = {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}
    assert set(by_test) == {"test_exits", "test_segfaults", "test_own_alarm", "test_healthy"}
    # "threads": the torch thread count the plugin ran the test's checks with (small: 1)
    assert by_test["test_exits"]["results"][0]["metrics"] == {"crashed": "exit", "exit_code": 3,
                                                              "threads": 1}
    assert by_test["test_segfaults"]["results"][0]["metrics"]["crashed"] == "SIGSEGV"
    assert by_test["test_own_alarm"]["results"][0]["metrics"] == {"timeout_s": 3.0, "hung": True,
                                                                   "threads": 1}
    assert by_test["test_healthy"]["results"][0]["status"] == "passed"
    assert by_test["test_healthy"]["model"]["flops"] > 0  # the facts came from the child
    assert by_test["test_segfaults"]["model"] == {"parameters": 45, "type": "Segfaults",
                                                  "flops": None, "macs": None}  # 8*5 + 5
    # one hang costs the budget plus the grace (1.3 s) plus the parent's backstop at most
    assert elapsed < 3 * BUDGET + 15, elapsed  # 15 s: two interpreters starting on a busy CI


def test_without_isolation_a_replaced_alarm_handler_no_longer_passes(pytester):
    """Item 2: the forward replaces the SIGALRM handler and busy-loops; the budget held only by
    SIGALRM let it run on (and pass). The watchdog thread stops it."""
    pytester.makeconftest("""
        import signal, time
        import pytest, torch

        class Busy(torch.nn.Linear):
            def forward(self, x):
                signal.signal(signal.SIGALRM, signal.SIG_IGN)
                end = time.monotonic() + 30
                while time.monotonic() < end:
                    pass
                return super().forward(x)

        @pytest.fixture
        def model(): return Busy(4, 2)
        @pytest.fixture
        def batch(): return torch.zeros(3, 4)
    """)
    pytester.makepyfile("""
        import pytest
        @pytest.mark.shapes_consistent
        def test_busy(): pass
    """)
    start = time.monotonic()
    result = pytester.runpytest("--modelcheck", "--modelcheck-timeout=1s")
    assert time.monotonic() - start < 25
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*expected the check to finish in 1 s, observed it ran past its"
                                 " time budget: SIGALRM was ignored or its handler replaced*"])


def test_watchdog_stops_a_busy_loop_that_ignores_sigalrm():
    before = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(BudgetOverrun):
        with time_budget(0.2):
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            while time.monotonic() - start < 20:
                pass
    assert time.monotonic() - start < 5  # 0.2 s + 1.02 s grace, not 20 s
    assert signal.getsignal(signal.SIGALRM) is before  # the model's SIG_IGN is undone


def test_watchdog_cuts_a_sleep_under_a_replaced_handler():
    start = time.monotonic()
    with pytest.raises(BudgetOverrun):
        with time_budget(0.2):
            signal.signal(signal.SIGALRM, lambda *a: None)
            time.sleep(20)
    assert time.monotonic() - start < 5


def test_a_late_return_under_an_ignored_alarm_fails_on_exit():
    """SIGALRM ignored and the body blocked in C: it cannot be cut short in-process, but it
    must not pass."""
    start = time.monotonic()
    with pytest.raises(CheckTimeout, match="past its time budget"):
        with budget_watchdog(0.05, grace=0.05):
            time.sleep(0.3)
    assert time.monotonic() - start < 2


def test_nothing_is_left_pending_after_a_watchdog_block():
    with budget_watchdog(0.05, grace=0.05):
        pass
    time.sleep(0.2)  # past the limit: a stray asynchronous exception would land here
    with budget_watchdog(30):
        x = sum(range(1000))
    assert x == 499500


def _spec_and_values(name="grads_finite"):
    spec = get_check(name)
    return spec, spec.bind()


class _Aborts(nn.Linear):
    def forward(self, x):
        import os
        os.abort()


@linux_only
def test_abort_is_a_failed_check_naming_sigabrt_and_the_test():
    spec, values = _spec_and_values()
    result, facts = run_check_isolated(spec, values, model=_Aborts(4, 2), batch=torch.ones(3, 4),
                                       timeout=30, facts=True, where="t.py::test_a")
    assert result.passed is False and facts is None
    assert result.headline == ("expected the check to finish, observed the process killed by"
                               " SIGABRT while running grads_finite")
    assert result.details.startswith("test: t.py::test_a\n")
    assert "in forward" in result.details  # faulthandler's stack at the abort


@linux_only
def test_a_healthy_isolated_check_returns_the_same_result_and_facts():
    spec, values = _spec_and_values("shapes_consistent")
    model, batch = nn.Linear(4, 2), torch.ones(3, 4)
    isolated, facts = run_check_isolated(spec, values, model=model, batch=batch, timeout=30,
                                         facts=True)
    direct = spec.run(values, model=model, batch=batch)
    assert (isolated.passed, isolated.headline) == (direct.passed, direct.headline)
    assert facts == {"parameters": 10, "type": "Linear", "flops": 48, "macs": 24}  # 2*3*4*2


@linux_only
def test_a_usage_error_in_the_child_is_raised_in_the_parent():
    from pytest_modelcheck.core.errors import UsageError

    spec, values = _spec_and_values()
    with pytest.raises(UsageError, match="expected a torch.nn.Module"):
        run_check_isolated(spec, values, model="not a model", batch=torch.ones(3, 4))


def test_cuda_initialised_means_spawn_not_fork(monkeypatch):
    assert start_method("spawn") == "spawn"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert start_method("auto") == "spawn"


def test_spawn_mode_isolates_a_picklable_model_and_runs_a_local_one_in_process():
    spec, values = _spec_and_values("shapes_consistent")
    result, _ = run_check_isolated(spec, values, model=nn.Linear(4, 2), batch=torch.ones(3, 4),
                                   mode="spawn", timeout=60)
    assert result.passed is True and "not isolated" not in result.details

    class Local(nn.Linear):  # a class made in a function cannot be pickled
        pass

    result, _ = run_check_isolated(spec, values, model=Local(4, 2), batch=torch.ones(3, 4),
                                   mode="spawn", timeout=60)
    assert result.passed is True
    assert "note: ran in the test process, not isolated" in result.details


class _SleepsUnderItsOwnAlarm(nn.Linear):
    def forward(self, x):
        signal.signal(signal.SIGALRM, lambda *a: None)
        time.sleep(60)
        return super().forward(x)


def test_spawn_mode_turns_an_abort_and_a_hang_into_failed_checks():
    """The path taken once CUDA is initialised: a fresh interpreter, the model pickled."""
    spec, values = _spec_and_values()
    result, _ = run_check_isolated(spec, values, model=_Aborts(4, 2), batch=torch.ones(3, 4),
                                   mode="spawn", timeout=60)
    assert result.headline.endswith("observed the process killed by SIGABRT while running"
                                    " grads_finite")
    assert "the check ran in a spawned process" in result.details
    start = time.monotonic()
    result, _ = run_check_isolated(spec, values, model=_SleepsUnderItsOwnAlarm(4, 2),
                                   batch=torch.ones(3, 4), mode="spawn", timeout=0.5)
    assert time.monotonic() - start < 30  # 0.5 s + 1.05 s grace after the child's start-up
    assert result.headline.startswith("expected the check to finish in 0.5 s, observed it still"
                                      " running after 1.55 s while running grads_finite")
    assert "in forward" in result.details and "Timeout" in result.details


def test_crash_result_for_a_hang_names_the_budget_and_keeps_the_stacks():
    dump = ("Timeout (0:00:04.300000)!\nThread 0x1 (most recent call first):\n"
            '  File "model.py", line 9 in forward\n')
    r = crash_result("grads_finite", signal.SIGKILL, True, dump, 3.0, "t.py::test_h")
    assert r.headline.startswith("expected the check to finish in 3 s, observed it still running"
                                 " after 4.3 s while running grads_finite")
    assert 'File "model.py", line 9 in forward' in r.details


def test_bad_isolate_value_is_a_usage_error(pytester):
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest("--modelcheck-isolate=fork")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--modelcheck-isolate / modelcheck_isolate: got 'fork';"
                                 " expected one of off, auto, spawn*"])


@linux_only
def test_ini_key_turns_isolation_on(pytester):
    pytester.makeini("[pytest]\nmodelcheck_isolate = auto\n")
    pytester.makeconftest(CRASHY_CONFTEST)
    pytester.makepyfile("""
        import pytest
        @pytest.mark.grads_finite(model_fixture="exits")
        def test_exits(): pass
        @pytest.mark.shapes_consistent
        def test_after(): pass
    """)
    result = pytester.runpytest("--modelcheck")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*observed the process exit with status 3*"])


@linux_only
def test_the_modelcheck_fixture_is_isolated_too(pytester):
    pytester.makeconftest(CRASHY_CONFTEST)
    pytester.makepyfile("""
        def test_fixture(modelcheck, segfaults):
            modelcheck.grads_finite(model=segfaults)
        def test_after(modelcheck):
            assert modelcheck.grads_finite().passed
    """)
    result = pytester.runpytest("--modelcheck", "--modelcheck-isolate=auto")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*observed the process killed by SIGSEGV while running"
                                 " grads_finite*"])


def test_help_names_the_option_and_its_default(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--modelcheck-isolate*"])
    assert "Default: off (ini: modelcheck_isolate)." in " ".join(result.stdout.str().split())
