"""The regression gate end to end: save a baseline, compare unchanged and regressed models."""
import json

import pytest

CONFTEST = """
import os, pytest, torch

@pytest.fixture
def model():
    torch.manual_seed(0)
    width = int(os.environ.get("WIDTH", "32"))
    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 5))

@pytest.fixture
def batch():
    return torch.randn(16, 8), torch.randint(0, 5, (16,))
"""

TESTS = """
import pytest
@pytest.mark.flops_under("1G")
@pytest.mark.params_under("1M")
@pytest.mark.no_host_sync
def test_budget(): pass
"""


def test_unchanged_model_passes_and_a_bigger_one_fails(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS)
    first = pytester.runpytest("--modelcheck", "--modelcheck-save-baseline=base.json")
    first.assert_outcomes(passed=1)
    doc = json.loads((pytester.path / "base.json").read_text())
    assert doc  # written
    same = pytester.runpytest("--modelcheck", "--modelcheck-baseline=base.json",
                              "--modelcheck-markdown=sum.md", "--modelcheck-html=rep.html")
    same.assert_outcomes(passed=1)
    same.stdout.fnmatch_lines(["baseline: * metrics compared, 0 regressed, 0 improved"])
    monkeypatch.setenv("WIDTH", "36")  # +12.5% parameters and FLOPs
    worse = pytester.runpytest("--modelcheck", "--modelcheck-baseline=base.json",
                               "--modelcheck-markdown=sum.md", "--modelcheck-html=rep.html")
    worse.assert_outcomes(failed=1)
    worse.stdout.fnmatch_lines([
        "*metric(s) regressed against the baseline:*",
        "*test_budget flops_under.flops: * -> * (+12.*%) regressed*",
    ])
    md = (pytester.path / "sum.md").read_text()
    assert "regressions against the baseline" in md and "flops_under.flops" in md
    html = (pytester.path / "rep.html").read_text()
    assert "<html" in html.lower() and "http://" not in html and "https://" not in html


def test_corrupt_baseline_is_a_one_line_usage_error(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS)
    (pytester.path / "base.json").write_text("{not json")
    result = pytester.runpytest("--modelcheck", "--modelcheck-baseline=base.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--modelcheck-baseline: *base.json*"])


def test_parallel_run_gives_the_same_gate(pytester, monkeypatch):
    pytest.importorskip("xdist")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS + "\n@pytest.mark.params_under('1M')\ndef test_other(): pass\n")
    pytester.runpytest("--modelcheck", "-n", "2", "--modelcheck-save-baseline=base.json").assert_outcomes(passed=2)
    monkeypatch.setenv("WIDTH", "40")
    result = pytester.runpytest("--modelcheck", "-n", "2", "--modelcheck-baseline=base.json")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["baseline: * metrics compared, * regressed, 0 improved"])


def test_renamed_test_is_reported_and_a_test_path_is_not_a_baseline(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_models=TESTS)
    pytester.runpytest("--modelcheck", "--modelcheck-save-baseline=base.json").assert_outcomes(
        passed=1)
    (pytester.path / "test_models.py").write_text(TESTS.replace("test_budget", "test_renamed"))
    result = pytester.runpytest("--modelcheck", "--modelcheck-baseline=base.json")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["baseline: 1 test(s) in the baseline did not run here*"
                                 "test_models.py::test_budget*"])
    swallowed = pytester.runpytest("--modelcheck", "--modelcheck-save-baseline",
                                   "test_models.py")
    assert swallowed.ret == pytest.ExitCode.USAGE_ERROR
    swallowed.stderr.fnmatch_lines(["*took 'test_models.py', a test path, as the baseline file*"])
    assert "def test_renamed" in (pytester.path / "test_models.py").read_text()


def test_comparison_lines_wrap_instead_of_losing_the_change(pytester, monkeypatch):
    from pytest_modelcheck.core.baseline import Comparison
    from pytest_modelcheck.plugin import _wrap_comparison

    c = Comparison("tests/" + "deep/" * 30 + "test_m.py::test_x[" + "p" * 80 + "]",
                   "flops_under.flops", "deterministic", 100, 110, 0.1, "regressed")
    lines = _wrap_comparison(c, 98)
    assert all(len(line) <= 98 for line in lines)
    assert "(+10.0%) regressed" in "".join(lines)


TIMED = """
import pytest
@pytest.mark.throughput_at_least("1 samples/s", min_runs=10, max_time=2.0)
@pytest.mark.params_under("1M")
def test_speed(): pass
"""


def test_serial_baseline_compared_under_xdist_is_not_a_false_alarm(pytester):
    """The reported false alarm: a baseline timed serially, compared under `-n 2` on an
    unchanged model (x3 on a loaded 2-core runner). The timing is not judged across
    parallelism; the deterministic metrics still are."""
    pytest.importorskip("xdist")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TIMED)
    pytester.runpytest("--modelcheck", "--modelcheck-save-baseline=base.json").assert_outcomes(
        passed=1)
    entry = json.loads((pytester.path / "base.json").read_text())["entries"]
    (timing,) = [m["throughput_at_least.times_s"] for tests in entry.values()
                 for m in tests.values()]
    assert timing["parallelism"]["xdist_workers"] == 1 and "load_per_core" in timing
    result = pytester.runpytest("--modelcheck", "-n", "2", "--modelcheck-baseline=base.json",
                                "--modelcheck-markdown=sum.md", "--modelcheck-html=rep.html")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["baseline: * metrics compared, 0 regressed, * improved*"
                                 "1 timed metrics not compared (other parallelism*"])
    md = (pytester.path / "sum.md").read_text()
    assert "no regressions against the baseline" in md and "another parallelism" in md
    assert "other parallelism" in (pytester.path / "rep.html").read_text()


def test_reports_show_inconclusive_and_other_parallelism_apart_from_regressions():
    from pytest_modelcheck.core.baseline import Comparison
    from pytest_modelcheck.report.html import render_html
    from pytest_modelcheck.report.markdown import render_markdown

    comps = [Comparison("t.py::a", "throughput_at_least.times_s", "timed", 1e-3, 3.1e-3, 2.1,
                        "inconclusive", "the 99% CI of the ratio 0.913..3.152 includes the"
                        " threshold x1.200"),
             Comparison("t.py::b", "throughput_at_least.times_s", "timed", 1e-3, 3e-3, None,
                        "skipped: other parallelism", "baseline timed with 1 xdist worker x 2"
                        " threads, this run 2 xdist workers x 1 thread")]
    md = render_markdown([], comps)
    assert "no regressions against the baseline" in md and "regression" not in md.replace(
        "no regressions", "")
    assert ":warning: 1 timed metric inconclusive" in md and "includes the threshold" in md
    assert "1 timed metrics skipped (timed under another parallelism" in md
    page = render_html([], comps)
    assert 'class="banner good"' in page and 'class="banner bad"' not in page
    assert '<tr class="inconclusive">' in page and "1 timed metric(s) inconclusive" in page
    assert "another parallelism" in page
