"""How checks name things in their messages: the module that owns a parameter or buffer
(``Linear 'head'``), name patterns given by the user, and the "and N more" of a list.

This module imports neither torch nor pytest.
"""
from __future__ import annotations

import fnmatch
from typing import Any

from ..core.errors import UsageError


def module_kind(model: Any, path: str) -> str:
    """``"<class> '<path>'"`` of the submodule at ``path`` (``''``: the model itself, named
    ``<root>``); the bare path when the model has no such submodule.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> module_kind(m, "0"), module_kind(m, ""), module_kind(m, "missing")
    ("Linear '0'", "Sequential '<root>'", 'missing')
    """
    try:
        mod = model.get_submodule(path) if path else model
    except AttributeError:
        return path
    return f"{type(mod).__name__} '{path or '<root>'}'"


def owner(model: Any, name: str) -> str:
    """:func:`module_kind` of the module that holds the parameter or buffer called ``name``.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> owner(m, "0.weight")
    "Linear '0'"
    """
    return module_kind(model, name.rsplit(".", 1)[0] if "." in name else "")


def and_more(items: Any) -> str:
    """``" and N more"`` after the first of ``items`` (empty for one item or none).

    >>> and_more(["a", "b", "c"]), and_more(["a"])
    (' and 2 more', '')
    """
    return f" and {len(items) - 1} more" if len(items) > 1 else ""


def fmt(x: float) -> str:
    """A number in messages: three significant digits.

    >>> fmt(0.000123456), fmt(1234567.0)
    ('0.000123', '1.23e+06')
    """
    return f"{x:.3g}"


def name_patterns(arg: str, value: Any, example: str) -> tuple:
    """The names or glob patterns given as ``arg`` (one string or a list), as a tuple; a
    :class:`UsageError` otherwise.

    >>> name_patterns("frozen", "encoder.*", "['encoder.*']")
    ('encoder.*',)
    """
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(p, str) for p in value):
        raise UsageError(f"{arg}={value!r}: expected a list of names or glob patterns such as"
                         f" {example}")
    return tuple(value)


def matches(name: str, patterns: tuple) -> bool:
    """Whether ``name`` matches one of the glob ``patterns`` (case-sensitive).

    >>> matches("encoder.0.weight", ("encoder.*",)), matches("head.bias", ())
    (True, False)
    """
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
