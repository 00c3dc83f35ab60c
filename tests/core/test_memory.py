"""Peak memory of one step: hand-derived numbers, estimate vs measurement, meta and CUDA paths."""
from __future__ import annotations

import json
import resource
import time

import pytest
import torch
from torch import nn

from pytest_modelcheck.core import memory
from pytest_modelcheck.core.batch import Batch
from pytest_modelcheck.core.errors import UsageError
from pytest_modelcheck.core.memory import (
    CATEGORIES,
    CUDA_BLOCK_BYTES,
    METHOD_CPU,
    METHOD_CUDA,
    METHOD_FAKE,
    EstimateError,
    MemoryReport,
    estimate_step_memory,
    measure_step_memory,
    step_memory,
)
from pytest_modelcheck.core.state import fingerprints_equal, model_fingerprint

MiB = 2**20
# A few 0-d tensors (the loss, a reduction's scratch scalar, Adam's step counters) sit on top
# of the MiB-sized buffers; the hand derivations below are exact up to these. How many there
# are differs between torch releases (torch 2.11 holds 68 bytes of them in the forward).
SCALARS = 256


def sgd(params, lr):
    """Plain SGD: no state, in-place update, so the optimizer step allocates nothing."""
    return torch.optim.SGD(params, lr=lr)


def linear_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 1024, generator=g), torch.randn(256, 1024, generator=g)


# --- hand-derived measurements ------------------------------------------------------------------

def test_inference_peak_of_a_linear_layer_is_derived_by_hand():
    model = nn.Linear(1024, 1024)
    x = torch.ones(256, 1024)
    report = measure_step_memory(model, x, phase="inference")
    weight = 1024 * 1024 * 4  # 4 MiB of float32
    bias = 1024 * 4  # 4 KiB
    inputs = 256 * 1024 * 4  # 1 MiB
    output = 256 * 1024 * 4  # 1 MiB, the only allocation of the step (addmm writes into it)
    assert report.baseline_bytes == weight + bias + inputs
    assert report.peak_bytes == weight + bias + inputs + output == 6_295_552
    assert (report.phase, report.peak_phase, report.device) == ("inference", "forward", "cpu")
    assert report.method == METHOD_CPU and report.estimated is False
    assert report.breakdown["parameters"] == weight + bias
    assert report.breakdown["other"] == inputs  # the batch
    assert report.breakdown["activations"] == output
    assert report.phase_peaks == {"forward": report.peak_bytes}


def squared_error(output, target):
    """MSE written out in Python ops, so each buffer below is one visible op."""
    return (output - target).pow(2).mean()


def test_training_step_peak_with_plain_sgd_is_derived_by_hand():
    model = nn.Linear(1024, 1024, bias=False)
    report = measure_step_memory(model, linear_batch(), squared_error, optimizer=sgd)
    # alive before: W 4 MiB + x 1 MiB + target 1 MiB = 6 MiB
    assert report.baseline_bytes == 6 * MiB
    # forward: out = x @ W.T (1 MiB), diff = out - y (1 MiB, saved by pow's backward),
    # diff**2 (1 MiB, freed once mean has read it) -> 6 + 3 = 9 MiB
    assert 9 * MiB <= report.phase_peaks["forward"] <= 9 * MiB + SCALARS
    # backward starts with out + diff (2 MiB) alive. Mean's backward makes grad/N (1 MiB);
    # pow's backward makes diff**1 (1 MiB), 2*diff (1 MiB) and grad*2*diff (1 MiB) before
    # freeing them and diff: 6 + 2 + 4 = 12 MiB. Then mm's backward holds out, the grad of
    # out and W.grad (4 MiB): 6 + 1 + 1 + 4 = 12 MiB again.
    assert 12 * MiB <= report.phase_peaks["backward"] <= 12 * MiB + SCALARS
    # optimizer step: the graph is freed; out (1 MiB) and W.grad (4 MiB) stay and SGD
    # updates W in place -> 6 + 1 + 4 = 11 MiB
    assert 11 * MiB <= report.phase_peaks["optimizer step"] <= 11 * MiB + SCALARS
    assert report.peak_phase == "backward"
    assert report.peak_bytes == report.phase_peaks["backward"]
    assert report.optimizer_state_bytes == 0


def test_adam_state_and_temporaries_put_the_peak_in_the_optimizer_step():
    model = nn.Linear(1024, 1024, bias=False)
    batch = linear_batch()
    adam = measure_step_memory(model, batch, squared_error, optimizer="adam")
    fused = measure_step_memory(model, batch, squared_error,
                                optimizer=lambda p, lr: torch.optim.Adam(p, lr=lr, fused=True))
    # 11 MiB are alive when step() begins (see above). Adam creates exp_avg and exp_avg_sq
    # (2 x 4 MiB); on CPU its default single-tensor update also makes two W-sized
    # temporaries (exp_avg_sq.sqrt(), then its division): 11 + 8 + 8 = 27 MiB.
    assert 27 * MiB <= adam.peak_bytes <= 27 * MiB + SCALARS
    assert adam.peak_phase == "optimizer step"
    assert 8 * MiB <= adam.optimizer_state_bytes <= 8 * MiB + SCALARS
    assert adam.breakdown["optimizer_state"] >= 16 * MiB
    assert adam.breakdown["gradients"] == 4 * MiB
    # the fused kernel updates in place: only the 8 MiB of state -> 19 MiB
    assert 19 * MiB <= fused.peak_bytes <= 19 * MiB + SCALARS
    # the estimate sees the same buffers
    estimate = estimate_step_memory(model, batch, squared_error, optimizer="adam")
    assert abs(estimate.peak_bytes - adam.peak_bytes) <= SCALARS


# --- estimate vs measurement ----------------------------------------------------------------------

def mlp():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.GELU(),
                          nn.Linear(512, 10))
    return model, (torch.randn(64, 256), torch.randint(0, 10, (64,)))


def conv_net():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return model, (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))


def transformer_encoder():
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                       batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    return model, torch.randn(4, 32, 64)


@pytest.mark.parametrize("phase", ["train", "inference"])
@pytest.mark.parametrize("build", [mlp, conv_net, transformer_encoder],
                         ids=["mlp", "conv", "transformer"])
def test_estimate_is_within_five_percent_of_the_measurement(build, phase):
    torch.manual_seed(0)
    model, batch = build()
    measured = measure_step_memory(model, batch, phase=phase)
    estimated = estimate_step_memory(model, batch, phase=phase)
    ratio = estimated.peak_bytes / measured.peak_bytes
    assert 0.95 <= ratio <= 1.05, (ratio, measured.render(), estimated.render())
    assert estimated.estimated and estimated.method == METHOD_FAKE
    assert estimated.baseline_bytes == measured.baseline_bytes
    assert estimated.peak_phase == measured.peak_phase


def test_estimate_restores_the_fastpath_flag():
    before = torch.backends.mha.get_fastpath_enabled()
    model, batch = transformer_encoder()
    estimate_step_memory(model, batch, phase="inference")
    assert torch.backends.mha.get_fastpath_enabled() == before


# --- what the step leaves behind ------------------------------------------------------------------

def trained_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    model(x).sum().backward()  # the caller's model carries gradients
    model.eval()
    return model, (x, torch.randint(0, 4, (8,)))


@pytest.mark.parametrize("fn", [measure_step_memory, estimate_step_memory])
def test_model_batch_and_rng_are_left_as_they_were(fn):
    model, (x, y) = trained_model()
    before = model_fingerprint(model)
    x0, y0 = x.clone(), y.clone()
    rng = torch.get_rng_state()
    fn(model, (x, y))
    assert fingerprints_equal(before, model_fingerprint(model)) == []
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert torch.equal(rng, torch.get_rng_state())
    assert not model.training


def test_report_is_builtin_data_and_renders_a_table():
    model, batch = mlp()
    report = measure_step_memory(model, batch)
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(CATEGORIES) <= set(data["breakdown"])
    assert MemoryReport(**data).to_dict() == data
    text = report.render()
    assert text.splitlines()[0].startswith("peak ")
    for word in ("parameters", "gradients", "optimizer_state", "total", "peak by phase"):
        assert word in text


def test_top_modules_are_sorted_and_name_module_paths():
    model, batch = mlp()
    report = measure_step_memory(model, batch, phase="inference")
    values = [v for _, v in report.top_modules]
    assert values == sorted(values, reverse=True) and len(values) <= memory.TOP_MODULES
    # Linear(256, 512) and the ReLU after it each leave a 64 x 512 float32 output alive
    assert dict(report.top_modules)["0"] == 64 * 512 * 4
    assert {name for name, _ in report.top_modules} <= {"0", "1", "2", "3", "4"}


def test_a_loss_that_calls_the_model_again_is_tracked_as_a_repeated_call():
    # as a GAN generator loss scores its output with the discriminator
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))

    def loss(output, target, model):
        return model(output).pow(2).mean()

    batch = torch.randn(32, 64)
    measured = measure_step_memory(model, batch, loss)
    estimated = estimate_step_memory(model, batch, loss)
    assert measured.breakdown["parameters"] == sum(p.numel() * 4 for p in model.parameters())
    assert 0.95 <= estimated.peak_bytes / measured.peak_bytes <= 1.05


def test_data_dependent_model_cannot_be_estimated():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x) if x.sum().item() > 0 else -self.lin(x)

    with pytest.raises(EstimateError, match="tensor values"):
        estimate_step_memory(Branchy(), torch.randn(4, 8))
    assert measure_step_memory(Branchy(), torch.randn(4, 8)).peak_bytes > 0


def test_bad_arguments_are_usage_errors():
    model, batch = mlp()
    with pytest.raises(UsageError, match=r"^phase='eval': expected 'train' or 'inference'$"):
        measure_step_memory(model, batch, phase="eval")
    with pytest.raises(UsageError, match="phase='inference'"):
        frozen = nn.Linear(4, 4).requires_grad_(False)
        measure_step_memory(frozen, torch.ones(2, 4))


# --- meta models and CUDA ---------------------------------------------------------------------------

def test_meta_model_of_4_gib_is_estimated_without_allocating_it():
    with torch.device("meta"):
        big = nn.Sequential(nn.Linear(32768, 32768), nn.ReLU(), nn.Linear(32768, 8))
    weights = 32768 * 32768 * 4  # 4 GiB of float32
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    report = estimate_step_memory(big, (torch.randn(2, 32768), torch.randint(0, 8, (2,))),
                                  optimizer=sgd)
    elapsed = time.perf_counter() - start
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert report.breakdown["parameters"] >= weights
    assert report.peak_bytes >= 2 * weights  # parameters + their gradients
    assert grew < weights // 4, f"peak RSS grew by {grew} bytes"
    assert elapsed < 30
    with pytest.raises(UsageError, match="meta device"):
        measure_step_memory(big, torch.randn(2, 32768))
    assert step_memory(big, torch.randn(2, 32768), phase="inference").estimated


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_cuda_without_cuda_is_estimated_in_512_byte_blocks():
    model, batch = mlp()
    report = step_memory(model, batch, device="cuda")
    assert report.estimated and report.device == "cuda (estimated on CPU)"
    assert report.method == METHOD_FAKE
    assert all(v % CUDA_BLOCK_BYTES == 0 for v in report.breakdown.values())
    assert report.peak_bytes % CUDA_BLOCK_BYTES == 0
    cpu = estimate_step_memory(model, batch)
    assert report.baseline_bytes >= cpu.baseline_bytes
    with pytest.raises(UsageError, match="CUDA is not available"):
        measure_step_memory(model, batch, device="cuda")


class FakeCuda:
    """Stands in for torch.cuda: the step runs on CPU, the allocator numbers are scripted."""

    def __init__(self, external, placed, phase_max):
        self.external, self.placed = external, placed
        self.phase_max = list(phase_max)
        self.allocated_calls = 0
        self.calls = []

    def is_available(self):
        return True

    def placement(self, device):
        assert torch.device(device).type == "cuda"
        return torch.device("cpu")

    def synchronize(self, device):
        self.calls.append("synchronize")

    def warm_up_libraries(self, device):
        self.calls.append("warm up")

    def release_cached_blocks(self, device):
        self.calls.append("release cache")

    def reset_peak_memory_stats(self, device):
        self.calls.append("reset")

    def memory_allocated(self, device):
        self.allocated_calls += 1
        return self.external if self.allocated_calls == 1 else self.external + self.placed

    def max_memory_allocated(self, device):
        self.calls.append("max")
        return self.external + self.phase_max.pop(0)


def test_cuda_branch_uses_the_caching_allocator_statistics(monkeypatch):
    # another 1000 bytes live on the device before the copy is placed; they are not the step's
    fake = FakeCuda(external=1000, placed=6 * MiB,
                    phase_max=[9 * MiB, 13 * MiB, 12 * MiB])
    monkeypatch.setattr(memory, "_cuda_api", fake)
    model = nn.Linear(1024, 1024, bias=False)
    before = model_fingerprint(model)
    report = measure_step_memory(model, linear_batch(), squared_error, optimizer=sgd,
                                 device="cuda")
    assert report.method == METHOD_CUDA and not report.estimated
    assert report.device == "cuda"
    assert report.baseline_bytes == 6 * MiB
    assert report.phase_peaks == {"forward": 9 * MiB, "backward": 13 * MiB,
                                  "optimizer step": 12 * MiB}
    assert (report.peak_bytes, report.peak_phase) == (13 * MiB, "backward")
    assert report.breakdown["parameters"] == 4 * MiB  # MemTracker ran alongside
    # library workspaces first, an empty cache, synchronize before and after placing the
    # copy, then per phase: synchronize, reset, (run), synchronize, read the maximum
    assert fake.calls == (["warm up", "synchronize", "release cache", "synchronize"]
                          + ["synchronize", "reset", "synchronize", "max"] * 3)
    assert fingerprints_equal(before, model_fingerprint(model)) == []
    fake.allocated_calls, fake.phase_max = 0, [1, 2, 3]
    assert step_memory(model, linear_batch(), "mse", device="cuda").method == METHOD_CUDA


def test_batch_object_is_accepted_as_is():
    x, y = linear_batch()
    report = measure_step_memory(nn.Linear(1024, 1024), Batch.from_user(x), phase="inference")
    assert report.peak_bytes > report.baseline_bytes
