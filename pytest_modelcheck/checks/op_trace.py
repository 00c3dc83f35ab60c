"""What the numerics checks share when they watch a forward op by op: the module now running
(forward hooks), an op's ``aten.`` name, the tensors of a nest, a source line's file name.

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

import os
from typing import Any

ROOT = "<root>"


def _short(source: str) -> str:
    """The file name (and line) of a user source line; "an unknown line" without one.

    >>> _short("/src/model.py:12 in forward"), _short("")
    ('model.py:12 in forward', 'an unknown line')
    """
    return os.path.basename(source) if source else "an unknown line"


class _ModuleStack:
    """Forward pre/post hooks that keep the path of the module now running (``current``).

    Hooks are removed on exit, even when the model raises.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> with _ModuleStack(m) as mods:
    ...     mods.describe("0")
    "module '0' (Linear)"
    """

    def __init__(self, model: Any) -> None:
        self.names = {m: (n or ROOT) for n, m in model.named_modules()}
        self.types = {(n or ROOT): type(m).__name__ for n, m in model.named_modules()}
        self.stack: list = []
        self.handles: list = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ROOT

    def describe(self, path: str) -> str:
        return f"module '{path}' ({self.types.get(path, '?')})"

    def __enter__(self) -> "_ModuleStack":
        def push(mod: Any, args: Any) -> None:
            self.stack.append(self.names.get(mod, ROOT))

        def pop(mod: Any, args: Any, out: Any) -> None:
            if self.stack:
                self.stack.pop()

        for m in self.names:
            self.handles.append(m.register_forward_pre_hook(push))
            self.handles.append(m.register_forward_hook(pop))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.stack.clear()


def _op_name(func: Any) -> str:
    """``aten.<name>`` of a dispatched op.

    >>> import torch
    >>> _op_name(torch.ops.aten.add.Tensor)
    'aten.add'
    """
    packet = getattr(func, "overloadpacket", None)
    return "aten." + (getattr(packet, "__name__", None) or str(func).split(".")[1])


def _flat_tensors(obj: Any) -> list:
    """The tensors among the leaves of a nest.

    >>> import torch
    >>> len(_flat_tensors(([torch.ones(1), 2], {"a": torch.zeros(2)})))
    2
    """
    import torch

    from ..core._torch_compat import tree_leaves

    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]
