"""Facts about a model test shown in the health summary: parameters and forward FLOPs."""
from __future__ import annotations

from typing import Any


def model_facts(model: Any, batch: Any = None) -> dict:
    """Parameter count, type and (with a batch) forward FLOPs/MACs of one eval forward on a copy.

    FLOPs are ``None`` when the forward cannot be counted (the check results say why).

    >>> import torch
    >>> model_facts(torch.nn.Linear(4, 3), torch.zeros(2, 4))  # 2 * (2*4*3) = 48 FLOPs
    {'parameters': 15, 'type': 'Linear', 'flops': 48, 'macs': 24}
    """
    from .forward import count_parameters

    facts = {"parameters": count_parameters(model), "type": type(model).__name__}
    if batch is None:
        return facts
    import torch

    from .batch import Batch, copy_model
    from .flops import count_flops_batch
    from .state import preserved_globals

    try:
        with preserved_globals(), torch.no_grad():
            report = count_flops_batch(copy_model(model).eval(), Batch.from_user(batch).clone())
        facts["flops"], facts["macs"] = int(report.flops), int(report.macs)
    except Exception:  # noqa: BLE001 - a summary column must never fail a test
        facts["flops"] = facts["macs"] = None
    return facts
