"""2D Fourier Neural Operator (example model for seed 002).

Follows the FNO pipeline of seed 002: a pointwise lifting layer, stacked
Fourier layers (a spectral convolution that keeps only the lowest
``modes1 x modes2`` Fourier modes, plus a pointwise linear path) and a
pointwise projection. The number of retained modes is a constructor argument
so the effect of mode truncation can be studied.

Simplifications: 2D fields on a 32x32 grid by default (instead of 3D
volumes), no domain padding for non-periodic inputs, 4 layers of width 16 with
6 modes per dimension. The complex spectral weights are stored as real
``(..., 2)`` parameters and viewed as complex in ``forward``, so every
parameter is a plain float tensor. Grid coordinates in ``[0, 1]`` are appended
to the input channels inside ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SpectralConv2d",
    "FNO2d",
    "loss_fn",
    "build_model",
    "make_batch",
]


class SpectralConv2d(nn.Module):
    """Multiply the lowest Fourier modes by learned complex weights.

    Along the first spatial dimension both the positive (``[:modes1]``) and the
    negative (``[-modes1:]``) frequency blocks are kept; along the last
    dimension ``rfft2`` gives the ``modes2`` lowest non-negative frequencies.
    """

    def __init__(self, in_channels: int, out_channels: int, modes1: int, modes2: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.modes1 = modes1
        self.modes2 = modes2
        scale = 1.0 / (in_channels * out_channels)
        shape = (in_channels, out_channels, modes1, modes2, 2)
        self.weight_pos = nn.Parameter(scale * torch.rand(shape))
        self.weight_neg = nn.Parameter(scale * torch.rand(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        if self.modes1 > height // 2:
            raise ValueError(
                f"modes1={self.modes1} exceeds H//2={height // 2} for input height H={height}"
            )
        if self.modes2 > width // 2 + 1:
            raise ValueError(
                f"modes2={self.modes2} exceeds W//2+1={width // 2 + 1} for input width W={width}"
            )
        m1, m2 = self.modes1, self.modes2
        # FFTs in float32: cuFFT has no bfloat16 transforms (and half ones need power-of-two
        # sizes), so under autocast the spectral path runs in full precision; complex tensors
        # are left alone by autocast, so the mode mixing below stays complex64.
        x_ft = torch.fft.rfft2(x.float())
        w_pos = torch.view_as_complex(self.weight_pos)
        w_neg = torch.view_as_complex(self.weight_neg)
        out_ft = torch.zeros(
            batch, self.out_channels, height, width // 2 + 1, dtype=x_ft.dtype, device=x.device
        )
        out_ft[:, :, :m1, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, :m1, :m2], w_pos)
        out_ft[:, :, -m1:, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, -m1:, :m2], w_neg)
        return torch.fft.irfft2(out_ft, s=(height, width)).to(x.dtype)


class FNO2d(nn.Module):
    """Lifting -> ``n_layers`` Fourier layers -> projection."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        width: int = 16,
        modes1: int = 6,
        modes2: int = 6,
        n_layers: int = 4,
        projection_channels: int = 64,
    ) -> None:
        super().__init__()
        self.lift = nn.Conv2d(in_channels + 2, width, 1)
        self.spectral = nn.ModuleList(
            SpectralConv2d(width, width, modes1, modes2) for _ in range(n_layers)
        )
        self.pointwise = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(n_layers))
        self.project = nn.Sequential(
            nn.Conv2d(width, projection_channels, 1),
            nn.GELU(),
            nn.Conv2d(projection_channels, out_channels, 1),
        )

    @staticmethod
    def grid(x: torch.Tensor) -> torch.Tensor:
        """``(B, 2, H, W)`` coordinates in ``[0, 1]`` matching ``x``'s device and dtype."""
        batch, _, height, width = x.shape
        gy = torch.linspace(0, 1, height, device=x.device, dtype=x.dtype)
        gx = torch.linspace(0, 1, width, device=x.device, dtype=x.dtype)
        yy, xx = torch.meshgrid(gy, gx, indexing="ij")
        return torch.stack([yy, xx]).unsqueeze(0).expand(batch, -1, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"FNO2d expects a (B, C, H, W) input; got shape {tuple(x.shape)}")
        x = self.lift(torch.cat([x, self.grid(x)], dim=1))
        last = len(self.spectral) - 1
        for i, (spec, point) in enumerate(zip(self.spectral, self.pointwise)):
            x = spec(x) + point(x)
            if i < last:
                x = F.gelu(x)
        return self.project(x)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return F.mse_loss(output, target)


def build_model(**cfg) -> FNO2d:
    """Build an :class:`FNO2d`; keyword arguments override the defaults."""
    return FNO2d(**cfg)


def _wavenumber_sq(size: int, device: torch.device | str) -> torch.Tensor:
    ky = torch.fft.fftfreq(size, d=1.0 / size, device=device, dtype=torch.float32)
    kx = torch.fft.rfftfreq(size, d=1.0 / size, device=device, dtype=torch.float32)
    return ky.view(-1, 1) ** 2 + kx.view(1, -1) ** 2


def make_batch(
    batch_size: int = 4, seed: int = 0, size: int = 32, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random smooth fields and their diffused, non-linearly transformed versions.

    Inputs are ``(B, 1, size, size)`` Gaussian random fields with a decaying
    power spectrum, normalised to unit variance; targets apply a heat-kernel
    (Gaussian) low-pass filter followed by a pointwise ``tanh``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(batch_size, 1, size, size, generator=gen, device="cpu", dtype=torch.float32)
    k2 = _wavenumber_sq(size, "cpu")
    x = torch.fft.irfft2(torch.fft.rfft2(noise) / (1.0 + k2), s=(size, size))
    x = x / x.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    smoothed = torch.fft.irfft2(torch.fft.rfft2(x) * torch.exp(-0.05 * k2), s=(size, size))
    target = torch.tanh(1.5 * smoothed)
    return x.to(device), target.to(device)
