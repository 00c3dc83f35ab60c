"""Baselines: fingerprint, metric kinds, save/load/merge under a lock, compare."""
import json
import multiprocessing
import os
import signal

import numpy as np
import pytest

from pytest_modelcheck.core.baseline import (METRIC_KINDS, Baseline, BaselineError,
                                             BaselineWarning, compare,
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


# --- malformed files, locks, links, non-finite values, leftovers (issue 11, item 5) ----------

def _doc(entries, machines=None, saved=None):
    return {"format": "pytest-modelcheck-baseline/1", "machines": machines or {},
            "saved": saved or {}, "entries": entries}


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_malformed_machine_entry_is_refused_on_load_and_replaced_on_save(tmp_path):
    path = tmp_path / "baseline.json"
    good = Baseline.from_rows([_row("t.py::kept")], OTHER).to_dict()
    doc = _doc({"machine-a": ["not", "an", "object"], "machine-b": good["entries"]["machine-b"]},
               machines={"machine-a": HERE, "machine-b": OTHER}, saved={"machine-b": 1.0})
    path.write_text(json.dumps(doc))
    with pytest.raises(BaselineError) as info:
        Baseline.load(str(path))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "entries['machine-a'] is a list" in msg
    # at session end the save never fails on it: this run's results replace the bad entry,
    # the other machine's valid entries stay
    with pytest.warns(BaselineWarning,
                      match=r"results were saved.*entries\['machine-a'\] is a list"):
        Baseline.from_rows([_row("t.py::a")], HERE).save(str(path))
    b = Baseline.load(str(path))
    assert sorted(b.entries["machine-a"]) == ["t.py::a"]
    assert sorted(b.entries["machine-b"]) == ["t.py::kept"]


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("entries, expected", [
    ('{"m": {"t::a": "oops"}}', "entries['m']['t::a'] is a str, expected an object"),
    ('{"m": {"t::a": {"model.parameters": 5}}}', "is a int, expected an object"),
    ('{"m": {"t::a": {"model.parameters": {"kind": "deterministic"}}}}',
     "has neither 'value' nor 'samples'"),
    ('{"m": {"t::a": {"model.parameters": {"kind": "bogus", "value": 1}}}}', "has kind 'bogus'"),
    ('{"m": {"t::a": {"model.parameters": {"kind": "deterministic", "value": NaN}}}}',
     "non-finite number (nan)"),
    ('{"m": {"t::a": {"model.parameters": {"kind": "deterministic", "value": Infinity}}}}',
     "non-finite number (inf)"),
    ('{"m": {"t::a": {"model.parameters": {"kind": "deterministic", "value": 1e400}}}}',
     "non-finite number (inf)"),
    ('{"m": {"t::a": {"model.parameters": {"kind": "deterministic", "value": 1%s}}}}' % ("0" * 400),
     "integer too large"),
    ('{"m": {"t::a": {"throughput_at_least.times_s": {"kind": "timed", "samples": []}}}}',
     "not a non-empty list of numbers"),
    ('{"m": {"t::a": {"throughput_at_least.times_s": {"kind": "timed",'
     ' "samples": [0.1, -Infinity]}}}}', "non-finite number (-inf)"),
    ('{"m": {"t::a": {"vectorized.ops_by_batch_size": {"kind": "deterministic", "value": %s}}}}'
     % ("[" * 40 + "]" * 40), "nested more than 32 levels deep"),
    ('{"m": {"t::a": {"x.y": {"kind": "deterministic", "value": %s}}}}' % DEEP,
     "nested too deeply"),
], ids=["test-not-object", "metric-not-object", "no-value", "bad-kind", "NaN", "Infinity",
        "1e400", "huge-int", "no-samples", "inf-sample", "40-deep", "100k-deep"])
def test_malformed_entries_are_one_clear_error(tmp_path, entries, expected):
    path = tmp_path / "baseline.json"
    path.write_text('{"format": "pytest-modelcheck-baseline/1", "entries": %s}' % entries)
    with pytest.raises(BaselineError) as info:
        Baseline.load(str(path))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and expected in msg and len(msg) < 400


def test_non_finite_values_are_never_same(tmp_path):
    base = Baseline.from_rows([_row(flops=2000, times=_times(0.01))], HERE)
    now = _row(flops=float("nan"), times=_times(0.01)[:-1] + [float("inf")])
    comps = {c.metric: c for c in compare(base, [now], HERE)}
    for name in ("flops_under.flops", "throughput_at_least.times_s"):
        assert comps[name].verdict == "regressed", name
        assert "not comparable" in comps[name].detail and "non-finite" in comps[name].detail
        assert comps[name].change is None
    assert comps["flops_under.macs"].verdict == "regressed"  # nan // 2 is nan too
    # a baseline value that is not finite (an older file) is reported the same way
    old = Baseline.from_rows([_row()], HERE)
    old.entries["machine-a"]["t.py::test_a"]["model.parameters"]["value"] = float("inf")
    c = next(c for c in compare(old, [_row()], HERE) if c.metric == "model.parameters")
    assert c.verdict == "regressed" and "baseline value holds a non-finite" in c.detail
    assert regressions(old, [_row()], HERE)
    # saving: the non-finite metric is left out (with a warning), the file is strict JSON
    path = tmp_path / "baseline.json"
    with pytest.warns(BaselineWarning, match="non-finite"):
        Baseline.from_rows([now], HERE).save(str(path))
    saved = _strict_json(_read(path))["entries"]["machine-a"]["t.py::test_a"]
    assert "flops_under.flops" not in saved and "model.parameters" in saved
    assert "throughput_at_least.times_s" not in saved


def test_json_report_has_no_nan_literals(tmp_path):
    from pytest_modelcheck.report.json_report import write_json

    row = _row()
    row["results"][3]["metrics"]["loss"] = float("nan")
    row["model"]["ratio"] = float("-inf")
    path = tmp_path / "r.json"
    write_json(str(path), [row], comparisons=[{"old": float("inf")}])
    doc = _strict_json(_read(path))
    assert doc["tests"][0]["results"][3]["metrics"]["loss"] == "nan"
    assert doc["tests"][0]["model"]["ratio"] == "-inf"
    assert doc["comparisons"] == [{"old": "inf"}]
    assert doc["non_finite"].startswith("3 non-finite number(s) written as the strings")
    write_json(str(path), [_row()])
    assert "non_finite" not in _strict_json(_read(path))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The temporary directory (where the lock lives) is one of this test's own."""
    import tempfile

    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def test_lock_path_that_is_a_directory_falls_back(tmp_path, private_tmp):
    path = str(tmp_path / "baseline.json")
    os.mkdir(lock_path(path))
    with pytest.warns(BaselineWarning, match=r"lock file .* cannot be used \(not a regular"):
        Baseline.from_rows([_row("t.py::a")], HERE).save(path)
    assert sorted(Baseline.load(path).entries["machine-a"]) == ["t.py::a"]
    # this user's own lock is used instead; when that is unusable too, no lock at all
    mine = [n for n in os.listdir(private_tmp) if "-uid" in n]
    assert len(mine) == 1
    os.unlink(private_tmp / mine[0])
    os.mkfifo(private_tmp / mine[0])  # a FIFO must not hang the open
    with pytest.warns(BaselineWarning, match="saved without a lock"):
        Baseline.from_rows([_row("t.py::b")], HERE).save(path)
    assert sorted(Baseline.load(path).entries["machine-a"]) == ["t.py::a", "t.py::b"]


def test_lock_file_of_another_user_is_shared_read_only(tmp_path, private_tmp, monkeypatch,
                                                        recwarn):
    path = str(tmp_path / "baseline.json")
    lock = lock_path(path)
    open(lock, "w").close()
    real_open = os.open
    opened = []

    def other_users_file(p, flags, *args):  # what a 0644 file of another user gives
        if p == lock and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", p)
        opened.append((p, flags))
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", other_users_file)
    Baseline.from_rows([_row("t.py::a")], HERE).save(path)
    monkeypatch.undo()
    assert any(p == lock for p, _ in opened)  # locked through a read-only descriptor
    assert not [w for w in recwarn if issubclass(w.category, BaselineWarning)]
    assert sorted(Baseline.load(path).entries["machine-a"]) == ["t.py::a"]


def test_symlinked_baseline_updates_the_target(tmp_path):
    target = tmp_path / "real" / "baseline.json"
    target.parent.mkdir()
    link = tmp_path / "baseline.json"
    link.symlink_to(target)  # dangling: the first save creates the target
    Baseline.from_rows([_row("t.py::a")], HERE).save(str(link))
    Baseline.from_rows([_row("t.py::b")], HERE).save(str(link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert sorted(Baseline.load(str(target)).entries["machine-a"]) == ["t.py::a", "t.py::b"]
    assert sorted(os.listdir(tmp_path / "real")) == ["baseline.json"]


def _killed_mid_save(path):
    def die(fd):
        os.kill(os.getpid(), signal.SIGKILL)
    os.fsync = die  # killed after the data is written, before the file is replaced
    Baseline.from_rows([_row("t.py::new")], HERE).save(path)


def _o_tmpfile_works(folder):
    try:
        os.close(os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600))
        return True
    except (AttributeError, OSError):
        return False


def test_writer_killed_mid_save_leaves_no_temp_file_to_commit(tmp_path):
    path = str(tmp_path / "baseline.json")
    Baseline.from_rows([_row("t.py::a")], HERE).save(path)
    before = _read(path)
    p = multiprocessing.get_context("fork").Process(target=_killed_mid_save, args=(path,))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    assert _read(path) == before
    if _o_tmpfile_works(str(tmp_path)):  # the temp file had no name while it was written
        assert sorted(os.listdir(tmp_path)) == ["baseline.json"]
    Baseline.from_rows([_row("t.py::b")], HERE).save(path)
    assert sorted(os.listdir(tmp_path)) == ["baseline.json"]


def test_leftover_temp_files_are_removed_at_the_next_save(tmp_path):
    import time

    path = str(tmp_path / "baseline.json")
    mine = tmp_path / ".modelcheck-baseline.json-1a2b3c4d.tmp"  # a writer of this file died
    stale = tmp_path / ".modelcheck-x8f_2kq1.tmp"  # an older version's, an hour old
    live = tmp_path / ".modelcheck-results.json-9f8e7d6c.tmp"  # a report being written now
    for f in (mine, stale, live):
        f.write_text('{"format": "pytest-modelcheck-baseline/1", "entr')
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    Baseline.from_rows([_row("t.py::a")], HERE).save(path)
    assert sorted(os.listdir(tmp_path)) == [live.name, "baseline.json"]


def test_session_end_save_never_loses_results_or_shows_a_traceback(pytester, private_tmp,
                                                                     monkeypatch):
    from tests.conftest import HEALTHY_CONFTEST

    pytester.makeconftest(HEALTHY_CONFTEST)
    pytester.makepyfile("import pytest\n@pytest.mark.params_under('1M')\ndef test_a(): pass\n")
    base = pytester.path / "b.json"
    # a malformed entry that the old load let through is refused at setup, in one line
    base.write_text(json.dumps(_doc({"machine-x": []})))
    bad = pytester.runpytest("--modelcheck-save-baseline=b.json")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: --modelcheck-save-baseline: baseline b.json:"
                              " entries?'machine-x'? is a list, expected an object; *"])
    assert "Traceback" not in bad.stderr.str() + bad.stdout.str()
    # an unusable lock in the temporary directory: the results are saved all the same
    base.unlink()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    os.mkdir(lock_path(str(base)))
    run = pytester.runpytest("--modelcheck", "--modelcheck-save-baseline=b.json")
    run.assert_outcomes(passed=1)
    run.stdout.fnmatch_lines(["modelcheck baseline written to *b.json",
                              "modelcheck baseline: lock file * cannot be used (not a regular*"])
    assert "INTERNALERROR" not in run.stdout.str()
    assert list(Baseline.load(str(base)).entries.values())[0]


def _timed_row(times, **context):
    r = CheckResult("throughput_at_least", True, "ok", metrics={"times_s": times, **context})
    return {"nodeid": "t.py::test_t", "outcome": "passed", "model": {},
            "results": [r.to_dict()]}


def test_timing_context_round_trips_through_save_and_merge(tmp_path):
    path = str(tmp_path / "baseline.json")
    ctx = {"threads": 2, "xdist_workers": 1, "load_before": 0.4, "load_after": 0.6, "cores": 2}
    Baseline.from_rows([_timed_row(_times(1e-3), **ctx)], HERE).save(path)
    Baseline.from_rows([_row(nodeid="t.py::test_other")], HERE).save(path)  # merge another test
    doc = json.loads(_read(path))
    assert doc["format"] == "pytest-modelcheck-baseline/1"  # the format is unchanged
    entry = doc["entries"]["machine-a"]["t.py::test_t"]["throughput_at_least.times_s"]
    assert entry["parallelism"] == {"threads": 2, "xdist_workers": 1}
    assert entry["load_per_core"] == 0.25  # (0.4 + 0.6) / 2 / 2 cores
    loaded = Baseline.load(path).entries["machine-a"]["t.py::test_t"]
    assert loaded["throughput_at_least.times_s"]["parallelism"]["threads"] == 2


def test_timing_context_that_is_not_usable_is_unknown_not_written():
    base = Baseline.from_rows([_timed_row(_times(1e-3), threads=0, xdist_workers=True,
                                          load_before=float("nan"), load_after=None,
                                          cores=2)], HERE)
    entry = base.entries["machine-a"]["t.py::test_t"]["throughput_at_least.times_s"]
    assert "parallelism" not in entry and "load_per_core" not in entry


def test_baseline_without_timing_context_compares_as_before(tmp_path):
    """A file saved before parallelism and load were recorded: timings still compare, a
    serial run still gates on them."""
    path = tmp_path / "old.json"
    old = _times(1e-3, spread=0.01)
    path.write_text(json.dumps({"format": "pytest-modelcheck-baseline/1",
                                "machines": {"machine-a": HERE}, "saved": {"machine-a": 1.0},
                                "entries": {"machine-a": {"t.py::test_t": {
                                    "throughput_at_least.times_s": {"kind": "timed",
                                                                    "samples": old}}}}}))
    base = Baseline.load(str(path))
    slower = _timed_row([t * 1.5 for t in old], threads=1, xdist_workers=1)
    assert _verdicts(compare(base, [slower], HERE)) == {"throughput_at_least.times_s":
                                                        "regressed"}
    assert _verdicts(compare(base, [_timed_row(old, threads=1, xdist_workers=1)], HERE)) == {
        "throughput_at_least.times_s": "same"}
