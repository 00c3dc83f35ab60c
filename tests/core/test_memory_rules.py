"""The kernel-workspace rule registries of core/memory/rules: one rule per aten op, every
registered name a real aten op, and the dispatcher finds the rule of a known op."""
from __future__ import annotations

import pytest
import torch

from pytest_modelcheck.core.memory import _conv_forward_workspace, _kernel_workspace
from pytest_modelcheck.core.memory.rules import CPU_RULES, CUDA_RULES, RuleRegistry
from pytest_modelcheck.core.memory.rules import convolution


def test_a_second_rule_for_an_op_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"CPU workspace rules: aten.convolution already has a"
                                         r" rule \(_convolution\); one rule per op"):
        CPU_RULES.register("convolution")(lambda name, args, out: 0)
    assert CPU_RULES.rules["convolution"] is convolution._convolution
    fresh = RuleRegistry("demo")
    fresh.register("relu")(lambda name, args, out: 1)
    with pytest.raises(ValueError, match="aten.relu already has a rule"):
        fresh.register("gelu", "relu")(lambda name, args, out: 2)


@pytest.mark.parametrize("registry", [CPU_RULES, CUDA_RULES], ids=["cpu", "cuda"])
def test_every_registered_name_is_a_real_aten_op(registry):
    assert registry.rules
    for name in registry.rules:
        packet = getattr(torch.ops.aten, name)  # raises for a name aten does not have
        assert isinstance(packet, torch._ops.OpOverloadPacket), name
        assert packet.overloads(), name


def test_the_dispatcher_finds_the_rule_of_a_known_op():
    op = torch.ops.aten.convolution.default
    assert CPU_RULES.lookup(op) is convolution._convolution
    assert CPU_RULES.lookup(torch.ops.aten.relu.default) is None
    assert CUDA_RULES.lookup(torch.ops.aten._native_multi_head_attention.default) is not None
    assert CUDA_RULES.lookup(op) is None
    x, w = torch.randn(1, 16, 16, 16), torch.randn(16, 16, 3, 3)
    args = (x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    out = op(*args)
    assert _kernel_workspace(op, args, out) == _conv_forward_workspace(args, out)
    assert _kernel_workspace(torch.ops.aten.relu.default, (x,), x) == 0
