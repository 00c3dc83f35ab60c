"""A suite split over shards (two separate runs, as on two CI runners) and merged with
``modelcheck merge`` gives the report and the baseline of the unsharded run; a test that two
shards hold differently is refused with one line."""
import json

import pytest

from pytest_modelcheck.cli import main
from pytest_modelcheck.core.baseline import Baseline
from pytest_modelcheck.core.shards import ShardConflict, merge_baselines
from pytest_modelcheck.report.merge import merge_reports

SUITE = {
    "test_a.py": """
        import pytest

        @pytest.mark.grads_finite
        @pytest.mark.params_under(1000)
        def test_grads():
            pass
    """,
    "test_b.py": """
        import pytest

        @pytest.mark.flops_under("1G")
        def test_flops():
            pass

        @pytest.mark.shapes_consistent(out=("B", 5))
        def test_shapes():
            pass
    """,
}


def _deterministic(doc: dict) -> list:
    """The tests and their verdicts and metrics without durations (timings differ per run)."""
    return [(t["nodeid"], t["model"], [{k: v for k, v in r.items() if k != "duration_s"}
                                      for r in t["results"]]) for t in doc["tests"]]


def _entries(path) -> dict:
    """The baseline's tests, per machine, without the save time."""
    return Baseline.load(str(path)).entries


def test_merged_shards_equal_the_unsharded_run(healthy_project, capsys):
    healthy_project.makepyfile(**SUITE)
    out = healthy_project.path
    whole = healthy_project.runpytest("--modelcheck", f"--modelcheck-json={out / 'all.json'}",
                                      f"--modelcheck-save-baseline={out / 'all-base.json'}")
    whole.assert_outcomes(passed=3)
    for i, path in enumerate(["test_a.py", "test_b.py"]):
        shard = healthy_project.runpytest(
            path, "--modelcheck", f"--modelcheck-json={out / f's{i}.json'}",
            f"--modelcheck-save-baseline={out / f's{i}-base.json'}")
        assert shard.ret == 0
    assert main(["merge", str(out / "s0.json"), str(out / "s1.json"), "--json",
                 str(out / "merged.json"), "--baseline", str(out / "s0-base.json"),
                 "--baseline", str(out / "s1-base.json"), "--baseline-out",
                 str(out / "merged-base.json")]) == 0
    assert "merged 2 reports: 3 tests, 4 checks, 0 failed" in capsys.readouterr().out
    merged, alone = (json.loads((out / n).read_text()) for n in ("merged.json", "all.json"))
    assert _deterministic(merged) == _deterministic(alone)
    assert merged["summary"] == alone["summary"]
    assert _entries(out / "merged-base.json") == _entries(out / "all-base.json")


def test_a_test_two_shards_report_differently_is_refused():
    doc = {"format": "pytest-modelcheck/1", "tests": [
        {"nodeid": "t.py::x", "results": [{"check": "c", "passed": True}]}]}
    other = {"format": "pytest-modelcheck/1", "tests": [
        {"nodeid": "t.py::x", "results": [{"check": "c", "passed": False}]}]}
    with pytest.raises(ShardConflict, match=r"t.py::x: reported by a.json and b.json with"
                       " different results"):
        merge_reports([doc, other], ["a.json", "b.json"])
    with pytest.raises(ShardConflict, match="expected a pytest-modelcheck/1 report"):
        merge_reports([{"format": "other"}])


def test_a_baseline_two_shards_hold_differently_is_refused():
    a = Baseline({"m": {}}, {"m": {"t.py::x": {"p": {"value": 1}}}}, {"m": 1.0})
    b = Baseline({"m": {}}, {"m": {"t.py::x": {"p": {"value": 2}}}}, {"m": 2.0})
    with pytest.raises(ShardConflict, match="t.py::x: metric 'p' differs between"):
        merge_baselines([a, b])


def test_merge_command_mistakes_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["merge", str(bad)]) == 2
    assert "merge: " + str(bad) + ": not a JSON report" in capsys.readouterr().err
    assert main(["merge"]) == 2
    assert "expected shard reports" in capsys.readouterr().err
    assert main(["merge", "--baseline", str(bad)]) == 2
    assert "--baseline given without --baseline-out" in capsys.readouterr().err
