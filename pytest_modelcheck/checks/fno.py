"""fno_modes: the Fourier modes kept by each spectral layer (found from the FFT ops at dispatch and
the slices of their spectra) fit below the Nyquist limit of each grid, and its output holds no
energy beyond the kept modes; skipped when no FFT truncates modes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..core.trace import module_stack
from ..core.errors import ModelError, UsageError
from ..core.result import CheckResult
from ..core.units import is_int, is_number
from .registry import SkipCheck, check
from .spatial import _input_tensor, _resized, _root_name, _storage, _validate_index, \
    _validate_sizes
from .subject import Subject


def _validate_fno(grid_sizes: Any = None, energy_tol: Any = 1e-4, input_index: Any = 0) -> dict:
    if grid_sizes is not None:
        grid_sizes = _validate_sizes(grid_sizes, "grid_sizes")
    if energy_tol is not None and (not is_number(energy_tol) or not 0 <= energy_tol < 1):
        raise UsageError(f"energy_tol={energy_tol!r}: expected a fraction in [0, 1) of the spectral"
                         " layer's output energy allowed beyond its kept modes, or None to skip")
    return {"grid_sizes": grid_sizes, "energy_tol": energy_tol,
            "input_index": _validate_index(input_index)}


def _kept_modes(start: Any, end: Any, n: int, onesided: bool) -> Any:
    """The modes a slice ``[start:end]`` of a spectrum dim of length ``n`` keeps, or None when it
    keeps the whole dim. ``[:m]`` keeps ``m`` (even beyond ``n``: the slice clamps silently),
    ``[-m:]`` keeps the ``m`` negative frequencies, a middle slice (an fftshift-ed spectrum)
    ``ceil(width / 2)`` on each side."""
    start = 0 if start is None else int(start)
    end = n if end is None or int(end) >= 2 ** 62 else int(end)
    if start == 0:
        return None if end == n else end
    if onesided:
        return max(0, min(end, n) - (start % n if start < 0 else start))
    if start < 0:
        return -start
    if end >= n:
        return n - start
    return -(-(end - start) // 2)


def _fft_mode(record: dict, stack: list) -> Any:
    """Records forward FFTs (``aten._fft_r2c``, forward ``_fft_c2c``), the slices of their
    spectra (the kept modes) and the inverse FFTs' outputs, per innermost module."""
    import torch

    from ..core._torch_compat import dispatch_mode_base
    from ..core.dispatch import user_source

    class FFTMode(dispatch_mode_base()):  # type: ignore[misc]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
            if name in ("_fft_r2c", "_fft_c2c", "_fft_c2r") and args \
                    and isinstance(args[0], torch.Tensor):
                x, nd = args[0], args[0].dim()
                dims = tuple(sorted(int(d) % nd - nd for d in args[1]))
                layer = stack[-1] if stack else ""
                forward = name == "_fft_r2c" or (name == "_fft_c2c" and bool(args[3]))
                if forward:
                    key = (layer, dims)
                    info = record["layers"].setdefault(key, {
                        "layer": layer, "dims": dims, "modes": {}, "grid": None,
                        "onesided": name == "_fft_r2c" and bool(args[3]), "source": user_source()})
                    if info["grid"] is None:
                        info["grid"] = tuple(int(x.shape[d]) for d in dims)
                    record["spectra"][_storage(out)] = (out, key)  # held: no address reuse
                    record["last"] = key
                elif record["last"] is not None and isinstance(out, torch.Tensor):
                    key = record["last"]
                    record["inverse"].setdefault(key, out)
            elif name in ("roll", "clone", "_to_copy") and args and isinstance(out, torch.Tensor) \
                    and isinstance(args[0], torch.Tensor) and _storage(args[0]) in record["spectra"] \
                    and out.shape == args[0].shape:  # fftshift (roll) or a copy of the spectrum
                key = record["spectra"][_storage(args[0])][1]
                record["spectra"].setdefault(_storage(out), (out, key))
            elif name == "slice" and args and isinstance(args[0], torch.Tensor) \
                    and _storage(args[0]) in record["spectra"]:
                spec, key = record["spectra"][_storage(args[0])]
                info = record["layers"][key]
                t = args[0]
                d = (int(args[1]) if len(args) > 1 else 0) % t.dim() - t.dim()
                if t.dim() == spec.dim() and d in info["dims"]:
                    onesided = info["onesided"] and d == info["dims"][-1]
                    m = _kept_modes(args[2] if len(args) > 2 else None,
                                    args[3] if len(args) > 3 else None, int(t.shape[d]), onesided)
                    if m:
                        info["modes"][d] = max(info["modes"].get(d, 0), m)
            return out

    return FFTMode()


def _run_fft(work: Any, data: Any) -> dict:
    """Forward (no gradients) under :func:`_fft_mode`; ``{"layers", "inverse", "error"}``."""
    import torch

    from ..core.forward import run_forward

    record: dict[str, Any] = {"layers": {}, "spectra": {}, "inverse": {}, "last": None,
                              "error": None}
    with module_stack(work) as stack:
        try:
            with torch.no_grad(), _fft_mode(record, stack):
                run_forward(work, data)
        except ModelError as exc:
            record["error"] = exc
    record["spectra"].clear()
    return record


def _layer_modes(info: dict, work: Any) -> tuple:
    """The kept modes per FFT dim (None: the whole dim), filling dims no slice truncated from
    the module's ``modes1``/``modes2``/``modes3`` attributes when it has them."""
    modes = [info["modes"].get(d) for d in info["dims"]]
    mod = dict(work.named_modules()).get(info["layer"])
    attrs = [getattr(mod, f"modes{i + 1}", None) for i in range(len(modes))]
    return tuple(m if m is not None or not is_int(a) else a for m, a in zip(modes, attrs))


def _mode_problems(modes: tuple, grid: tuple, onesided: bool = True) -> list:
    """Where ``modes`` exceed the grid: ``m <= n // 2`` (full FFT dims), ``m <= n // 2 + 1`` (the
    last dim of a one-sided rfft); ``None`` modes (the whole dim kept) cannot exceed it."""
    probs = []
    nd = len(modes)
    for i, (m, n) in enumerate(zip(modes, grid)):
        last = onesided and i == nd - 1
        limit = n // 2 + 1 if last else n // 2
        if m is not None and m > limit:
            rule = f"{n}//2+1 = {limit} along the rfft dim {i - nd}" if last else \
                f"{n}//2 = {limit} along dim {i - nd}"
            probs.append(f"modes{i + 1}={m} > {rule}")
    return probs


def _energy_beyond(y: Any, modes: tuple, onesided: bool = True) -> float:
    """Fraction of ``y``'s spectral energy outside the kept modes.

    Kept: frequencies ``-m..m`` along the full-FFT dims (``[:m]`` and ``[-m:]`` are written; a
    real output mirrors ``-m`` onto ``+m`` in the zero-frequency column) and ``[:m]`` along the
    one-sided rfft dim; a ``None`` mode keeps the whole dim.
    """
    import torch

    nd = len(modes)
    y = y.detach()
    y = (y.real if y.is_complex() else y).double()
    spec = torch.fft.rfftn(y, dim=tuple(range(-nd, 0))).abs().pow(2)
    index = []
    for i, (m, n) in enumerate(zip(modes, spec.shape[-nd:])):
        idx = torch.zeros(n, dtype=torch.bool, device=spec.device)
        if m is None:
            idx[:] = True
        elif i < nd - 1 or not onesided:  # frequencies -m..m (on the rfft of a real output: 0..m)
            idx[:m + 1] = True
            if m and i < nd - 1:
                idx[-m:] = True
        else:
            idx[:m] = True
        index.append(idx)
    keep = index[0]
    for idx in index[1:]:
        keep = keep.unsqueeze(-1) & idx
    total = float(spec.sum())
    return float(spec[..., ~keep].sum()) / total if total > 0 else 0.0


def _spectral_layers(work: Any, base: Any, root: str) -> tuple:
    """``(record of the example forward, {key: (info, kept modes)})`` of the layers whose spectra
    are truncated; SkipCheck (or the forward's error) when there are none."""
    first = _run_fft(work, base)
    layers = {k: (info, _layer_modes(info, work)) for k, info in first["layers"].items()}
    checked = {k: v for k, v in layers.items() if any(m is not None for m in v[1])}
    if not checked:
        if first["error"] is not None and not layers:
            raise first["error"]
        why = ("no FFT op ran in forward" if not layers else
               f"the FFTs in {', '.join(repr(i['layer'] or root) for i, _ in layers.values())}"
               " keep every mode (no slice of their spectra truncates it)")
        raise SkipCheck(f"no spectral layer found: {why}")
    return first, checked


def _label_of(info: dict, checked: dict, root: str) -> str:
    """The layer's name, with its FFT dims when the layer runs more than one truncating FFT."""
    name = info["layer"] or root
    same = [i for i, _ in checked.values() if i["layer"] == info["layer"]]
    return name if len(same) == 1 else f"{name} (FFT dims {list(info['dims'])})"


def _modes_at(info: dict, modes0: tuple, now: Optional[dict], error: Any, grid: tuple,
              example: tuple) -> tuple:
    """``(modes, FFT grid)`` of one layer at ``grid``; ``now`` is its record there (None: not
    reached, the example's modes are used with its grid scaled to this one)."""
    if now is not None:
        # modes as sliced at this grid (a model may adapt them); when the forward then
        # raised, the example's modes where larger: they explain the error
        modes = tuple(m0 if m is None else (max(m, m0 or 0) if error is not None else m)
                      for m, m0 in zip((now["modes"].get(d) for d in info["dims"]), modes0))
        return modes, now["grid"]
    k = len(info["dims"])
    scale = [g / e for g, e in zip(grid[-k:], example[-k:])]
    n = tuple(max(1, round(g0 * s)) for g0, s in zip(info["grid"], scale)) \
        if len(scale) == len(info["grid"]) else grid
    return modes0, n


@dataclass
class _GridOutcome:
    """One grid: the detail row, the failure message ("" when it fits) and the energy beyond the
    kept modes per layer."""

    row: str
    failure: str
    energy: dict


def _judge_grid(rec: dict, grid: tuple, example: tuple, checked: dict, energy_tol: Any,
                root: str) -> _GridOutcome:
    error = rec["error"]
    label = f"grid {grid}"
    static, energy = [], {}
    for key, (info, modes0) in checked.items():
        modes, n = _modes_at(info, modes0, rec["layers"].get(key), error, grid, example)
        probs = _mode_problems(modes, n, info["onesided"])
        if probs:
            static.append(f"layer '{_label_of(info, checked, root)}' keeps {' and '.join(probs)}")
        elif energy_tol is not None and key in rec["inverse"]:
            energy[_label_of(info, checked, root)] = _energy_beyond(rec["inverse"][key], modes,
                                                                    info["onesided"])
    spilled = [(n, e) for n, e in energy.items() if e > energy_tol] if energy_tol is not None else []
    failure = ""
    if static:
        extra = f" (forward raised {type(error.original).__name__})" if error is not None else \
            " (the forward ran: those weights are never used as intended)"
        failure = static[0] + extra
    elif error is not None:
        failure = str(error)
    elif spilled:
        name, e = max(spilled, key=lambda kv: kv[1])
        failure = (f"layer '{name}' puts {e:.3g} of its output energy beyond its kept modes"
                   f" (tolerance {energy_tol:g})")
    parts = static + ([str(error)] if error else []) + [f"'{n}' energy beyond modes {e:.3g}"
                                                        for n, e in energy.items()]
    row = f"{label}: " + "; ".join(parts) if parts else f"{label}: fits"
    return _GridOutcome(row, failure, energy)


@check(default=False, validate=_validate_fno)
def fno_modes(grid_sizes: Any = None, energy_tol: Any = 1e-4, input_index: Any = 0, *,
              subject: Subject) -> CheckResult:
    """FNO spectral layers keep modes within each grid's Nyquist limit and write no energy beyond them.

    Spectral layers are found at dispatch: each module (the innermost one running) that calls a
    forward FFT (``aten._fft_r2c``: ``torch.fft.rfft*``; ``aten._fft_c2c``: ``torch.fft.fft*``)
    whose spectrum it then slices; the slices give the kept modes per FFT dim (``[:m]`` and
    ``[-m:]``), whatever the layer's attributes are called (a dim no slice truncates falls back
    to a ``modes1``/``modes2``/``modes3`` attribute, else keeps everything). The last dim of a
    one-sided rfft is the rfft dim. For each grid size (default: the example batch's), the input
    is tiled/cropped to it and the forward runs (eval, no gradients, on a copy); each layer's FFT
    grid ``n`` is recorded and ``modes <= n // 2`` (``n // 2 + 1`` along the rfft dim) must hold:
    larger modes are weights that only a slicing accident reaches. With ``energy_tol``, the
    fraction of the inverse FFT's output energy outside the kept modes must not exceed it. A
    model in which no FFT runs, or whose spectra are never truncated, is skipped.

    >>> import torch
    >>> class Spectral(torch.nn.Module):
    ...     def forward(self, x):
    ...         f = torch.fft.rfft2(x)
    ...         out = torch.zeros_like(f)
    ...         out[..., :3, :3], out[..., -3:, :3] = f[..., :3, :3], f[..., -3:, :3]
    ...         return torch.fft.irfft2(out, s=x.shape[-2:])
    >>> fno_modes(model=Spectral(), batch=torch.randn(1, 1, 8, 8)).passed
    True
    """
    base = subject.batch_copy()
    x = _input_tensor(base, input_index)
    given = [s for s in grid_sizes or () if not is_int(s)]
    root = _root_name(subject.model)
    first, checked = _spectral_layers(subject.model_copy("eval"), base, root)
    ndim = len(next(iter(checked.values()))[0]["dims"]) if not given else len(given[0])
    ndim = min(ndim, x.dim() - 1)
    example = tuple(x.shape[-ndim:])
    grids = [((g,) * ndim if is_int(g) else tuple(g)) for g in (grid_sizes or (example,))]
    rows, failures, worst = [], [], 0.0
    for grid in grids:
        rec = first if grid == example else _run_fft(subject.model_copy("eval"),
                                                     _resized(base, input_index, grid, ndim))
        outcome = _judge_grid(rec, grid, example, checked, energy_tol, root)
        worst = max([worst] + list(outcome.energy.values()))
        if outcome.failure:
            failures.append((f"grid {grid}", outcome.failure))
        rows.append(outcome.row)
    labels = [_label_of(i, checked, root) for i, _ in checked.values()]
    layer_text = f"{len(checked)} spectral layers with modes {next(iter(checked.values()))[1]}"
    metrics = {"layers": labels, "modes": [list(m) for _, m in checked.values()],
               "sources": [i["source"] for i, _ in checked.values()],
               "grids": [list(g) for g in grids], "max_energy_beyond": worst,
               "failed_grids": [lb for lb, _ in failures]}
    expected = ("expected FNO modes within the Nyquist limit for grids "
                + ", ".join(str(g) for g in grids))
    details = [f"found {layer_text}"]
    details += [f"  '{lb}': FFT over dims {list(i['dims'])}"
                f"{' (one-sided rfft)' if i['onesided'] else ''}, modes {m}, grid {i['grid']},"
                f" at {i['source'] or 'an unknown line'}" for lb, (i, m) in zip(labels, checked.values())]
    details += rows
    if failures:
        label, msg = failures[0]
        details.append("remedy: keep modes <= n//2 along the full-FFT dims and <= n//2+1 along the"
                       " rfft dim for the smallest grid used, or lower the modes")
        return subject.failed(f"{expected}, observed at {label}: {msg}", details, metrics)
    return subject.passed(f"{expected}, observed {layer_text} fitting every grid", details, metrics)
