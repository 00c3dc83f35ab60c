"""spectrum_matches: the radially averaged power spectrum of the prediction follows the target's
in every wavenumber band."""
from __future__ import annotations

import math
import os
from typing import Any

from ..core.errors import UsageError
from ..core.result import CheckResult
from ..core.units import is_int, is_number
from .registry import SkipCheck, check
from .subject import Subject


def _validate_spectrum(max_band_ratio: Any = 2.0, bands: Any = 3, plot: Any = None) -> dict:
    if not is_number(max_band_ratio) or not max_band_ratio > 1 or not math.isfinite(max_band_ratio):
        raise UsageError(f"max_band_ratio={max_band_ratio!r}: expected a number > 1; each band's"
                         " P_pred/P_target must lie in [1/max_band_ratio, max_band_ratio]")
    if is_int(bands):
        if bands < 1:
            raise UsageError(f"bands={bands!r}: expected an int >= 1 (equal slices of k) or a list"
                             " of (k_lo, k_hi) pairs such as [(1, 4), (5, 8)]")
    elif (isinstance(bands, (list, tuple)) and bands and all(
            isinstance(b, (list, tuple)) and len(b) == 2 and all(is_number(v) for v in b)
            and 0 < b[0] <= b[1] for b in bands)):
        bands = tuple((float(lo), float(hi)) for lo, hi in bands)
    else:
        raise UsageError(f"bands={bands!r}: expected an int >= 1 (equal slices of k) or a list of"
                         " (k_lo, k_hi) pairs with 0 < k_lo <= k_hi, such as [(1, 4), (5, 8)]")
    if plot is not None and not isinstance(plot, (str, os.PathLike)):
        raise UsageError(f"plot={plot!r}: expected a file path for the PNG, or None")
    return {"max_band_ratio": float(max_band_ratio), "bands": bands, "plot": plot}


def _fields(subject: Subject) -> tuple:
    """``(prediction, target, ndim)``: the first output tensor and the batch target, both
    ``(B, C, *spatial)`` fields of one shape; SkipCheck otherwise."""
    import torch

    from ..core.batch import iter_tensors
    from ..core.forward import run_forward

    work, data = subject.model_copy("eval"), subject.batch_copy()
    with torch.no_grad():
        output = run_forward(work, data)
    out = next((t for _, t in iter_tensors(output)), None)
    target = data.target
    if out is None or not isinstance(target, torch.Tensor) or tuple(out.shape) != tuple(target.shape):
        got = tuple(out.shape) if out is not None else type(output).__name__
        want = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise SkipCheck(f"the output {got} and the target {want} are not fields of the same shape,"
                        " so their power spectra cannot be compared")
    ndim = out.dim() - 2
    if not 1 <= ndim <= 3:
        raise SkipCheck(f"the output of shape {tuple(out.shape)} is not a (B, C, *spatial) field"
                        " with 1 to 3 spatial dims")
    return out, target, ndim


def _worst_band(outside: list) -> tuple:
    """The band furthest from a ratio of 1 (on a log scale; 0 and inf furthest)."""
    return max(outside, key=lambda r: abs(math.log(r[3])) if 0 < r[3] < math.inf else math.inf)


@check(default=False, validate=_validate_spectrum)
def spectrum_matches(max_band_ratio: Any = 2.0, bands: Any = 3, plot: Any = None, *,
                     subject: Subject) -> CheckResult:
    """The prediction's radial power spectrum follows the target's in every band (within max_band_ratio).

    The model runs on the example batch (eval, no gradients, on a copy); its output (the first
    tensor of a nest) and the batch target must have the same ``(B, C, *spatial)`` shape with 1
    to 3 spatial dims. ``bands`` is a number of equal slices of the wavenumbers (3: low, mid,
    high) or ``(k_lo, k_hi)`` pairs in cycles per box. Each band's summed ``P_pred / P_target``
    must lie in ``[1/max_band_ratio, max_band_ratio]``: a blurring model loses high-k power, a
    noisy one gains it. ``plot`` saves a log-log PNG of both spectra.

    >>> import torch
    >>> x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> spectrum_matches(model=torch.nn.Identity(), batch=(x, x.clone())).passed
    True
    """
    from ..core.spectra import band_ratios, radial_power_spectrum

    out, target, ndim = _fields(subject)
    k, p_pred = radial_power_spectrum(out.float(), ndim)
    _, p_true = radial_power_spectrum(target.float(), ndim)
    ratios = band_ratios(k, p_pred, p_true, bands)
    lo_ok, hi_ok = 1.0 / max_band_ratio, max_band_ratio
    outside = [r for r in ratios if not lo_ok <= r[3] <= hi_ok]
    metrics: dict[str, Any] = {"bands": {name: ratio for name, _, _, ratio in ratios},
                               "k": [float(v) for v in k], "p_pred": [float(v) for v in p_pred],
                               "p_target": [float(v) for v in p_true]}
    details = [f"{'band':>10} {'k range':>10} {'P_pred/P_target':>16}"]
    details += [f"{name:>10} {f'{lo:g}-{hi:g}':>10} {ratio:16.4g}" for name, lo, hi, ratio in ratios]
    if plot is not None:
        from ..core.plots import save_power_spectrum

        saved = save_power_spectrum(k, {"target": p_true, "prediction": p_pred}, plot,
                                    title="radially averaged power spectrum", bands=ratios)
        metrics["plot"] = saved
        if saved:
            details.append(f"plot: {saved}")
    expected = f"expected P_pred/P_target within [{lo_ok:.3g}, {hi_ok:.3g}] in every band"
    if not outside:
        summary = ", ".join(f"{name} {ratio:.3g}" for name, _, _, ratio in ratios)
        return subject.passed(f"{expected}, observed {summary}", details, metrics)
    name, lo, hi, ratio = _worst_band(outside)
    others = ", ".join(f"{n} {r:.3g}" for n, _, _, r in ratios if n != name)
    trend = "lacks" if ratio < 1 else "has excess"
    details.append(f"the prediction {trend} power at k={lo:g}-{hi:g}" +
                   (" (smoothed or blurred output)" if ratio < 1 and name == ratios[-1][0] else ""))
    return subject.failed(f"{expected}, observed {ratio:.3g} in the {name} band (k={lo:g}-{hi:g})"
                          + (f" ({others})" if others else ""), details, metrics)
