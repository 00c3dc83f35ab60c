"""spectrum_matches: the radially averaged power spectrum of the prediction follows the target's
in every wavenumber band; no_aliasing: a finer grid adds no output power above the example
grid's Nyquist."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ..core.trace import module_stack
from ..core.errors import UsageError
from ..core.plots import plot_path
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
            metrics["plot_title"] = "radial power spectrum, prediction vs target"
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


# ------------------------------------------------------------------------------------ no_aliasing
def _validate_plot(plot: Any) -> Any:
    if plot is not None and not isinstance(plot, (bool, str, os.PathLike)):
        raise UsageError(f"plot={plot!r}: expected True (a temporary PNG), a file path for the"
                         " PNG, or None/False for no plot")
    return plot


def _validate_aliasing(scale: Any = 2, max_ratio: Any = 5e-3, max_band_ratio: Any = 2.0,
                       plot: Any = True, input_index: Any = 0) -> dict:
    from .spatial import _validate_index

    if not is_int(scale) or not 2 <= scale <= 8:
        raise UsageError(f"scale={scale!r}: expected an int from 2 to 8, the factor by which the"
                         " input grid is refined")
    if not is_number(max_ratio) or not 0 < max_ratio < 1:
        raise UsageError(f"max_ratio={max_ratio!r}: expected a fraction in (0, 1) of the"
                         " fine-grid output's power allowed above the coarse grid's Nyquist")
    if max_band_ratio is not None and (not is_number(max_band_ratio) or not max_band_ratio > 1
                                       or not math.isfinite(max_band_ratio)):
        raise UsageError(f"max_band_ratio={max_band_ratio!r}: expected a number > 1 (the"
                         " fine/coarse spectra's ratio per band), or None to skip that comparison")
    return {"scale": int(scale), "max_ratio": float(max_ratio),
            "max_band_ratio": None if max_band_ratio is None else float(max_band_ratio),
            "plot": _validate_plot(plot), "input_index": _validate_index(input_index)}


def _with_input(batch: Any, input_index: int, new: Any) -> Any:
    """A copy of ``batch`` whose input ``input_index`` is ``new`` (other fields kept)."""
    import dataclasses

    from .spatial import _input_slot

    kind, key = _input_slot(batch, input_index)
    if kind == "kwargs":
        return dataclasses.replace(batch, kwargs={**batch.kwargs, key: new})
    return dataclasses.replace(batch, args=batch.args[:key] + (new,) + batch.args[key + 1:])


#: The example input is band-limited to this fraction of its grid's Nyquist before resampling.
INPUT_BAND = 0.5


@dataclass
class _Resolutions:
    """The model's outputs on the example grid and on the ``scale`` times finer one, and the
    modules of the fine forward whose outputs hold power above the coarse Nyquist."""

    coarse: Any
    fine: Any
    ndim: int
    modules: list  # (name, type, fraction) in completion order, fine-grid forward


def _first_field(output: Any) -> Any:
    from ..core.batch import iter_tensors

    return next((t for _, t in iter_tensors(output) if t.is_floating_point()), None)


def _run_resolutions(subject: Subject, scale: int, input_index: int) -> _Resolutions:
    """Runs the model (eval, no gradients, on a copy) on the example input and on its Fourier
    interpolation to a ``scale`` times finer grid; SkipCheck when the input or the output is
    not a field that follows the grid."""
    import torch

    from ..core.forward import run_forward
    from ..core.spectra import band_limited, fourier_upsample, power_beyond
    from .spatial import _input_tensor

    base = subject.batch_copy()
    x = _input_tensor(base, input_index)
    if not x.is_floating_point() or x.dim() < 3:
        raise SkipCheck(f"the input of shape {tuple(x.shape)} is not a floating (B, C, *spatial)"
                        " field, so it cannot be resampled")
    ndim = min(x.dim() - 2, 3)
    # half the Nyquist: a pointwise nonlinearity's harmonics of the finest scales stay on the
    # example grid, so what the fine grid holds beyond it comes from the model, not the data
    x = band_limited(x, INPUT_BAND, ndim)
    base = _with_input(base, input_index, x)
    fine_in = fourier_upsample(x, scale, ndim)
    fine_grid = tuple(fine_in.shape[-ndim:])
    work = subject.model_copy("eval")
    modules: list = []

    limits = tuple(int(n) // 2 for n in x.shape[-ndim:])  # cycles per box, on every grid

    def record(name: str, mod: Any, args: Any, out: Any) -> None:
        t = _first_field(out)  # fields on the fine grid only (not flattened or pooled maps)
        if t is not None and t.dim() >= ndim + 1 and tuple(t.shape[-ndim:]) == fine_grid:
            modules.append((name, type(mod).__name__, power_beyond(t, limits, ndim)))

    with torch.no_grad():
        coarse = _first_field(run_forward(work, base))
        with module_stack(work, on_output=record):
            fine = _first_field(run_forward(work, _with_input(base, input_index, fine_in)))
    if coarse is None or fine is None or coarse.dim() < ndim + 1 or fine.dim() != coarse.dim() \
            or tuple(fine.shape[-ndim:]) != tuple(n * scale for n in coarse.shape[-ndim:]):
        got = [tuple(t.shape) if t is not None else None for t in (coarse, fine)]
        raise SkipCheck(f"the output ({got[0]} on the example grid, {got[1]} on the {scale}x"
                        " grid) is not a field whose grid follows the input's")
    return _Resolutions(coarse, fine, ndim, modules)


def _aliasing_plot(plot: Any, k: Any, p_fine: Any, p_coarse: Any, nyquist: float) -> Any:
    import torch

    from ..core.plots import save_power_spectrum

    path = plot_path(plot, "no_aliasing")
    if path is None:
        return None
    padded = torch.full_like(p_fine, float("nan"))
    padded[:len(p_coarse)] = p_coarse
    return save_power_spectrum(k, {"fine grid": p_fine, "example grid": padded}, path,
                               title="output power spectrum (mean removed, Hann window)",
                               bands=[(f"k > {nyquist:g}", nyquist, float(k[-1]))])


@check(default=False, validate=_validate_aliasing)
def no_aliasing(scale: Any = 2, max_ratio: Any = 5e-3, max_band_ratio: Any = 2.0,
                plot: Any = True, input_index: Any = 0, *, subject: Subject) -> CheckResult:
    """A finer grid adds no output power above the example grid's Nyquist (no aliasing artefacts).

    The example input (``input_index``, a ``(B, C, *spatial)`` field) is first band-limited to
    half its grid's Nyquist (``n/4``), so that the harmonics a pointwise nonlinearity makes of
    its finest scales still fit the example grid (with a full-band input, white noise, every
    healthy FNO would put them beyond it), then Fourier-interpolated to a grid ``scale`` times
    finer: the same field on both grids. The model runs on both (eval, no gradients, on a copy). A resolution-invariant
    operator (an FNO: truncated spectral layers, pointwise maps) gives nearly the same field at
    both, so the fine output's power beyond ``n/2`` must be at most ``max_ratio`` of its power
    (each map's mean removed and a Hann window applied, so a non-periodic output's jump across
    the box is not counted; boundary artefacts of zero padding are therefore not seen).
    Nearest-neighbour or transposed-conv upsampling, strided convolutions and coarse-grid
    shortcuts put their artefacts there; the failure names the first module whose output
    exceeds the ratio. With ``max_band_ratio``, the radial spectra at the two grids must agree
    band by band (low/mid/high, up to ``n/2``). ``plot`` saves both spectra as a PNG (True: a
    temporary file) whose path is ``metrics["plot"]``.

    >>> import torch
    >>> x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> no_aliasing(plot=None, model=torch.nn.Conv2d(1, 1, 1), batch=(x, x)).passed
    True
    """
    from ..core.spectra import band_ratios, detrended, power_beyond, radial_power_spectrum

    res = _run_resolutions(subject, scale, input_index)
    coarse_n = tuple(int(n) for n in res.coarse.shape[-res.ndim:])
    fraction = power_beyond(res.fine, tuple(n // 2 for n in coarse_n), res.ndim)
    k, p_fine = radial_power_spectrum(detrended(res.fine, res.ndim), res.ndim)
    kc, p_coarse = radial_power_spectrum(detrended(res.coarse, res.ndim), res.ndim)
    ratios = band_ratios(kc, p_fine[:len(kc)], p_coarse, min(3, len(kc)))
    metrics: dict[str, Any] = {"fraction_above_nyquist": fraction, "scale": scale,
                               "grids": [list(coarse_n), [n * scale for n in coarse_n]],
                               "bands": {name: r for name, _, _, r in ratios},
                               "modules": [[n or "(model)", t, f] for n, t, f in res.modules]}
    saved = _aliasing_plot(plot, k, p_fine, p_coarse, min(coarse_n) / 2)
    if saved:
        metrics["plot"] = saved
        metrics["plot_title"] = "output power spectrum on the example and the finer grid"
    return _aliasing_verdict(subject, res, fraction, ratios, max_ratio, max_band_ratio, metrics)


def _aliasing_verdict(subject: Subject, res: _Resolutions, fraction: float, ratios: list,
                      max_ratio: float, max_band_ratio: Any, metrics: dict) -> CheckResult:
    coarse_n = metrics["grids"][0]
    grids = f"{_grid(coarse_n)} -> {_grid(metrics['grids'][1])}"
    details = [f"grids {grids}: {fraction:.3g} of the fine output's power above k = "
               f"{min(coarse_n) // 2} (limit {max_ratio:g})"]
    details += [f"  band {name:>6} k={lo:g}-{hi:g}: P_fine/P_coarse {r:.4g}" for name, lo, hi, r in ratios]
    if metrics.get("plot"):
        details.append(f"plot: {metrics['plot']}")
    expected = (f"expected at most {max_ratio:g} of the output's power above the example grid's"
                f" Nyquist on a {metrics['scale']}x finer grid ({grids})")
    if fraction > max_ratio:
        culprit = next(((n, t, f) for n, t, f in res.modules if f > max_ratio), None)
        where = (f"; first seen in the output of '{culprit[0] or 'the model'}' ({culprit[1]}):"
                 f" {culprit[2]:.3g}" if culprit else "")
        details.append("remedy: upsample by interpolation that adds no high frequencies (Fourier,"
                       " bilinear), avoid nearest-neighbour/transposed-conv upsampling and strided"
                       " shortcuts in a resolution-invariant operator")
        return subject.failed(f"{expected}, observed {fraction:.3g} ({fraction / max_ratio:.1f}x"
                              f" the limit): the model adds high-frequency content when the grid"
                              f" is refined{where}", details, metrics)
    if max_band_ratio is not None:
        off = [r for r in ratios if not 1 / max_band_ratio <= r[3] <= max_band_ratio]
        if off:
            name, lo, hi, r = _worst_band(off)
            return subject.failed(f"{expected} and spectra agreeing within {max_band_ratio:g}x per"
                                  f" band, observed P_fine/P_coarse {r:.3g} in the {name} band"
                                  f" (k={lo:g}-{hi:g}): the output changes with the grid", details,
                                  metrics)
    return subject.passed(f"{expected}, observed {fraction:.3g}", details, metrics)


def _grid(sizes: Any) -> str:
    return "x".join(str(n) for n in sizes)
