"""unet_skips: every ``torch.cat`` of the forward joins tensors of matching spatial size at each
declared input size; names the first mismatching cat (module, source line) and the divisibility
rule the UNet's depth imposes."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from ..core.trace import module_stack
from ..core.errors import ModelError
from ..core.result import CheckResult
from ..core.units import is_int
from .registry import SkipCheck, check
from .spatial import (_input_tensor, _label, _labels, _resized, _root_name,
                      _validate_declared)
from .subject import Subject


def _validate_unet(sizes: Any = None, input_index: Any = 0) -> dict:
    return _validate_declared(sizes, input_index, "the input sizes to try, such as sizes=[16, 24]"
                              " or sizes=[(16, 16, 16), (24, 24, 24)]")


def _cat_mismatch(shapes: list, dim: int) -> Optional[dict]:
    """How the first input of a cat whose shape disagrees with the first input's outside the cat
    dim differs: ``{"dim", "cat_dim", "a", "b", "shapes"}`` (``dim`` None: the ranks differ, ``a``
    and ``b`` are then the ranks); None when all agree."""
    if not shapes:
        return None
    nd = len(shapes[0])
    d = dim % nd if nd else 0
    for s in shapes[1:]:
        diff = [j for j in range(min(nd, len(s))) if j != d and s[j] != shapes[0][j]]
        if len(s) != nd or diff:
            j = diff[0] if diff else None
            return {"dim": j, "cat_dim": d, "a": shapes[0][j] if j is not None else nd,
                    "b": s[j] if j is not None else len(s), "shapes": shapes}
    return None


def _cat_mode(record: dict, stack: list, root: str) -> Any:
    import torch

    from ..core._torch_compat import dispatch_mode_base
    from ..core.dispatch import user_source

    cat = torch.ops.aten.cat

    class CatMode(dispatch_mode_base()):  # type: ignore[misc]
        """Records the first ``aten.cat`` whose inputs disagree outside the cat dimension."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            if getattr(func, "overloadpacket", None) is cat and record["mismatch"] is None:
                tensors = args[0] if args else kwargs.get("tensors", ())
                dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                shapes = [tuple(t.shape) for t in tensors
                          if isinstance(t, torch.Tensor) and not (t.dim() == 1 and t.numel() == 0)]
                record["cats"] += 1
                mismatch = _cat_mismatch(shapes, dim)
                if mismatch is not None:
                    record["mismatch"] = {"module": stack[-1] if stack and stack[-1] else root,
                                          "source": user_source(), **mismatch}
            return func(*args, **kwargs)

    return CatMode()


def _stride_factor(model: Any) -> int:
    """Product of the strides of the down-sampling convolutions and pools (structural guess)."""
    import torch.nn as nn

    down = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
            nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
    factor = 1
    for m in model.modules():
        if isinstance(m, down):
            stride = m.stride if m.stride is not None else m.kernel_size
            stride = stride if isinstance(stride, (tuple, list)) else (stride,)
            factor *= max(int(s) for s in stride)
    return factor


def _run_traced(work: Any, data: Any, ndim: int) -> dict:
    """Forward under the cat-recording mode; the smallest spatial size of any module output."""
    import torch

    record: dict[str, Any] = {"cats": 0, "mismatch": None, "error": None, "output": None,
                              "smallest": None}
    in_dim = None
    for t in data.args:
        if isinstance(t, torch.Tensor):
            in_dim = t.dim()
            break

    def seen(name: str, mod: Any, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == in_dim and ndim:
            spatial = tuple(out.shape[-ndim:])
            if min(spatial) > 1:
                old = record["smallest"]
                record["smallest"] = spatial if old is None else tuple(map(min, old, spatial))

    from ..core.forward import run_forward

    with module_stack(work, seen) as stack:
        try:
            with torch.no_grad(), _cat_mode(record, stack, _root_name(work)):
                record["output"] = run_forward(work, data)
        except ModelError as exc:
            record["error"] = exc
    return record


def _out_spatial(output: Any, ndim: int) -> Any:
    from ..core.batch import iter_tensors

    for _, t in iter_tensors(output):
        if t.dim() >= ndim + 1:
            return tuple(t.shape[-ndim:])
        return None
    return None


@dataclass
class _Depth:
    """The example size, the input's spatial dims and the down-sampling the UNet applies."""

    ndim: int
    example: tuple
    factor: int
    depth: Optional[int]
    keeps_size: bool

    @property
    def rule(self) -> str:
        return f"; sizes must be divisible by 2**{self.depth} = {self.factor}" if self.depth else ""


def _depth(work: Any, x: Any, first: dict, ndim: int) -> _Depth:
    """The UNet's down-sampling: from the smallest feature map at the example size, else (the
    forward failed there) from the strides of its convolutions and pools."""
    example = tuple(x.shape[-ndim:])
    factor = 1
    if first["smallest"] is not None:
        ratio = min(n / s for n, s in zip(example, first["smallest"]))
        factor = 2 ** int(math.floor(math.log2(ratio))) if ratio >= 2 else 1
    elif first["error"] is not None or first["mismatch"] is not None:
        factor = _stride_factor(work)
    depth = int(math.log2(factor)) if factor > 1 and factor & (factor - 1) == 0 else None
    keeps = _out_spatial(first["output"], ndim) == example if first["output"] is not None else False
    return _Depth(ndim, example, factor, depth, keeps)


def _problem(rec: dict, size: Any, plan: _Depth) -> str:
    """What went wrong at one size: a mismatching cat, a forward error or a silent crop; ""."""
    mm = rec["mismatch"]
    if mm is not None:
        src = f" from {os.path.basename(mm['source'].split(':')[0])}:{mm['source'].split(':')[1]}" \
            if mm["source"] else ""
        what = (f"({mm['a']} vs {mm['b']} along dim {mm['dim']})" if mm["dim"] is not None
                else f"({mm['a']} vs {mm['b']} dims)")
        return f"a mismatch in cat at module '{mm['module']}' {what}{src}"
    if rec["error"] is not None:
        return str(rec["error"])
    if plan.keeps_size:
        got = _out_spatial(rec["output"], plan.ndim)
        want = (size,) * plan.ndim if is_int(size) else tuple(size)
        if got != want:
            return (f"an output of spatial size {got} for an input of {want} (the example"
                    f" size {plan.example} is kept: a skip or decoder crops silently)")
    return ""


def _failure_details(label: str, rec: dict, plan: _Depth) -> list:
    details = []
    mm = rec["mismatch"]
    if mm is not None:
        details.append(f"cat inputs at {label}: {mm['shapes']} (cat along dim {mm['cat_dim']})"
                       f" in module '{mm['module']}' at {mm['source'] or 'an unknown line'}")
        if rec["error"] is not None:
            details.append(f"the forward then raised: {rec['error']}")
    if plan.rule:
        details.append(f"remedy: use input sizes divisible by {plan.factor} (the model halves the"
                       f" size {plan.depth} times), or pad/crop inside the model before each cat")
    return details


@check(default=False, validate=_validate_unet)
def unet_skips(sizes: Any = None, input_index: Any = 0, *, subject: Subject) -> CheckResult:
    """Skip connections (torch.cat) join matching spatial sizes at every declared input size.

    ``sizes`` lists spatial sizes to try: ints (the same along every spatial dim) or tuples such
    as ``(16, 16, 16)``; input ``input_index`` (a ``(B, C, *spatial)`` tensor) is tiled or
    cropped to each. At each size the forward runs in eval mode without gradients on a copy,
    and every ``aten.cat`` is inspected before it runs: the first one whose inputs disagree
    outside the concatenation dim is named with its module and source line. A forward that
    raises, or an output that stops matching the input's spatial size when it matches at the
    example size (a silent crop), fails too. The headline gives the size rule: divisible by
    ``2**depth``, the depth read from the smallest feature map at the example size. A model in
    which no ``torch.cat`` runs is skipped (``passed`` is None) with the reason.

    >>> import torch
    >>> class Skip(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    ...     def forward(self, x):
    ...         return torch.cat([x, self.conv(x)], dim=1)
    >>> unet_skips([8, 12], model=Skip(), batch=torch.zeros(1, 1, 8, 8)).passed
    True
    >>> unet_skips([8, 12], model=torch.nn.Conv2d(1, 1, 3, padding=1),
    ...            batch=torch.zeros(1, 1, 8, 8)).passed is None
    True
    """
    work, base = subject.model_copy("eval"), subject.batch_copy()
    x = _input_tensor(base, input_index)
    given = [s for s in sizes if not is_int(s)]
    ndim = len(given[0]) if given else max(1, x.dim() - 2)
    first = _run_traced(work, base, ndim)
    plan = _depth(work, x, first, ndim)
    cases = [("the example size " + _label(plan.example), first, plan.example)]
    for size in sizes:
        cases.append((f"size {_label(size)}", _run_traced(
            subject.model_copy("eval"), _resized(base, input_index, size, ndim), ndim), size))
    rows, failures = [], []
    for label, rec, size in cases:
        msg = _problem(rec, size, plan)
        rows.append(f"{label}: {rec['cats']} cats, " + (msg or "consistent"))
        if msg:
            failures.append((label, msg, rec))
    metrics = {"sizes": [_label(s) for s in sizes], "factor": plan.factor, "depth": plan.depth,
               "cats": first["cats"], "failed_sizes": [lb for lb, _, _ in failures]}
    expected = f"expected skip connections to match for sizes {_labels(sizes)}"
    if failures:
        label, msg, rec = failures[0]
        return subject.failed(f"{expected}, observed at {label} {msg}{plan.rule}",
                              rows + _failure_details(label, rec, plan), metrics)
    if all(rec["cats"] == 0 for _, rec, _ in cases):
        # a declared check that finds nothing to check never passes
        raise SkipCheck(f"no skip connection found: no torch.cat ran in forward at any of"
                        f" {len(cases)} sizes (an additive skip that mismatches raises in the"
                        f" forward, which this check reports)")
    note = f" (sizes must be divisible by 2**{plan.depth} = {plan.factor})" if plan.depth else ""
    return subject.passed(f"{expected}, observed {first['cats']} consistent cats at each of"
                          f" {len(cases)} sizes{note}", rows, metrics)
