"""What a forward returned: the prediction tensor and a loss the model computed itself.

Models return a tensor, a tuple or dict of tensors, or a structured output such as Hugging Face's
``ModelOutput`` (a dataclass and an ordered dict at once, holding ``loss`` first when labels were
given, then ``logits``, caches and hidden states). Checks that need *the* prediction take it from
``primary_output``; a loss the model computed (``output.loss``) is read with ``model_loss``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

PREDICTION_KEYS = ("logits", "out", "prediction", "predictions", "pred", "output")


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _field(output: Any, key: str) -> Any:
    if isinstance(output, dict):
        return output.get(key)
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return getattr(output, key, None)
    return None


def primary_output(output: Any) -> Any:
    """The prediction tensor of a forward's output (``None`` when it holds no tensor).

    A tensor is itself; a structured output (dict, dataclass, ``ModelOutput``) gives its
    ``logits`` (or ``out``, ``prediction``...) when it has one, else its first tensor that is not
    a ``loss``; a tuple or list gives its first element's prediction.

    >>> import torch
    >>> primary_output({"loss": torch.tensor(1.0), "logits": torch.zeros(2, 3)}).shape
    torch.Size([2, 3])
    >>> primary_output((torch.ones(4), torch.zeros(1))).shape
    torch.Size([4])
    """
    if _is_tensor(output):
        return output
    if isinstance(output, dict) or (dataclasses.is_dataclass(output) and not isinstance(output, type)):
        for key in PREDICTION_KEYS:
            value = _field(output, key)
            if _is_tensor(value):
                return value
        items = output.items() if isinstance(output, dict) else (
            (f.name, getattr(output, f.name, None)) for f in dataclasses.fields(output))
        for key, value in items:
            if key == "loss":
                continue
            found = primary_output(value)
            if found is not None:
                return found
        return None
    if isinstance(output, (tuple, list)):
        for value in output:
            found = primary_output(value)
            if found is not None:
                return found
    return None


def model_loss(output: Any) -> Optional[Any]:
    """The scalar loss a model computed itself (``output.loss``, ``output["loss"]``), else None.

    >>> import torch
    >>> float(model_loss({"loss": torch.tensor(2.5), "logits": torch.zeros(1)}))
    2.5
    >>> model_loss(torch.zeros(3)) is None
    True
    """
    value = _field(output, "loss")
    if value is None and not isinstance(output, dict):
        value = getattr(output, "loss", None) if hasattr(type(output), "__dataclass_fields__") else None
    if _is_tensor(value) and value.numel() == 1 and (value.is_floating_point() or value.is_complex()):
        return value
    return None
