"""Facts about a model test shown in the health summary: parameters and forward FLOPs."""
from __future__ import annotations

from typing import Any


def model_facts(model: Any, batch: Any = None, timeout: Any = None) -> dict:
    """Parameter count, type and (with a batch) forward FLOPs/MACs of one eval forward on a copy.

    FLOPs are ``None`` when the forward cannot be counted or overruns ``timeout`` seconds (the
    check results say why); a summary column never fails a test nor hangs one.

    >>> import torch
    >>> model_facts(torch.nn.Linear(4, 3), torch.zeros(2, 4))  # 2 * (2*4*3) = 48 FLOPs
    {'parameters': 15, 'type': 'Linear', 'flops': 48, 'macs': 24}
    """
    import torch

    from .forward import count_parameters

    if not isinstance(model, torch.nn.Module):
        return {"parameters": None, "type": type(model).__name__}
    facts = {"parameters": count_parameters(model), "type": type(model).__name__}
    if batch is None:
        return facts
    from .batch import Batch, copy_model
    from .flops import count_flops_batch
    from .guard import CheckTimeout, time_budget
    from .state import preserved_globals

    try:
        with preserved_globals(), torch.no_grad(), time_budget(timeout):
            data = Batch.from_user(batch, model=model).clone()
            report = count_flops_batch(copy_model(model).eval(), data)
        facts["flops"], facts["macs"] = int(report.flops), int(report.macs)
    except (Exception, CheckTimeout, SystemExit):  # noqa: BLE001 - a summary column only
        facts["flops"] = facts["macs"] = None
    return facts
