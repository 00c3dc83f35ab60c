"""The fused attention kernels (``_native_multi_head_attention``,
``_transformer_encoder_layer_fwd``): their intermediates, held inside one kernel
(docs/memory-model.md, "Fused attention")."""
from __future__ import annotations

from typing import Any

from .registry import CPU_RULES, CUDA_RULES


def _attention_peak(x: Any, heads: int, mask: Any, need_weights: bool = False,
                    average: bool = True) -> tuple:
    """Peak of native_multi_head_attention_cpu above what was alive before it, and the bytes it
    leaves (see the rules above): (peak, left)."""
    b = x.element_size()
    n, t = int(x.shape[0]), int(x.shape[1])
    xb = x.numel() * b
    scores = n * heads * t * t * b
    if mask is not None:
        copy = mask.numel() if mask.dtype != _bool_dtype() else 0
        softmax = 3 * xb + 2 * scores + copy
    else:
        softmax = 3 * xb + scores
    kept = scores if need_weights else 0
    peak = max(6 * xb, softmax, 5 * xb + kept)
    if need_weights and average:
        weights = n * t * t * b
        peak = max(peak, 4 * xb + scores + weights)
        return peak, xb + weights
    return peak, xb + kept


def _bool_dtype() -> Any:
    import torch

    return torch.bool


def _attention_workspace(name: str, args: tuple) -> int:
    """Bytes the fused CPU attention kernels hold above what is alive after they return."""
    if name == "_native_multi_head_attention":
        query, key, value, _embed, heads = args[:5]
        mask, need_weights, average = args[9], bool(args[10]), bool(args[11])
        if not (query is key is value) or query.dim() != 3 or query.is_nested:
            return 0
        peak, left = _attention_peak(query, int(heads), mask, need_weights, average)
        return peak - left
    # _transformer_encoder_layer_fwd
    src, heads, norm_first, mask = args[0], int(args[2]), bool(args[8]), args[18]
    if src.dim() != 3 or src.is_nested:
        return 0
    b = src.element_size()
    xb = src.numel() * b
    n, t = int(src.shape[0]), int(src.shape[1])
    rstd = n * t * 4
    hidden = n * t * int(args[14].shape[0]) * b
    attn, _left = _attention_peak(src, heads, mask)
    if norm_first:
        peak = max(xb + 2 * rstd, xb + attn, 2 * xb + 2 * rstd, 3 * xb + hidden)
    else:
        peak = max(attn, 2 * xb + 2 * rstd, 2 * xb + hidden, 3 * xb + 2 * rstd)
    return peak - xb


@CPU_RULES.register("_native_multi_head_attention", "_transformer_encoder_layer_fwd")
@CUDA_RULES.register("_native_multi_head_attention", "_transformer_encoder_layer_fwd")
def _fused_attention(name: str, args: tuple, out: Any) -> int:
    """CPU and CUDA run the same C++ for these ops but the attention core (CUDA's SDPA kernels
    do not multiply out the scores), so on CUDA the rule errs high by at most the scores
    (docs/memory-model.md, "Fused attention")."""
    return _attention_workspace(name, args)
