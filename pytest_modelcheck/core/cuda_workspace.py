"""How much cuDNN convolution workspace can come on top of a CUDA memory estimate.

A CUDA estimate runs the step on fake tensors and rounds every allocation to the caching
allocator's 512-byte blocks; on models without convolutions it matched the allocator's peak
exactly on an H200 (``tests/gpu``). Convolutions are different: with
``torch.backends.cudnn.benchmark = False`` cuDNN's heuristics pick an engine per shape, and the
engine's workspace comes from the caching allocator. ``benchmarks/cuda_workspace_probe.py``
measured it for 420 convolution shapes (1D/2D/3D, transposed, 1-64 channels, stride 1 and 2,
batch 1 and 16; H200, cuDNN 9.19, torch 2.11): the forward took either nothing or copies of its
operands in another layout (input + weight, input + output, or input + output + weight); the
backward either nothing or 1.0-1.4x input + grad_output + weight, 2.3x at most. Which of those a
shape gets is the heuristic's choice and follows no shape rule.

Where the GPU is present, the estimate measures each kernel's workspace instead
(:mod:`.cuda_probe`). Elsewhere the estimate itself leaves cuDNN workspaces out, and
:func:`cudnn_workspace_bound` gives
what each convolution could add at most: input + output + weight in the forward, 2.5x input +
grad_output + weight in the backward. ``MemoryReport.peak_upper_bytes`` is the estimate with
that bound added at every convolution, so a CUDA step's real peak lies between
``peak_bytes`` and ``peak_upper_bytes``. Rules for other devices live in ``core/memory.py``.
"""
from __future__ import annotations

from typing import Any

CUDA_BLOCK_BYTES = 512  # the caching allocator's rounding for small and large blocks alike
BACKWARD_FACTOR = 2.5  # largest backward workspace seen: 2.31x the operands


def _rounded(t: Any) -> int:
    if t is None or not hasattr(t, "numel"):
        return 0
    size = int(t.numel()) * int(t.element_size())
    return -(-size // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


def cudnn_workspace_bound(func: Any, args: tuple, out: Any) -> int:
    """Bytes a cuDNN convolution could hold as workspace during ``func``, above what is alive
    once it returns (0 for other ops).

    ``args`` are the op's arguments in schema order. A 3x3 convolution of a 16x32x64x64
    float input to 64 channels at stride 2: input 8 MiB, output 4 MiB, weight 72 KiB.

    >>> import torch
    >>> x, w = torch.empty(16, 32, 64, 64, device="meta"), torch.empty(64, 32, 3, 3, device="meta")
    >>> y = torch.empty(16, 64, 32, 32, device="meta")
    >>> conv = torch.ops.aten.convolution.default
    >>> cudnn_workspace_bound(conv, (x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1), y)
    12656640
    >>> cudnn_workspace_bound(torch.ops.aten.mm.default, (x, w), y)
    0
    """
    name = func.overloadpacket.__name__
    if name == "convolution":
        inp, weight = args[0], args[1]
        return _rounded(inp) + _rounded(out) + _rounded(weight)
    if name == "convolution_backward":
        grad_out, inp, weight = args[0], args[1], args[2]
        return int(BACKWARD_FACTOR * (_rounded(inp) + _rounded(grad_out) + _rounded(weight)))
    return 0
