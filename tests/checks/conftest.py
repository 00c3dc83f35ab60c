"""Shared helpers for the check tests: one torch thread, and a fake clock for throughput_at_least."""
import pytest
import torch

import pytest_modelcheck.checks.throughput as throughput_module


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """Run torch on one thread here and in pytester subprocesses.

    The models are tiny; with two intra-op threads on a loaded two-core machine each op waits on
    the busy other core, and a 30-step training run takes seconds instead of milliseconds.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeClock:
    """A clock for ``throughput_at_least``'s ``TIMER`` seam.

    The check reads the clock twice per timed run (before and after the step). Each pair of
    readings is ``t`` then ``t + d``, where ``d`` is the next scripted duration, or ``then``
    once the script is used up. Durations are multiples of 1/4 s, so every reading and every
    difference is exact in binary floating point.
    """

    def __init__(self, durations, then=None):
        self.script = list(durations)
        self.then = then
        self.now = 0.0
        self.reads = 0
        self._in_run = False

    def __call__(self):
        self.reads += 1
        if self._in_run:
            if self.script:
                self.now += self.script.pop(0)
            elif self.then is not None:
                self.now += self.then
            else:
                raise AssertionError("the fake clock ran out of scripted durations")
        self._in_run = not self._in_run
        return self.now


@pytest.fixture
def fake_timer(monkeypatch):
    """``fake_timer(durations, then=None)`` installs a FakeClock as the throughput TIMER."""

    def install(durations=(), then=None):
        clock = FakeClock(durations, then)
        monkeypatch.setattr(throughput_module, "TIMER", clock)
        return clock

    return install
