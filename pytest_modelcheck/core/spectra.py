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


def fourier_upsample(field: Any, scale: int, ndim: Optional[int] = None) -> Any:
    """``field`` on a grid ``scale`` times finer along its last ``ndim`` dims, by Fourier
    interpolation: its spectrum is zero-padded (the Nyquist mode of an even size is split
    between ``+n/2`` and ``-n/2``), so the result is band-limited to the input grid's Nyquist
    and equals ``field`` at every ``scale``-th point. ``ndim`` defaults as in
    :func:`radial_power_spectrum`; the dtype and device are kept.

    >>> import torch
    >>> x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> y = fourier_upsample(x, 2)
    >>> tuple(y.shape), bool(torch.allclose(y[..., ::2, ::2], x, atol=1e-6))
    ((1, 1, 16, 16), True)
    >>> power_beyond(y, (4, 4), window=False) < 1e-12  # nothing above the 8-grid's Nyquist
    True
    """
    import torch

    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise UsageError(f"scale={scale!r}: expected an int >= 1")
    ndim = _spatial_ndim(field, ndim)
    spec = torch.fft.fftn(field.detach().to(torch.float64), dim=tuple(range(-ndim, 0)))
    for axis in range(-ndim, 0):
        n = spec.shape[axis]
        m = n * scale
        shape = list(spec.shape)
        shape[axis] = m
        out = spec.new_zeros(shape)
        pos, neg = (n + 1) // 2, (n - 1) // 2  # DC and positive, negative (no Nyquist)
        out.narrow(axis, 0, pos).copy_(spec.narrow(axis, 0, pos))
        out.narrow(axis, m - neg, neg).copy_(spec.narrow(axis, n - neg, neg))
        if n % 2 == 0 and scale > 1:
            half = spec.narrow(axis, n // 2, 1) * 0.5
            out.narrow(axis, n // 2, 1).copy_(half)
            out.narrow(axis, m - n // 2, 1).copy_(half)
        elif n % 2 == 0:
            out.narrow(axis, n // 2, 1).copy_(spec.narrow(axis, n // 2, 1))
        spec = out
    fine = torch.fft.ifftn(spec, dim=tuple(range(-ndim, 0))).real * float(scale) ** ndim
    return fine.to(field.dtype)


def _spatial_ndim(field: Any, ndim: Optional[int]) -> int:
    if ndim is None:
        ndim = field.dim() - 2 if field.dim() >= 4 else field.dim()
    if not isinstance(ndim, int) or isinstance(ndim, bool) or not 1 <= ndim <= 3 or ndim > field.dim():
        raise UsageError(f"ndim={ndim!r}: expected 1, 2 or 3 spatial dimensions, at most"
                         f" field.dim()={field.dim()}")
    return ndim


def band_limited(field: Any, fraction: float, ndim: Optional[int] = None) -> Any:
    """``field`` with every Fourier mode above ``fraction`` of its grid's Nyquist (along any of
    its last ``ndim`` dims) removed; dtype and device kept. ``fraction=0.5`` leaves room for the
    harmonics a pointwise nonlinearity makes of the finest kept scales (twice their wavenumber)
    on the same grid.

    >>> import math, torch
    >>> x = torch.arange(16.0)
    >>> wave = torch.sin(2 * math.pi * 2 * x / 16) + torch.sin(2 * math.pi * 7 * x / 16)
    >>> low = band_limited(wave[None, None], 0.5, ndim=1)[0, 0]
    >>> bool(torch.allclose(low, torch.sin(2 * math.pi * 2 * x / 16), atol=1e-6))
    True
    """
    import torch

    ndim = _spatial_ndim(field, ndim)
    dims = tuple(range(-ndim, 0))
    spec = torch.fft.fftn(field.detach().to(torch.float64), dim=dims)
    spatial = tuple(spec.shape[-ndim:])
    spec = spec * ~_modes_beyond(spatial, [fraction * n / 2 for n in spatial], spec.device)
    return torch.fft.ifftn(spec, dim=dims).real.to(field.dtype)


def _modes_beyond(spatial: tuple, limits: Any, device: Any = None) -> Any:
    """Boolean mask over an FFT grid of shape ``spatial``: the modes with ``|k| > limit`` along
    any axis (``k`` in cycles per box, one limit per axis)."""
    import torch

    beyond = torch.zeros(spatial, dtype=torch.bool, device=device)
    for i, (n, lim) in enumerate(zip(spatial, limits)):
        k = (torch.fft.fftfreq(n, dtype=torch.float64, device=device) * n).abs() > lim
        shape = [1] * len(spatial)
        shape[i] = n
        beyond = beyond | k.view(shape)
    return beyond


def detrended(field: Any, ndim: Optional[int] = None) -> Any:
    """A float64 CPU copy of ``field`` with each map's mean removed and a periodic Hann window
    applied along its last ``ndim`` dims: its spectrum shows the field's own structure, not
    the jump a non-periodic field makes across the box's wrap-around (which an FFT reads as
    power at every wavenumber).

    >>> import torch
    >>> ramp = torch.linspace(0, 1, 16).expand(16, 16)  # non-periodic: jumps from 1 to 0
    >>> power_beyond(ramp, (4, 4), window=False) > 100 * power_beyond(ramp, (4, 4))
    True
    >>> tuple(detrended(torch.ones(2, 8, 8)).abs().amax((-2, -1)).tolist())
    (0.0, 0.0)
    """
    import torch

    ndim = _spatial_ndim(field, ndim)
    data = field.detach().to("cpu", torch.float64)
    dims = tuple(range(-ndim, 0))
    data = data - data.mean(dim=dims, keepdim=True)
    for axis in dims:
        shape = [1] * data.dim()
        shape[axis] = data.shape[axis]
        data = data * torch.hann_window(data.shape[axis], periodic=True,
                                        dtype=torch.float64).view(shape)
    return data


def power_beyond(field: Any, limits: Any, ndim: Optional[int] = None, window: bool = True) -> float:
    """The fraction of ``field``'s power (the mean, DC, left out) in modes with ``|k| > limit``
    along any spatial axis (``limits`` one per axis, in cycles per box): the power a grid
    whose Nyquist wavenumbers are ``limits`` cannot hold. With ``window`` the field is first
    :func:`detrended` (mean removed, Hann window), so a non-periodic field is not counted as
    having high-frequency content; 0.0 for a constant field.

    >>> import math, torch
    >>> x = torch.arange(32.0)
    >>> wave = torch.sin(2 * math.pi * 3 * x / 32) + 0.1 * torch.sin(2 * math.pi * 12 * x / 32)
    >>> round(power_beyond(wave, (8,), ndim=1, window=False), 4)  # 0.01 / (1 + 0.01)
    0.0099
    """
    import torch

    ndim = _spatial_ndim(field, ndim)
    data = detrended(field, ndim) if window else field.detach().to("cpu", torch.float64)
    spatial = tuple(data.shape[-ndim:])
    limits = tuple(limits)
    if len(limits) != ndim:
        raise UsageError(f"limits={limits!r}: expected one limit per spatial axis ({ndim})")
    power = torch.fft.fftn(data.reshape(-1, *spatial), dim=tuple(range(1, ndim + 1)))
    power = power.abs().pow(2).sum(0)
    power[(0,) * ndim] = 0.0
    beyond = _modes_beyond(spatial, [lim + (1 if window else 0) for lim in limits])
    total = float(power.sum())
    return float(power[beyond].sum()) / total if total > 0 else 0.0
