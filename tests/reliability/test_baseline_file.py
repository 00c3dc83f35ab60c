"""Baselines: fingerprint, metric kinds, save/load/merge under a lock, compare."""
import json
import multiprocessing
import os
import signal

import numpy as np
import pytest

from pytest_modelcheck.core.baseline import (METRIC_KINDS, Baseline, BaselineError, compare,
                                             lock_path, machine_fingerprint, metric_kind,
                                             regressions)
from pytest_modelcheck.core.result import CheckResult

HERE = {"key": "machine-a", "cpu": "test cpu"}
OTHER = {"key": "machine-b", "cpu": "other cpu"}


def _times(median, n=30, seed=0, spread=0.05):
    return [float(x) for x in np.random.default_rng(seed).lognormal(np.log(median), spread, n)]


def _row(nodeid="t.py::test_a", params=1000, flops=2000, syncs=0, peak=4096, estimated=True,
         times=None, shapes=None):
    results = [
        CheckResult("flops_under", True, "ok", metrics={"flops": flops, "macs": flops // 2,
                                                        "by_operator": {"mm": flops}}),
        CheckResult("no_host_sync", True, "ok", metrics={"count": syncs, "ops": 50}),
        CheckResult("memory_under", True, "ok", metrics={"peak_bytes": peak},
                    estimated=estimated),
        CheckResult("grads_finite", True, "ok", metrics={"loss": 1.5}),
        CheckResult("vectorized", True, "ok", metrics={"ops_by_batch_size": {"4": 10, "8": 10}}),
        CheckResult("shapes_consistent", True, "ok",
                    metrics={"runs": shapes or [{"case": "B=1", "outputs": ["output (1, 5)"]}]}),
        CheckResult("sees_nothing", None, "skipped", metrics={}),
    ]
    if times is not None:
        results.append(CheckResult("throughput_at_least", True, "ok",
                                   metrics={"samples_per_s": 4 / np.median(times),
                                            "times_s": times}))
    return {"nodeid": nodeid, "outcome": "passed", "model": {"parameters": params, "type": "M"},
            "results": [r.to_dict() for r in results]}


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _verdicts(comps):
    return {c.metric: c.verdict for c in comps}


def test_fingerprint_is_stable_and_names_the_machine():
    fp = machine_fingerprint()
    assert fp["key"] == machine_fingerprint()["key"] and len(fp["key"]) == 12
    assert fp["cores"] == os.cpu_count()
    assert fp["cpu"] and fp["python"].count(".") == 2
    assert fp["torch"]  # torch is installed here


def test_metric_kinds_table():
    assert METRIC_KINDS[("params_under", "params")].kind == "deterministic"
    assert METRIC_KINDS[("throughput_at_least", "times_s")].kind == "timed"
    assert metric_kind("memory_under", "peak_bytes", estimated=True).kind == "deterministic"
    assert metric_kind("memory_under", "peak_bytes", estimated=False).kind == "timed"
    assert metric_kind("grads_finite", "loss") is None


def test_from_rows_keeps_only_baselined_metrics():
    b = Baseline.from_rows([_row(times=_times(0.01))], HERE)
    entry = b.entries["machine-a"]["t.py::test_a"]
    assert sorted(entry) == ["flops_under.flops", "flops_under.macs", "memory_under.peak_bytes",
                             "model.parameters", "no_host_sync.count", "no_host_sync.ops",
                             "shapes_consistent.runs", "throughput_at_least.times_s",
                             "vectorized.ops_by_batch_size"]
    assert entry["throughput_at_least.times_s"]["kind"] == "timed"
    assert len(entry["throughput_at_least.times_s"]["samples"]) == 30
    assert b.machines["machine-a"] == HERE


def test_compare_identical_run_is_all_same():
    rows = [_row(times=_times(0.01, seed=1))]
    base = Baseline.from_rows(rows, HERE)
    comps = compare(base, [_row(times=_times(0.01, seed=2))], HERE)
    assert {c.verdict for c in comps} == {"same"}
    assert regressions(base, rows, HERE) == []


def test_compare_deterministic_regressions_and_improvements():
    base = Baseline.from_rows([_row()], HERE)
    now = _row(flops=2200, params=900, syncs=1, peak=4096,
               shapes=[{"case": "B=1", "outputs": ["output (1, 6)"]}])
    v = _verdicts(compare(base, [now], HERE))
    assert v["flops_under.flops"] == "regressed"  # 2000 -> 2200, +10%, compared exactly
    assert v["flops_under.macs"] == "regressed"
    assert v["model.parameters"] == "improved"  # 1000 -> 900
    assert v["no_host_sync.count"] == "regressed"  # 0 -> 1
    assert v["shapes_consistent.runs"] == "regressed"  # any change of output shape
    assert v["memory_under.peak_bytes"] == "same"
    c = next(c for c in compare(base, [now], HERE) if c.metric == "flops_under.flops")
    assert (c.old, c.new, c.kind) == (2000, 2200, "deterministic")
    assert c.change == pytest.approx(0.1)
    assert c.line() == "t.py::test_a flops_under.flops: 2.00k -> 2.20k (+10.0%) regressed; exact"
    # an explicit relative tolerance lets the 10% through
    v = _verdicts(compare(base, [now], HERE, tolerances={"flops_under.flops": 0.15}))
    assert v["flops_under.flops"] == "same" and v["flops_under.macs"] == "regressed"


def test_deterministic_metrics_compare_across_machines():
    base = Baseline.from_rows([_row(times=_times(0.01))], OTHER)
    comps = compare(base, [_row(flops=2200, times=_times(0.02))], HERE)
    v = _verdicts(comps)
    assert v["flops_under.flops"] == "regressed"
    assert v["throughput_at_least.times_s"] == "skipped: other machine"


def test_timed_metrics_statistical_same_machine():
    base = Baseline.from_rows([_row(times=_times(0.01, seed=1))], HERE)
    slow = compare(base, [_row(times=_times(0.0125, seed=2))], HERE)
    c = next(c for c in slow if c.metric == "throughput_at_least.times_s")
    assert c.verdict == "regressed" and c.kind == "timed"
    assert c.change == pytest.approx(0.25, abs=0.05)
    assert "Mann-Whitney p=" in c.detail
    fast = _verdicts(compare(base, [_row(times=_times(0.008, seed=2))], HERE))
    assert fast["throughput_at_least.times_s"] == "improved"


def test_measured_memory_only_same_machine_with_tolerance():
    base = Baseline.from_rows([_row(peak=1000, estimated=False)], HERE)
    v = _verdicts(compare(base, [_row(peak=1040, estimated=False)], HERE))
    assert v["memory_under.peak_bytes"] == "same"  # +4% within the 5% of measured memory
    v = _verdicts(compare(base, [_row(peak=1100, estimated=False)], HERE))
    assert v["memory_under.peak_bytes"] == "regressed"
    v = _verdicts(compare(base, [_row(peak=1100, estimated=False)], OTHER))
    assert v["memory_under.peak_bytes"] == "skipped: other machine"


def test_new_tests_and_metrics():
    base = Baseline.from_rows([_row()], HERE)
    comps = compare(base, [_row(nodeid="t.py::test_b"), _row(times=_times(0.01))], HERE)
    assert {c.verdict for c in comps if c.nodeid == "t.py::test_b"} == {"new"}
    assert _verdicts(c for c in comps if c.nodeid == "t.py::test_a")[
        "throughput_at_least.times_s"] == "new"
    assert compare(Baseline(), [_row()], HERE)[0].verdict == "new"


def test_save_merges_other_tests_and_machines(tmp_path):
    path = str(tmp_path / "sub" / "baseline.json")
    Baseline.from_rows([_row("t.py::a"), _row("t.py::b")], HERE).save(path)
    Baseline.from_rows([_row("t.py::a", flops=1)], OTHER).save(path)
    Baseline.from_rows([_row("t.py::b", flops=7)], HERE).save(path)
    b = Baseline.load(path)
    assert sorted(b.machines) == ["machine-a", "machine-b"]
    assert sorted(b.entries["machine-a"]) == ["t.py::a", "t.py::b"]
    assert b.entries["machine-a"]["t.py::b"]["flops_under.flops"]["value"] == 7
    assert b.entries["machine-a"]["t.py::a"]["flops_under.flops"]["value"] == 2000
    assert b.entries["machine-b"]["t.py::a"]["flops_under.flops"]["value"] == 1
    # the lock lives in the temporary directory, not beside the committed baseline
    assert sorted(os.listdir(tmp_path / "sub")) == ["baseline.json"]
    assert os.path.exists(lock_path(path))


def test_load_missing_and_corrupt(tmp_path):
    assert Baseline.load(str(tmp_path / "none.json")).entries == {}
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "pytest-modelcheck-baseline/1", "entries": {')
    with pytest.raises(BaselineError) as info:
        Baseline.load(str(bad))
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and "not valid JSON" in msg
    bad.write_text('{"tests": []}')
    with pytest.raises(BaselineError, match=r"expected a 'pytest-modelcheck-baseline/1' file"):
        Baseline.load(str(bad))
    # saving over a corrupt file refuses instead of silently dropping what was there
    bad.write_text("garbage")
    with pytest.raises(BaselineError):
        Baseline.from_rows([_row()], HERE).save(str(bad))
    assert bad.read_text() == "garbage"


def _save_many(path, prefix, barrier):
    barrier.wait()
    for i in range(15):
        Baseline.from_rows([_row(f"t.py::{prefix}{i}")], {"key": "shared"}).save(path)


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "baseline.json")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_save_many, args=(path, p, barrier)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    tests = Baseline.load(path).entries["shared"]
    assert sorted(tests) == sorted(f"t.py::{p}{i}" for p in "ab" for i in range(15))


def _killed_writer(path, ready):
    import fcntl
    import tempfile

    lock = open(lock_path(path), "a")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    fd, tmp = tempfile.mkstemp(prefix=".modelcheck-", suffix=".tmp",
                               dir=os.path.dirname(path))
    os.write(fd, b'{"format": "pytest-modelcheck-baseline/1", "entr')  # half a document
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)  # dies before os.replace, holding the lock


def test_writer_killed_mid_write_leaves_previous_baseline(tmp_path):
    path = str(tmp_path / "baseline.json")
    Baseline.from_rows([_row("t.py::a")], HERE).save(path)
    before = _read(path)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_killed_writer, args=(path, ready))
    p.start()
    p.join(60)
    assert ready.is_set() and p.exitcode == -signal.SIGKILL
    assert _read(path) == before
    assert sorted(Baseline.load(path).entries["machine-a"]) == ["t.py::a"]
    # the kernel released the dead writer's lock: the next save goes through
    Baseline.from_rows([_row("t.py::b")], HERE).save(path)
    assert sorted(Baseline.load(path).entries["machine-a"]) == ["t.py::a", "t.py::b"]
    json.loads(_read(path))
