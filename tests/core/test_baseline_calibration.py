"""The timing gate divides each session's times by its own calibration run, so a machine
that is slower today as a whole is not a regression, and a slower model still is."""
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
