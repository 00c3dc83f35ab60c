"""Calling the user's model, with errors that say which module raised."""
from __future__ import annotations

from typing import Any

from .batch import Batch
from .errors import ModelError, UsageError
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
        return batch.call(model)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the module path
        where = module_where_raised(model, exc)
        place = f" in module '{where}' ({type(_module(model, where)).__name__})" if where else ""
        raise ModelError(f"forward raised {type(exc).__name__}{place}: {_one_line(exc)}",
                         where, exc) from exc


def _module(model: Any, path: str) -> Any:
    try:
        return model.get_submodule(path) if path and path != type(model).__name__ else model
    except AttributeError:
        return model


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


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
