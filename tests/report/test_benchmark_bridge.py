"""Our timings inside pytest-benchmark: its JSON, saved runs and --benchmark-compare-fail."""
import json
import textwrap

import pytest

from pytest_modelcheck.report.benchmark_bridge import (add_result_timings, add_timings,
                                                        benchmark_names, benchmark_session)

pytest.importorskip("pytest_benchmark")

# Calls add_timings from a makereport hook, as the plugin's runtest_call wrapper will. The
# measured times are replaced by FAKE_TIMES so that the comparison is deterministic.
BRIDGE_CONFTEST = textwrap.dedent('''
    import os
    import pytest
    from pytest_modelcheck.report.benchmark_bridge import add_timings

    @pytest.fixture
    def model():
        import torch
        torch.manual_seed(0)
        return torch.nn.Linear(4, 2)

    @pytest.fixture
    def batch():
        import torch
        return torch.randn(8, 4), torch.randint(0, 2, (8,))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item, call):
        report = yield
        if call.when == "call":
            for key, value in item.user_properties:
                if key == "modelcheck" and value["check"] == "throughput_at_least":
                    times = value["metrics"]["times_s"]
                    assert times and all(t > 0 for t in times)
                    fake = os.environ.get("FAKE_TIMES")
                    if fake:
                        times = [float(t) for t in fake.split(",")]
                    add_timings(item.config, item.nodeid, "throughput_at_least", times,
                                extra={"samples_per_s": value["metrics"]["samples_per_s"]})
        return report
''')

TEST_FILE = """
    import pytest

    @pytest.mark.throughput_at_least("1 samples/s", warmup=1, min_runs=5, max_time="2 s")
    def test_speed():
        pass
"""

# The same record without running the check (no torch import: each run takes a fraction of a
# second), for the save/compare round trips.
RECORDED_FILE = """
    def test_speed(record_property):
        record_property("modelcheck", {"check": "throughput_at_least", "passed": True,
                                       "metrics": {"times_s": [1.0], "samples_per_s": 8.0}})
"""

# 10 ms per batch saved; 20 ms now: median +100% > 5%.
FAST = "0.010,0.011,0.009,0.010,0.010"
SLOW = "0.020,0.021,0.019,0.020,0.020"


def _project(pytester, monkeypatch, test_file):
    # pytest-benchmark disables itself when it sees an xdist worker in the environment, which
    # the inner run inherits when this suite runs under -n.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makeconftest(BRIDGE_CONFTEST)
    pytester.makepyfile(test_file)
    return pytester


@pytest.fixture
def bench_project(pytester, monkeypatch):
    """A project whose test runs the real throughput_at_least check."""
    return _project(pytester, monkeypatch, TEST_FILE)


@pytest.fixture
def recorded_project(pytester, monkeypatch):
    """A project whose test records a throughput result without measuring anything."""
    return _project(pytester, monkeypatch, RECORDED_FILE)


def test_timings_land_in_benchmark_json_and_table(bench_project, monkeypatch):
    monkeypatch.setenv("FAKE_TIMES", FAST)
    result = bench_project.runpytest("--modelcheck", "--benchmark-json=out.json")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*benchmark 'modelcheck'*", "*test_speed::throughput_at_least*"])
    data = json.loads((bench_project.path / "out.json").read_text())
    (entry,) = data["benchmarks"]
    assert entry["fullname"] == "test_timings_land_in_benchmark_json_and_table.py::test_speed" \
        "::throughput_at_least"
    assert entry["group"] == "modelcheck"
    assert entry["stats"]["rounds"] == 5
    assert entry["stats"]["median"] == pytest.approx(0.010)   # sorted: 9, 10, 10, 10, 11 ms
    assert entry["stats"]["min"] == pytest.approx(0.009)
    assert entry["stats"]["data"] == pytest.approx([0.010, 0.011, 0.009, 0.010, 0.010])
    assert entry["extra_info"]["samples_per_s"] > 0


def test_compare_fail_catches_a_slower_run(recorded_project, monkeypatch):
    monkeypatch.setenv("FAKE_TIMES", FAST)
    recorded_project.runpytest("--modelcheck", "--benchmark-save=fast").assert_outcomes(passed=1)
    saved = list((recorded_project.path / ".benchmarks").rglob("0001_fast.json"))
    assert len(saved) == 1

    # Same times: the comparison passes.
    same = recorded_project.runpytest("--modelcheck", "--benchmark-compare=0001",
                                      "--benchmark-compare-fail=median:5%")
    same.assert_outcomes(passed=1)
    assert same.ret == 0
    assert "Performance has regressed" not in same.stdout.str() + same.stderr.str()

    # Twice as slow: median 20 ms vs 10 ms is +100% > 5%.
    monkeypatch.setenv("FAKE_TIMES", SLOW)
    slow = recorded_project.runpytest("--modelcheck", "--benchmark-compare=0001",
                                      "--benchmark-compare-fail=median:5%")
    assert slow.ret != 0
    out = slow.stdout.str() + slow.stderr.str()
    assert "Performance has regressed" in out
    assert "test_speed::throughput_at_least" in out
    assert "'median' has failed PercentageRegressionCheck" in out


def test_disabled_benchmark_session_gets_nothing(recorded_project, monkeypatch):
    monkeypatch.setenv("FAKE_TIMES", FAST)
    result = recorded_project.runpytest("--benchmark-disable", "--benchmark-json=out.json")
    result.assert_outcomes(passed=1)
    out = recorded_project.path / "out.json"
    # some pytest-benchmark releases write an empty file or an empty report when disabled:
    # nothing of ours in it
    text = out.read_text() if out.exists() else ""
    assert not text.strip() or json.loads(text)["benchmarks"] == []
    assert "benchmark 'modelcheck'" not in result.stdout.str()


class _FakeSession:
    def __init__(self, disabled=False):
        self.benchmarks = []
        self.disabled = disabled


def test_add_timings_builds_stats_and_replaces_duplicates():
    bs = _FakeSession()
    entry = add_timings(bs, "t.py::test_a", "throughput_at_least", [0.3, 0.1, 0.2, float("nan")])
    assert bs.benchmarks == [entry]
    assert entry.stats.rounds == 3          # the NaN is dropped
    assert entry.stats.median == pytest.approx(0.2)
    assert entry.stats.ops == pytest.approx(3 / 0.6)   # rounds / total
    again = add_timings(bs, "t.py::test_a", "throughput_at_least", [0.5])
    assert bs.benchmarks == [again]
    assert add_timings(bs, "t.py::test_a", "x", []) is None
    assert add_timings(_FakeSession(disabled=True), "t.py::test_a", "x", [0.1]) is None


def test_add_result_timings_uses_results_with_times():
    bs = _FakeSession()
    results = [{"check": "grads_finite", "metrics": {}},
               {"check": "throughput_at_least",
                "metrics": {"times_s": [0.01, 0.02], "samples_per_s": 800.0, "phase": "train"}}]
    (entry,) = add_result_timings(bs, "t.py::test_a", results)
    assert entry.fullname == "t.py::test_a::throughput_at_least"
    assert entry.extra_info == {"samples_per_s": 800.0, "phase": "train"}
    assert benchmark_session(bs) is bs
    assert benchmark_names("a.py::t", "c") == ("t::c", "a.py::t::c")


THROUGHPUT_ONLY = """
    import pytest

    @pytest.mark.throughput_at_least("1 samples/s", warmup=1, min_runs=3, max_time="1 s")
    def test_speed():
        pass
"""


@pytest.fixture
def throughput_project(healthy_project, monkeypatch):
    """The plugin's throughput check alone (no bridge conftest: the plugin feeds
    pytest-benchmark itself), and no pytest-benchmark fixture."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    healthy_project.makepyfile(test_tp=THROUGHPUT_ONLY)
    return healthy_project


def test_no_benchmark_table_without_benchmark_options(throughput_project):
    result = throughput_project.runpytest("--modelcheck")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "model health summary" in out
    assert "benchmark 'modelcheck'" not in out and "Legend:" not in out


@pytest.mark.parametrize("option", ["--benchmark-columns=min,max", "--benchmark-sort=mean"])
def test_benchmark_table_when_the_user_asks_for_it(throughput_project, option):
    result = throughput_project.runpytest("--modelcheck", option)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*benchmark 'modelcheck'*", "*test_speed::throughput_at_least*"])


def test_benchmark_options_from_addopts_count(throughput_project, monkeypatch):
    monkeypatch.setenv("PYTEST_ADDOPTS", "--benchmark-columns=min,max")
    result = throughput_project.runpytest("--modelcheck")
    result.stdout.fnmatch_lines(["*benchmark 'modelcheck'*"])


def test_user_benchmarks_keep_their_table(throughput_project):
    throughput_project.makepyfile(test_user_bench="""
        def test_sum(benchmark):
            benchmark(sum, range(10))
    """)
    result = throughput_project.runpytest("--modelcheck")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_sum*"])
    assert "Legend:" in result.stdout.str()
