"""3D Vision Transformer for volume-level regression (example model for seed 002).

Follows the ViT3D pipeline of seed 002: the volume is tiled into
non-overlapping 3D patches by a ``Conv3d`` with ``kernel_size == stride ==
patch_size``, a CLS token is prepended, a learned positional embedding sized
for the configured image size (``num_patches + 1``) is added, and pre-norm
transformer blocks (attention via
``torch.nn.functional.scaled_dot_product_attention``) feed a head on the CLS
token. ``forward`` checks that the patch tiling and the sequence length match
the positional embedding.

Simplifications: 16^3 single-channel volumes with 4^3 patches (64 tokens),
embedding dim 64, 4 blocks, no dropout / stochastic depth, and a linear head
producing ``num_outputs`` values (regression by default; use the logits with a
cross-entropy loss for classification). ``interpolate_pos=True`` (off by default)
resizes the positional embedding trilinearly to the token grid of any input size
divisible by the patch, so the model takes other volume sizes (token counts).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PatchEmbed3d",
    "Attention",
    "Block",
    "ViT3D",
    "loss_fn",
    "build_model",
    "make_batch",
]


class PatchEmbed3d(nn.Module):
    """Non-overlapping 3D patches -> tokens ``(B, N, embed_dim)``."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        if len(spatial) != 3 or any(s % self.patch_size for s in spatial):
            raise ValueError(
                f"input spatial size {spatial} is not divisible by patch size {self.patch_size} "
                f"(input shape {tuple(x.shape)})"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention using ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """ViT over 3D volumes with a CLS-token head producing ``num_outputs`` values."""

    def __init__(
        self,
        img_size: int = 16,
        patch_size: int = 4,
        in_channels: int = 1,
        num_outputs: int = 3,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        interpolate_pos: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 3
        self.interpolate_pos = interpolate_pos
        self.patch_embed = PatchEmbed3d(in_channels, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_outputs)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _pos_for(self, grid: tuple) -> torch.Tensor:
        """The positional embedding for a token grid ``(D, H, W)``: the learned one, or (with
        ``interpolate_pos``) its patch part resized trilinearly to ``grid``."""
        n = self.img_size // self.patch_size
        if not self.interpolate_pos or tuple(grid) == (n, n, n):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        cube = patch_pos.reshape(1, n, n, n, dim).permute(0, 4, 1, 2, 3)
        cube = F.interpolate(cube, size=tuple(grid), mode="trilinear", align_corners=False)
        return torch.cat([cls_pos, cube.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        if self.interpolate_pos:
            grid = tuple(s // self.patch_size for s in x.shape[2:])
            cls = self.cls_token.expand(tokens.shape[0], -1, -1)
            x = torch.cat([cls, tokens], dim=1) + self._pos_for(grid)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x[:, 0]))
        n_tokens, n_pos = tokens.shape[1], self.pos_embed.shape[1] - 1
        if n_tokens != n_pos:
            raise ValueError(
                f"input of shape {tuple(x.shape)} gives {n_tokens} patch tokens but the "
                f"positional embedding has {n_pos} (configured img_size={self.img_size}, "
                f"patch_size={self.patch_size})"
            )
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return F.mse_loss(output, target)


def build_model(**cfg) -> ViT3D:
    """Build a :class:`ViT3D`; keyword arguments override the defaults."""
    return ViT3D(**cfg)


def _smooth3d(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1), mode="circular"), kernel_size=3, stride=1)


def make_batch(
    batch_size: int = 4, seed: int = 0, size: int = 16, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Volumes ``(B, 1, size, size, size)`` and 3 summary statistics per volume.

    Each volume is ``offset + amplitude * field + slope * z`` with a smoothed
    unit-variance random field and per-sample random ``offset``, ``amplitude``
    and ``slope``. The target is a function of the volume itself: its mean, its
    standard deviation and its least-squares slope along the depth axis
    (scaled by the depth extent).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(
        batch_size, 1, size, size, size, generator=gen, device="cpu", dtype=torch.float32
    )
    field = _smooth3d(noise)
    field = field / field.flatten(1).std(dim=1).view(-1, 1, 1, 1, 1)
    params = torch.randn(batch_size, 3, generator=gen, device="cpu", dtype=torch.float32)
    offset = params[:, 0].view(-1, 1, 1, 1, 1)
    amplitude = (0.5 + 0.5 * params[:, 1].abs()).view(-1, 1, 1, 1, 1)
    slope = params[:, 2].view(-1, 1, 1, 1, 1)
    z = torch.linspace(-1, 1, size, device="cpu", dtype=torch.float32).view(1, 1, -1, 1, 1)
    x = offset + amplitude * field + slope * z

    flat = x.flatten(1)
    zc = z.expand_as(x).flatten(1)
    fit_slope = (flat * zc).mean(dim=1) / zc.pow(2).mean(dim=1)
    target = torch.stack([flat.mean(dim=1), flat.std(dim=1), fit_slope], dim=1)
    return x.to(device), target.to(device)
