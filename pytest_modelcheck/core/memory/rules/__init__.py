"""Kernel-workspace rules, one module per kernel family, each registered per aten op in
``CPU_RULES`` / ``CUDA_RULES`` (see ``registry``; derivations in docs/memory-model.md).

>>> sorted(CPU_RULES.rules)[:3]
['_fft_c2c', '_fft_c2r', '_fft_r2c']
"""
from __future__ import annotations

from . import attention, convolution, fft, loss, normalization, rnn  # noqa: F401 - they register
from .registry import CPU_RULES, CUDA_RULES, RuleRegistry

__all__ = ["CPU_RULES", "CUDA_RULES", "RuleRegistry"]
