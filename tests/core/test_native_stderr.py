"""Kineto's status lines are dropped from a measurement's stderr; everything else is kept."""
from __future__ import annotations

import os

import torch

from pytest_modelcheck.core.memory import measure_step_memory
from pytest_modelcheck.core.native_stderr import filtered_stderr


def test_only_the_prefixed_lines_are_dropped(capfd) -> None:
    with filtered_stderr(("USDT:", "STAGE:")):
        os.write(2, b"USDT:2026 profiler_start\n")
        os.write(2, b"a real warning\n")
        os.write(2, b"STAGE:2026 Completed Stage: Warm Up\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "a real warning\nafter\n"


def test_descriptor_two_is_restored_when_the_block_raises(capfd) -> None:
    try:
        with filtered_stderr(("X:",)):
            os.write(2, b"kept before the error\n")
            raise ValueError("boom")
    except ValueError:
        pass
    os.write(2, b"restored\n")
    assert capfd.readouterr().err == "kept before the error\nrestored\n"


def test_a_cpu_memory_measurement_prints_no_profiler_status_lines(capfd) -> None:
    report = measure_step_memory(torch.nn.Linear(8, 8), torch.ones(4, 8), phase="inference")
    assert report.peak_bytes > 0
    err = capfd.readouterr().err
    assert "USDT:" not in err and "profiler_start" not in err, err
