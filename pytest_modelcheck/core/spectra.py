"""Radially averaged power spectra of 1D, 2D and 3D fields, and band-by-band comparisons.

The wavenumber of a mode is counted in cycles per box along each axis (``fftfreq(n) * n``), so
a pure sine completing ``k0`` periods across the field puts its power in the bin ``k = k0``.
Bins are the integers ``1 .. min(n) // 2`` (the DC mode is left out: it is the mean, not a
structure); a mode falls in the bin nearest to its wavenumber magnitude ``|k|``. Leading
dimensions (batch, channels) are averaged.

This module imports neither pytest nor, until called, torch.
"""
from __future__ import annotations

from typing import Any, Optional

from .errors import UsageError

BAND_NAMES_3 = ("low", "mid", "high")


def radial_power_spectrum(field: Any, ndim: Optional[int] = None) -> tuple:
    """``(k, P(k))``: the power spectrum of ``field`` averaged over shells of ``|k|``.

    The last ``ndim`` dimensions are spatial (default: ``field.dim() - 2`` for a
    ``(B, C, *spatial)`` tensor, or every dimension of a 1-3 dim tensor); the others are
    averaged. ``P(k)`` is the mean of ``|FFT|^2 / N^2`` over the modes of the shell, so a
    field ``a * sin(2 pi k0 x / n)`` gives ``P(k0) = a^2 / 4`` per mode (two modes, +-k0, on
    the k0 shell of a 1D field). Both are 1-D float64 tensors on the CPU.

    >>> import math, torch
    >>> x = torch.arange(16.0)
    >>> field = torch.sin(2 * math.pi * 3 * x / 16).expand(16, 16)  # 3 periods along the last axis
    >>> k, p = radial_power_spectrum(field, ndim=2)
    >>> k.tolist()
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    >>> int(p.argmax()) + 1
    3
    """
    import torch

    if not isinstance(field, torch.Tensor):
        field = torch.as_tensor(field)
    if ndim is None:
        ndim = field.dim() - 2 if field.dim() >= 4 else field.dim()
    if not isinstance(ndim, int) or isinstance(ndim, bool) or not 1 <= ndim <= 3 or ndim > field.dim():
        raise UsageError(f"ndim={ndim!r}: expected 1, 2 or 3 spatial dimensions, at most"
                         f" field.dim()={field.dim()}")
    spatial = tuple(field.shape[-ndim:])
    if min(spatial) < 2:
        raise UsageError(f"field of shape {tuple(field.shape)}: spatial dims {spatial} need at"
                         " least 2 points each")
    data = field.detach().to("cpu", torch.float64)
    data = data.reshape(-1, *spatial)
    dims = tuple(range(1, ndim + 1))
    n_total = 1
    for n in spatial:
        n_total *= n
    power = torch.fft.fftn(data, dim=dims).abs().pow(2).mean(0) / n_total ** 2
    grids = torch.meshgrid(*[torch.fft.fftfreq(n, dtype=torch.float64) * n for n in spatial],
                           indexing="ij")
    kmag = torch.sqrt(torch.stack([g ** 2 for g in grids]).sum(0))
    kmax = min(spatial) // 2
    bins = torch.round(kmag).long().flatten()
    keep = (bins >= 1) & (bins <= kmax)
    sums = torch.zeros(kmax + 1, dtype=torch.float64).index_add_(0, bins[keep], power.flatten()[keep])
    counts = torch.zeros(kmax + 1, dtype=torch.float64).index_add_(
        0, bins[keep], torch.ones_like(power.flatten()[keep]))
    k = torch.arange(1, kmax + 1, dtype=torch.float64)
    return k, sums[1:] / counts[1:].clamp(min=1)


def band_edges(k: Any, bands: Any = 3) -> list:
    """``[(name, k_lo, k_hi), ...]``: ``bands`` equal contiguous slices of the bins of ``k``
    (named low/mid/high for 3), or the given ``(k_lo, k_hi)`` pairs (inclusive).

    >>> import torch
    >>> band_edges(torch.arange(1.0, 10.0))  # 9 bins in thirds
    [('low', 1.0, 3.0), ('mid', 4.0, 6.0), ('high', 7.0, 9.0)]
    >>> band_edges(torch.arange(1.0, 10.0), [(2, 5)])
    [('k=2-5', 2.0, 5.0)]
    """
    values = [float(v) for v in k]
    if isinstance(bands, int) and not isinstance(bands, bool):
        if bands > len(values):
            raise UsageError(f"bands={bands}: only {len(values)} wavenumber bins; expected at most"
                             f" {len(values)} bands")
        out = []
        for i in range(bands):
            lo = values[i * len(values) // bands]
            hi = values[(i + 1) * len(values) // bands - 1]
            name = BAND_NAMES_3[i] if bands == 3 else f"k={lo:g}-{hi:g}"
            out.append((name, lo, hi))
        return out
    return [(f"k={float(lo):g}-{float(hi):g}", float(lo), float(hi)) for lo, hi in bands]


def band_ratios(k: Any, p_pred: Any, p_target: Any, bands: Any = 3) -> list:
    """``[(name, k_lo, k_hi, ratio), ...]``: summed ``P_pred / P_target`` over each band.

    A band with no target power and no predicted power has ratio 1; predicted power over zero
    target power gives ``inf``.

    >>> import torch
    >>> k = torch.arange(1.0, 7.0)
    >>> [round(r, 3) for *_, r in band_ratios(k, torch.ones(6), torch.tensor([1., 1, 2, 2, 4, 4]))]
    [1.0, 0.5, 0.25]
    """
    out = []
    for name, lo, hi in band_edges(k, bands):
        sel = (k >= lo) & (k <= hi)
        num, den = float(p_pred[sel].sum()), float(p_target[sel].sum())
        if den == 0.0:
            ratio = 1.0 if num == 0.0 else float("inf")
        else:
            ratio = num / den
        out.append((name, lo, hi, ratio))
    return out
