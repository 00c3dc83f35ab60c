"""The cuDNN workspace bound of CUDA estimates (core/cuda_workspace.py), on a CPU-only runner."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pytest_modelcheck.checks import memory_under
from pytest_modelcheck.core.memory import estimate_step_memory


def test_a_convolution_gets_an_upper_bound_above_the_estimate() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 16, 16)
    r = estimate_step_memory(model, x, phase="inference", device="cuda")
    # 512-byte blocks: input 8192, weight 1152 -> 1536, bias 32 -> 512, output 16384
    assert r.peak_bytes == 8192 + 1536 + 512 + 16384
    # the bound adds input + output + weight at the convolution
    assert r.peak_upper_bytes == r.peak_bytes + 8192 + 16384 + 1536
    assert "up to" in r.render() and r.to_dict()["peak_upper_bytes"] == r.peak_upper_bytes


def test_the_backward_bound_is_two_and_a_half_times_the_operands() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 16, 16)
    r = estimate_step_memory(model, (x, torch.randn(2, 8, 16, 16)), lambda o, t: (o - t).pow(2).mean(),
                             phase="train", optimizer="sgd", device="cuda")
    assert r.peak_upper_bytes is not None and r.peak_upper_bytes > r.peak_bytes
    # at least the backward's bound, 2.5 x (input 8192 + grad_output 16384 + weight 1536), on
    # top of what was alive before the step (parameters and batch)
    assert r.peak_upper_bytes >= r.baseline_bytes + int(2.5 * (8192 + 16384 + 1536))


def test_no_bound_without_convolutions_and_none_on_cpu() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    cuda = estimate_step_memory(model, x, phase="inference", device="cuda")
    assert cuda.peak_upper_bytes == cuda.peak_bytes
    assert estimate_step_memory(model, x, phase="inference").peak_upper_bytes is None
    conv_cpu = estimate_step_memory(nn.Conv2d(4, 8, 3), torch.randn(2, 4, 16, 16),
                                    phase="inference")
    assert conv_cpu.peak_upper_bytes is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_memory_under_warns_when_the_bound_crosses_the_limit() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 16, 16)
    # estimate 26624 bytes, bound 52736: a 40000-byte limit passes with a warning
    r = memory_under(40000, phase="inference", model=model, batch=x, device="cuda")
    assert r.passed is True and r.estimated
    assert "could take the peak to up to" in r.details, r.details
    assert r.metrics["peak_upper_bytes"] == 52736
    quiet = memory_under(60000, phase="inference", model=model, batch=x, device="cuda")
    assert quiet.passed and "could take the peak" not in quiet.details
