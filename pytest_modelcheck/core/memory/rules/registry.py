"""Kernel-workspace rules, registered per aten op (by overload packet name, e.g. ``convolution``).

A rule is ``rule(name, args, out) -> int``: the bytes a kernel holds inside itself above what is
alive once it has returned, from the op's arguments in schema order (``_common._all_args``) and
its outputs. A registry refuses a second rule for an op, as ``torch.utils.flop_counter``'s
``register_flop_formula`` does.
"""
from __future__ import annotations

from typing import Any, Callable

Rule = Callable[[str, tuple, Any], int]


class RuleRegistry:
    """The workspace rules of one target (CPU kernels, CUDA kernels), one per aten op.

    >>> reg = RuleRegistry("demo")
    >>> @reg.register("relu")
    ... def _relu(name, args, out):
    ...     return 8
    >>> import torch
    >>> reg(torch.ops.aten.relu.default, (), None), reg(torch.ops.aten.gelu.default, (), None)
    (8, 0)
    >>> reg.register("relu")(_relu)
    Traceback (most recent call last):
    ...
    ValueError: demo workspace rules: aten.relu already has a rule (_relu); one rule per op
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.rules: dict[str, Rule] = {}

    def register(self, *ops: str) -> Callable[[Rule], Rule]:
        """Decorator: register the rule for each aten op named (overload packet names)."""
        def add(rule: Rule) -> Rule:
            for op in ops:
                if op in self.rules:
                    raise ValueError(f"{self.name} workspace rules: aten.{op} already has a rule"
                                     f" ({self.rules[op].__name__}); one rule per op")
                self.rules[op] = rule
            return rule

        return add

    def lookup(self, func: Any) -> Rule | None:
        """The rule registered for ``func``'s overload packet, or None."""
        return self.rules.get(func.overloadpacket.__name__)

    def __call__(self, func: Any, args: tuple, out: Any) -> int:
        """The workspace of ``func`` from its rule; 0 for an op without one."""
        name = func.overloadpacket.__name__
        rule = self.rules.get(name)
        return 0 if rule is None else rule(name, args, out)


#: Rules of CPU kernels (oneDNN, pocketfft, ATen's own), part of CPU estimates.
CPU_RULES = RuleRegistry("CPU")
#: Fixed rules of CUDA kernels, for CUDA estimates made without probing the GPU.
CUDA_RULES = RuleRegistry("CUDA")
