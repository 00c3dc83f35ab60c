"""mode_sweep: the output of an FNO with its spectral layers truncated to fewer Fourier modes,
against the full model and against the target: where extra modes stop helping, where
truncation starts to hurt, and modes a layer keeps that never reach the output."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.errors import UsageError
from ..core.plots import plot_path
from ..core.result import CheckResult
from ..core.units import is_int, is_number
from .fno import _label_of, _spectral_layers
from .registry import SkipCheck, check
from .spatial import _root_name
from .spectra import _validate_plot
from .subject import Subject

SATURATED = 0.01  # relative change to the full output below which more modes "stop helping"


def _validate_sweep(modes: Any = (2, 4, 8, 16), max_rel_l2: Any = None, dead_tol: Any = 1e-6,
                    plot: Any = True) -> dict:
    if is_int(modes):
        modes = (modes,)
    if not isinstance(modes, (list, tuple)) or not modes \
            or not all(is_int(m) and m >= 1 for m in modes):
        raise UsageError(f"modes={modes!r}: expected a non-empty list of mode counts >= 1 to"
                         " truncate the spectral layers to, such as modes=(2, 4, 8, 16)")
    if max_rel_l2 is not None and (not is_number(max_rel_l2) or not max_rel_l2 > 0
                                   or not math.isfinite(max_rel_l2)):
        raise UsageError(f"max_rel_l2={max_rel_l2!r}: expected a number > 0, the largest relative"
                         " L2 error of the full model's output to the target, or None")
    if dead_tol is not None and (not is_number(dead_tol) or not 0 <= dead_tol < 1):
        raise UsageError(f"dead_tol={dead_tol!r}: expected a fraction in [0, 1) of the output"
                         " that a truncation below a layer's modes must change, or None to skip")
    return {"modes": tuple(sorted({int(m) for m in modes})),
            "max_rel_l2": None if max_rel_l2 is None else float(max_rel_l2),
            "dead_tol": None if dead_tol is None else float(dead_tol), "plot": _validate_plot(plot)}


def _truncating_mode(layers: set, stack: list, k: int) -> Any:
    """A dispatch mode that zeroes every mode ``>= k`` (``[k:]`` on the one-sided rfft dim,
    ``[k:-k]`` on full-FFT dims) of the forward FFTs that the ``layers`` run themselves."""
    import torch

    from ..core._torch_compat import dispatch_mode_base

    class Truncate(dispatch_mode_base()):  # type: ignore[misc]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
            forward = name == "_fft_r2c" or (name == "_fft_c2c" and bool(args[3]))
            if not forward or not stack or stack[-1] not in layers:
                return out
            nd = out.dim()
            dims = sorted(int(d) % nd for d in args[1])
            onesided = name == "_fft_r2c" and bool(args[3])
            for d in dims:
                n = out.shape[d]
                idx = torch.arange(n, device=out.device)
                keep = idx < k if onesided and d == dims[-1] else (idx < k) | (idx >= n - k)
                shape = [1] * nd
                shape[d] = n
                out = out * keep.view(shape).to(out.dtype)
            return out

    return Truncate()


@dataclass
class _Sweep:
    """Relative L2 of each truncation's output to the full output and to the target."""

    levels: tuple
    change: list
    to_target: Optional[list]
    full_to_target: Optional[float]
    layers: list  # (label, declared modes, sliced modes)
    bound: int  # the most modes any layer keeps (declared or sliced) along any dim
    computed: list = field(default_factory=list)


def _declared(info: dict, sliced: tuple, work: Any) -> tuple:
    """The modes a layer says it keeps (``modes1``/``modes2``/``modes3`` attributes), else the
    modes its slices keep."""
    mod = dict(work.named_modules()).get(info["layer"])
    attrs = [getattr(mod, f"modes{i + 1}", None) for i in range(len(sliced))]
    return tuple(a if is_int(a) else s for a, s in zip(attrs, sliced))


def _rel(a: Any, b: Any) -> float:
    den = float(b.double().norm())
    num = float((a.double() - b.double()).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _run_sweep(subject: Subject, levels: tuple) -> _Sweep:
    import torch

    from ..core.forward import run_forward
    from ..core.trace import module_stack
    from .spectra import _first_field

    base, work = subject.batch_copy(), subject.model_copy("eval")
    root = _root_name(subject.model)
    _, checked = _spectral_layers(work, base, root)
    layers = [(_label_of(info, checked, root), _declared(info, m, work), m)
              for info, m in checked.values()]
    bound = max(max((v or 0) for v in d + s) for _, d, s in layers)
    names = {info["layer"] for info, _ in checked.values()}
    with torch.no_grad():
        full = _first_field(run_forward(work, base))
        if full is None:
            raise SkipCheck("the model's output holds no floating tensor to compare")
        outs = {}
        for k in levels:
            if k >= bound:
                continue
            with module_stack(work) as stack, _truncating_mode(names, stack, k):
                outs[k] = _first_field(run_forward(work, base))
    target = base.target
    has_target = isinstance(target, torch.Tensor) and tuple(target.shape) == tuple(full.shape)
    change = [_rel(outs[k], full) if k in outs else 0.0 for k in levels]
    to_target = [_rel(outs.get(k, full), target) for k in levels] if has_target else None
    return _Sweep(levels, change, to_target, _rel(full, target) if has_target else None, layers,
                  bound, sorted(outs))


def _sweep_plot(plot: Any, sweep: _Sweep) -> Any:
    from ..core.plots import _figure

    path = plot_path(plot, "mode_sweep")
    if path is None:
        return None
    fig = _figure(6, 4.5)
    if fig is None:
        return None
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(sweep.levels, sweep.change, marker="o", label="rel. L2 to the full model")
    if sweep.to_target is not None:
        ax.plot(sweep.levels, sweep.to_target, marker="s", label="rel. L2 to the target")
    ax.axvline(sweep.bound, color="grey", linestyle="--", label=f"model's modes ({sweep.bound})")
    ax.set_xscale("log", base=2)
    positive = [v for v in sweep.change + (sweep.to_target or []) if 0 < v < math.inf]
    if positive:  # small changes (an output dominated by its mean) stay visible; 0 stays 0
        ax.set_yscale("symlog", linthresh=min(positive))
    ax.set_ylim(bottom=0)
    ax.set_xticks(list(sweep.levels))
    ax.set_xticklabels([str(k) for k in sweep.levels])
    ax.set_xlabel("Fourier modes kept per spectral layer")
    ax.set_ylabel("relative L2 error")
    ax.set_title("Fourier mode truncation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


@check(default=False, validate=_validate_sweep)
def mode_sweep(modes: Any = (2, 4, 8, 16), max_rel_l2: Any = None, dead_tol: Any = 1e-6,
               plot: Any = True, *, subject: Subject) -> CheckResult:
    """Truncating the FNO's spectral layers to fewer modes changes its output; its fidelity meets max_rel_l2.

    The spectral layers are found as in ``fno_modes`` (the modules whose forward FFT spectra
    are sliced). For each count ``k`` in ``modes`` below the layers' modes, the model (eval,
    no gradients, on a copy) runs with every mode ``>= k`` of those FFTs zeroed (``[k:]`` along
    the one-sided rfft dim, ``[k:-k]`` along full-FFT dims, all dims at once): for an
    ``out = W * x_ft`` spectral convolution that is the model with its spectral weights above
    ``k`` zeroed, whatever they are called or stored as, and without retraining (a model
    trained with ``k`` modes may do better; this measures how much the given, trained model
    relies on its higher modes). It reports, per ``k``, the relative L2 distance of the output
    to the full model's and, when the batch target is a tensor of the output's shape, to the
    target, and plots both against ``k`` (``plot``: True a temporary PNG, or a path; in
    ``metrics["plot"]``). Fails when a truncation to ``k`` below a layer's declared modes
    (``modes1``/``modes2``/``modes3``, else its slices) changes the output by at most
    ``dead_tol``: modes ``k`` and above never reach the output (a mode count read or sliced
    wrong); and, with ``max_rel_l2``, when the full model's relative L2 error to the target
    exceeds it. A model without truncating FFTs is skipped.

    >>> import torch
    >>> from example_models import fno
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model, batch = fno.build_model(n_layers=1, width=4), fno.make_batch(1, size=16)
    >>> r = mode_sweep((2, 4, 8), plot=None, model=model, batch=batch)
    >>> r.passed, r.metrics["modes"], r.metrics["rel_l2_full"][-1]
    (True, [2, 4, 8], 0.0)
    """
    sweep = _run_sweep(subject, modes)
    if max_rel_l2 is not None and sweep.full_to_target is None:
        raise SkipCheck("max_rel_l2 needs a batch target of the output's shape; the sweep against"
                        " the full model alone is in the metrics when max_rel_l2 is not given")
    metrics: dict[str, Any] = {
        "modes": list(sweep.levels), "rel_l2_full": sweep.change, "rel_l2_target": sweep.to_target,
        "full_rel_l2_target": sweep.full_to_target, "model_modes": sweep.bound,
        "layers": [[lb, list(d), [m for m in s]] for lb, d, s in sweep.layers]}
    saved = _sweep_plot(plot, sweep)
    if saved:
        metrics["plot"] = saved
        metrics["plot_title"] = "relative L2 over the kept Fourier modes"
    return _sweep_verdict(subject, sweep, max_rel_l2, dead_tol, metrics)


def _dead_level(sweep: _Sweep, dead_tol: Any) -> Optional[int]:
    """The smallest computed truncation (below some layer's declared modes) that leaves the
    output unchanged within ``dead_tol``."""
    if dead_tol is None:
        return None
    declared = max(max((v or 0) for v in d) for _, d, _ in sweep.layers)
    return next((k for k, c in zip(sweep.levels, sweep.change)
                 if k in sweep.computed and k < declared and c <= dead_tol), None)


def _sweep_verdict(subject: Subject, sweep: _Sweep, max_rel_l2: Any, dead_tol: Any,
                   metrics: dict) -> CheckResult:
    rows = [f"{'modes':>6} {'rel L2 to full':>15} {'rel L2 to target':>17}"]
    for i, k in enumerate(sweep.levels):
        tgt = f"{sweep.to_target[i]:17.4g}" if sweep.to_target is not None else f"{'-':>17}"
        note = "" if k in sweep.computed else "   (>= the model's modes: no truncation)"
        rows.append(f"{k:>6} {sweep.change[i]:15.4g} {tgt}{note}")
    layers = [f"  '{lb}': declares modes {d}, slices its spectrum to {s}" for lb, d, s in sweep.layers]
    details = ["spectral layers:"] + layers + rows
    if metrics.get("plot"):
        details.append(f"plot: {metrics['plot']}")
    enough = next((k for k, c in zip(sweep.levels, sweep.change) if c <= SATURATED), None)
    curve = (f"output within {SATURATED:g} of the full model from {enough} modes on"
             if enough is not None else "every truncation changes the output by more than"
             f" {SATURATED:g}")
    dead = _dead_level(sweep, dead_tol)
    problems = []
    if dead is not None:
        change = sweep.change[sweep.levels.index(dead)]
        odd = [f"'{lb}' slices {s} but declares {d}" for lb, d, s in sweep.layers if d != s]
        problems.append(f"truncating to {dead} modes changes the output by {change:.3g} (<="
                        f" dead_tol {dead_tol:g}): modes {dead} and above never reach it"
                        + (f" ({'; '.join(odd)}: a mode count read or sliced wrong)" if odd else ""))
    if max_rel_l2 is not None and sweep.full_to_target is not None \
            and not sweep.full_to_target <= max_rel_l2:
        problems.append(f"relative L2 to the target {sweep.full_to_target:.3g} > max_rel_l2"
                        f" {max_rel_l2:g} at the model's modes")
    expected = ("expected every truncation below the layers' modes to change the output"
                + (f" and a relative L2 to the target <= {max_rel_l2:g}" if max_rel_l2 else ""))
    if problems:
        details.append("remedy: check how the spectral layers slice their spectra and mode counts,"
                       " or raise the modes if truncation still improves fidelity at the top")
        return subject.failed(f"{expected}, observed " + "; ".join(problems), details, metrics)
    fid = (f"; relative L2 to the target {sweep.full_to_target:.3g}"
           if sweep.full_to_target is not None else "")
    return subject.passed(f"{expected}, observed {curve}{fid}", details, metrics)
