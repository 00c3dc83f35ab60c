"""pocketfft's copies of its input (docs/memory-model.md, "FFT")."""
from __future__ import annotations

from typing import Any

from .registry import CPU_RULES


def _fft_workspace(name: str, args: tuple) -> int:
    inp, dim = args[0], args[1]
    size = inp.numel() * inp.element_size()
    if name == "_fft_c2r":
        return size * (2 if len(dim) > 1 else 1)
    return 0 if inp.is_contiguous() else size


@CPU_RULES.register("_fft_r2c", "_fft_c2r", "_fft_c2c")
def _fft(name: str, args: tuple, out: Any) -> int:
    return _fft_workspace(name, args)
