"""The fake-tensor estimate against the measured peak (CPU allocator events) of real steps.

The models here were not used to derive the CPU kernel-workspace rules of core/memory.py
(oneDNN convolution blocked copies, pocketfft buffers): they check that the rules carry over
to other shapes and channel counts. Each estimate must be within 5% of the measurement, above
or below.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_modelcheck.core.memory import estimate_step_memory, measure_step_memory

TOLERANCE = 0.05


class UNet2d(nn.Module):
    def __init__(self, c: int = 12) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(2, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.ReLU(),
                                  nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc1(x)
        b = self.enc2(a)
        return self.dec(torch.cat([a, self.up(b)], dim=1))


class UNet3d(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv3d(1, c, 3, padding=1), nn.BatchNorm3d(c), nn.ReLU())
        self.down = nn.Conv3d(c, 3 * c, 2, stride=2)
        self.mid = nn.Sequential(nn.Conv3d(3 * c, 3 * c, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose3d(3 * c, c, 2, stride=2)
        self.dec = nn.Conv3d(2 * c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc1(x)
        b = self.mid(self.down(a))
        return self.dec(torch.cat([a, self.up(b)], dim=1))


class ConvNet1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(4, 20, 5, padding=2), nn.ReLU(),
                                  nn.Conv1d(20, 40, 3, padding=1), nn.ReLU(),
                                  nn.Conv1d(40, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Spectral(nn.Module):
    def __init__(self, width: int, modes: int) -> None:
        super().__init__()
        self.modes = modes
        self.w = nn.Parameter(torch.randn(width, width, 2 * modes, modes, 2) / width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.modes
        x_ft = torch.fft.rfft2(x)
        w = torch.view_as_complex(self.w)
        out = torch.zeros_like(x_ft)
        out[:, :, :m, :m] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, :m, :m], w[:, :, :m])
        out[:, :, -m:, :m] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, -m:, :m], w[:, :, m:])
        return torch.fft.irfft2(out, s=x.shape[-2:])


class FNO(nn.Module):
    def __init__(self, width: int = 10, modes: int = 4, layers: int = 3) -> None:
        super().__init__()
        self.lift = nn.Conv2d(1, width, 1)
        self.spectral = nn.ModuleList(Spectral(width, modes) for _ in range(layers))
        self.point = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(layers))
        self.proj = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lift(x)
        for s, p in zip(self.spectral, self.point):
            x = F.gelu(s(x) + p(x))
        return self.proj(x)


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


CASES = {
    # name: (model factory, input shape, target shape)
    "unet2d": (UNet2d, (4, 2, 32, 32), (4, 1, 32, 32)),
    "unet3d": (UNet3d, (2, 1, 12, 12, 12), (2, 1, 12, 12, 12)),
    # one sample: torch picks the im2col convolutions (Slow2d/Slow3d, SlowTranspose2d/3d)
    "unet2d_batch1": (UNet2d, (1, 2, 32, 32), (1, 1, 32, 32)),
    "unet3d_batch1": (UNet3d, (1, 1, 12, 12, 12), (1, 1, 12, 12, 12)),
    "conv1d": (ConvNet1d, (4, 4, 256), (4, 4, 256)),
    "fno": (FNO, (4, 1, 24, 24), (4, 1, 24, 24)),
    "transformer": (_encoder, (4, 16, 32), (4, 16, 32)),
}


# oneDNN's weight-gradient kernel for fewer than 16 input channels uses per-thread reduction
# buffers whose size depends on the thread count (383872 bytes for UNet3d's 12 -> 1 channel
# output convolution on 2 threads); they are not modelled, so these estimates can be low.
_UNMODELLED = {("unet3d", "train"), ("conv1d", "train")}


def _params() -> list:
    return [pytest.param(name, phase, marks=[pytest.mark.xfail(
                reason="oneDNN per-thread weight-gradient scratch is not modelled",
                strict=False)] if (name, phase) in _UNMODELLED else [])
            for name in sorted(CASES) for phase in ("train", "inference")]


@pytest.mark.parametrize("name,phase", _params())
def test_estimate_within_five_percent_of_measured_peak(name: str, phase: str) -> None:
    factory, x_shape, y_shape = CASES[name]
    torch.manual_seed(0)
    model = factory()
    batch = (torch.randn(*x_shape), torch.randn(*y_shape))
    real = measure_step_memory(model, batch, _mse, phase=phase)
    est = estimate_step_memory(model, batch, _mse, phase=phase)
    ratio = est.peak_bytes / real.peak_bytes
    assert abs(ratio - 1) <= TOLERANCE, (name, phase, real.peak_bytes, est.peak_bytes, ratio)


def test_workspace_rules_apply_to_cpu_estimates_only() -> None:
    # A 3D convolution with 16 channels: oneDNN's blocked copies are counted on CPU, and the
    # CUDA estimate (other kernels, other workspaces) does not take them.
    torch.manual_seed(0)
    model = nn.Conv3d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 8, 8, 8)
    cpu = estimate_step_memory(model, x, phase="inference")
    cuda = estimate_step_memory(model, x, phase="inference", device="cuda")
    # alive before: input 2*16*512*4 = 65536 + weight 16*16*27*4 = 27648 + bias 64 = 93248;
    # inside the kernel: blocked input 65536 + blocked weight 27648 + blocked output 65536.
    assert cpu.peak_bytes == 93248 + 65536 + 27648 + 65536
    assert cpu.peak_bytes == measure_step_memory(model, x, phase="inference").peak_bytes
    # CUDA: no CPU workspace; the bias rounds up to one 512-byte block, plus the output.
    assert cuda.peak_bytes == 65536 + 27648 + 512 + 65536


def test_im2col_column_buffer_of_a_one_sample_3d_convolution() -> None:
    # One sample through a 3x3x3 Conv3d: torch runs slow_conv3d, whose column buffer is not
    # seen by the dispatcher; the CPU estimate models it and matches the measurement.
    from pytest_modelcheck.core.memory import _conv_backend

    torch.manual_seed(0)
    model = nn.Conv3d(4, 8, 3, padding=1)
    x = torch.randn(1, 4, 8, 8, 8)
    assert _conv_backend(x, model.weight, model.bias, model.stride, model.padding,
                         model.dilation, False, [0, 0, 0], 1) == "Slow3d"
    est = estimate_step_memory(model, x, phase="inference")
    # alive before: input 4*512*4 = 8192 + weight 8*4*27*4 = 3456 + bias 32 = 11680;
    # inside the kernel: columns Cin*K*S_out*4 = 4*27*512*4 = 221184 beside the output
    # 8*512*4 = 16384.
    assert est.peak_bytes == 11680 + 221184 + 16384
    assert est.peak_bytes == measure_step_memory(model, x, phase="inference").peak_bytes
