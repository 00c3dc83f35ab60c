"""dtype_stable: activations keep the parameters' dtype (no float64 creeping in), and the model
runs under ``torch.autocast`` with finite outputs.

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import ModelError, UsageError, describe_error
from ..core.result import CheckResult
from ..core.units import dtype_name
from .op_trace import ROOT, _flat_tensors, _ModuleStack, _op_name, _short
from .registry import SkipCheck, check
from .subject import Subject

AMP_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}


def _validate_dtype(amp: Any = "bf16") -> dict:
    if amp is not None and (not isinstance(amp, str) or amp.lower() not in AMP_DTYPES):
        raise UsageError(f"amp={amp!r}: expected 'bf16', 'fp16' or None (no autocast run)")
    return {"amp": amp.lower() if isinstance(amp, str) else None}


def _width(dtype: Any) -> int:
    """Bytes of one real component: float32 and complex64 are both 4.

    >>> import torch
    >>> _width(torch.float32), _width(torch.complex64), _width(torch.float64)
    (4, 4, 8)
    """
    size = dtype.itemsize
    return size // 2 if dtype.is_complex else size


def _is_wide(t: Any, limit: int) -> bool:
    return (t.is_floating_point() or t.is_complex()) and _width(t.dtype) > limit


@dataclass
class _WideOps:
    """What a recorded forward saw: the ops with outputs wider than the parameters' dtype."""

    wide: list  # {"op", "dtype", "module", "source", "shape"} of the first 20
    ops: int  # ops dispatched
    out: Any  # the forward's output
    types: dict  # module path -> type name


def _param_dtype(work: Any) -> Any:
    """The widest floating dtype of the parameters (else the buffers, else torch's default)."""
    import torch

    floats = [p.dtype for p in work.parameters() if p.is_floating_point()] or \
        [b.dtype for b in work.buffers() if b.is_floating_point()]
    return max(floats, key=lambda d: d.itemsize) if floats else torch.get_default_dtype()


def _record_wide_ops(subject: Subject, work: Any, limit: int) -> _WideOps:
    """Every dispatched op of a no-grad forward of ``work``; SkipCheck when the model cannot run
    under a dispatch mode (after replaying the forward without it, so a model error is raised)."""
    import torch

    from ..core._torch_compat import dispatch_mode_base
    from ..core.dispatch import user_source
    from ..core.forward import run_forward

    data = subject.batch_copy()
    wide: list = []
    seen = {"ops": 0}

    with _ModuleStack(work) as mods:
        class Recorder(dispatch_mode_base()):  # type: ignore[misc]
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                seen["ops"] += 1
                if len(wide) < 20:
                    t = next((t for t in _flat_tensors(out) if _is_wide(t, limit)), None)
                    if t is not None:
                        wide.append({"op": _op_name(func), "dtype": dtype_name(t.dtype),
                                     "module": mods.current, "source": user_source(),
                                     "shape": list(t.shape)})
                return out

        try:
            with torch.no_grad(), Recorder():
                out = data.call(work)
        except Exception as exc:  # noqa: BLE001 - replayed without the mode to tell model from mode
            with torch.no_grad():
                run_forward(subject.model_copy("eval"), subject.batch_copy())
            raise SkipCheck(f"the model cannot run under a TorchDispatchMode ({describe_error(exc)}),"
                            " which this check needs to see every op") from None
        return _WideOps(wide, seen["ops"], out, mods.types)


def _wide_failure(subject: Subject, rec: _WideOps, limit: int, pname: str,
                  metrics: dict) -> CheckResult:
    """The failure naming the first op whose output is wider than the parameters' dtype."""
    from ..core.batch import iter_tensors

    wide_outputs = [(p, dtype_name(t.dtype)) for p, t in iter_tensors(rec.out, "output")
                    if _is_wide(t, limit)]
    details = [f"ops with floating outputs wider than the parameters' {pname}:"]
    details += [f"  {w['op']:32} -> {w['dtype']} {w['shape']}  module '{w['module']}'"
                f"  {w['source'] or '(no user line)'}" for w in rec.wide]
    details.append("remedy: keep constants in Python floats or tensors made with"
                   " dtype=x.dtype / x.new_tensor(...); avoid numpy float64 scalars in"
                   " torch.tensor(...), .double(), dtype=torch.float64")
    w = rec.wide[0]
    mod = "" if w["module"] == ROOT else \
        f" in module '{w['module']}' ({rec.types.get(w['module'], '?')})"
    observed = f"{w['op']} producing {w['dtype']} at {_short(w['source'])}{mod}"
    if wide_outputs:
        observed += f"; {wide_outputs[0][0]} is {wide_outputs[0][1]}"
    metrics.update({"first_wide_op": w["op"], "first_wide_module": w["module"],
                    "first_wide_source": w["source"]})
    return subject.failed(f"expected activations in the parameters' dtype {pname}, observed"
                          f" {observed}", details, metrics)


def _amp_result(subject: Subject, amp: str, pname: str, ops: int, metrics: dict) -> CheckResult:
    """The autocast half of the check: the forward runs under autocast with finite outputs."""
    import torch

    from ..core.batch import iter_tensors
    from ..core.forward import run_forward

    amp_dtype = getattr(torch, AMP_DTYPES[amp])
    dev_type = torch.device(subject.device).type if subject.device is not None else "cpu"
    work, data = subject.model_copy("eval"), subject.batch_copy()
    expected = f"expected the forward to run under torch.autocast('{dev_type}', {AMP_DTYPES[amp]})" \
               " with finite outputs"
    details: list = []
    try:
        with torch.no_grad(), torch.autocast(dev_type, dtype=amp_dtype):
            amp_out = run_forward(work, data)
    except ModelError as exc:
        # torch's fused inference path of nn.MultiheadAttention / TransformerEncoderLayer has
        # no autocast support on every device; training (with grad) never takes it
        amp_out = _without_attention_fastpath(work, data, dev_type, amp_dtype)
        if amp_out is None:
            details.append(_cause_text(exc))
            return subject.failed(f"{expected}, observed {exc}", details,
                                  dict(metrics, amp_raised_in=exc.module))
        details.append(f"note: the autocast forward raised on torch's fused attention inference"
                       f" path ({exc}) and ran without it; training never takes that path")
    bad = [p for p, t in iter_tensors(amp_out, "output")
           if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]
    if bad:
        origin = _first_nonfinite_op(subject.model_copy("eval"), subject.batch_copy(), dev_type,
                                     amp_dtype)
        where = f"; first non-finite value from {origin}" if origin else ""
        return subject.failed(f"{expected}, observed non-finite values in {bad[0]}{where}",
                              "remedy: values beyond the half-precision range (65504 for float16)"
                              " or reductions that overflow; keep that op in float32 with"
                              " torch.autocast(..., enabled=False) around it", metrics)
    return subject.passed(f"expected activations in the parameters' dtype {pname} and a finite"
                          f" autocast({AMP_DTYPES[amp]}) forward, observed both ({ops} ops)",
                          "", metrics)


@check(default=True, validate=_validate_dtype)
def dtype_stable(amp: Any = "bf16", *, subject: Subject) -> CheckResult:
    """Activations keep the parameters' dtype (no float64 creeping in) and the model runs under autocast.

    Records every dispatched op of a forward (eval mode, on a copy) and reports the first whose
    floating output is wider than the parameters' dtype (float64 from numpy scalars,
    ``torch.tensor(np.float64(...))``, ``.double()``...), naming the module and source line.
    Then, unless ``amp=None``, runs the forward under ``torch.autocast(device, dtype=bfloat16)``
    (``amp='fp16'``: float16) and requires it to run and give finite outputs.

    >>> import torch
    >>> dtype_stable(model=torch.nn.Linear(4, 3), batch=torch.randn(2, 4)).passed
    True
    """
    work = subject.model_copy("eval")
    param_dtype = _param_dtype(work)
    limit = _width(param_dtype)
    rec = _record_wide_ops(subject, work, limit)
    pname = dtype_name(param_dtype)
    metrics: dict = {"param_dtype": pname, "ops": rec.ops, "wide_ops": len(rec.wide), "amp": amp}
    if rec.wide:
        return _wide_failure(subject, rec, limit, pname, metrics)
    if amp is None:
        return subject.passed(f"expected activations in the parameters' dtype {pname}, observed"
                              f" {rec.ops} ops all within {pname} (autocast not run: amp=None)",
                              "", metrics)
    return _amp_result(subject, amp, pname, rec.ops, metrics)


def _cause_text(exc: ModelError) -> str:
    import traceback

    if exc.original is None:
        return ""
    lines = traceback.format_exception(type(exc.original), exc.original, exc.original.__traceback__)
    return "\n".join("".join(lines).rstrip().splitlines()[-8:])


def _without_attention_fastpath(work: Any, data: Any, dev_type: str, amp_dtype: Any) -> Any:
    """The autocast forward with torch's fused attention path off; None when it raises too (or
    when that path was not on)."""
    import torch

    from ..core.forward import run_forward
    from ..core.memory import _mha_fastpath

    mha = getattr(torch.backends, "mha", None)
    if mha is None or not getattr(mha, "get_fastpath_enabled", lambda: False)():
        return None
    try:
        with _mha_fastpath(False), torch.no_grad(), torch.autocast(dev_type, dtype=amp_dtype):
            return run_forward(work, data)
    except ModelError:
        return None


def _first_nonfinite_op(work: Any, data: Any, dev_type: str, amp_dtype: Any) -> str:
    """``op at file:line in module 'x' (Type)`` of the first op under autocast whose floating
    output is not finite while its inputs are (``work`` and ``data``: copies on the device)."""
    import torch

    from ..core._torch_compat import dispatch_mode_base
    from ..core.dispatch import user_source

    hit: list = []

    def finite(ts: list) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in ts if t.is_floating_point() or t.is_complex())

    with _ModuleStack(work) as mods:
        class Finder(dispatch_mode_base()):  # type: ignore[misc]
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                if not hit and not finite(_flat_tensors(out)) and finite(_flat_tensors((args, kwargs))):
                    hit.append(f"{_op_name(func)} at {_short(user_source())} in"
                               f" {mods.describe(mods.current)}")
                return out

        try:
            with torch.no_grad(), torch.autocast(dev_type, dtype=amp_dtype), Finder():
                data.call(work)
        except Exception:  # noqa: BLE001 - best effort only
            pass
    return hit[0] if hit else ""
