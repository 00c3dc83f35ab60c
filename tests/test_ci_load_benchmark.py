"""The loaded-runner benchmark's harness (benchmarks/ci_load.py, benchmarks/background_load.py):
the background load starts and stops its processes and leaves none behind however its parent
ends; the zoo part runs end to end in smoke mode (both tools' workers, the JSON, --resume).

Nothing here asserts on speed: only on processes, statuses and counts. The end-to-end run
takes about 20-40 s on a loaded 2-core machine; deselect it with ``-k "not smoke_run"``.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import background_load  # noqa: E402
import ci_load  # noqa: E402


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list, timeout: float = 30.0) -> list:
    end = time.time() + timeout
    while time.time() < end and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def kill_leftovers(pids: list) -> None:
    for p in pids:
        try:
            os.killpg(p, signal.SIGKILL)
        except OSError:
            pass


def test_default_thread_env_drops_thread_variables():
    env = background_load.default_thread_env({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                              "PATH": "/bin"})
    assert env == {"PATH": "/bin"}


def test_load_starts_k_processes_and_stop_leaves_none():
    load = background_load.BackgroundLoad(2, lifetime=60)
    try:
        load.start()
        pids = load.pids
        assert len(pids) == 2 and all(alive(p) for p in pids)
        for p in pids:  # each child leads its own process group, so killpg reaches all of it
            assert os.getpgid(p) == p
        with open(f"/proc/{pids[0]}/environ", "rb") as fh:
            assert b"OMP_NUM_THREADS=" not in fh.read()
    finally:
        load.stop()
    assert load.pids == [] and wait_gone(pids, 5) == []
    assert signal.getsignal(signal.SIGTERM) is not load._on_signal  # handlers restored


def test_load_children_end_by_themselves_at_their_deadline():
    load = background_load.BackgroundLoad(1, lifetime=0.5).start()
    try:
        pids = load.pids
        assert wait_gone(pids, 60) == []
    finally:
        load.stop()


def test_k_zero_is_idle():
    with background_load.BackgroundLoad(0) as load:
        assert load.pids == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_orphans_when_the_parent_is_terminated_or_killed(sig):
    """SIGTERM: the parent's handler stops the load; SIGKILL: the children notice the parent's
    death (PR_SET_PDEATHSIG, and os.getppid() changing) and exit."""
    pids: list = []
    with subprocess.Popen([sys.executable, os.path.join(BENCH, "background_load.py"), "2", "120"],
                          stdout=subprocess.PIPE, text=True,
                          env=background_load.default_thread_env()) as proc:
        try:
            line = proc.stdout.readline()
            pids = [int(x) for x in line.split("[", 1)[1].split("]", 1)[0].split(",")]
            assert len(pids) == 2 and all(alive(p) for p in pids)
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == -sig
            assert wait_gone(pids, 30) == []
        finally:
            proc.kill()
            kill_leftovers(pids)


def test_throughput_counts_reads_statuses_and_gate_verdicts():
    doc = {"tests": [
        {"outcome": "passed", "results": [
            {"check": "throughput_at_least", "passed": True, "headline": "ok"},
            {"check": "grads_finite", "passed": False, "headline": "bad"}]},
        {"outcome": "passed", "results": [  # inconclusive: passes, says it could not decide
            {"check": "throughput_at_least", "passed": True,
             "headline": "inconclusive: expected ...", "metrics": {"inconclusive": True,
                                                                  "verdict": "inconclusive"}}]},
        {"outcome": "failed", "results": [  # strict=True: an inconclusive timing fails
            {"check": "throughput_at_least", "passed": False, "headline": "inconclusive, failed",
             "metrics": {"inconclusive": False, "verdict": "inconclusive"}}]},
        {"outcome": "failed", "results": [
            {"check": "throughput_at_least", "passed": False, "headline": "slow"}]}],
        "comparisons": [{"verdict": "same"}, {"verdict": "regressed"}, {"verdict": "new"},
                        {"verdict": "inconclusive"}]}
    c = ci_load.throughput_counts(doc)
    assert (c["throughput_passed"], c["throughput_inconclusive"], c["throughput_failed"]) == (1, 1, 2)
    assert (c["tests"], c["tests_failed"], c["gate_regressed"], c["gate_compared"]) == (4, 2, 1, 2)
    assert c["gate_verdicts"] == {"same": 1, "regressed": 1, "new": 1, "inconclusive": 1}
    assert len(c["failed_checks"]) == 3  # grads_finite and the two failed throughput checks


def test_zoo_status_of_check_results():
    from pytest_modelcheck.core.result import CheckResult

    assert ci_load._status(CheckResult("a", True, "ok")) == "passed"
    assert ci_load._status(CheckResult("a", False, "bad")) == "failed"
    assert ci_load._status(CheckResult("a", None, "skipped: no target")) == "skipped"
    assert ci_load._status(CheckResult("throughput_at_least", True, "inconclusive: busy",
                                       metrics={"inconclusive": True})) == "inconclusive"
    assert ci_load._status(CheckResult("throughput_at_least", False, "inconclusive, failed",
                                       metrics={"verdict": "inconclusive"})) == "failed"


def test_results_file_keeps_steps_for_resume(tmp_path):
    path = str(tmp_path / "r.json")
    r = ci_load.Results(path, {"date": "x"})
    part = r.part("zoo", {"reps": 1}, resume=False)
    ci_load.step(r, part, "a", lambda: {"v": 1})
    r2 = ci_load.Results(path, {"date": "y"})
    part2 = r2.part("zoo", {"reps": 1}, resume=True)
    calls = []
    assert ci_load.step(r2, part2, "a", lambda: calls.append(1) or {"v": 2})["v"] == 1
    assert calls == []
    fresh = r2.part("zoo", {"reps": 2}, resume=True)  # other settings: start over
    assert fresh["steps"] == {}
    assert [run["date"] for run in r2.doc["runs"]] == ["x", "y"]


def test_pt_skip_names_are_checked():
    with pytest.raises(SystemExit):
        ci_load.parse(["zoo", "--pt-skip", "no_such_assertion"])


def test_pytest_torch_adapter_on_one_case(tmp_path):
    """pytest-torch's assertions on the zoo's nan_log (caught by AssertionError) and its healthy
    twin (clean), in a fresh worker process as the benchmark runs them."""
    if ci_load.find_pytest_torch() is None:
        pytest.skip("pytest-torch is not installed (pip install pytest-torch==1.1.1, or"
                    " --target .venv/extras/pytest-torch)")
    out = ci_load.run_worker("pytest-torch", ["nan_log", "nan_log_ok"],
                             ["gradients_finite", "all_params_receive_grad", "onnx_parity",
                              "output_spec"], timeout=300)
    assert out["rc"] == 0, out.get("error")
    rows = {c["case"]: c for c in out["cases"]}
    bug = {c["check"]: c["status"] for c in rows["nan_log"]["checks"]}
    assert bug["gradients_finite"] == "failed" and rows["nan_log"]["flagged"]
    assert bug["onnx_parity"] in ("n/a", "passed", "failed")  # n/a without onnxruntime
    ok = rows["nan_log_ok"]
    assert not ok["flagged"] and ok["errors"] == []
    assert [d["check"] for d in ok["declared"]] == ["output_spec"]
    assert out["threads"]["env"]["OMP_NUM_THREADS"] is None  # torch defaults in the worker


def test_smoke_run_of_the_zoo_part_end_to_end(tmp_path):
    """``ci_load.py zoo --smoke --load 1 --tools modelcheck``: idle and under load, in the JSON
    with the environment; then ``--resume`` measures nothing again (the pytest-torch worker is
    covered by the adapter test above)."""
    out = str(tmp_path / "ci.json")
    cmd = [sys.executable, os.path.join(BENCH, "ci_load.py"), "zoo", "--smoke", "--load", "1",
           "--tools", "modelcheck", "--out", out]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(out) as fh:
        doc = json.load(fh)
    env = doc["runs"][0]
    assert env["machine"]["cores"] >= 1 and env["torch"] and len(env["load_averages"]) == 3
    zoo = doc["parts"]["zoo"]
    tools = zoo["settings"]["tools"]
    assert tools == ["modelcheck"]
    for tool in tools:
        for cond in ("idle", "load"):
            s = zoo["steps"][f"{tool}/{cond}/rep0"]
            assert s["rc"] == 0 and s["summary"]["bugs"] == 1 and s["summary"]["healthy"] == 1
            assert s["threads"]["env"]["OMP_NUM_THREADS"] is None
            assert s["load_processes"] == (1 if cond == "load" else 0)
            assert wait_gone(s["load_pids"], 10) == []
    mc = zoo["steps"]["modelcheck/idle/rep0"]
    assert mc["summary"]["caught"] == 1 and mc["summary"]["flagged_healthy"] == 0
    assert all("seconds" in chk for c in mc["cases"] for chk in c["checks"])
    again = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "kept from an earlier run" in again.stdout
