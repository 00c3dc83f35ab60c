"""Guarded subprocesses: a native crash in the child fails a check instead of killing the session."""
from __future__ import annotations

import ctypes
import os
import time

import pytest
import torch
from torch import nn

from pytest_modelcheck.checks.memory import memory_under
from pytest_modelcheck.core.errors import ModelError
from pytest_modelcheck.core.isolate import (IsolatedCrash, IsolatedTimeout, NotIsolatable,
                                            run_isolated)
from pytest_modelcheck.core.memory import CRASH_SEAM_ENV

# Top-level functions: the child imports this module by name to unpickle them.


def _abort():
    os.abort()


def _segfault():
    ctypes.string_at(0)


def _square_tensor(t, *, power=2):
    return t ** power, os.getpid()


def _raise_value_error(text):
    raise ValueError(text)


def _sleep(seconds):
    time.sleep(seconds)
    return "woke up"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)


def test_abort_in_the_child_is_a_crash_naming_sigabrt():
    with pytest.raises(IsolatedCrash) as info:
        run_isolated(_abort, what="the estimate")
    assert str(info.value) == "the estimate crashed the worker process (SIGABRT)"
    assert info.value.signal_name == "SIGABRT" and isinstance(info.value, ModelError)
    assert run_isolated(abs, -3) == 3  # the parent lives on and can start another child


def test_segfault_in_the_child_is_a_crash_naming_sigsegv():
    with pytest.raises(IsolatedCrash, match=r"crashed the worker process \(SIGSEGV\)$"):
        run_isolated(_segfault)


def test_a_result_round_trips():
    value, child_pid = run_isolated(_square_tensor, torch.arange(4.0), power=3)
    assert torch.equal(value, torch.tensor([0.0, 1.0, 8.0, 27.0]))  # 0^3, 1^3, 2^3, 3^3
    assert child_pid != os.getpid()


def test_a_child_exception_comes_back_as_itself_in_one_line():
    with pytest.raises(ValueError) as info:
        run_isolated(_raise_value_error, "limit: expected a size, got 'x'")
    assert str(info.value) == "limit: expected a size, got 'x'"
    assert "_raise_value_error" in info.value.isolated_traceback


def test_a_timeout_kills_the_child():
    with pytest.raises(IsolatedTimeout, match="did not finish in 0.5 s") as info:
        run_isolated(_sleep, 60, timeout=0.5)
    assert info.value.returncode == -9  # SIGKILL


def test_unpicklable_work_is_refused_before_a_child_starts():
    with pytest.raises(NotIsolatable, match="lambda|local"):
        run_isolated(lambda: 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_memory_under_estimates_cuda_in_a_worker():
    ok = memory_under("1 GiB", model=_model(), batch=_batch(), device="cuda")
    assert ok.passed is True and ok.estimated is True, ok.format()
    assert "estimated for cuda: fake tensors" in ok.headline
    assert "ran in the test process" not in ok.details  # it ran in the worker
    bad = memory_under("4 KiB", model=_model(), batch=_batch(), device="cuda")
    assert bad.passed is False and bad.estimated is True
    assert bad.headline.startswith("expected peak memory of a training step under 4.00 KiB,"
                                   " estimated ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_an_unpicklable_model_is_estimated_in_process_with_a_note():
    class Local(nn.Module):  # defined in a function: cannot be pickled
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x)

    result = memory_under("1 GiB", model=Local(), batch=_batch(), device="cuda")
    assert result.passed is True and result.estimated is True
    assert "note: the estimate ran in the test process" in result.details


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
@pytest.mark.parametrize("how, signal_name", [("abort", "SIGABRT"), ("segfault", "SIGSEGV")])
def test_a_crashing_estimate_is_a_failed_check(monkeypatch, how, signal_name):
    monkeypatch.setenv(CRASH_SEAM_ENV, how)  # read by the worker (see core/memory.py)
    result = memory_under("1 GiB", model=_model(), batch=_batch(), device="cuda")
    assert result.passed is False
    assert result.headline == ("expected peak memory of a training step under 1.00 GiB,"
                               f" observed the estimate crashed its worker process"
                               f" ({signal_name}); the test session goes on")
    assert result.metrics["crashed"] == signal_name
    assert "remedy:" in result.details
    # measured paths stay in-process: the seam does not touch a CPU step
    assert memory_under("1 GiB", model=_model(), batch=_batch(), device="cpu").passed
