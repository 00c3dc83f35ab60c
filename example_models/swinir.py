"""Small SwinIR image-restoration transformer (seed 004).

Seed 004 profiles a SwinIR/SwinMR restoration model (parameters, FLOPs,
latency and memory versus batch size). This module follows the SwinIR
architecture: a 3x3 convolution extracts shallow features; residual Swin
transformer blocks (RSTB) -- window self-attention with a learned relative
position bias, alternating with shifted windows and their attention mask,
closed by a 3x3 convolution and a residual connection -- form the body; a
convolution after the body adds a long skip; a pixel-shuffle upsampler
reconstructs the image (``upscale=2`` by default, or ``upscale=1`` for
same-resolution restoration with a global image residual). Inputs are padded
by reflection to a multiple of the window size (``check_image_size``) and the
output is cropped back.

Simplifications: embed_dim 24, two RSTBs of depth 2 with 3 heads, window 4,
MLP ratio 2, 32 features in the upsampler, no dropout or stochastic depth, and
16x16 inputs by default. The shifted-window mask is built inside ``forward``
for the actual (padded) image size on the input's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "window_partition",
    "window_reverse",
    "WindowAttention",
    "SwinTransformerBlock",
    "RSTB",
    "Upsample",
    "SwinIR",
    "loss_fn",
    "build_model",
    "make_batch",
]


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * num_windows, window_size**2, C)``."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window_size: int, shift: int, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask ``(num_windows, N, N)`` for cyclically shifted windows.

    After rolling the image by ``-shift``, a window at the bottom/right border
    mixes pixels from up to three regions per axis that are not neighbours in
    the original image; pairs from different regions get -100 (SwinIR's value).
    """
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    row_region = (rows >= h - window_size).long() + (rows >= h - shift).long()
    col_region = (cols >= w - window_size).long() + (cols >= w - shift).long()
    region = (row_region.unsqueeze(1) * 3 + col_region.unsqueeze(0)).view(1, h, w, 1)
    region = window_partition(region, window_size).squeeze(-1)           # (nW, N)
    different = region.unsqueeze(1) != region.unsqueeze(2)
    return different.to(dtype) * -100.0


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        # One learned bias per head for each of the (2w-1)^2 relative offsets.
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        coords = torch.stack(torch.meshgrid(
            torch.arange(window_size), torch.arange(window_size), indexing="ij"
        )).flatten(1)                                                         # (2, N)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
        index = relative[..., 0] * (2 * window_size - 1) + relative[..., 1]   # (N, N)
        self.register_buffer("relative_position_index", index)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, c = x.shape
        qkv = self.qkv(x).view(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)                         # (B_, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            n_windows = mask.shape[0]
            attn = attn.view(b_ // n_windows, n_windows, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(b_, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention and MLP, each pre-norm with a residual."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, x_size: tuple, shift_mask: torch.Tensor | None) -> torch.Tensor:
        h, w = x_size
        b, length, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        s = self.shift_size
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = window_partition(x, self.window_size)
        windows = self.attn(windows, mask=shift_mask if s else None)
        x = window_reverse(windows, self.window_size, h, w)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = shortcut + x.reshape(b, length, c)
        return x + self.mlp(self.norm2(x))


class RSTB(nn.Module):
    """Residual Swin Transformer Block: ``depth`` Swin blocks + 3x3 conv + residual."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                                 mlp_ratio)
            for i in range(depth)
        )
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, x_size: tuple, shift_mask: torch.Tensor | None) -> torch.Tensor:
        residual = x
        for block in self.blocks:
            x = block(x, x_size, shift_mask)
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, *x_size)      # tokens -> image
        x = self.conv(x).flatten(2).transpose(1, 2)        # image -> tokens
        return x + residual


class Upsample(nn.Sequential):
    """Conv + PixelShuffle stages for scale ``2**n`` or 3."""

    def __init__(self, scale: int, num_feat: int) -> None:
        layers: list = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upscale {scale} is not supported; use 2**n or 3")
        super().__init__(*layers)


class SwinIR(nn.Module):
    """Shallow conv -> RSTBs -> conv (+ long skip) -> reconstruction."""

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 24,
        depths: tuple = (2, 2),
        num_heads: tuple = (3, 3),
        window_size: int = 4,
        mlp_ratio: float = 2.0,
        upscale: int = 2,
        num_feat: int = 32,
        img_range: float = 1.0,
        rgb_mean: tuple = (0.4488, 0.4371, 0.4040),
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        self.window_size = window_size
        self.upscale = upscale
        self.img_range = img_range
        mean = torch.tensor(rgb_mean, dtype=torch.float32) if in_chans == 3 else torch.zeros(in_chans)
        self.register_buffer("mean", mean.view(1, in_chans, 1, 1))

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.layers = nn.ModuleList(
            RSTB(embed_dim, d, h, window_size, mlp_ratio) for d, h in zip(depths, num_heads)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        if upscale > 1:
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU())
            self.upsample = Upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def check_image_size(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pad height and width up to multiples of the window size."""
        _, _, h, w = x.shape
        pad_h = (self.window_size - h % self.window_size) % self.window_size
        pad_w = (self.window_size - w % self.window_size) % self.window_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_size = (h, w)
        shift_mask = shifted_window_mask(h, w, self.window_size, self.window_size // 2,
                                         x.device, x.dtype)
        x = self.patch_norm(x.flatten(2).transpose(1, 2))
        for layer in self.layers:
            x = layer(x, x_size, shift_mask)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"SwinIR expects a (B, C, H, W) image, got shape {tuple(x.shape)}")
        h, w = x.shape[2:]
        x = self.check_image_size(x)
        x = (x - self.mean) * self.img_range
        features = self.conv_first(x)
        features = self.conv_after_body(self.forward_features(features)) + features
        if self.upscale > 1:
            out = self.conv_last(self.upsample(self.conv_before_upsample(features)))
        else:
            out = x + self.conv_last(features)
        out = out / self.img_range + self.mean
        return out[:, :, : h * self.upscale, : w * self.upscale]


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (L1), SwinIR's training loss."""
    return F.l1_loss(output, target)


def build_model(**cfg) -> SwinIR:
    """Build a :class:`SwinIR`; keyword arguments override the defaults."""
    return SwinIR(**cfg)


def make_batch(batch_size: int = 4, seed: int = 0, size: int = 16, upscale: int = 2,
               device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(lr, hr)``: ``(B, 3, size, size)`` inputs and ``(B, 3, size*upscale, size*upscale)`` targets.

    High-resolution images are smooth colour fields (bicubic upsampling of 4x4
    noise) plus an oriented sinusoidal texture, clipped to ``[0, 1]``; the
    low-resolution input is their ``upscale x upscale`` box-filter average.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hr_size = size * upscale
    coarse = torch.rand(batch_size, 3, 4, 4, generator=gen)
    base = F.interpolate(coarse, size=(hr_size, hr_size), mode="bicubic", align_corners=False)
    freq = 1.0 + 3.0 * torch.rand(batch_size, 1, 1, 1, generator=gen)   # cycles per image
    angle = math.pi * torch.rand(batch_size, 1, 1, 1, generator=gen)
    phase = 2.0 * math.pi * torch.rand(batch_size, 1, 1, 1, generator=gen)
    coords = torch.linspace(0.0, 1.0, hr_size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    texture = 0.15 * torch.sin(2.0 * math.pi * freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
    hr = (base + texture).clamp(0.0, 1.0)
    lr = F.avg_pool2d(hr, upscale) if upscale > 1 else hr.clone()
    return lr.to(device), hr.to(device)
