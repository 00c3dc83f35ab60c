"""data_sane: the test's batch holds finite, varying values that match the declared data spec."""
from __future__ import annotations

from typing import Any

from ..core.result import CheckResult
from .registry import check


def _validate(spec: Any = None) -> dict:
    from ..core.datacheck import validate_data_spec

    return {"spec": validate_data_spec(spec)}


def _padding_masks(data: Any) -> list:
    """(B, N) inputs holding two values (0/1 or bool): ``[(tensor, bool mask, padding value), ...]``.

    The padding value is the minority value (the real elements outnumber the padded ones in a
    padded batch), so both conventions work: 1 = real (``mask``) and True = padded
    (``key_padding_mask``).
    """
    import torch

    out = []
    for _, t in data.input_tensors():
        if t.dim() != 2 or t.shape[0] != data.batch_size or t.is_complex():
            continue
        values = torch.unique(t.detach())
        if values.numel() != 2 or not bool(((values == 0) | (values == 1)).all()):
            continue
        ones = int((t != 0).sum())
        out.append((t, t != 0, ones * 2 < t.numel()))
    return out


def _constant_channels_unpadded(data: Any) -> list:
    """The spec-free constant-channel check, skipping set/sequence positions that a mask input
    marks as padding for every sample (a batch padded to a fixed length has such positions)."""
    import torch

    from ..core.datacheck import MIN_SAMPLES_FOR_CONSTANT, _fmt

    problems: list = []
    size = data.batch_size or 0
    if size < MIN_SAMPLES_FOR_CONSTANT:
        return problems
    masks = _padding_masks(data)
    skip = f"input[0][{data.target_key!r}]" if data.target_key else None
    for path, t in data.input_tensors():
        if not t.is_floating_point() or t.dim() < 2 or t.shape[0] != size or path == skip or any(
                t is m for m, _, _ in masks):  # a mask's columns are constant where padded
            continue
        flat = t.detach().movedim(1, 0).reshape(t.shape[1], -1)
        if flat.shape[1] < 2:
            continue
        const = (flat == flat[:, :1]).all(dim=1) & torch.isfinite(flat).all(dim=1)
        for _, mask, pad in masks:
            if t.dim() >= 3 and mask.shape == t.shape[:2]:
                const &= ~(mask == pad).all(dim=0)  # padded in every sample: constant by design
        for c in const.nonzero().flatten().tolist()[:1]:
            problems.append((f"channel {c} of {path} to vary across the {size} samples",
                             f"the constant {_fmt(float(flat[c, 0]))} (a dead sensor, a fill value"
                             " or a broken normalization; if intended, pass"
                             " spec={'constant_channels': False})"))
    return problems


@check(default=True, validate=_validate)
def data_sane(spec: Any = None, *, model: Any, batch: Any, loss: Any = None,
              device: Any = None) -> CheckResult:
    """The batch's inputs and target are finite, not constant per channel, and match ``spec``.

    Without a spec: every floating tensor is finite, and no channel (dim 1) of a floating input
    ``(B, C, ...)`` is one constant over a batch of 4 or more samples (a position of a
    ``(B, N, ...)`` set or sequence that a ``(B, N)`` 0/1 mask input marks as padding in every
    sample is exempt: batches padded to a fixed length have them). ``spec`` maps an input
    index, an input key or ``'target'`` to its shape, dtype, range, mean/std, per-feature ranges
    and label distribution (see ``pytest_modelcheck.core.datacheck``). The model runs once, in
    eval mode on a copy, to confirm it accepts the batch.
    For a real DataLoader, call ``pytest_modelcheck.core.datacheck.check_data(loader, spec)``.

    >>> import torch
    >>> x = torch.tensor([[0.1, 2.0], [0.4, 3.0], [0.9, 1.0], [0.5, 7.0]])
    >>> data_sane({0: {"features": {0: (0, 1)}}}, model=torch.nn.Identity(), batch=x).passed
    True
    """
    import torch

    from ..core.batch import copy_model
    from ..core.datacheck import batch_problems
    from ..core.forward import run_forward

    data = batch.clone()
    if (spec or {}).get("constant_channels", True):
        problems = batch_problems(data, {**(spec or {}), "constant_channels": False})
        problems += _constant_channels_unpadded(data)
    else:
        problems = batch_problems(data, spec)
    with torch.no_grad():  # the model accepts the data (a ModelError names the module otherwise)
        run_forward(copy_model(model).to(device).eval(), data.clone().to(device))
    metrics = {"problems": len(problems), "batch_size": data.batch_size,
               "tensors": len(data.input_tensors()), "declared": sorted(str(k) for k in (spec or {}))}
    details = "\n".join(f"expected {e}, observed {o}" for e, o in problems[:20])
    if problems:
        exp, obs = problems[0]
        extra = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return CheckResult("data_sane", False, f"expected {exp}, observed {obs}{extra}",
                           details + "\nbatch: " + data.describe(), metrics)
    what = "the declared spec" if spec else "finite values and varying channels"
    return CheckResult("data_sane", True, f"expected {what}, observed them in a batch of"
                       f" {data.batch_size} samples ({len(data.input_tensors())} input tensors)",
                       "batch: " + data.describe(), metrics)
