"""Diffusion transformer over detector PMTs, after GENESIS ``PMTDit`` (seed 000).

Follows the forward pass documented in seed 000: the noisy per-PMT signal
``x_sig (B, 2, L)`` ([charge, time]) and the PMT positions ``geom (B, 3, L)``
are each transposed and embedded by a ``Linear`` and summed (SUM fusion); the
diffusion timestep ``t (B,)`` goes through a sinusoidal embedding and an MLP,
the event label ``(B, 6)`` ([energy, zenith, azimuth, x, y, z]) through a
``Linear``; their sum conditions ``depth`` DiT blocks via adaptive layer norm
(shift, scale and gate for the attention and the MLP branch). After the blocks
the geometry embedding is added again, then a final layer norm and a linear
projection give the predicted noise ``(B, 2, L)``.

All inputs are assumed already normalised (as the seed's dataloader does):
signal, label and geometry roughly in ``[0, 1]``.

Simplifications: ``L = 64`` PMTs instead of 5160, hidden size 32, 2 blocks, 4
heads, a 64-dim timestep embedding and no dropout by default. The adaptive
layer-norm projections start from a small normal initialisation rather than
DiT's exact zeros, so every parameter receives a gradient from the first step.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "NUM_TIMESTEPS",
    "SinusoidalPositionEmbeddings",
    "Attention",
    "DiTBlock",
    "PMTDit",
    "alpha_bar_schedule",
    "loss_fn",
    "build_model",
    "make_batch",
]

#: Length of the diffusion chain; timesteps are integers in ``[0, NUM_TIMESTEPS)``.
NUM_TIMESTEPS = 1000


class SinusoidalPositionEmbeddings(nn.Module):
    """Transformer-style sinusoidal embedding of a (B,) timestep -> (B, dim)."""

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"timestep embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.to(self.freqs.dtype).unsqueeze(1) * self.freqs.unsqueeze(0)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention over the PMT sequence (``scaled_dot_product_attention``)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN conditioning (shift/scale/gate per branch)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
            nn.Linear(mlp_hidden, hidden),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1)
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class PMTDit(nn.Module):
    """Noise predictor ``eps(x_sig, t, label, geom) -> (B, 2, L)``."""

    def __init__(
        self,
        seq_len: int = 64,
        hidden: int = 32,
        depth: int = 2,
        heads: int = 4,
        label_dim: int = 6,
        t_embed_dim: int = 64,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        signal_channels: int = 2,
        geom_channels: int = 3,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.signal_channels = signal_channels
        self.signal_embed = nn.Linear(signal_channels, hidden)
        self.geom_embed = nn.Linear(geom_channels, hidden)
        self.time_embed = SinusoidalPositionEmbeddings(t_embed_dim)
        self.time_mlp = nn.Sequential(nn.Linear(t_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_embed = nn.Linear(label_dim, hidden)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden)
        self.output_proj = nn.Linear(hidden, signal_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Small (not zero) modulation and output weights: blocks start close to the identity
        # and the output close to zero, while every parameter still gets a gradient.
        for block in self.blocks:
            nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
        nn.init.normal_(self.output_proj.weight, std=0.02)

    def forward(self, x_sig: torch.Tensor, t: torch.Tensor, label: torch.Tensor,
                geom: torch.Tensor) -> torch.Tensor:
        if x_sig.dim() != 3 or x_sig.shape[1] != self.signal_channels:
            raise ValueError(f"x_sig must be (B, {self.signal_channels}, L), got {tuple(x_sig.shape)}")
        if geom.shape[0] != x_sig.shape[0] or geom.shape[2] != x_sig.shape[2]:
            raise ValueError(f"geom {tuple(geom.shape)} does not match x_sig {tuple(x_sig.shape)}")
        signal = self.signal_embed(x_sig.transpose(1, 2))   # (B, L, hidden)
        geometry = self.geom_embed(geom.transpose(1, 2))    # (B, L, hidden)
        x = signal + geometry
        c = self.time_mlp(self.time_embed(t)) + self.label_embed(label)  # (B, hidden)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_norm(x + geometry)  # re-add geometry before the output stage
        return self.output_proj(x).transpose(1, 2)


def alpha_bar_schedule(num_timesteps: int = NUM_TIMESTEPS, beta_start: float = 1e-4,
                       beta_end: float = 0.02) -> torch.Tensor:
    """Cumulative product of ``1 - beta`` for the linear DDPM beta schedule (float32)."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and true noise."""
    return F.mse_loss(output, target)


def build_model(**cfg) -> PMTDit:
    """Build a :class:`PMTDit`; keyword arguments override the defaults."""
    return PMTDit(**cfg)


def make_batch(batch_size: int = 4, seed: int = 0, seq_len: int = 64,
               device: str | torch.device = "cpu") -> tuple:
    """``((x_sig, t, label, geom), noise)`` for one DDPM training step.

    The detector (PMT positions in ``[0, 1]^3``) is fixed across seeds. Labels
    are uniform in ``[0, 1]^6``; the clean signal of a PMT at distance ``d``
    from the (normalised) vertex is ``charge = energy * exp(-d / 0.3)`` and
    ``time = ln(1 + 5000 d) / 10``. ``t`` is an integer timestep in
    ``[0, 1000)`` and ``x_sig = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.
    """
    geom_gen = torch.Generator(device="cpu").manual_seed(5160)
    pmt_xyz = torch.rand(3, seq_len, generator=geom_gen)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    label = torch.rand(batch_size, 6, generator=gen)
    t = torch.randint(0, NUM_TIMESTEPS, (batch_size,), generator=gen)
    noise = torch.randn(batch_size, 2, seq_len, generator=gen)

    geom = pmt_xyz.unsqueeze(0).expand(batch_size, -1, -1).contiguous()
    vertex = label[:, 3:6].unsqueeze(2)                                   # (B, 3, 1)
    dist = (geom - vertex).norm(dim=1)                                    # (B, L)
    charge = label[:, :1] * torch.exp(-dist / 0.3)
    time = torch.log1p(5000.0 * dist) / 10.0
    x0 = torch.stack([charge, time], dim=1)                               # (B, 2, L)

    abar = alpha_bar_schedule()[t].view(-1, 1, 1)
    x_sig = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
    inputs = tuple(v.to(device) for v in (x_sig, t, label, geom))
    return inputs, noise.to(device)
