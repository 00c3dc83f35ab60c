"""3D V-Net-style UNet for volume-to-volume regression (example model for seed 002).

Follows the UNet pipeline of seed 002: encoder stages built from residual
convolution blocks with strided-convolution downsampling, a decoder with
transposed-convolution upsampling and skip concatenations whose shapes must
line up, BatchNorm (or InstanceNorm) layers, and an identity final activation
so the output keeps the dynamic range of a regression target.

Simplifications with respect to a full V-Net: small volumes (16^3 by default),
few channels, ``depth`` downsamplings (2 by default) with one residual block
per stage, 3x3x3 kernels instead of 5x5x5.

With ``norm="batch"`` the training-mode output of a sample depends on the rest
of the batch; in eval mode BatchNorm uses its running statistics, so each
sample's output is independent of the others.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ResidualConvBlock3d",
    "VNetUNet3d",
    "loss_fn",
    "build_model",
    "make_batch",
]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"unknown norm {kind!r}; expected 'batch' or 'instance'")


class ResidualConvBlock3d(nn.Module):
    """``n_convs`` conv-norm-PReLU layers with a (projected) residual shortcut."""

    def __init__(self, in_channels: int, out_channels: int, n_convs: int = 2, norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for i in range(n_convs):
            layers += [nn.Conv3d(ch, out_channels, 3, padding=1), _norm(norm, out_channels)]
            if i < n_convs - 1:
                layers.append(nn.PReLU(out_channels))
            ch = out_channels
        self.body = nn.Sequential(*layers)
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)
        )
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class VNetUNet3d(nn.Module):
    """V-Net-style 3D UNet with ``depth`` downsamplings and an identity output."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 8,
        depth: int = 2,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        chs = [base_channels * 2**i for i in range(depth + 1)]

        self.stem = ResidualConvBlock3d(in_channels, chs[0], n_convs=1, norm=norm)
        self.down = nn.ModuleList()
        self.encoders = nn.ModuleList()
        for i in range(depth):
            self.down.append(
                nn.Sequential(
                    nn.Conv3d(chs[i], chs[i + 1], 2, stride=2),
                    _norm(norm, chs[i + 1]),
                    nn.PReLU(chs[i + 1]),
                )
            )
            self.encoders.append(ResidualConvBlock3d(chs[i + 1], chs[i + 1], n_convs=2, norm=norm))

        self.up = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in reversed(range(depth)):
            self.up.append(
                nn.Sequential(
                    nn.ConvTranspose3d(chs[i + 1], chs[i], 2, stride=2),
                    _norm(norm, chs[i]),
                    nn.PReLU(chs[i]),
                )
            )
            self.decoders.append(ResidualConvBlock3d(2 * chs[i], chs[i], n_convs=2, norm=norm))

        self.head = nn.Conv3d(chs[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2**self.depth
        spatial = tuple(x.shape[2:])
        if len(spatial) != 3 or any(s % factor for s in spatial):
            raise ValueError(
                f"VNetUNet3d with depth={self.depth} needs a (B, C, D, H, W) input with "
                f"D, H, W divisible by {factor}; got shape {tuple(x.shape)}"
            )
        x = self.stem(x)
        skips = [x]
        for down, enc in zip(self.down, self.encoders):
            x = enc(down(x))
            skips.append(x)
        skips.pop()
        for up, dec in zip(self.up, self.decoders):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return F.mse_loss(output, target)


def build_model(**cfg) -> VNetUNet3d:
    """Build a :class:`VNetUNet3d`; keyword arguments override the defaults."""
    return VNetUNet3d(**cfg)


def _smooth3d(x: torch.Tensor, passes: int = 1) -> torch.Tensor:
    for _ in range(passes):
        x = F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1), mode="circular"), kernel_size=3, stride=1)
    return x


def make_batch(
    batch_size: int = 4, seed: int = 0, size: int = 16, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input fields and regression targets, each ``(B, 1, size, size, size)``.

    The input is a smoothed Gaussian random field with unit variance; the
    target is a further smoothed, non-linearly transformed version of it.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(
        batch_size, 1, size, size, size, generator=gen, device="cpu", dtype=torch.float32
    )
    x = _smooth3d(noise, passes=1)
    x = x / x.flatten(1).std(dim=1).view(-1, 1, 1, 1, 1)
    target = torch.tanh(1.5 * _smooth3d(x, passes=1))
    return x.to(device), target.to(device)
