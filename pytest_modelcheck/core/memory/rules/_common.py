"""Small arithmetic shared by the workspace rules, and the op's full argument list."""
from __future__ import annotations

from typing import Any


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _pad8(c: int) -> int:
    return _cdiv(c, 8) * 8


_CONV_BLOCK = 16  # the channel block of oneDNN's AVX-512 kernels


def _pad16(c: int) -> int:
    return -(-int(c) // _CONV_BLOCK) * _CONV_BLOCK


_SCRATCHPAD_PAD = 128  # oneDNN pads each scratchpad entry by its alignment (at least 128)
_PAGE = 4096


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


def _all_args(func: Any, args: tuple, kwargs: Any) -> tuple:
    """The op's arguments in schema order, keyword and default ones included."""
    full = list(args)
    for arg in func._schema.arguments[len(args):]:
        if kwargs and arg.name in kwargs:
            full.append(kwargs[arg.name])
        elif arg.has_default_value():
            full.append(arg.default_value)
        else:
            full.append(None)
    return tuple(full)
