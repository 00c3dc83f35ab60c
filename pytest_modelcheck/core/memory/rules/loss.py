"""Losses: the elementwise temporaries of CPU and CUDA loss kernels, and the full-size storage
behind a reduced CPU loss (docs/memory-model.md, "Losses")."""
from __future__ import annotations

from typing import Any

from ...cuda_workspace import CUDA_BLOCK_BYTES
from ..report import _is_tensor
from ._common import _all_args, _numel
from .registry import CPU_RULES, CUDA_RULES


def _loss_temporary(args: tuple) -> int:
    """CPU ``mse_loss``/``smooth_l1_loss``: one more elementwise loss while reducing, above
    the full-size storage the result keeps (``_held_loss``); ``huber_loss`` the same, keeping
    nothing; ``(input, target, reduction)``.
    ``binary_cross_entropy_with_logits`` holds two (its ``log_sigmoid`` and ``1 - target``)
    before reducing. Measured, torch 2.13."""
    import torch

    if len(args) > 2 and args[2] == 0:
        return 0
    shape = torch.broadcast_shapes(tuple(args[0].shape), tuple(args[1].shape))
    return _numel(shape) * args[0].element_size()


def _mse_loss_temporary(name: str, args: tuple) -> int:
    """CUDA's ``mse_loss``: the elementwise loss, freed once reduced (seen on an H200)."""
    if name != "mse_loss":
        return 0
    size = _loss_temporary(args)
    return -(-size // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


# CPU losses whose reduced (0-dim) result keeps the storage of the unreduced elementwise loss
# (measured, torch 2.13: ``F.mse_loss(a, b).untyped_storage().nbytes() == a.nbytes``); it is
# held as long as the loss is, through backward. ``huber_loss`` and ``l1_loss`` do not.
# Name -> position of the ``reduction`` argument.
_HELD_LOSSES = {"mse_loss": 2, "smooth_l1_loss": 2, "binary_cross_entropy": 3,
                "soft_margin_loss": 2}


def _held_loss(func: Any, args: tuple, kwargs: Any, out: Any) -> Any:
    """``out`` as a 0-dim view of a storage of the elementwise loss's size, as the CPU kernel
    returns it (``out`` itself when the loss is not reduced or the shapes are unexpected)."""
    import torch

    full = _all_args(func, args, kwargs)
    name = func.overloadpacket.__name__
    at = _HELD_LOSSES[name]
    reduction = full[at] if len(full) > at else 1
    if not _is_tensor(out) or out.dim() != 0 or reduction == 0:
        return out
    try:
        shape = torch.broadcast_shapes(tuple(full[0].shape), tuple(full[1].shape))
    except (RuntimeError, AttributeError, IndexError):
        return out
    storage = torch.empty(_numel(shape), dtype=out.dtype, device=out.device)
    return storage.as_strided((), ())


@CPU_RULES.register("mse_loss", "smooth_l1_loss", "huber_loss")
def _elementwise_loss(name: str, args: tuple, out: Any) -> int:
    return _loss_temporary(args)


@CPU_RULES.register("binary_cross_entropy_with_logits")
def _bce_with_logits(name: str, args: tuple, out: Any) -> int:
    return 2 * _loss_temporary(args[:2] + args[4:5])


@CUDA_RULES.register("mse_loss")
def _cuda_mse_loss(name: str, args: tuple, out: Any) -> int:
    return _mse_loss_temporary(name, args)
