"""flops_under and params_under: compute and size budgets.

``flops_under`` counts with ``core.flops`` (torch's FlopCounterMode formulas plus attention
kernels, FLOPs = 2 x MACs) on a copy of the model; ``params_under`` counts parameters once even
when they are tied (shared between modules).
"""
from __future__ import annotations

from typing import Any

from ..core.errors import UsageError
from ..core.result import CheckResult
from ..core.units import UnitError, format_count, parse_count
from .registry import check
from .subject import Subject


def _limit(limit: Any, example: str) -> int:
    try:
        value = parse_count(limit)
    except UnitError as exc:
        raise UsageError(f"limit={_short(limit)}: {exc}") from None
    if value <= 0:
        raise UsageError(f"limit={limit!r}: expected a positive count such as {example}")
    if not _is_whole_count(limit):  # parse_count rounds: '1.5' would be read as 2
        raise UsageError(f"limit={limit!r}: expected a whole count such as {example}, not a"
                         f" fraction (it would be rounded to {value})")
    try:  # the headline prints the limit: one too large to print is refused now
        format_count(value)
    except UnitError:
        raise UsageError(f"limit={_short(limit)}: expected a count such as {example}, got a"
                         " number too large to print") from None
    return value


def _is_whole_count(limit: Any) -> bool:
    """A count given as a float, or as a string whose number times its suffix is not whole
    (``'1.5'``, ``'1.2345k'``), is not a whole count; ``'1.5M'`` and ``25000.0`` are."""
    import decimal

    from ..core.units import _COUNT_REST_RE, _COUNT_SUFFIXES, _split

    if isinstance(limit, float):
        return limit.is_integer()
    if not isinstance(limit, str):
        return True  # an int (parse_count refused the rest)
    num, rest = _split(limit, "")
    match = _COUNT_REST_RE.fullmatch(rest)
    assert match is not None, "parse_count accepted the limit, so its rest is a suffix"
    factor = _COUNT_SUFFIXES[match.group("suffix").lower()]
    with decimal.localcontext() as ctx:
        ctx.prec = 100
        return (decimal.Decimal(num) * factor) % 1 == 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def _validate_flops(limit: Any, backward: Any = False) -> dict:
    """Check the marker arguments before anything runs.

    >>> _validate_flops("4.1G")["limit"]
    4100000000
    >>> _validate_flops("4.1G", backward="yes")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: backward='yes': expected True or False
    """
    value = _limit(limit, "'4.1G' (FLOPs)")
    if not isinstance(backward, bool):
        raise UsageError(f"backward={backward!r}: expected True or False")
    return {"limit": value, "backward": backward}


def _validate_params(limit: Any, trainable_only: Any = False) -> dict:
    """Check the marker arguments before anything runs.

    >>> _validate_params("25M")["limit"]
    25000000
    >>> _validate_params("lots")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: limit='lots': expected a count such as 25000, '25k', '1.5M' or '7B', got 'lots'
    """
    value = _limit(limit, "'25M' (parameters)")
    if not isinstance(trainable_only, bool):
        raise UsageError(f"trainable_only={trainable_only!r}: expected True or False")
    return {"limit": value, "trainable_only": trainable_only}


@check(default=False, validate=_validate_flops)
def flops_under(limit: Any, backward: bool = False, *, subject: Subject) -> CheckResult:
    """FLOPs of one forward pass (backward=True: forward and backward) stay under `limit` (e.g. '4.1G').

    FLOPs = 2 x MACs (torch's convention; torchvision's published "GFLOPS" are MACs). Counted on
    a copy of the model, in eval mode for the forward pass and in train mode with
    ``backward=True`` (gradients of the loss for the trainable parameters). Ops with no FLOP
    formula are listed in the details, never silently counted.

    >>> import torch
    >>> m = torch.nn.Linear(4, 3)
    >>> flops_under("1k", model=m, batch=torch.ones(2, 4)).headline
    'expected forward FLOPs under 1.00k, observed 48 (24 MACs; FLOPs = 2 x MACs)'
    >>> flops_under(40, model=m, batch=torch.ones(2, 4)).passed
    False
    """
    from ..core.flops import count_flops_batch

    work, data = subject.model_copy(), subject.batch_copy()
    work.train(backward)
    report = count_flops_batch(work, data, backward=backward, loss=subject.loss)
    passed = report.flops <= limit
    what = "forward+backward FLOPs" if backward else "forward FLOPs"
    split = (f"; forward {format_count(report.forward_flops)}, backward"
             f" {format_count(report.backward_flops)}" if backward else "")
    headline = (f"expected {what} under {format_count(limit)}, observed"
                f" {format_count(report.flops)} ({format_count(report.macs)} MACs{split};"
                f" FLOPs = 2 x MACs)")
    details = []
    top = report.top_modules(5)
    if top:
        details.append("costliest modules: " + ", ".join(
            f"'{p or '<model>'}' {format_count(f)}" for p, f in top))
    details.append(report.render())
    if not passed:
        details.append(f"over the limit by {format_count(report.flops - limit)} FLOPs")
        details.append("remedy: a smaller input resolution or sequence length, fewer or narrower"
                       " layers, depthwise-separable or grouped convolutions; if the model is"
                       " meant to be this large, raise limit=")
    metrics = {
        "flops": report.flops,
        "macs": report.macs,
        "limit_flops": limit,
        "forward_flops": report.forward_flops,
        "backward_flops": report.backward_flops,
        "backward": backward,
        "top_modules": [list(item) for item in top],
        "by_operator": dict(report.by_operator),
        "uncovered": dict(report.uncovered),
    }
    return subject.result(passed, headline, details, metrics)


def _by_module_type(model: Any, trainable_only: bool) -> tuple:
    """Parameters per owning module type, each tensor once; and the tied tensors."""
    seen: dict = {}
    by_type: dict = {}
    tied = []
    for path, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False):
            full = f"{path}.{name}" if path else name
            if id(p) in seen:
                if seen[id(p)] != full:
                    tied.append((full, seen[id(p)]))
                continue
            seen[id(p)] = full
            if trainable_only and not p.requires_grad:
                continue
            kind = type(module).__name__
            by_type[kind] = by_type.get(kind, 0) + p.numel()
    return by_type, tied


@check(default=False, validate=_validate_params)
def params_under(limit: Any, trainable_only: bool = False, *, subject: Subject) -> CheckResult:
    """The number of parameters (tied ones once; trainable_only=True: trainable only) stays under `limit` (e.g. '25M').

    One forward pass runs first, without gradients, on a copy of the model: it materializes
    lazy modules (``nn.LazyLinear``...) and a model that cannot run fails the check.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> params_under("1k", model=m, batch=torch.ones(2, 4)).headline
    'expected parameters under 1.00k, observed 15 (largest module types: Linear 15)'
    """
    import torch

    from ..core.forward import run_forward

    work = subject.model_copy("eval")
    with torch.no_grad():
        run_forward(work, subject.batch_copy())
    by_type, tied = _by_module_type(work, trainable_only)
    total = sum(by_type.values())
    passed = total <= limit
    ranked = sorted(by_type.items(), key=lambda kv: -kv[1])
    what = "trainable parameters" if trainable_only else "parameters"
    largest = ", ".join(f"{k} {format_count(n)}" for k, n in ranked[:3]) or "none"
    headline = (f"expected {what} under {format_count(limit)}, observed {format_count(total)}"
                f" (largest module types: {largest})")
    details = ["parameters by module type:"]
    details += [f"  {k:24} {format_count(n):>10}  {100 * n / (total or 1):.1f}%"
                for k, n in ranked]
    if tied:
        details.append("tied parameters, counted once: " + ", ".join(
            f"'{a}' is '{b}'" for a, b in tied[:10]))
    if not passed:
        details.append(f"over the limit by {format_count(total - limit)}")
    metrics = {"params": total, "limit_params": limit, "trainable_only": trainable_only,
               "by_module_type": dict(ranked), "tied": [list(t) for t in tied]}
    return subject.result(passed, headline, details, metrics)
