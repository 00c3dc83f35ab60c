"""3D Pix2PixCC-style conditional GAN (example model for seed 002).

Follows the GAN pipeline of seed 002: a conditional generator maps a 3D
conditioning volume to a 3D target volume, a multi-scale 3D PatchGAN
discriminator judges ``concat(cond, volume)`` pairs, and the generator loss is
decomposed into its LSGAN, feature-matching and correlation (CC) terms so each
can be inspected separately.

Simplifications with respect to a full Pix2PixCC:

* tiny volumes (8^3 by default) and few channels;
* one down/up-sampling level and two residual blocks in the generator,
  3x3x3 kernels everywhere, no reflection padding;
* two discriminator scales without normalisation layers;
* the correlation term is 1 - Pearson (or Lin's concordance) correlation at
  ``cc_scales`` average-pooled resolutions, computed per sample and averaged;
* no channel-balancing logic.

The generator loss is ``loss_fn(output, target, model, inputs)``: pytest-modelcheck passes
the model being trained (for its discriminator) and the model inputs (``inputs[0]`` is the
conditioning volume), so the discriminator scores ``(cond, volume)`` pairs and the wrapper
keeps no state between calls.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ResidualBlock3d",
    "Generator3d",
    "PatchDiscriminator3d",
    "MultiScaleDiscriminator3d",
    "Pix2PixCC",
    "make_pair",
    "make_pairs",
    "correlation_coefficient",
    "lsgan_generator_loss",
    "lsgan_discriminator_loss",
    "feature_matching_loss",
    "correlation_loss",
    "generator_loss",
    "discriminator_loss",
    "loss_fn",
    "build_model",
    "make_batch",
]


# --------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------


class ResidualBlock3d(nn.Module):
    """conv-norm-act-conv-norm with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(channels, channels, 3, padding=1),
            nn.InstanceNorm3d(channels, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, 3, padding=1),
            nn.InstanceNorm3d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator3d(nn.Module):
    """Encoder / residual bottleneck / decoder generator for 3D volumes."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 8,
        n_downsample: int = 1,
        n_residual: int = 2,
    ) -> None:
        super().__init__()
        self.n_downsample = n_downsample
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, base_channels, 3, padding=1),
            nn.InstanceNorm3d(base_channels, affine=True),
            nn.ReLU(inplace=True),
        ]
        ch = base_channels
        for _ in range(n_downsample):
            layers += [
                nn.Conv3d(ch, ch * 2, 3, stride=2, padding=1),
                nn.InstanceNorm3d(ch * 2, affine=True),
                nn.ReLU(inplace=True),
            ]
            ch *= 2
        layers += [ResidualBlock3d(ch) for _ in range(n_residual)]
        for _ in range(n_downsample):
            layers += [
                nn.ConvTranspose3d(ch, ch // 2, 2, stride=2),
                nn.InstanceNorm3d(ch // 2, affine=True),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        layers.append(nn.Conv3d(ch, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        factor = 2 ** self.n_downsample
        spatial = tuple(cond.shape[2:])
        if len(spatial) != 3 or any(s % factor for s in spatial):
            raise ValueError(
                f"Generator3d expects a (B, C, D, H, W) input with D, H, W "
                f"divisible by {factor}; got shape {tuple(cond.shape)}"
            )
        return self.net(cond)


class PatchDiscriminator3d(nn.Module):
    """3D PatchGAN returning every intermediate feature map.

    The last element of the returned list is the map of patch logits.
    """

    def __init__(self, in_channels: int = 2, base_channels: int = 8, n_layers: int = 2) -> None:
        super().__init__()
        blocks = []
        ch_in, ch = in_channels, base_channels
        for _ in range(n_layers):
            blocks.append(
                nn.Sequential(
                    nn.Conv3d(ch_in, ch, 3, stride=2, padding=1),
                    nn.LeakyReLU(0.2, inplace=True),
                )
            )
            ch_in, ch = ch, ch * 2
        blocks.append(nn.Conv3d(ch_in, 1, 3, padding=1))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


class MultiScaleDiscriminator3d(nn.Module):
    """PatchGAN discriminators applied to successively average-pooled inputs."""

    def __init__(
        self, in_channels: int = 2, base_channels: int = 8, n_layers: int = 2, n_scales: int = 2
    ) -> None:
        super().__init__()
        self.scales = nn.ModuleList(
            PatchDiscriminator3d(in_channels, base_channels, n_layers) for _ in range(n_scales)
        )

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        outputs = []
        for i, disc in enumerate(self.scales):
            if i > 0:
                x = F.avg_pool3d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
            outputs.append(disc(x))
        return outputs


def make_pair(cond: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
    """The discriminator input of a ``(cond, volume)`` pair: channels ``[cond, volume]``."""
    return torch.cat([cond, volume], dim=1)


def make_pairs(
    cond: torch.Tensor, real: torch.Tensor, fake: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real pair ``(cond, real)`` and the fake pair ``(cond, fake)``, in one channel order."""
    return make_pair(cond, real), make_pair(cond, fake)


class Pix2PixCC(nn.Module):
    """Generator + multi-scale discriminator; ``forward(cond)`` runs the generator."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        gen_channels: int = 8,
        n_downsample: int = 1,
        n_residual: int = 2,
        disc_channels: int = 8,
        disc_layers: int = 2,
        n_scales: int = 2,
    ) -> None:
        super().__init__()
        self.generator = Generator3d(in_channels, out_channels, gen_channels, n_downsample, n_residual)
        self.discriminator = MultiScaleDiscriminator3d(
            in_channels + out_channels, disc_channels, disc_layers, n_scales
        )

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.generator(cond)

    def discriminate(self, cond: torch.Tensor, volume: torch.Tensor) -> list[list[torch.Tensor]]:
        return self.discriminator(make_pair(cond, volume))


# --------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------


def correlation_coefficient(
    x: torch.Tensor, y: torch.Tensor, kind: str = "pearson", eps: float = 1e-6
) -> torch.Tensor:
    """Per-sample correlation between ``x`` and ``y``, shape ``(B,)``.

    ``kind="pearson"`` gives the Pearson correlation coefficient,
    ``kind="ccc"`` Lin's concordance correlation coefficient.
    """
    x = x.flatten(1)
    y = y.flatten(1)
    mx, my = x.mean(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)
    xc, yc = x - mx, y - my
    cov = (xc * yc).mean(dim=1)
    vx, vy = xc.pow(2).mean(dim=1), yc.pow(2).mean(dim=1)
    if kind == "pearson":
        return cov / torch.sqrt((vx + eps) * (vy + eps))
    if kind == "ccc":
        return 2 * cov / (vx + vy + (mx - my).squeeze(1).pow(2) + eps)
    raise ValueError(f"unknown correlation kind {kind!r}; expected 'pearson' or 'ccc'")


def lsgan_generator_loss(fake_outputs: list[list[torch.Tensor]]) -> torch.Tensor:
    """Least-squares generator term: fake patch logits pushed towards 1."""
    terms = [F.mse_loss(feats[-1], torch.ones_like(feats[-1])) for feats in fake_outputs]
    return torch.stack(terms).mean()


def lsgan_discriminator_loss(outputs: list[list[torch.Tensor]], real: bool) -> torch.Tensor:
    """Least-squares discriminator term: logits towards 1 (real) or 0 (fake)."""
    make = torch.ones_like if real else torch.zeros_like
    terms = [F.mse_loss(feats[-1], make(feats[-1])) for feats in outputs]
    return 0.5 * torch.stack(terms).mean()


def feature_matching_loss(
    fake_outputs: list[list[torch.Tensor]], real_outputs: list[list[torch.Tensor]]
) -> torch.Tensor:
    """L1 between discriminator features of fake and (detached) real pairs."""
    terms = []
    for fake_feats, real_feats in zip(fake_outputs, real_outputs):
        per_scale = [F.l1_loss(f, r.detach()) for f, r in zip(fake_feats, real_feats)]
        terms.append(torch.stack(per_scale).mean())
    return torch.stack(terms).mean()


def correlation_loss(
    fake: torch.Tensor, real: torch.Tensor, n_scales: int = 2, kind: str = "pearson"
) -> torch.Tensor:
    """Mean over scales and samples of ``1 - correlation(fake, real)``."""
    terms = []
    for i in range(n_scales):
        if i > 0:
            fake = F.avg_pool3d(fake, kernel_size=2, stride=2)
            real = F.avg_pool3d(real, kernel_size=2, stride=2)
        terms.append((1 - correlation_coefficient(fake, real, kind=kind)).mean())
    return torch.stack(terms).mean()


def generator_loss(
    output: torch.Tensor,
    target: torch.Tensor,
    model: Pix2PixCC,
    inputs: tuple | None = None,
    *,
    cond: torch.Tensor | None = None,
    lambda_lsgan: float = 2.0,
    lambda_fm: float = 10.0,
    lambda_cc: float = 5.0,
    cc_scales: int = 2,
    cc_kind: str = "pearson",
) -> dict[str, torch.Tensor]:
    """Weighted generator loss terms of Pix2PixCC.

    ``model`` is the :class:`Pix2PixCC` being trained; its discriminator
    scores ``(cond, output)`` and ``(cond, target)``. ``cond`` defaults to
    ``inputs[0]``, the conditioning volume the model was called with.
    """
    if cond is None:
        if not inputs:
            raise ValueError("generator_loss needs the model inputs (inputs=...) or cond=...")
        cond = inputs[0]
    if cond.shape[0] != output.shape[0] or cond.shape[2:] != output.shape[2:]:
        raise ValueError(
            f"cond shape {tuple(cond.shape)} does not match output shape {tuple(output.shape)}"
        )
    fake_outputs = model.discriminate(cond, output)
    real_outputs = model.discriminate(cond, target)
    return {
        "lsgan": lambda_lsgan * lsgan_generator_loss(fake_outputs),
        "feature_matching": lambda_fm * feature_matching_loss(fake_outputs, real_outputs),
        "correlation": lambda_cc * correlation_loss(output, target, n_scales=cc_scales, kind=cc_kind),
    }


def discriminator_loss(
    model: Pix2PixCC, cond: torch.Tensor, real: torch.Tensor, fake: torch.Tensor
) -> dict[str, torch.Tensor]:
    """LSGAN discriminator terms; ``fake`` is detached from the generator."""
    return {
        "d_real": lsgan_discriminator_loss(model.discriminate(cond, real), real=True),
        "d_fake": lsgan_discriminator_loss(model.discriminate(cond, fake.detach()), real=False),
    }


loss_fn = generator_loss


# --------------------------------------------------------------------------
# Construction and data
# --------------------------------------------------------------------------


def build_model(**cfg) -> Pix2PixCC:
    """Build a :class:`Pix2PixCC`; keyword arguments override the defaults."""
    return Pix2PixCC(**cfg)


def _smooth3d(x: torch.Tensor, passes: int = 2) -> torch.Tensor:
    for _ in range(passes):
        x = F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1), mode="circular"), kernel_size=3, stride=1)
    return x


def make_batch(
    batch_size: int = 4, seed: int = 0, size: int = 8, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning fields and their target volumes, each ``(B, 1, size, size, size)``.

    The conditioning volume is a smoothed Gaussian random field; the target is
    a further smoothed, non-linearly transformed version of it.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(
        batch_size, 1, size, size, size, generator=gen, device="cpu", dtype=torch.float32
    )
    cond = _smooth3d(noise, passes=1)
    cond = cond / cond.flatten(1).std(dim=1).view(-1, 1, 1, 1, 1)
    target = torch.tanh(_smooth3d(cond, passes=1)) + 0.3 * cond
    return cond.to(device), target.to(device)
