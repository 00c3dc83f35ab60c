"""Exceptions with one-line messages for user mistakes (never shown with a traceback)."""
from __future__ import annotations

from typing import Any, Optional


class UsageError(ValueError):
    """A bad argument, marker option or input given by the user.

    The message is one line: what was given and what is expected. The pytest plugin prefixes
    it with the marker name (``@pytest.mark.memory_under: ...``).

    >>> str(UsageError("limit: expected a size such as '2 GiB', got 'x'"))
    "limit: expected a size such as '2 GiB', got 'x'"
    """


class ModelError(RuntimeError):
    """The user's model raised while a check ran it; ``module`` names where, when known."""

    def __init__(self, message: str, module: str = "", original: Optional[BaseException] = None):
        super().__init__(message)
        self.module = module
        self.original = original


def first_line(value: Any, *, or_type: bool = False, limit: Optional[int] = None,
               skip: tuple = ()) -> str:
    """The first non-empty line of an exception's message (or of a text), stripped, for
    one-line reports of an error raised by the user's code. ``""`` when there is none, or the
    exception's type name with ``or_type=True``; lines starting with one of ``skip`` are passed
    over; ``limit`` cuts the line to that many characters.

    >>> first_line(RuntimeError("shape mismatch\\nat frame 3"))
    'shape mismatch'
    >>> first_line(KeyError(), or_type=True), first_line("\\n  second\\n", limit=3)
    ('KeyError', 'sec')
    """
    text = ""
    for line in str(value).splitlines():
        line = line.strip()
        if line and not line.startswith(skip or ("\0",)):
            text = line
            break
    if not text and or_type and isinstance(value, BaseException):
        text = type(value).__name__
    return text[:limit] if limit is not None else text


def describe_error(exc: BaseException) -> str:
    """``"TypeName: first line"`` of an exception, for a one-line report.

    >>> describe_error(ValueError("bad value\\nmore"))
    'ValueError: bad value'
    """
    return f"{type(exc).__name__}: {first_line(exc)}"


class InconclusiveTimingWarning(UserWarning):
    """A timed check or baseline comparison could not tell: the measurement was too noisy (a
    loaded machine), so it passed without a verdict. ``--modelcheck-strict-timing`` fails
    such a throughput check instead.

    >>> issubclass(InconclusiveTimingWarning, UserWarning)
    True
    """
