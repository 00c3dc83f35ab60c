"""Per-rank memory of data-parallel training (DDP, FSDP2) from the single-device estimate.

The model is arithmetic on top of the single-device ``MemoryEstimate`` (its batch is the
*per-rank* batch); it is stated, with its cross-checks, in ``docs/memory-model.md`` ("Per-rank
memory of distributed training"). No process group and no GPU are needed.

* ``ddp``: every rank holds the whole model, its gradients and optimizer state, plus the
  reducer's gradient buckets (flat copies of the gradients, ``gradients_bytes`` in all).
* ``fsdp`` (FSDP2 ``fully_shard``, FULL_SHARD, units as ``fsdp_units`` says):
  parameters, gradients and optimizer state are divided by ``world_size``; the step adds the
  largest unit's all-gathered parameters twice (the current unit and the prefetched one) and
  its unsharded gradients (the reduce-scatter input) as communication buffers.
"""
from __future__ import annotations

from typing import Any

from ..errors import UsageError

STRATEGIES = ("ddp", "fsdp")


def check_distributed(world_size: Any, strategy: Any) -> tuple:
    """Validate ``world_size`` and ``strategy`` (both or neither); return them.

    >>> check_distributed(None, None)
    (None, None)
    >>> check_distributed(4, "FSDP")
    (4, 'fsdp')
    >>> check_distributed(0, "ddp")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: world_size=0: expected an integer >= 1
    """
    from ..units import is_int

    if world_size is None:
        if strategy is not None:
            raise UsageError(f"strategy={strategy!r}: needs world_size (the number of ranks)")
        return None, None
    if not is_int(world_size) or isinstance(world_size, bool) or world_size < 1:
        raise UsageError(f"world_size={world_size!r}: expected an integer >= 1")
    name = strategy.lower() if isinstance(strategy, str) else strategy
    if name not in STRATEGIES:
        raise UsageError(f"strategy={strategy!r}: expected 'ddp' or 'fsdp'")
    return int(world_size), name


def fsdp_units(model: Any) -> list:
    """The modules ``fully_shard`` is assumed applied to, root last: every direct child of the
    root, with ``ModuleList``/``ModuleDict`` containers replaced by their elements (the usual
    ``for block in model.layers: fully_shard(block)``), then the root.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ModuleList([torch.nn.ReLU()]))
    >>> [type(u).__name__ for u in fsdp_units(m)]
    ['Linear', 'ReLU', 'Sequential']
    """
    import torch

    containers = (torch.nn.ModuleList, torch.nn.ModuleDict)
    units: list = []
    todo = list(model.children())
    while todo:
        child = todo.pop(0)
        if isinstance(child, containers):
            todo[:0] = list(child.children())
        else:
            units.append(child)
    return units + [model]


def largest_unit_bytes(model: Any) -> int:
    """Parameter bytes of the largest FSDP unit (see ``fsdp_units``); a unit owns the
    parameters of its subtree that no earlier unit owns (the root: what is left).

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> largest_unit_bytes(m)   # 4*4 + 4 floats
    80
    """
    owned: set = set()
    best = 0
    for unit in fsdp_units(model):
        size = 0
        for p in unit.parameters():
            if id(p) not in owned:
                owned.add(id(p))
                size += p.numel() * p.element_size()
        best = max(best, size)
    return best


def per_rank(estimate: Any, model: Any, world_size: int, strategy: str) -> dict:
    """The per-rank figures of ``estimate`` (a single-device ``MemoryEstimate``), as a dict.

    >>> from pytest_modelcheck.core.memory.report import MemoryEstimate
    >>> import torch
    >>> e = MemoryEstimate(batch_size=2, phase="train", optimizer="adamw", amp=None,
    ...                    device="cpu", peak_bytes=1000, peak_phase="optimizer step",
    ...                    parameters_bytes=200, gradients_bytes=200,
    ...                    optimizer_state_bytes=400, activations_bytes=100)
    >>> r = per_rank(e, torch.nn.Linear(7, 7), 2, "ddp")
    >>> r["communication_buffers_bytes"], r["peak_bytes"]
    (200, 1200)
    """
    params, grads = int(estimate.parameters_bytes), int(estimate.gradients_bytes)
    opt = int(estimate.optimizer_state_bytes)
    row = {"world_size": world_size, "strategy": strategy,
           "activations_bytes": int(estimate.activations_bytes)}
    if strategy == "ddp":
        comm = grads if estimate.phase == "train" else 0
        row.update(parameters_bytes=params, gradients_bytes=grads,
                   optimizer_state_bytes=opt, communication_buffers_bytes=comm,
                   peak_bytes=int(estimate.peak_bytes) + comm)
        return row
    shard = -(-params // world_size), -(-grads // world_size), -(-opt // world_size)
    unit = largest_unit_bytes(model) if world_size > 1 else 0
    comm = 2 * unit + (unit if estimate.phase == "train" and world_size > 1 else 0)
    rest = max(0, int(estimate.peak_bytes) - params - grads - opt,
               int(estimate.activations_bytes) + int(estimate.temporaries_bytes))
    row.update(parameters_bytes=shard[0], gradients_bytes=shard[1],
               optimizer_state_bytes=shard[2], communication_buffers_bytes=comm,
               peak_bytes=sum(shard) + rest + comm)
    return row


def render_per_rank(row: dict) -> list:
    """Text lines for a per-rank row (see ``per_rank``).

    >>> render_per_rank({"world_size": 2, "strategy": "ddp", "parameters_bytes": 1,
    ...     "gradients_bytes": 1, "optimizer_state_bytes": 2, "activations_bytes": 3,
    ...     "communication_buffers_bytes": 1, "peak_bytes": 9})[0]
    'per rank with ddp on 2 ranks (the batch is the per-rank batch): peak 9 B'
    """
    from ..units import format_bytes

    lines = [f"per rank with {row['strategy']} on {row['world_size']} ranks (the batch is the"
             f" per-rank batch): peak {format_bytes(row['peak_bytes'])}"]
    for key in ("parameters", "gradients", "optimizer_state", "activations",
                "communication_buffers"):
        lines.append(f"    {key.replace('_', ' '):<22}{format_bytes(row[key + '_bytes']):>12}")
    return lines
