"""Thread control (core.threads), the per-test time budget (checks.registry.CheckBudget,
run_plans, CheckSpec.run's budget_left) and check_model's threads=/budget=: injected cores,
workers, load, FLOPs and a fake clock, so that nothing depends on this machine or its speed."""
import inspect
import time

import pytest
import torch

from pytest_modelcheck import check_model
from pytest_modelcheck.checks.registry import CheckBudget, CheckSpec, run_plans
from pytest_modelcheck.core.errors import UsageError
from pytest_modelcheck.core.result import CheckResult
from pytest_modelcheck.core.threads import (SMALL_MODEL_FLOPS, SMALL_MODEL_PARAMETERS,
                                            ThreadChoice, child_threads, choose_threads,
                                            sibling_workers, torch_threads, validate_threads)

BIG = 10 * SMALL_MODEL_FLOPS


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


# -- choose_threads -----------------------------------------------------------------------
def test_auto_small_model_gets_one_thread():
    c = choose_threads(flops=3.1e6, cores=16, workers=1, load=0.0, current=16)
    assert (c.count, c.reason, c.setting) == (1, "auto: small model (3.1 MFLOP per forward)", "auto")


def test_auto_big_model_on_idle_machine_gets_all_cores():
    c = choose_threads(flops=BIG, cores=16, workers=1, load=0.5, current=16)
    assert (c.count, c.reason) == (16, "auto: 16 cores")


def test_auto_divides_cores_among_xdist_workers():
    c = choose_threads(flops=BIG, cores=2, workers=2, load=0.1, current=2)
    assert (c.count, c.reason) == (1, "auto: 2 xdist workers on 2 cores")
    # 16 // 3 = 5 threads per worker
    assert choose_threads(flops=BIG, cores=16, workers=3, load=0.0, current=16).count == 5
    # more workers than cores: still one thread
    assert choose_threads(flops=BIG, cores=2, workers=8, load=0.0, current=2).count == 1


def test_auto_loaded_machine_gets_one_thread():
    c = choose_threads(flops=BIG, cores=2, workers=1, load=3.2, current=2)
    assert (c.count, c.reason) == (1, "auto: machine load 3.2 on 2 cores")
    # load per core just below 1: not oversubscribed (1.9 / 2 = 0.95)
    assert choose_threads(flops=BIG, cores=2, workers=1, load=1.9, current=2).count == 2
    # exactly 1 per core: oversubscribed
    assert choose_threads(flops=BIG, cores=2, workers=1, load=2.0, current=2).count == 1


def test_auto_never_exceeds_torch_current_count():
    c = choose_threads(flops=BIG, cores=16, workers=1, load=0.0, current=4)
    assert (c.count, c.reason) == (4, "auto: torch's setting")


def test_auto_unknown_flops_falls_back_to_parameter_count():
    small = choose_threads(parameters=SMALL_MODEL_PARAMETERS - 1, cores=8, workers=1, load=0.0,
                           current=8)
    assert small.count == 1 and "parameters, FLOPs not counted" in small.reason
    big = choose_threads(parameters=SMALL_MODEL_PARAMETERS, cores=8, workers=1, load=0.0,
                         current=8)
    assert big.count == 8
    # nothing known: not small, the budget decides
    assert choose_threads(cores=8, workers=1, load=0.0, current=8).count == 8


def test_auto_without_load_average_ignores_load(monkeypatch):
    import os
    monkeypatch.delattr(os, "getloadavg")  # a system without a load average
    c = choose_threads(flops=BIG, cores=4, workers=1, load=None, current=4)
    assert (c.count, c.reason) == (4, "auto: 4 cores")


def test_keep_and_explicit_counts():
    assert choose_threads("keep", current=7).to_dict() == {
        "count": 7, "reason": "keep: the process setting", "setting": "keep"}
    assert choose_threads("3", current=8) == ThreadChoice(3, "set by --modelcheck-threads", "3")
    # an explicit count is used as given, even above the current count and on a small model
    assert choose_threads(12, flops=1.0, current=2, origin="threads=12").reason == \
        "set by threads=12"


@pytest.mark.parametrize("bad", ["0", 0, -1, "many", 2.5, True, "1.5", 10 ** 6, [1]])
def test_bad_settings_are_usage_errors(bad):
    with pytest.raises(UsageError, match=r"expected 'auto', 'keep' or a thread count"):
        validate_threads(bad)


def test_sibling_workers_reads_xdist_count(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    assert sibling_workers() == 4
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "junk")
    assert sibling_workers() == 1
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT")
    assert sibling_workers() == 1
    # choose_threads reads it when workers is not given
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert choose_threads(flops=BIG, cores=8, load=0.0, current=8).count == 4


# -- torch_threads restores exactly ---------------------------------------------------------
def test_torch_threads_sets_and_restores(restore_threads):
    torch.set_num_threads(3)
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3


def test_torch_threads_restores_on_exception(restore_threads):
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_torch_threads_restores_what_the_body_changed(restore_threads):
    torch.set_num_threads(2)
    with torch_threads(1):
        torch.set_num_threads(4)  # the model's code changes it
    assert torch.get_num_threads() == 2


def test_torch_threads_none_changes_nothing(restore_threads):
    torch.set_num_threads(2)
    with torch_threads(None):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


def test_child_threads_restores_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with child_threads(1):
        import os
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "7"


# -- the time budget, with a fake clock ----------------------------------------------------
class FakeClock:
    """A clock that only moves when a fake check says so."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _spec(name):
    def impl(*, model, batch, loss=None, device=None):
        raise AssertionError("not run in these tests")

    return CheckSpec(name, impl, inspect.signature(impl), "fake", False, None, True)


def test_budget_skips_the_checks_after_it_is_spent():
    clock = FakeClock()
    budget = CheckBudget(60, clock=clock)
    cost = {"a": 25.0, "b": 40.0, "c": 1.0, "d": 1.0}  # a+b = 65 s >= 60 s: c and d skipped
    ran, lefts = [], []

    def run(spec, values, left):
        ran.append(spec.name)
        lefts.append(left)
        clock.now += cost[spec.name]
        return CheckResult(spec.name, True, "ok")

    results = run_plans([(_spec(n), {}) for n in "abcd"], run, budget)
    assert ran == ["a", "b"]
    assert lefts == [60.0, 35.0]  # each check is bounded by what is left
    assert [r.status for r in results] == ["passed", "passed", "skipped", "skipped"]
    assert [r.check for r in results] == list("abcd")  # never dropped
    assert results[2].headline == \
        "skipped: the test's time budget of 60 s was spent (ran 2 of 4 checks)"
    assert results[3].metrics["budget_spent"] is True and results[3].metrics["budget_s"] == 60


def test_budget_not_spent_runs_everything():
    clock = FakeClock()
    budget = CheckBudget(60, clock=clock)

    def run(spec, values, left):
        clock.now += 10.0
        return CheckResult(spec.name, True, "ok")

    results = run_plans([(_spec(n), {}) for n in "abc"], run, budget)
    assert [r.status for r in results] == ["passed"] * 3
    assert budget.spent == 30.0 and budget.left() == 30.0


def test_no_budget_runs_everything_with_no_limit():
    lefts = []

    def run(spec, values, left):
        lefts.append(left)
        return CheckResult(spec.name, False, "bad")

    results = run_plans([(_spec(n), {}) for n in "ab"], run)
    assert lefts == [None, None] and [r.status for r in results] == ["failed", "failed"]


def test_check_stopped_by_the_budget_is_skipped_with_the_budget_headline():
    clock = FakeClock()
    budget = CheckBudget(60, clock=clock)

    def run(spec, values, left):
        clock.now += 20.0 if spec.name == "a" else left  # b runs until the budget is spent
        if spec.name == "b":
            return CheckResult(spec.name, None, "stopped", metrics={"budget_spent": True})
        return CheckResult(spec.name, True, "ok")

    results = run_plans([(_spec(n), {}) for n in "abc"], run, budget)
    assert [r.status for r in results] == ["passed", "skipped", "skipped"]
    assert results[1].headline == results[2].headline == \
        "skipped: the test's time budget of 60 s was spent (ran 1 of 3 checks)"


def _sleeping_spec(seconds):
    def impl(*, model, batch, loss=None, device=None):
        time.sleep(seconds)
        return CheckResult("sleepy", True, "ok")

    return CheckSpec("sleepy", impl, inspect.signature(impl), "sleeps", False, None, True)


def test_run_reports_a_budget_overrun_as_skipped_and_a_timeout_as_failed():
    # the check sleeps 60 s; the alarm stops it long before, whichever limit is nearer
    spec, model, batch = _sleeping_spec(60), torch.nn.Linear(2, 2), torch.zeros(1, 2)
    by_budget = spec.run({}, model=model, batch=batch, timeout=30, budget_left=0.2)
    assert by_budget.passed is None and by_budget.metrics["budget_spent"] is True
    by_timeout = spec.run({}, model=model, batch=batch, timeout=0.2, budget_left=30)
    assert by_timeout.passed is False and by_timeout.metrics["timeout_s"] == 0.2


# -- check_model(threads=, budget=) ----------------------------------------------------------
SEEN: list = []  # module level: the checks run on copies of the model


class ThreadSpy(torch.nn.Module):
    """Records torch's thread count at every forward (of any copy) in SEEN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.seen = SEEN
        SEEN.clear()

    def forward(self, x):
        SEEN.append(torch.get_num_threads())
        return self.lin(x)


def test_check_model_runs_at_the_chosen_count_and_restores(restore_threads):
    torch.set_num_threads(3)
    m = ThreadSpy()
    report = check_model(m, (torch.randn(8, 4), torch.randint(0, 3, (8,))),
                         checks=["grads_finite"], threads=2)
    assert report.passed and set(m.seen) == {2}
    assert report["grads_finite"].metrics["threads"] == 2
    assert torch.get_num_threads() == 3


def test_check_model_auto_gives_a_small_model_one_thread(restore_threads):
    torch.set_num_threads(2)
    m = ThreadSpy()
    report = check_model(m, (torch.randn(8, 4), torch.randint(0, 3, (8,))),
                         checks=["grads_finite"])
    # the FLOP count's forward ran at the budget; the check's forward at 1 thread
    assert m.seen[-1] == 1 and report["grads_finite"].metrics["threads"] == 1
    assert torch.get_num_threads() == 2


def test_check_model_keep(restore_threads):
    torch.set_num_threads(2)
    m = ThreadSpy()
    check_model(m, (torch.randn(8, 4), torch.randint(0, 3, (8,))), checks=["grads_finite"],
                threads="keep")
    assert set(m.seen) == {2}


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 0}, "threads=0: got 0; expected 'auto', 'keep' or a thread count"),
    ({"budget": "soon"}, "budget='soon': "),
    ({"budget": 0}, "budget=0: expected a positive duration"),
])
def test_check_model_usage_errors(kwargs, message):
    with pytest.raises(UsageError) as info:
        check_model(torch.nn.Linear(4, 3), torch.zeros(2, 4), checks=["grads_finite"], **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_child_threads_reaches_a_spawned_check_process(monkeypatch):
    # what --modelcheck-isolate=spawn relies on: the spawned interpreter's torch reads it
    from pytest_modelcheck.core.isolate import run_isolated

    from pytest_modelcheck.core.threads import usable_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # a child would take every core
    with child_threads(1):
        assert run_isolated(torch.get_num_threads, timeout=300) == 1
    with child_threads(usable_cores()):  # torch caps the variable at the cores it has
        assert run_isolated(torch.get_num_threads, timeout=300) == usable_cores()
