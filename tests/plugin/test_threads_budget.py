"""The plugin's thread control (--modelcheck-threads), per-test time budget
(--modelcheck-budget), per-check cost in the JSON report, --modelcheck-strict-timing and the
InconclusiveTimingWarning. The inner projects register their own small checks, so that what a
check sees (torch's thread count) and how long it takes (a sleep far beyond the budget) are
known exactly; no assertion depends on this machine's speed."""
import json
import textwrap
import types

import pytest

from pytest_modelcheck.plugin import SessionState, _strict_timing, session_key
from tests.conftest import HEALTHY_CONFTEST

# Checks of the inner projects: one reports the thread count its forward ran with, one sleeps
# far beyond any budget used here, one passes with an inconclusive timing.
CHECKS_CONFTEST = textwrap.dedent('''
    import time
    import pytest
    import torch
    from pytest_modelcheck.checks.registry import check
    from pytest_modelcheck.core.result import CheckResult

    @check(default=False)
    def seen_threads(*, model, batch, loss=None, device=None):
        """Report torch's thread count during the check."""
        return CheckResult("seen_threads", True, "ok", metrics={"seen": torch.get_num_threads()})

    @check(default=False)
    def sleeps(*, model, batch, loss=None, device=None):
        """Sleep for a minute."""
        time.sleep(60)
        return CheckResult("sleeps", True, "slept")

    @check(default=False)
    def noisy_timing(*, model, batch, loss=None, device=None):
        """Pass with an inconclusive timing."""
        return CheckResult("noisy_timing", True, "expected 100 samples/s, observed 80-130"
                           " samples/s (95% interval) at load 3.2 on 2 cores: inconclusive",
                           metrics={"inconclusive": True})

''') + HEALTHY_CONFTEST  # the model and batch fixtures


@pytest.fixture
def project(pytester):
    pytester.makeconftest(CHECKS_CONFTEST)
    return pytester


@pytest.mark.parametrize("args, ini, message", [
    (["--modelcheck-threads=zero"], "", "--modelcheck-threads / modelcheck_threads: got 'zero';"
     " expected 'auto', 'keep' or a thread count such as 1 or 4"),
    ([], "modelcheck_threads = 0", "--modelcheck-threads / modelcheck_threads: got 0;*"),
    (["--modelcheck-budget=soon"], "", "--modelcheck-budget / modelcheck_budget: *soon*"),
    ([], "modelcheck_budget = -5s", "--modelcheck-budget / modelcheck_budget: *"),
])
def test_bad_threads_and_budget_are_one_line_usage_errors(pytester, args, ini, message):
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest("--modelcheck", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_help_lists_the_options(pytester):
    result = pytester.runpytest("--help")
    text = " ".join(result.stdout.str().split())
    for option in ("--modelcheck-threads=N", "--modelcheck-budget=DURATION",
                   "--modelcheck-strict-timing"):
        assert option in text
    assert "Default: auto (ini: modelcheck_threads)" in text
    result.stdout.fnmatch_lines(["*modelcheck_threads*", "*modelcheck_budget*",
                                 "*modelcheck_strict_timing*"])


def test_checks_run_at_the_chosen_count_which_is_restored_and_reported(project):
    project.makepyfile("""
        import pytest, torch
        torch.set_num_threads(3)  # the process setting, as the user left it

        @pytest.mark.seen_threads
        def test_marker():
            assert torch.get_num_threads() == 3  # restored before the test body

        def test_fixture(modelcheck):
            assert modelcheck.seen_threads().metrics["seen"] == 2
            assert torch.get_num_threads() == 3

        def test_fixture_check_model(modelcheck):
            report = modelcheck.check_model(checks=["seen_threads", "grads_finite"])
            assert [r.metrics["threads"] for r in report.results] == [2, 2]
            assert report["seen_threads"].metrics["seen"] == 2
            assert torch.get_num_threads() == 3
    """)
    result = project.runpytest("--modelcheck", "--modelcheck-threads=2",
                               "--modelcheck-json=out.json")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*model health summary*",
                                 "torch threads: 2 per test (set by --modelcheck-threads)"])
    doc = json.loads((project.path / "out.json").read_text())
    rows = {t["nodeid"].split("::")[1]: t for t in doc["tests"]}
    for row in rows.values():
        assert row["threads"] == {"count": 2, "reason": "set by --modelcheck-threads",
                                  "setting": "2"}
    marker = rows["test_marker"]["results"][0]
    assert marker["metrics"] == {"seen": 2, "threads": 2}
    cost = doc["cost_by_check"]
    assert set(cost) == {"seen_threads", "grads_finite"}
    assert cost["seen_threads"]["tests"] == 3 and cost["grads_finite"]["tests"] == 1
    seconds = [v["seconds"] for v in cost.values()]
    assert seconds == sorted(seconds, reverse=True)


def test_auto_gives_a_small_model_one_thread_and_says_why(project):
    project.makeini("[pytest]\nmodelcheck_threads = auto\n")
    project.makepyfile("""
        import pytest, torch
        torch.set_num_threads(2)

        @pytest.mark.seen_threads
        def test_a():
            assert torch.get_num_threads() == 2
    """)
    result = project.runpytest("--modelcheck", "--modelcheck-json=out.json")
    result.assert_outcomes(passed=1)
    # 16 x (8x32 + 32x5) multiply-adds = 6656 MACs = 13312 FLOPs, plus the ReLU
    result.stdout.fnmatch_lines(["torch threads: 1 per test (auto: small model (13.* kFLOP per"
                                 " forward))"])
    row = json.loads((project.path / "out.json").read_text())["tests"][0]
    assert row["results"][0]["metrics"]["seen"] == 1
    assert row["threads"]["setting"] == "auto" and row["threads"]["count"] == 1


def test_keep_leaves_the_process_setting(project):
    project.makepyfile("""
        import pytest, torch
        torch.set_num_threads(2)

        def test_a(modelcheck):
            assert modelcheck.seen_threads().metrics["seen"] == 2
    """)
    result = project.runpytest("--modelcheck", "--modelcheck-threads=keep")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["torch threads: 2 per test (keep: the process setting)"])


def test_budget_skips_the_rest_and_never_fails_or_drops_a_check(project):
    project.makepyfile("""
        import pytest

        @pytest.mark.seen_threads
        @pytest.mark.sleeps
        @pytest.mark.grads_finite
        def test_markers():
            pass

        def test_fixture(modelcheck):
            assert modelcheck.seen_threads().passed
            r = modelcheck.sleeps()
            assert r.passed is None and "ran 1 of 2 checks" in r.headline
            r = modelcheck.grads_finite()
            assert r.passed is None and "ran 1 of 3 checks" in r.headline
    """)
    result = project.runpytest("--modelcheck", "--modelcheck-budget=4s",
                               "--modelcheck-json=out.json")
    result.assert_outcomes(passed=2)
    doc = json.loads((project.path / "out.json").read_text())
    rows = {t["nodeid"].split("::")[1]: t for t in doc["tests"]}
    results = rows["test_markers"]["results"]
    assert [r["check"] for r in results] == ["seen_threads", "sleeps", "grads_finite"]
    assert [r["status"] for r in results] == ["passed", "skipped", "skipped"]
    for r in results[1:]:
        assert r["headline"] == "skipped: the test's time budget of 4 s was spent (ran 1 of 3" \
                                " checks)"
    assert results[1]["duration_s"] < 30  # the 60 s sleep was stopped by the budget
    result.stdout.fnmatch_lines(["*1/3 (2 skipped)*test_markers*"])


def test_budget_stops_a_check_under_isolation_too(project):
    project.makepyfile("""
        import pytest

        @pytest.mark.sleeps
        @pytest.mark.seen_threads
        def test_markers():
            pass
    """)
    result = project.runpytest("--modelcheck", "--modelcheck-budget=3s",
                               "--modelcheck-isolate=auto", "--modelcheck-json=out.json")
    result.assert_outcomes(passed=1)
    results = json.loads((project.path / "out.json").read_text())["tests"][0]["results"]
    assert [r["status"] for r in results] == ["skipped", "skipped"]
    assert all(r["headline"] == "skipped: the test's time budget of 3 s was spent (ran 0 of 2"
               " checks)" for r in results)


def test_inconclusive_timing_warns_with_the_headline(project):
    project.makepyfile("""
        import pytest

        @pytest.mark.noisy_timing
        def test_marker():
            pass

        def test_fixture(modelcheck):
            assert modelcheck.noisy_timing().passed
    """)
    result = project.runpytest("--modelcheck")
    result.assert_outcomes(passed=2, warnings=2)
    result.stdout.fnmatch_lines([
        "*InconclusiveTimingWarning: test_inconclusive_timing_warns_with_the_headline.py::"
        "test_marker: noisy_timing: timing inconclusive: expected 100 samples/s, observed"
        " 80-130 samples/s (95% interval) at load 3.2 on 2 cores: inconclusive"])
    # a suite that wants to know can make it an error
    strict = project.runpytest("--modelcheck", "-W",
                               "error::pytest_modelcheck.core.errors.InconclusiveTimingWarning")
    strict.assert_outcomes(failed=2)


def test_no_warning_for_conclusive_results(project):
    project.makepyfile("""
        import pytest

        @pytest.mark.seen_threads
        def test_a():
            pass
    """)
    result = project.runpytest("--modelcheck", "-W", "error")
    result.assert_outcomes(passed=1)


# -- --modelcheck-strict-timing injects strict=True where the check takes it ------------------
def _fake_spec(name, params):
    import inspect
    sig = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                               default=False) for p in params])
    return types.SimpleNamespace(name=name, user_params=list(sig.parameters.values()))


def _config(strict):
    return types.SimpleNamespace(stash={session_key: SessionState(True, None,
                                                                  strict_timing=strict)})


def test_strict_timing_is_injected_only_when_not_given_and_accepted():
    spec = _fake_spec("throughput_at_least", ["rate", "strict"])
    plans = [(spec, {"rate": 10}), (spec, {"rate": 10, "strict": False})]
    _strict_timing(_config(True), plans)
    assert plans[0][1] == {"rate": 10, "strict": True}
    assert plans[1][1] == {"rate": 10, "strict": False}  # the marker's own word wins
    off = [(spec, {"rate": 10})]
    _strict_timing(_config(False), off)
    assert off[0][1] == {"rate": 10}


def test_strict_timing_is_not_injected_into_a_check_without_strict():
    old = _fake_spec("throughput_at_least", ["rate"])  # before strict= exists
    other = _fake_spec("memory_under", ["limit", "strict"])
    plans = [(old, {"rate": 10}), (other, {"limit": 1})]
    _strict_timing(_config(True), plans)
    assert plans == [(old, {"rate": 10}), (other, {"limit": 1})]


def test_strict_timing_option_and_ini_are_accepted(project):
    project.makeini("[pytest]\nmodelcheck_strict_timing = true\n")
    project.makepyfile("""
        import pytest

        @pytest.mark.seen_threads
        def test_a():
            pass
    """)
    project.runpytest("--modelcheck").assert_outcomes(passed=1)
    project.runpytest("--modelcheck", "--modelcheck-strict-timing").assert_outcomes(passed=1)


def test_strict_timing_reaches_throughput_at_least(project):
    from pytest_modelcheck.checks import all_checks
    if not any(p.name == "strict" for p in all_checks()["throughput_at_least"].user_params):
        pytest.skip("throughput_at_least takes no strict= here")
    project.makepyfile("""
        import pytest

        @pytest.mark.throughput_at_least("1 samples/s", warmup=0, min_runs=3, max_time="1s")
        def test_default():
            pass

        @pytest.mark.throughput_at_least("1 samples/s", warmup=0, min_runs=3, max_time="1s",
                                         strict=False)
        def test_says_not_strict():
            pass
    """)
    project.runpytest("--modelcheck", "--modelcheck-strict-timing", "--modelcheck-json=out.json")
    doc = json.loads((project.path / "out.json").read_text())
    args = {t["nodeid"].split("::")[1]: t["results"][0]["arguments"] for t in doc["tests"]}
    assert args["test_default"]["strict"] is True
    assert args["test_says_not_strict"]["strict"] is False  # the marker's own word wins


def test_inconclusive_baseline_comparison_warns_one_line():
    from pytest_modelcheck.core.errors import InconclusiveTimingWarning
    from pytest_modelcheck.core.result import CheckResult
    from pytest_modelcheck.plugin import COMPARISON_PROPERTY, _warn_inconclusive

    comparisons = [
        {"nodeid": "t.py::a", "metric": "throughput_at_least.samples_per_s", "kind": "timed",
         "old": 100.0, "new": 80.0, "change": -0.2, "verdict": "inconclusive",
         "detail": "95% interval -35%..+5%, load 3.2 per core"},
        {"nodeid": "t.py::a", "metric": "flops_under.flops", "kind": "deterministic",
         "old": 10, "new": 10, "change": 0.0, "verdict": "same", "detail": ""},
    ]
    item = types.SimpleNamespace(nodeid="t.py::a",
                                 user_properties=[(COMPARISON_PROPERTY, comparisons)])
    with pytest.warns(InconclusiveTimingWarning) as record:
        _warn_inconclusive(item, [CheckResult("grads_finite", True, "ok")])
    assert len(record) == 1
    text = str(record[0].message)
    assert "\n" not in text
    assert text.startswith("t.py::a: baseline comparison inconclusive:"
                           " throughput_at_least.samples_per_s: ")
    assert text.endswith("inconclusive; 95% interval -35%..+5%, load 3.2 per core")
