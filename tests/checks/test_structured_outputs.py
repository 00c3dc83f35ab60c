"""Structured outputs (Hugging Face ``ModelOutput``-like dataclasses holding ``loss`` and ``logits``)."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from pytest_modelcheck.checks import shapes_consistent
from pytest_modelcheck.core.batch import Batch


@dataclass
class Output:
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


class Classifier(nn.Module):
    """Returns ``Output(loss, logits)``; the loss is computed when labels are given."""

    def __init__(self, reduce_batch=False):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.reduce_batch = reduce_batch

    def forward(self, x, labels=None):
        logits = self.lin(x)
        if self.reduce_batch:  # the bug: the batch dimension is averaged away
            logits = logits.mean(0, keepdim=True)
        loss = None if labels is None else nn.functional.cross_entropy(
            logits.expand(len(x), -1), labels)
        return Output(loss=loss, logits=logits)


def _batch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
    return Batch(args=(x,), kwargs={"labels": y}, target=y)


def test_own_scalar_loss_is_not_an_output_without_batch_dim():
    torch.manual_seed(0)
    result = shapes_consistent(model=Classifier(), batch=_batch())
    assert result.passed, result.headline


def test_logits_without_batch_dim_still_fail_next_to_a_loss():
    torch.manual_seed(0)
    result = shapes_consistent(model=Classifier(reduce_batch=True), batch=_batch())
    assert result.passed is False
    assert "output.logits (1, 3)" in result.headline and "expected B=2" in result.headline


def test_declared_spec_applies_to_the_logits_of_a_structured_output():
    torch.manual_seed(0)
    assert shapes_consistent(("B", 3), model=Classifier(), batch=_batch()).passed
    failed = shapes_consistent(("B", 5), model=Classifier(), batch=_batch())
    assert failed.passed is False and "output.logits" in failed.headline
