"""Loss resolution: a name, a callable, or a sensible default from the batch.

A loss callable is called as ``loss(output, target)``; if it has a parameter named ``model``
it also gets the model being trained (``model=...``, which GAN losses need for their
discriminator), and if it has one named ``inputs``, the tuple of positional model inputs
(``inputs=...``, e.g. the conditioning volume of a conditional GAN). It returns a scalar tensor, or a dict of scalar terms that are
summed (the terms are kept for reports).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .batch import Batch, iter_tensors
from .errors import ModelError, UsageError, first_line

LOSS_NAMES = ("cross_entropy", "mse", "l1", "smooth_l1", "bce", "bce_with_logits", "nll")


def _named_loss(name: str) -> Callable:
    import torch.nn.functional as F

    return {
        "cross_entropy": F.cross_entropy,
        "mse": F.mse_loss,
        "l1": F.l1_loss,
        "smooth_l1": F.smooth_l1_loss,
        "bce": F.binary_cross_entropy,
        "bce_with_logits": F.binary_cross_entropy_with_logits,
        "nll": F.nll_loss,
    }[name]


def _first_tensor(obj: Any) -> Any:
    for _, t in iter_tensors(obj):
        return t
    return None


def surrogate_loss(output: Any) -> Any:
    """Sum over floating outputs of mean(output**2): reaches every output element.

    >>> import torch
    >>> float(surrogate_loss((torch.ones(2), torch.full((3,), 2.0))))
    5.0
    """
    terms = [t.float().pow(2).mean() for _, t in iter_tensors(output)
             if t.is_floating_point() or t.is_complex()]
    if not terms:
        raise UsageError("loss: the model output holds no floating tensor to differentiate")
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


@dataclass
class Loss:
    """A resolved loss: ``compute(output, batch, model) -> (total, terms)``."""

    name: str
    fn: Optional[Callable] = None
    wants_model: bool = False
    wants_inputs: bool = False

    def compute(self, output: Any, batch: Batch, model: Any = None) -> tuple:
        if self.fn is None:
            return surrogate_loss(output), {}
        extra = {}
        if self.wants_model:
            extra["model"] = model
        if self.wants_inputs:
            extra["inputs"] = batch.args
        try:
            value = self.fn(output, batch.target, **extra)
        except (UsageError, ModelError):
            raise
        except Exception as exc:  # noqa: BLE001 - the user's loss: a failed check, named
            raise ModelError(f"the loss {self.name} raised {type(exc).__name__}:"
                             f" {first_line(exc)[:200]}",
                             module="loss", original=exc) from None
        if isinstance(value, dict):
            if not value:
                raise UsageError(f"loss {self.name}: returned an empty dict of terms")
            for key, v in value.items():
                _check_loss_value(f"{self.name}[{key!r}]", v)
            total = None
            for v in value.values():
                total = v if total is None else total + v
            return total, dict(value)
        _check_loss_value(self.name, value)
        return value, {}


def _check_loss_value(name: str, value: Any) -> None:
    """A loss must be a tensor with one element (a scalar); anything else is named."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise ModelError(f"the loss {name} returned {type(value).__name__}; expected a scalar"
                         f" tensor", module="loss")
    if value.numel() != 1:
        raise ModelError(f"the loss {name} returned a tensor of shape {tuple(value.shape)};"
                         f" expected a scalar (reduce it with .mean() or .sum())", module="loss")


def _auto_name(output: Any, batch: Batch) -> Optional[str]:
    out, tgt = _first_tensor(output), _first_tensor(batch.target)
    if out is None or tgt is None:
        return None
    if not tgt.is_floating_point() and out.is_floating_point() and out.dim() == tgt.dim() + 1:
        return "cross_entropy"
    if out.shape == tgt.shape:
        return "mse"
    return None


def resolve_loss(loss: Any, batch: Batch, output: Any = None) -> Loss:
    """Turn the user's ``loss`` (None, a name from LOSS_NAMES, or a callable) into a Loss.

    ``None`` picks cross-entropy for integer targets one dimension shorter than the output,
    MSE for targets of the output's shape, and the surrogate ``sum(mean(out**2))`` when the
    batch has no target.

    >>> import torch
    >>> b = Batch.from_user((torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
    >>> resolve_loss(None, b, output=torch.zeros(4, 10)).name
    'cross_entropy'
    """
    if loss is None:
        if not batch.has_target:
            return Loss("surrogate mean(output**2)")
        name = _auto_name(output, batch) if output is not None else None
        if name is None:
            raise UsageError(
                "loss: cannot infer a loss for this output and target; pass loss='mse',"
                " 'cross_entropy' or a callable to the marker, or define a loss_fn fixture")
        return Loss(name, _named_loss(name))
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in LOSS_NAMES:
            raise UsageError(f"loss: unknown loss {loss!r}; expected one of {', '.join(LOSS_NAMES)}"
                             " or a callable loss(output, target)")
        if not batch.has_target:
            raise UsageError(f"loss: {loss!r} needs a target, but the batch has none")
        return Loss(loss, _named_loss(loss))
    if callable(loss):
        try:
            params = inspect.signature(loss).parameters
        except (TypeError, ValueError):
            params = {}
        name = getattr(loss, "__name__", type(loss).__name__)
        return Loss(name, loss, wants_model="model" in params, wants_inputs="inputs" in params)
    raise UsageError(f"loss: expected a loss name or a callable, got {type(loss).__name__}")


def validate_loss_arg(loss: Any) -> Any:
    """Setup-time validation of a marker's ``loss=`` (no model run needed)."""
    if loss is None or callable(loss) or isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss in LOSS_NAMES:
        return loss
    raise UsageError(f"loss={loss!r}: expected one of {', '.join(LOSS_NAMES)} or a callable"
                     " loss(output, target)")
