"""Symbolic shape specs: ``("B", 10)``, ``("B", "C", "H", "W")``, ``("B", ...)``, nested in
tuples, lists and dicts to mirror a model's inputs or outputs.

A dimension is an int (exact), a str (a symbol, bound on first use and then enforced), ``None``
(any size) or ``...`` (any number of dimensions, at most once per spec).
"""
from __future__ import annotations

from typing import Any

from .errors import UsageError


def is_tensor_spec(spec: Any) -> bool:
    """A tuple/list whose items are all dims (int, str, None, ...).

    >>> is_tensor_spec(("B", 10)), is_tensor_spec((("B", 10), ("B",)))
    (True, False)
    """
    return isinstance(spec, (tuple, list)) and all(
        d is None or d is Ellipsis or isinstance(d, (int, str)) and not isinstance(d, bool)
        for d in spec)


def validate_spec(spec: Any, name: str) -> Any:
    """Raise UsageError unless ``spec`` is a tensor spec or a nest of them."""
    if is_tensor_spec(spec):
        if sum(d is Ellipsis for d in spec) > 1:
            raise UsageError(f"{name}={spec!r}: at most one ... per shape")
        if any(isinstance(d, int) and d < 0 for d in spec):
            raise UsageError(f"{name}={spec!r}: sizes must be >= 0")
        return tuple(spec)
    if isinstance(spec, dict) and spec:
        return {k: validate_spec(v, f"{name}[{k!r}]") for k, v in spec.items()}
    if isinstance(spec, (tuple, list)) and spec:
        if all(isinstance(v, (tuple, list, dict)) for v in spec):
            return tuple(validate_spec(v, f"{name}[{i}]") for i, v in enumerate(spec))
        bad = next(d for d in spec if not (d is None or d is Ellipsis or isinstance(d, (int, str))
                                           and not isinstance(d, bool)))
        raise UsageError(f"{name}={spec!r}: dimension {bad!r} is not an int, a symbol such as 'B',"
                         " None or ...; expected a shape such as ('B', 10)")
    raise UsageError(f"{name}={spec!r}: expected a shape such as ('B', 10), or a tuple/dict of"
                     " shapes such as {'logits': ('B', 'C'), 'angles': ('B', 2)}")


def match_shape(shape: tuple, spec: tuple, env: dict) -> str:
    """Match one tensor shape against a spec, binding symbols in ``env``; '' when it fits.

    >>> env = {"B": 4}
    >>> match_shape((4, 10), ("B", "C"), env), env["C"]
    ('', 10)
    >>> match_shape((4, 11), ("B", "C"), env)
    'dim 1 is 11, expected C=10'
    """
    shape = tuple(shape)
    if Ellipsis in spec:
        i = spec.index(Ellipsis)
        head, tail = spec[:i], spec[i + 1:]
        if len(shape) < len(head) + len(tail):
            return f"has {len(shape)} dims, expected at least {len(head) + len(tail)}"
        pairs = list(zip(range(len(head)), shape[:len(head)], head))
        pairs += [(len(shape) - len(tail) + j, s, d)
                  for j, (s, d) in enumerate(zip(shape[len(shape) - len(tail):], tail))]
    else:
        if len(shape) != len(spec):
            return f"has {len(shape)} dims {shape}, expected {len(spec)} dims {tuple(spec)}"
        pairs = list(zip(range(len(shape)), shape, spec))
    for i, size, dim in pairs:
        if dim is None:
            continue
        if isinstance(dim, int):
            if size != dim:
                return f"dim {i} is {size}, expected {dim}"
        elif dim in env:
            if size != env[dim]:
                return f"dim {i} is {size}, expected {dim}={env[dim]}"
        else:
            env[dim] = size
    return ""


def match_structure(obj: Any, spec: Any, env: dict, path: str = "output") -> list:
    """Match a nest of tensors against a nest of specs; returns a list of mismatch messages."""
    import torch

    if is_tensor_spec(spec):
        if not isinstance(obj, torch.Tensor) and _structured(obj):
            from .outputs import primary_output

            # a dataclass output (a Hugging Face ModelOutput): a tensor spec is its prediction
            pred = primary_output(obj)
            if pred is not None:
                path = f"{path}.logits" if getattr(obj, "logits", None) is pred else path
                obj = pred
        if not isinstance(obj, torch.Tensor):
            return [f"{path} is a {type(obj).__name__}, expected a tensor of shape {tuple(spec)}"]
        msg = match_shape(tuple(obj.shape), spec, env)
        return [f"{path} {tuple(obj.shape)}: {msg}"] if msg else []
    if isinstance(spec, dict):
        if not isinstance(obj, dict):
            return [f"{path} is a {type(obj).__name__}, expected a dict with keys {sorted(spec)}"]
        errs = [f"{path} lacks key {k!r}" for k in spec if k not in obj]
        for k in spec:
            if k in obj:
                errs += match_structure(obj[k], spec[k], env, f"{path}[{k!r}]")
        return errs
    if not isinstance(obj, (tuple, list)) or len(obj) != len(spec):
        kind = f"a {type(obj).__name__}" + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        return [f"{path} is {kind}, expected a sequence of {len(spec)}"]
    errs = []
    for i, (o, s) in enumerate(zip(obj, spec)):
        errs += match_structure(o, s, env, f"{path}[{i}]")
    return errs


def _structured(obj: Any) -> bool:
    import dataclasses

    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def resize_to(t: Any, shape: tuple) -> Any:
    """Tile or crop ``t`` along every dimension to ``shape`` (keeps dtype, device and values).

    >>> import torch
    >>> resize_to(torch.arange(3), (5,)).tolist()
    [0, 1, 2, 0, 1]
    """
    import math

    import torch

    from .batch import check_allocation

    if any(int(size) > 2 ** 40 for size in shape):
        raise UsageError(f"size {max(int(x) for x in shape)} is too large for a tensor dimension")
    check_allocation(math.prod(int(x) for x in shape) * t.element_size(),
                     f"an input of shape {tuple(shape)}")
    out = t.detach()
    for dim, size in enumerate(shape):
        if out.shape[dim] != size:
            if out.shape[dim] == 0:
                raise UsageError(f"cannot grow an empty dimension {dim} to {size}")
            idx = torch.arange(size, device=out.device) % out.shape[dim]
            out = out.index_select(dim, idx)
    return out.clone()
