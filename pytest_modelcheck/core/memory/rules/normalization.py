"""Batch normalization's backward (docs/memory-model.md, "Normalization")."""
from __future__ import annotations

from typing import Any

from .registry import CPU_RULES


def _batch_norm_backward_workspace(args: tuple) -> int:
    """The CPU batch-norm backward makes its input gradient twice when the input and the
    output gradient are contiguous in one memory format (``empty_like``, then again in its
    all-contiguous branch): one input-sized buffer more, for a moment. It is the peak in
    channels-last networks, whose convolutions make no blocked copies."""
    import torch

    gout, inp, mask = args[0], args[1], args[9]
    if not mask or not mask[0] or inp.dim() < 2 or inp.device.type not in ("cpu", "meta"):
        return 0
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        try:
            if inp.is_contiguous(memory_format=fmt) and gout.is_contiguous(memory_format=fmt):
                return inp.numel() * inp.element_size()
        except RuntimeError:  # a format for another rank
            continue
    return 0


@CPU_RULES.register("native_batch_norm_backward")
def _batch_norm_backward(name: str, args: tuple, out: Any) -> int:
    return _batch_norm_backward_workspace(args)
