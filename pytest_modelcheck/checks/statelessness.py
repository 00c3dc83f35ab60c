"""stateless_forward: an eval forward changes no parameter, buffer, plain attribute or input.

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

from typing import Any, Optional

from ..core.result import CheckResult
from .compare import identical, plain_attributes
from .naming import and_more, matches, name_patterns
from .registry import check
from .subject import Subject


def _validate_stateless(ignore: Any = ()) -> dict:
    return {"ignore": name_patterns("ignore", ignore, "['calls', 'encoder.cache']")}


def _summary(value: Any) -> tuple:
    """A comparable (kind, value, text) summary of an attribute value."""
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", value.detach().clone(), f"tensor {tuple(value.shape)}")
    if value is None or isinstance(value, (bool, int, float, str, bytes, complex)):
        return (type(value).__name__, value, repr(value) if len(repr(value)) < 40 else type(value).__name__)
    if isinstance(value, (list, tuple, dict, set, frozenset)) or (
            hasattr(value, "__len__") and hasattr(value, "__iter__")):
        try:
            n = len(value)
        except TypeError:
            return (type(value).__name__, id(value), type(value).__name__)
        return (type(value).__name__, n, f"{type(value).__name__} length {n}")
    return (type(value).__name__, id(value), type(value).__name__)


def _same(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "tensor":
        return identical(a[1], b[1])
    if isinstance(a[1], float) and isinstance(b[1], float) and a[1] != a[1] and b[1] != b[1]:
        return True
    return a[1] == b[1]


def _snapshot(work: Any, ignore: tuple) -> dict:
    snap = {}
    for mname, mod in work.named_modules():
        for attr, value in plain_attributes(mod):
            path = f"{mname}.{attr}" if mname else attr
            if not matches(path, ignore):
                snap[("attribute", mname, attr)] = _summary(value)
    for n, p in work.named_parameters():
        snap[("parameter", n, "")] = ("tensor", p.detach().clone(), "")
    for n, b in work.named_buffers():
        snap[("buffer", n, "")] = ("tensor", b.detach().clone(), "")
    return snap


def _describe_change(key: tuple, old: Optional[tuple], new: Optional[tuple]) -> str:
    kind, name, attr = key
    if kind == "attribute":
        where = f"attribute '{attr}' of module '{name}'" if name else f"attribute '{attr}' of the model"
        if old is None:
            assert new is not None
            return f"{where} added ({new[2]})"
        if new is None:
            return f"{where} deleted"
        if old[0] == new[0] == "tensor":
            return f"{where} changed (tensor values)"
        if old[0] == new[0] and old[2].startswith(old[0] + " length"):
            return f"{where} changed ({old[0]} length {old[1]} -> {new[1]})"
        return f"{where} changed ({old[2]} -> {new[2]})"
    return f"{kind} '{name}' changed"


def _diff(a: dict, b: dict) -> list:
    """Keys of two snapshots whose entries differ (or exist in one only), in order."""
    return [k for k in list(a) + [k for k in b if k not in a]
            if (k in a) != (k in b) or not _same(a[k], b[k])]


def _two_calls(subject: Subject, ignore: tuple) -> tuple:
    """Snapshots before and after each of two no-grad eval forwards on a copy, and the inputs
    the forwards changed in place."""
    import torch

    from ..core.forward import run_forward

    work = subject.model_copy("eval")
    snaps = [_snapshot(work, ignore)]
    changed_inputs: list = []
    for _ in range(2):
        data = subject.batch_copy()
        reference = subject.batch_copy()
        with torch.no_grad():
            run_forward(work, data)
        changed_inputs = changed_inputs or data.differs_from(reference)
        snaps.append(_snapshot(work, ignore))
    return snaps, changed_inputs


def _changes(s0: dict, s1: dict, s2: dict) -> tuple:
    """(problems: [(key, old, new)], lazy: [key]): changes made by the calls; an attribute set
    once from None (or added) by the first call only is lazy initialisation."""
    every_call = set(_diff(s1, s2))
    first_call = _diff(s0, s1)
    problems = []
    lazy = []
    for k in first_call:
        is_lazy = (k[0] == "attribute" and k not in every_call
                   and (k not in s0 or s0[k][0] == "NoneType"))
        if is_lazy:
            lazy.append(k)
        else:
            problems.append((k, s0.get(k), s1.get(k)))
    problems += [(k, s1.get(k), s2.get(k)) for k in _diff(s1, s2) if k not in set(first_call)]
    return problems, lazy


@check(default=True, validate=_validate_stateless)
def stateless_forward(ignore: Any = (), *, subject: Subject) -> CheckResult:
    """An eval forward leaves parameters, buffers, plain attributes and the inputs unchanged.

    Two no-grad eval forwards on a copy; after each, every parameter and buffer is compared
    bitwise and every plain attribute of every submodule by value (tensors, numbers, strings) or
    length (containers). A change made by every call (a counter, a growing list, a cache that
    follows the input) fails; an attribute set once from ``None`` by the first call (a lazily
    built table) does not. ``ignore`` lists attribute paths (``'calls'``, ``'encoder.cache'``,
    globs) that may change. Inputs changed in place fail too.

    >>> import torch
    >>> stateless_forward(model=torch.nn.BatchNorm1d(3), batch=torch.randn(4, 3)).passed
    True
    >>> class Counting(torch.nn.Linear):
    ...     calls = 0
    ...     def forward(self, x):
    ...         self.calls += 1
    ...         return super().forward(x)
    >>> stateless_forward(model=Counting(3, 2), batch=torch.randn(4, 3)).headline
    "expected forward to leave the model unchanged, observed attribute 'calls' of the model added (1)"
    """
    (s0, s1, s2), changed_inputs = _two_calls(subject, ignore)
    problems, lazy = _changes(s0, s1, s2)
    metrics = {"attributes": sum(1 for k in s0 if k[0] == "attribute"),
               "changed": len(problems), "lazily_set": len(lazy),
               "inputs_changed": len(changed_inputs)}
    details = [_describe_change(k, o, n) for k, o, n in problems[:20]]
    if lazy:
        details.append("set once by the first forward (lazy initialisation, tolerated): "
                       + ", ".join(".".join(x for x in k[1:] if x) for k in lazy[:10]))
    if problems:
        k, o, n = problems[0]
        details.append("remedy: keep per-call values local, register state as buffers updated"
                       " only in training, or list intended attributes in ignore=[...]")
        return subject.failed(f"expected forward to leave the model unchanged, observed"
                              f" {_describe_change(k, o, n)}{and_more(problems)}", details, metrics)
    if changed_inputs:
        return subject.failed(f"expected forward to leave its inputs unchanged, observed"
                              f" {changed_inputs[0]} modified in place{and_more(changed_inputs)}",
                              details, metrics)
    return subject.passed(f"expected forward to leave the model unchanged, observed all"
                          f" {len(s0)} parameters, buffers and attributes unchanged after 2 calls",
                          details, metrics)
