"""Facts the behaviour checks compare between two runs of a model: bitwise tensor equality, the
largest difference, the first differing output, and the plain attributes of a module (those
that are neither ``nn.Module`` internals nor managed by hooks).

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

from typing import Any, Optional

_MODULE_INTERNALS: Optional[frozenset] = None


def identical(a: Any, b: Any) -> bool:
    """``tensors_identical`` that also takes 0-d tensors (compared as one-element tensors).

    >>> import torch
    >>> identical(torch.tensor(1.0), torch.tensor(1.0)), identical(torch.ones(2), torch.zeros(2))
    (True, False)
    """
    from ..core.state import tensors_identical

    if a is None or b is None or a.shape != b.shape:
        return tensors_identical(a, b)
    return tensors_identical(a.reshape(-1), b.reshape(-1))


def max_diff(a: Any, b: Any) -> float:
    """Largest ``|a - b|`` (NaN counts as infinite; different shapes too).

    >>> import torch
    >>> max_diff(torch.ones(3), torch.tensor([1.0, 3.0, 1.0]))
    2.0
    """
    import torch

    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        return float("inf")
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    d = (a.double() - b.double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max()) if d.numel() else 0.0


def output_difference(a: Any, b: Any) -> Optional[tuple]:
    """None when two outputs are identical, else (path, max |difference|) of the first that
    differs.

    >>> import torch
    >>> output_difference((torch.ones(2), torch.ones(2)), (torch.ones(2), torch.zeros(2)))
    ('output[1]', 1.0)
    """
    from ..core.batch import iter_tensors

    ta, tb = list(iter_tensors(a, "output")), list(iter_tensors(b, "output"))
    if len(ta) != len(tb):
        return ("output structure", float("inf"))
    for (p, x), (_, y) in zip(ta, tb):
        if not identical(x, y):
            return (p, max_diff(x, y))
    return None


def _internals() -> frozenset:
    global _MODULE_INTERNALS
    if _MODULE_INTERNALS is None:
        import torch

        _MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) | {"training"}
    return _MODULE_INTERNALS


def plain_attributes(mod: Any) -> list:
    """``[(name, value)]`` of the attributes a module's own code set (``self.calls = 0``):
    neither ``nn.Module``'s internals nor attributes that hooks manage.

    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> m.calls = 0
    >>> plain_attributes(m)
    [('in_features', 2), ('out_features', 2), ('calls', 0)]
    """
    from ..core.state import hook_managed_attributes

    internals = _internals()
    managed = hook_managed_attributes(mod)
    return [(attr, value) for attr, value in vars(mod).items()
            if attr not in internals and attr not in managed]
