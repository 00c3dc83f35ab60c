"""grads_finite: outputs, loss and every gradient finite; every trainable parameter reached."""
from __future__ import annotations

import fnmatch
from typing import Any

from ..core.errors import UsageError
from ..core.result import CheckResult
from .naming import owner
from .registry import check
from .subject import Subject


def _validate(allow_unused: Any = ()) -> dict:
    if isinstance(allow_unused, str):
        allow_unused = (allow_unused,)
    if not isinstance(allow_unused, (list, tuple, set)) or not all(
            isinstance(p, str) for p in allow_unused):
        raise UsageError(f"allow_unused={allow_unused!r}: expected a list of parameter names or"
                         " glob patterns such as ['head.bias', 'aux.*']")
    return {"allow_unused": tuple(allow_unused)}


@check(default=True, validate=_validate)
def grads_finite(allow_unused: Any = (), *, subject: Subject) -> CheckResult:
    """Forward and backward of the loss give finite outputs, loss and gradients for every parameter.

    Runs in train mode on a copy. ``allow_unused`` lists parameters (names or glob patterns)
    that may legitimately receive no gradient.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> grads_finite(model=m, batch=(torch.randn(2, 4), torch.tensor([0, 2]))).passed
    True
    """
    import torch

    from ..core.batch import iter_tensors
    from ..core.forward import run_forward
    from ..core.losses import resolve_loss
    from ..core.nonfinite import locate_nonfinite
    from ..core.training import grad_norm

    work, data = subject.model_copy("train"), subject.batch_copy()
    work.zero_grad(set_to_none=True)

    bad_inputs = [p for p, t in data.input_tensors() if t.is_floating_point()
                  and not bool(torch.isfinite(t).all())]
    if bad_inputs:
        return subject.failed(f"expected finite inputs, observed non-finite values in"
                              f" {bad_inputs[0]} of the batch (the data, not the model, holds"
                              " NaN/Inf)", metrics={"nonfinite_inputs": bad_inputs})

    out = run_forward(work, data)
    lossfn = resolve_loss(subject.loss, data, out)
    total, terms = lossfn.compute(out, data, work)
    problems: list = []
    bad_outputs = [p for p, t in iter_tensors(out, "output") if t.is_floating_point()
                   and not bool(torch.isfinite(t.detach()).all())]
    if bad_outputs:
        problems.append(f"non-finite values in {bad_outputs[0]}")
    loss_value = float(total.detach())
    if not bad_outputs and not torch.isfinite(total.detach()):
        problems.append(f"loss {loss_value}")
    if total.requires_grad:
        total.backward()
    params = [(n, p) for n, p in work.named_parameters() if p.requires_grad]
    nonfinite, missing = [], []
    for n, p in params:
        if p.grad is None:
            if not any(fnmatch.fnmatchcase(n, pat) for pat in allow_unused):
                missing.append(n)
        elif not bool(torch.isfinite(p.grad).all()):
            nonfinite.append((n, "NaN" if bool(torch.isnan(p.grad).any()) else "Inf",
                              int((~torch.isfinite(p.grad)).sum()), p.grad.numel()))
    metrics = {"loss": loss_value, "loss_fn": lossfn.name, "trainable_tensors": len(params),
               "nonfinite_grads": len(nonfinite), "missing_grads": len(missing),
               "grad_norm": grad_norm(work) if not nonfinite else None}
    details = []
    if nonfinite:
        details.append("parameters with non-finite gradients:")
        details += [f"  {n:40} {kind}: {cnt}/{size} elements  ({owner(work, n)})"
                    for n, kind, cnt, size in nonfinite[:20]]
    if missing:
        details.append("trainable parameters that received no gradient (not reached by the loss):")
        details += [f"  {n:40} ({owner(work, n)})" for n in missing[:20]]
        if len(missing) > 20:
            details.append(f"  ... and {len(missing) - 20} more")
        details.append("remedy: a branch not used in forward, a .detach()/.item()/no_grad in the"
                       " middle, or integer ops cut the graph; if intended (layers built but not"
                       " used in this configuration), pass allow_unused=[...] and note that"
                       " DistributedDataParallel then needs find_unused_parameters=True")

    origin = None
    if bad_outputs or problems or nonfinite:
        origin = locate_nonfinite(subject.model_copy("train"), subject.batch_copy(), lossfn)
        if origin is not None:
            details.insert(0, f"origin: {origin.describe()}")
            metrics["origin_op"] = origin.op
            metrics["origin_module"] = origin.module
            metrics["origin_phase"] = origin.phase

    if problems or nonfinite:
        if problems:
            observed = problems[0]
        else:
            n, kind, cnt, size = nonfinite[0]
            observed = f"{kind} in the gradient of '{n}' ({owner(work, n)})"
            if len(nonfinite) > 1:
                observed += f" and {len(nonfinite) - 1} more"
        if origin is not None:
            observed += f"; {origin.describe()}"
        return subject.failed(f"expected finite outputs, loss and gradients, observed {observed}",
                              details, metrics)
    if missing:
        extra = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return subject.failed(f"expected a gradient for every trainable parameter, observed none"
                              f" for '{missing[0]}' ({owner(work, missing[0])}){extra}",
                              details, metrics)
    return subject.passed(f"expected finite gradients for all {len(params)} trainable tensors,"
                          f" observed finite (loss {loss_value:.4g}, grad norm"
                          f" {metrics['grad_norm']:.3g})", details, metrics)
