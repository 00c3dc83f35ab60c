"""Calling the user's model, with errors that say which module raised."""
from __future__ import annotations

from typing import Any

from .batch import Batch
from .errors import ModelError, UsageError, first_line
from .state import module_where_raised


def run_forward(model: Any, batch: Batch) -> Any:
    """``batch.call(model)``; an exception becomes a ModelError naming the module that raised.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> try:
    ...     run_forward(m, Batch.from_user(torch.zeros(1, 4)))
    ... except ModelError as e:
    ...     print(e.module)
    0
    """
    try:
        out = batch.call(model)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the module path
        where = module_where_raised(model, exc)
        place = f" in module '{where}' ({type(_module(model, where)).__name__})" if where else ""
        raise ModelError(f"forward raised {type(exc).__name__}{place}: {first_line(exc)}",
                         where, exc) from exc
    if not _holds_tensor(out):
        raise ModelError(f"forward returned {type(out).__name__} with no tensor in it; expected"
                         " a tensor, or a tuple, list or dict of tensors")
    return out


def _holds_tensor(value: Any, depth: int = 0) -> bool:
    """Whether a forward's output holds a tensor (in tuples, lists, dicts, dataclasses)."""
    import dataclasses

    import torch

    if isinstance(value, torch.Tensor):
        return True
    if depth > 8:
        return False
    if isinstance(value, dict):
        return any(_holds_tensor(v, depth + 1) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v, depth + 1) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_holds_tensor(getattr(value, f.name), depth + 1)
                   for f in dataclasses.fields(value))
    return False


def _module(model: Any, path: str) -> Any:
    try:
        return model.get_submodule(path) if path and path != type(model).__name__ else model
    except AttributeError:
        return model


def model_device(model: Any) -> Any:
    """Device of the model's first parameter or buffer (CPU when it has none)."""
    import torch

    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def count_parameters(model: Any) -> int:
    """Parameters counted once even when shared (tied weights).

    >>> import torch
    >>> count_parameters(torch.nn.Linear(3, 2))  # 3*2 weights + 2 biases
    8
    """
    return sum(p.numel() for p in model.parameters())
