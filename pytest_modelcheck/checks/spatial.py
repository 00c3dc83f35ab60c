"""Helpers shared by the architecture checks (``unet``, ``vit``, ``fno``): declared sizes, the
image input of a batch, resizing it (the module stack of a running forward is
``core.trace.module_stack``).

>>> _label(20), _label((20, 24)), _labels([16, (8, 8)])
('20', '(20, 24)', '16, (8, 8)')
"""
from __future__ import annotations

from typing import Any

from ..core.errors import UsageError
from ..core.units import is_int


def _validate_sizes(sizes: Any, name: str) -> tuple:
    """A list of spatial sizes: ints (the same along every spatial dim) or tuples of ints."""
    example = f"{name}=[16, 24] or {name}=[(16, 16, 16), (24, 24, 24)]"
    if is_int(sizes):
        sizes = [sizes]
    if not isinstance(sizes, (list, tuple)) or not sizes:
        raise UsageError(f"{name}={sizes!r}: expected a non-empty list of sizes such as {example}")
    out = []
    for s in sizes:
        if is_int(s) and s >= 1:
            out.append(s)
        elif (isinstance(s, (list, tuple)) and s and all(is_int(d) and d >= 1 for d in s)):
            out.append(tuple(s))
        else:
            raise UsageError(f"{name}={sizes!r}: size {s!r} is not a positive int or a tuple of"
                             f" positive ints; expected {example}")
    return tuple(out)


def _validate_index(input_index: Any) -> int:
    if not is_int(input_index) or input_index < 0:
        raise UsageError(f"input_index={input_index!r}: expected an int >= 0, the position of the"
                         " image/volume among the model's inputs")
    return input_index


def _validate_declared(sizes: Any, input_index: Any, example: str) -> dict:
    """The ``sizes`` and ``input_index`` arguments of a check that tries declared sizes;
    ``example`` completes "sizes=None: expected ..." when no sizes are given."""
    if sizes is None:
        raise UsageError(f"sizes=None: expected {example}")
    return {"sizes": _validate_sizes(sizes, "sizes"), "input_index": _validate_index(input_index)}


def _label(size: Any) -> str:
    """``20`` for a cube (or an int), ``(20, 24)`` otherwise."""
    if is_int(size):
        return str(size)
    return str(size[0]) if len(set(size)) == 1 else str(tuple(size))


def _labels(sizes: Any) -> str:
    return ", ".join(str(s) for s in sizes)


def _input_slot(batch: Any, input_index: int) -> tuple:
    """``("args", i)`` for positional input ``input_index``, or, for a batch of keyword inputs
    only (``model(**batch)``, such as ``pixel_values``) and ``input_index=0``, ``("kwargs",
    name)`` of its first floating tensor with a batch, a channel and a spatial dim."""
    import torch

    if input_index < len(batch.args) and isinstance(batch.args[input_index], torch.Tensor):
        return "args", input_index
    if not batch.args and input_index == 0:
        for k, v in batch.kwargs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 3:
                return "kwargs", k
    raise UsageError(f"input_index={input_index}: the model's positional input {input_index}"
                     f" is not a tensor (the batch has {len(batch.args)} positional inputs)")


def _input_tensor(batch: Any, input_index: int) -> Any:
    kind, key = _input_slot(batch, input_index)
    return batch.args[key] if kind == "args" else batch.kwargs[key]


def _target_shape(x: Any, size: Any, ndim: int) -> tuple:
    """``x.shape`` with its last ``ndim`` dims (or ``len(size)`` for a tuple) set to ``size``."""
    dims = (size,) * ndim if is_int(size) else tuple(size)
    if len(dims) > x.dim() - 1:
        raise UsageError(f"size {size!r}: {len(dims)} spatial dims, but the input of shape"
                         f" {tuple(x.shape)} has only {x.dim() - 1} dims after the batch dim")
    return tuple(x.shape[:x.dim() - len(dims)]) + dims


def _resized(batch: Any, input_index: int, size: Any, ndim: int) -> Any:
    """A copy of ``batch`` whose input ``input_index`` is tiled/cropped to spatial ``size``."""
    from ..core.batch import Batch
    from ..core.shapes import resize_to

    kind, key = _input_slot(batch, input_index)
    x = _input_tensor(batch, input_index)
    new = resize_to(x, _target_shape(x, size, ndim))
    if kind == "kwargs":
        return Batch(args=batch.args, kwargs={**batch.kwargs, key: new}, target=batch.target,
                     has_target=batch.has_target, target_key=batch.target_key)
    args = list(batch.args)
    args[key] = new
    return Batch(args=tuple(args), kwargs=batch.kwargs, target=batch.target,
                 has_target=batch.has_target)


def _root_name(model: Any) -> str:
    return type(model).__name__


def _storage(t: Any) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0
