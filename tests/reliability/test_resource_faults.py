"""Resource faults: a time budget per check, out-of-memory inside a check, a forward that raises."""
import pytest
import torch
from torch import nn

from pytest_modelcheck.checks import grads_finite, shapes_consistent
from pytest_modelcheck.core.guard import CheckTimeout, is_out_of_memory, time_budget


class SleepyForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        import time
        time.sleep(0.5)
        return self.lin(x)


class FakeOOM(nn.Module):
    """Raises what the CUDA caching allocator raises, on CPU."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_time_budget_raises_and_restores_the_alarm_handler():
    import signal
    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(CheckTimeout):
        with time_budget(0.05):
            while True:
                pass
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_check_over_budget_fails_with_a_clear_headline():
    spec = shapes_consistent.spec
    r = spec.run(spec.bind((), {}), model=SleepyForward(), batch=torch.zeros(2, 4), timeout=0.2)
    assert r.passed is False
    assert r.headline == "expected the check to finish in 0.2 s, observed it exceeded its time budget of 0.2 s"


def test_out_of_memory_becomes_a_failed_result_and_the_next_check_runs():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    r = grads_finite(model=FakeOOM(), batch=torch.zeros(2, 4))
    assert r.passed is False
    assert r.headline.startswith("expected the check to fit in device memory, observed out of memory")
    assert r.metrics["oom"] is True
    assert grads_finite(model=nn.Linear(4, 2), batch=torch.zeros(2, 4)).passed


def test_forward_that_raises_names_the_module():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(x)

    r = grads_finite(model=Broken(), batch=torch.zeros(2, 4))
    assert r.passed is False
    assert r.headline.startswith("forward raised RuntimeError in module 'head' (Linear)")


def test_timeout_option_fails_the_slow_check_and_the_session_goes_on(pytester):
    pytester.makeconftest("""
        import time, pytest, torch
        class Slow(torch.nn.Module):
            def __init__(self):
                super().__init__(); self.l = torch.nn.Linear(4, 2)
            def forward(self, x):
                time.sleep(0.3); return self.l(x)
        @pytest.fixture
        def model(): return Slow()
        @pytest.fixture
        def fast(): return torch.nn.Linear(4, 2)
        @pytest.fixture
        def batch(): return torch.zeros(2, 4)
    """)
    pytester.makepyfile("""
        import pytest
        @pytest.mark.shapes_consistent
        def test_slow(): pass
        @pytest.mark.shapes_consistent(model_fixture="fast")
        def test_fast(): pass
    """)
    result = pytester.runpytest("--modelcheck", "--modelcheck-timeout=0.5s")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*expected the check to finish in 0.5 s, observed it exceeded*"])


def test_bad_timeout_is_a_usage_error(pytester):
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest("--modelcheck-timeout=soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--modelcheck-timeout / modelcheck_timeout: expected a duration*"])
