"""Loss resolution: a name, a callable, or a sensible default from the batch.

A loss callable is called as ``loss(output, target)``; if it has a parameter named ``model``
it also gets the model being trained (``model=...``, which GAN losses need for their
discriminator), and if it has one named ``inputs``, the tuple of positional model inputs
(``inputs=...``, e.g. the conditioning volume of a conditional GAN). It returns a scalar tensor, or a dict of scalar terms that are
summed (the terms are kept for reports).

Named losses (and the inferred one) apply to the output's prediction tensor
(``outputs.primary_output``: the tensor itself, a structured output's ``logits``...). Cross-entropy
and NLL take the classes in dim 1 when the target fits that layout (``(B, C)`` with ``(B,)``,
``(B, C, H, W)`` with ``(B, H, W)``), else in the last dim (a language model's ``(B, T, V)`` logits
with ``(B, T)`` targets); targets equal to -100 are ignored, as torch does. With no loss given,
a loss the model computed itself (``output.loss``, e.g. a Hugging Face model given ``labels``)
is the loss.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .batch import Batch, iter_tensors
from .errors import ModelError, UsageError, first_line
from .outputs import model_loss, primary_output

LOSS_NAMES = ("cross_entropy", "mse", "l1", "smooth_l1", "bce", "bce_with_logits", "nll")


def _named_loss(name: str) -> Any:
    import torch.nn.functional as F

    return {
        "cross_entropy": cross_entropy,
        "mse": F.mse_loss,
        "l1": F.l1_loss,
        "smooth_l1": F.smooth_l1_loss,
        "bce": F.binary_cross_entropy,
        "bce_with_logits": F.binary_cross_entropy_with_logits,
        "nll": nll,
    }[name]


def class_dim(output: Any, target: Any) -> Optional[int]:
    """The dimension of ``output`` holding the classes for integer ``target`` labels, or None.

    Dim 1 when the target is the output without it (``(B, C)``/``(B,)``, ``(B, C, H, W)``/
    ``(B, H, W)``), else the last dim when that fits (``(B, T, V)``/``(B, T)``, a language model).

    >>> import torch
    >>> class_dim(torch.zeros(8, 64, 100), torch.zeros(8, 64, dtype=torch.long))
    2
    >>> class_dim(torch.zeros(2, 5, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long))
    1
    >>> class_dim(torch.zeros(8, 10), torch.zeros(4, dtype=torch.long)) is None
    True
    """
    import torch

    if not (isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    if output.dim() != target.dim() + 1 or output.dim() < 1:
        return None
    if output.dim() == 1:
        return 0 if target.dim() == 0 else None
    shape, want = tuple(output.shape), tuple(target.shape)
    if shape[:1] + shape[2:] == want:
        return 1
    if shape[:-1] == want:
        return output.dim() - 1
    return None


def _classes_in_dim1(output: Any, target: Any) -> Any:
    dim = class_dim(output, target)
    if dim is not None and dim > 1:
        return output.movedim(dim, 1)
    return output


def cross_entropy(output: Any, target: Any, **kwargs: Any) -> Any:
    """``F.cross_entropy`` with the classes in dim 1 or, for a language model's ``(B, T, V)``
    logits and ``(B, T)`` targets, in the last dim; -100 targets are ignored.

    >>> import torch
    >>> logits = torch.zeros(2, 3, 4)  # uniform over 4 classes: loss = ln 4
    >>> target = torch.tensor([[0, 1, -100], [3, 2, 1]])
    >>> round(float(cross_entropy(logits, target)), 4)
    1.3863
    """
    import torch.nn.functional as F

    return F.cross_entropy(_classes_in_dim1(output, target), target, **kwargs)


def nll(output: Any, target: Any, **kwargs: Any) -> Any:
    """``F.nll_loss`` on log-probabilities laid out as ``cross_entropy`` accepts them.

    >>> import torch
    >>> logp = torch.log_softmax(torch.zeros(2, 3, 4), -1)
    >>> round(float(nll(logp, torch.zeros(2, 3, dtype=torch.long))), 4)
    1.3863
    """
    import torch.nn.functional as F

    return F.nll_loss(_classes_in_dim1(output, target), target, **kwargs)


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


OWN_LOSS = "the model's own loss (output.loss)"


@dataclass
class Loss:
    """A resolved loss: ``compute(output, batch, model) -> (total, terms)``.

    ``named`` losses (from LOSS_NAMES, or inferred) get the output's prediction tensor
    (``primary_output``), a user's callable the output as the model returned it; ``own`` is the
    loss the model computed itself (``output.loss``).

    >>> import torch
    >>> b = Batch.from_user((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)))
    >>> out = {"loss": torch.tensor(0.5), "logits": torch.zeros(2, 4)}
    >>> loss = resolve_loss(None, b, out)
    >>> loss.name, float(loss.compute(out, b)[0])
    ("the model's own loss (output['loss'])", 0.5)
    """

    name: str
    fn: Optional[Callable] = None
    wants_model: bool = False
    wants_inputs: bool = False
    named: bool = False
    own: bool = False

    def compute(self, output: Any, batch: Batch, model: Any = None) -> tuple:
        if self.own:
            value = model_loss(output)
            if value is None:
                raise ModelError(f"expected {self.name} in the forward's output, observed"
                                 f" {type(output).__name__} without a scalar loss this time",
                                 module="loss")
            return value, {}
        if self.fn is None:
            return surrogate_loss(output), {}
        extra = {}
        if self.wants_model:
            extra["model"] = model
        if self.wants_inputs:
            extra["inputs"] = batch.args
        prediction = output
        if self.named:
            prediction = primary_output(output)
            if prediction is None:
                raise ModelError(f"the loss {self.name}: the output ({type(output).__name__})"
                                 " holds no prediction tensor", module="loss")
        try:
            value = self.fn(prediction, batch.target, **extra)
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
    out, tgt = primary_output(output), _first_tensor(batch.target)
    if out is None or tgt is None:
        return None
    if not tgt.is_floating_point() and not tgt.is_complex() and tgt.dtype != _bool() \
            and out.is_floating_point() and class_dim(out, tgt) is not None:
        return "cross_entropy"
    if out.shape == tgt.shape:
        return "mse"
    return None


def _bool() -> Any:
    import torch

    return torch.bool


def resolve_loss(loss: Any, batch: Batch, output: Any = None) -> Loss:
    """Turn the user's ``loss`` (None, a name from LOSS_NAMES, or a callable) into a Loss.

    ``None`` takes the loss the model computed itself when its output holds one
    (``output.loss``); otherwise, on the output's prediction (``logits`` of a structured output),
    cross-entropy for integer targets one dimension shorter (classes in dim 1, or last for
    ``(B, T, V)`` logits with ``(B, T)`` targets), MSE for targets of the output's shape, and the
    surrogate ``sum(mean(out**2))`` when the batch has no target.

    >>> import torch
    >>> b = Batch.from_user((torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
    >>> resolve_loss(None, b, output=torch.zeros(4, 10)).name
    'cross_entropy'
    """
    if loss is None:
        if output is not None and model_loss(output) is not None:
            plain_dict = isinstance(output, dict) and not dataclasses.is_dataclass(output)
            return Loss(OWN_LOSS.replace("output.loss", "output['loss']") if plain_dict
                        else OWN_LOSS, own=True)  # a ModelOutput is a dict and a dataclass
        if not batch.has_target:
            return Loss("surrogate mean(output**2)")
        name = _auto_name(output, batch) if output is not None else None
        if name is None:
            out, tgt = primary_output(output), _first_tensor(batch.target)
            seen = (f" (output {tuple(out.shape)} {str(out.dtype).replace('torch.', '')},"
                    f" target {tuple(tgt.shape)} {str(tgt.dtype).replace('torch.', '')})"
                    if out is not None and tgt is not None else "")
            raise UsageError(
                f"loss: cannot infer a loss for this output and target{seen}; pass loss='mse',"
                " 'cross_entropy' or a callable to the marker, or define a loss_fn fixture")
        return Loss(name, _named_loss(name), named=True)
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in LOSS_NAMES:
            raise UsageError(f"loss: unknown loss {loss!r}; expected one of {', '.join(LOSS_NAMES)}"
                             " or a callable loss(output, target)")
        if not batch.has_target:
            raise UsageError(f"loss: {loss!r} needs a target, but the batch has none")
        return Loss(loss, _named_loss(loss), named=True)
    if callable(loss):
        try:
            params: Any = inspect.signature(loss).parameters
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
