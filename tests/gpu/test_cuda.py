"""The CUDA code paths, for real: run on a machine with a GPU, skipped elsewhere.

Every path here is also unit-tested through CPU fallbacks or fakes in the other suites; these
tests confirm the fakes describe the real thing: the caching allocator's peak against the
fake-tensor estimate, CUDA events, the driver's sync debug mode, a real out-of-memory error,
and ``device_portable`` moving a model to the GPU.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# The CUDA estimate rounds every block to 512 bytes and, on a machine with the GPU, asks it for
# each kernel's workspace (core/cuda_probe.py). The target is 10% of the caching allocator's peak.
CUDA_TOLERANCE = 0.10


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _UNet(nn.Module):
    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
        self.down = nn.Conv2d(c, 2 * c, 3, padding=1, stride=2)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec = nn.Conv2d(2 * c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc(x)
        return self.dec(torch.cat([a, self.up(F.relu(self.down(a)))], dim=1))


def _transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 4, enable_nested_tensor=False),
                         nn.Linear(256, 256))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(),
                         nn.Linear(2048, 512))


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def _ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)


CASES = {
    "mlp": (_mlp, lambda b: (torch.randn(b, 512), torch.randn(b, 512)), _mse),
    "convnet": (_Conv, lambda b: (torch.randn(b, 3, 64, 64), torch.randint(0, 10, (b,))), _ce),
    "unet": (_UNet, lambda b: (torch.randn(b, 1, 96, 96), torch.randn(b, 1, 96, 96)), _mse),
    "transformer": (_transformer, lambda b: (torch.randn(b, 128, 256), torch.randn(b, 128, 256)),
                    _mse),
}


EXAMPLES = {"icecube_deepsets": 8, "vit3d": 4, "pix2pixcc_gan": 4, "swinir": 1,
            "vnet_unet": 4, "fno": 4, "genesis_dit": 4}


def _example(name: str, size: int) -> tuple:
    import importlib

    from pytest_modelcheck.core.batch import Batch
    from pytest_modelcheck.core.losses import resolve_loss

    mod = importlib.import_module(f"example_models.{name}")
    model = mod.build_model().cuda()
    batch = Batch.from_user(mod.make_batch(size)).to("cuda")
    with torch.no_grad():
        out = batch.call(model)
    return model, batch, resolve_loss(mod.loss_fn, batch, out)


@pytest.mark.parametrize("phase", ["train", "inference"])
@pytest.mark.parametrize("name", sorted(CASES) + sorted(EXAMPLES))
def test_estimate_against_the_caching_allocator_peak(name: str, phase: str) -> None:
    # Convolutions included: cuDNN's workspaces come from probing each kernel on the GPU.
    from pytest_modelcheck.core.memory import (METHOD_CUDA, estimate_step_memory,
                                               measure_step_memory)

    torch.manual_seed(0)
    if name in CASES:
        factory, make, loss = CASES[name]
        model = factory().cuda()
        batch = tuple(t.cuda() for t in make(16))
    else:
        model, batch, loss = _example(name, EXAMPLES[name])
    real = measure_step_memory(model, batch, loss, phase=phase)
    est = estimate_step_memory(model, batch, loss, phase=phase, device="cuda")
    assert real.method == METHOD_CUDA and not real.estimated and est.estimated
    ratio = est.peak_bytes / real.peak_bytes
    print(f"{name} {phase}: measured {real.peak_bytes} estimated {est.peak_bytes}"
          f" ratio {ratio:.3f} (measured phase {real.peak_phase}, estimated {est.peak_phase});"
          f" {est.kernel_workspaces}")
    assert "probed on the GPU" in est.kernel_workspaces, est.kernel_workspaces
    assert est.peak_upper_bytes == est.peak_bytes
    assert abs(ratio - 1) <= CUDA_TOLERANCE, (name, phase, real.peak_bytes, est.peak_bytes)


def test_memory_under_measures_on_the_gpu_and_fails_when_over() -> None:
    from pytest_modelcheck.checks import memory_under

    model = _mlp().cuda()
    batch = (torch.randn(64, 512, device="cuda"), torch.randn(64, 512, device="cuda"))
    ok = memory_under("4 GiB", model=model, batch=batch, loss=_mse)
    assert ok.passed, ok.headline
    assert ok.metrics["method"].startswith("cuda") and not ok.metrics.get("estimated"), ok.metrics
    # parameters alone are 2*(512*2048 + 2048*2048 + 2048*512)*4 bytes ~ 25 MiB
    bad = memory_under("8 MiB", model=model, batch=batch, loss=_mse)
    assert bad.passed is False and "MiB" in bad.headline, bad.headline


def test_no_host_sync_counts_item_and_the_driver_agrees() -> None:
    from pytest_modelcheck.checks import no_host_sync

    class Syncs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = float(x.abs().max().item())   # a host sync
            return self.lin(x) / (scale + 1.0)

    class NoSyncs(Syncs):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) / (x.abs().amax() + 1.0)

    batch = torch.randn(4, 8, device="cuda")
    bad = no_host_sync(model=Syncs().cuda(), batch=batch)
    good = no_host_sync(model=NoSyncs().cuda(), batch=batch)
    assert bad.passed is False and good.passed is True, (bad.headline, good.headline)
    assert bad.metrics.get("cuda_sync_warnings", 0) >= 1, bad.metrics
    assert good.metrics.get("cuda_sync_warnings", 0) == 0, good.metrics
    assert torch.cuda.get_sync_debug_mode() == 0


def test_device_portable_moves_a_cpu_model_to_the_gpu() -> None:
    from pytest_modelcheck.checks import device_portable

    class Stray(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + torch.arange(8.0)          # created on the CPU

    class Follows(Stray):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + torch.arange(8.0, device=x.device)

    batch = torch.randn(4, 8)
    bad = device_portable(model=Stray(), batch=batch)
    good = device_portable(model=Follows(), batch=batch)
    assert bad.passed is False and good.passed is True, (bad.headline, good.headline)
    assert "cuda" in bad.details or "meta" in bad.details


def test_cuda_event_timer_and_throughput_on_the_gpu() -> None:
    from pytest_modelcheck.checks import throughput_at_least
    from pytest_modelcheck.core.timing import cuda_event_timer

    timer = cuda_event_timer("cuda")
    a = torch.randn(2048, 2048, device="cuda")
    seconds = timer(lambda: [a @ a for _ in range(10)])
    assert 0 < seconds < 10 and math.isfinite(seconds)
    model = _mlp().cuda()
    batch = torch.randn(256, 512, device="cuda")
    fast = throughput_at_least(1.0, model=model, batch=batch)
    slow = throughput_at_least(1e15, model=model, batch=batch)
    assert fast.passed is True and slow.passed is False, (fast.headline, slow.headline)
    assert fast.metrics["method"] == "cuda-events", fast.metrics


def test_a_real_out_of_memory_fails_the_check_and_the_next_check_runs() -> None:
    from pytest_modelcheck.api import check_model

    class Hungry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            free, total = torch.cuda.mem_get_info()
            waste = torch.empty(2 * total, dtype=torch.uint8, device=x.device)  # never fits
            return self.lin(x) + waste[:1].float()

    batch = (torch.randn(4, 8, device="cuda"), torch.randn(4, 8, device="cuda"))
    before = torch.cuda.memory_allocated()
    report = check_model(Hungry().cuda(), batch, checks=["grads_finite"], loss=_mse)
    r = report.results[0]
    assert r.passed is False and r.metrics.get("oom") is True, (r.headline, r.metrics)
    assert "out of memory" in r.headline
    assert torch.cuda.memory_allocated() <= before + (1 << 20)
    healthy = check_model(_mlp().cuda(), (torch.randn(4, 512, device="cuda"),
                                          torch.randn(4, 512, device="cuda")),
                          checks=["grads_finite"], loss=_mse)
    assert healthy.passed, healthy.results[0].headline


def test_profiler_on_the_gpu_stops_at_the_last_batch_size_that_fit() -> None:
    from pytest_modelcheck.core.profiler import profile_model

    free, total = torch.cuda.mem_get_info()
    per_sample = total // 3          # batch 4 and above cannot fit in the card

    class Grows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            buf = torch.empty(x.shape[0] * per_sample, dtype=torch.uint8, device=x.device)
            return self.lin(x) + buf[:1].float()

    model = Grows().cuda()
    report = profile_model(model, lambda n: torch.randn(n, 8, device="cuda"),
                           batch_sizes=[1, 2, 4, 8], warmup=1, runs=3)
    sizes = [row["batch_size"] for row in report.batch_profiling]
    assert sizes == [1, 2], report.to_json()
    assert report.stopped and report.stopped.get("batch_size") == 4, report.stopped
    row = report.batch_profiling[-1]
    assert row["peak_memory_bytes"] >= 2 * per_sample, row
    assert torch.cuda.memory_allocated() < per_sample
