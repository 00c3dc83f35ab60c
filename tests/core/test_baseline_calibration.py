"""The timing gate divides each session's times by its own calibration run, so a machine
that is slower today as a whole is not a regression, and a slower model still is."""
import pytest

from pytest_modelcheck.core.baseline import Baseline, compare
from pytest_modelcheck.core.timing import calibration_times

FP = {"key": "m"}
NODE = "t.py::test_speed"


def _row(times, calibration):
    return {"nodeid": NODE, "model": {}, "results": [{
        "check": "throughput_at_least", "passed": True, "estimated": False,
        "metrics": {"times_s": times, "calibration_s": calibration}}]}


def _verdict(old, new):
    base = Baseline.from_rows([old], FP)
    (c,) = [c for c in compare(base, [new], FP) if c.metric == "throughput_at_least.times_s"]
    return c


OLD = [1e-3 * (1 + 0.01 * (i % 5)) for i in range(20)]
CAL = [5e-4 * (1 + 0.01 * (i % 3)) for i in range(20)]


def test_a_slower_machine_is_not_a_regression():
    c = _verdict(_row(OLD, CAL), _row([t * 1.5 for t in OLD], [t * 1.5 for t in CAL]))
    assert c.verdict == "same" and "calibration" in c.detail


def test_a_slower_model_on_the_same_machine_is():
    c = _verdict(_row(OLD, CAL), _row([t * 1.5 for t in OLD], CAL))
    assert c.verdict == "regressed"


def test_without_calibration_the_raw_times_are_compared():
    old = {"nodeid": NODE, "model": {}, "results": [{"check": "throughput_at_least",
                                                      "passed": True, "estimated": False,
                                                      "metrics": {"times_s": OLD}}]}
    new = {"nodeid": NODE, "model": {}, "results": [{"check": "throughput_at_least",
                                                      "passed": True, "estimated": False,
                                                      "metrics": {"times_s": [t * 1.5 for t in OLD]}}]}
    assert _verdict(old, new).verdict == "regressed"


def test_calibration_times_are_positive():
    assert all(t > 0 for t in calibration_times(runs=5))


# --- parallelism and load: recorded with each timing, refused or doubted, never a false alarm

from pytest_modelcheck.core.stats import timed_regression  # noqa: E402


def _ctx_row(times, *, threads=1, workers=1, load=0.1, cores=2, calibration=CAL):
    """A throughput result as the check reports it: times, calibration, parallelism, load
    (1-minute load average before/after, here ``load * cores`` both: load per core ``load``)."""
    metrics = {"times_s": times, "calibration_s": calibration, "cores": cores,
               "load_before": load * cores, "load_after": load * cores}
    if threads is not None:
        metrics["threads"] = threads
    if workers is not None:
        metrics["xdist_workers"] = workers
    return {"nodeid": NODE, "model": {}, "results": [{
        "check": "throughput_at_least", "passed": True, "estimated": False, "metrics": metrics}]}


# The reported case: x3.10 with a 99% interval 0.913..3.152 (reported: x3.096, 0.826..3.226).
BUG_OLD = [1e-3 * (1.0 + 0.002 * i) for i in range(8)] + [1.22e-3, 1.23e-3]
BUG_NEW = [1e-3 * (1.01 + 0.002 * i) for i in range(6)] + [1e-3 * (3.12 + 0.01 * i)
                                                           for i in range(9)]
TIGHT = [1e-3 * (1 + 0.002 * (i % 7)) for i in range(20)]


def test_stored_timing_records_parallelism_and_load_per_core():
    base = Baseline.from_rows([_ctx_row(OLD, threads=2, workers="1", load=0.25)], FP)
    entry = base.entries["m"][NODE]["throughput_at_least.times_s"]
    assert entry["parallelism"] == {"threads": 2, "xdist_workers": 1}
    assert entry["load_per_core"] == 0.25  # (0.5 + 0.5) / 2 / 2 cores


def test_interval_including_the_threshold_is_not_a_regression():
    v = timed_regression(BUG_OLD, BUG_NEW, threshold=0.20)
    assert v.p_value < 0.002 and v.ci[0] < 1.0 < 1.2 < v.ratio  # significant, size unknown
    c = _verdict(_ctx_row(BUG_OLD), _ctx_row(BUG_NEW))
    assert c.verdict == "inconclusive", c.line()
    assert "includes the threshold x1.200" in c.detail and c.change > 2


def test_other_parallelism_is_skipped_with_the_remedy():
    c = _verdict(_ctx_row(OLD, threads=2, workers=1), _ctx_row(BUG_NEW, threads=1, workers=2))
    assert c.verdict == "skipped: other parallelism" and c.change is None
    assert c.detail.startswith("baseline timed with 1 xdist worker x 2 threads, this run 2"
                               " xdist workers x 1 thread;")
    assert "save a baseline under the same -n / --modelcheck-threads" in c.detail
    # even a 'clean' 3x slowdown is not judged across parallelism
    c = _verdict(_ctx_row(TIGHT), _ctx_row([t * 3 for t in TIGHT], workers=2))
    assert c.verdict == "skipped: other parallelism"


def test_old_baseline_without_parallelism_and_an_xdist_run_is_not_a_regression():
    old = _ctx_row(TIGHT, threads=None, workers=None)  # saved by an older version
    base = Baseline.from_rows([old], FP)
    assert "parallelism" not in base.entries["m"][NODE]["throughput_at_least.times_s"]
    c = _verdict(old, _ctx_row([t * 1.5 for t in TIGHT], workers=2))
    assert c.verdict == "inconclusive", c.line()
    assert "did not record its parallelism" in c.detail and "2 xdist workers" in c.detail
    # serially, the old baseline still gates
    assert _verdict(old, _ctx_row([t * 1.5 for t in TIGHT])).verdict == "regressed"


def test_loaded_session_is_inconclusive_with_both_loads():
    c = _verdict(_ctx_row(TIGHT, load=0.2), _ctx_row([t * 1.5 for t in TIGHT], load=1.3))
    assert c.verdict == "inconclusive", c.line()
    assert "load per core 0.20 for the baseline, 1.30 for this run" in c.detail
    # loads that differ by more than the margin, neither oversubscribed
    c = _verdict(_ctx_row(TIGHT, load=0.1), _ctx_row([t * 1.5 for t in TIGHT], load=0.8))
    assert c.verdict == "inconclusive" and "differ by more than 0.5" in c.detail
    # a slowdown far beyond what the load explains stays a regression: x4 > 1.2 * 2.3
    c = _verdict(_ctx_row(TIGHT, load=0.2), _ctx_row([t * 4 for t in TIGHT], load=1.3))
    assert c.verdict == "regressed"


def test_clean_25_percent_slowdown_on_an_idle_machine_is_a_regression():
    c = _verdict(_ctx_row(TIGHT, threads=1, workers=1, load=0.1),
                 _ctx_row([t * 1.25 for t in TIGHT], threads=1, workers=1, load=0.15))
    assert c.verdict == "regressed", c.line()
    assert c.change == pytest.approx(0.25)


def test_older_baseline_file_without_the_new_fields_still_loads_and_compares(tmp_path):
    import json

    path = tmp_path / "base.json"
    path.write_text(json.dumps({"format": "pytest-modelcheck-baseline/1", "machines": {"m": {}},
                                "saved": {"m": 1.0}, "entries": {"m": {NODE: {
                                    "throughput_at_least.times_s": {"kind": "timed",
                                                                    "samples": TIGHT}}}}}))
    base = Baseline.load(str(path))
    (c,) = [c for c in compare(base, [_ctx_row([t * 1.25 for t in TIGHT], calibration=None)],
                               FP) if c.metric == "throughput_at_least.times_s"]
    assert c.verdict == "regressed"


def test_malformed_parallelism_or_load_in_a_file_is_refused(tmp_path):
    import json

    from pytest_modelcheck.core.baseline import BaselineError

    for bad, message in (({"parallelism": {"threads": 0}}, "parallelism threads 0"),
                         ({"parallelism": {"cpus": 2}}, "parallelism key 'cpus'"),
                         ({"load_per_core": -1}, "load_per_core -1")):
        path = tmp_path / "base.json"
        path.write_text(json.dumps({"format": "pytest-modelcheck-baseline/1", "entries": {
            "m": {NODE: {"throughput_at_least.times_s": {"kind": "timed", "samples": TIGHT,
                                                          **bad}}}}}))
        with pytest.raises(BaselineError, match=message):
            Baseline.load(str(path))


def test_unknown_xdist_workers_on_one_side_only_is_not_a_regression_either():
    old = _ctx_row(TIGHT, threads=1, workers=None)  # threads known, workers not
    c = _verdict(old, _ctx_row([t * 1.5 for t in TIGHT], threads=1, workers=2))
    assert c.verdict == "inconclusive" and "2 xdist workers" in c.detail
    # the other way round: a baseline saved under xdist, this run's workers unknown
    c = _verdict(_ctx_row(TIGHT, workers=2), _ctx_row([t * 1.5 for t in TIGHT], workers=None))
    assert c.verdict == "inconclusive" and "this run did not record" in c.detail
