"""data_sane: the test's batch holds finite, varying values that match the declared data spec."""
from __future__ import annotations

from typing import Any

from ..core.result import CheckResult
from .registry import check
from .subject import Subject


def _validate(spec: Any = None) -> dict:
    from ..core.datacheck import validate_data_spec

    return {"spec": validate_data_spec(spec)}


@check(default=True, validate=_validate)
def data_sane(spec: Any = None, *, subject: Subject) -> CheckResult:
    """The batch's inputs and target are finite, not constant per channel, and match ``spec``.

    Without a spec: every floating tensor is finite, and no channel (dim 1) of a floating input
    ``(B, C, ...)`` is one constant over a batch of 4 or more samples (a position of a
    ``(B, N, ...)`` set or sequence that a ``(B, N)`` 0/1 mask input marks as padding in every
    sample is exempt: batches padded to a fixed length have them). ``spec`` maps an input
    index, an input key or ``'target'`` to its shape, dtype, range, mean/std, per-feature ranges
    and label distribution (see ``pytest_modelcheck.core.datacheck``). The model runs once, in
    eval mode on a copy, to confirm it accepts the batch. A ``(B, T)`` integer target equal to a
    token input, or lagging it by one, fails (a language model trained without the label shift;
    ``spec={'label_shift': False}`` allows it), unless the model computes its own loss
    (``output.loss``, as Hugging Face models given ``labels`` do, shifting inside).
    For a real DataLoader, call ``pytest_modelcheck.core.datacheck.check_data(loader, spec)``.

    >>> import torch
    >>> x = torch.tensor([[0.1, 2.0], [0.4, 3.0], [0.9, 1.0], [0.5, 7.0]])
    >>> data_sane({0: {"features": {0: (0, 1)}}}, model=torch.nn.Identity(), batch=x).passed
    True
    """
    import torch

    from ..core.datacheck import batch_problems, label_shift_problems
    from ..core.forward import run_forward
    from ..core.outputs import model_loss

    data = subject.batch.clone()  # judged where the user's batch lives, run on the device
    problems = batch_problems(data, spec)
    with torch.no_grad():  # the model accepts the data (a ModelError names the module otherwise)
        out = run_forward(subject.model_copy("eval"), data.clone().to(subject.device))
    if (spec or {}).get("label_shift", True) and model_loss(out) is None:
        problems += label_shift_problems(data)
    metrics = {"problems": len(problems), "batch_size": data.batch_size,
               "tensors": len(data.input_tensors()), "declared": sorted(str(k) for k in (spec or {}))}
    details = "\n".join(f"expected {e}, observed {o}" for e, o in problems[:20])
    if problems:
        exp, obs = problems[0]
        extra = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return subject.failed(f"expected {exp}, observed {obs}{extra}",
                              details + "\nbatch: " + data.describe(), metrics)
    what = "the declared spec" if spec else "finite values and varying channels"
    return subject.passed(f"expected {what}, observed them in a batch of {data.batch_size} samples"
                          f" ({len(data.input_tensors())} input tensors)",
                          "batch: " + data.describe(), metrics)
