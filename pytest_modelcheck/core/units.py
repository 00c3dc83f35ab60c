"""Parsing and formatting of human-friendly quantities.

Thresholds in marker arguments and configuration are easier to read as
``"2 GiB"``, ``"1.5k samples/s"``, ``"25M"`` or ``"30s"`` than as raw numbers.
This module turns such strings into plain numbers and back again.

Every parser accepts a plain number as well as a string, and raises
:class:`UnitError` (a :class:`ValueError`) with a one-line message naming the
value it was given and the form it expects.  The module depends only on the
standard library; in particular it never imports ``torch`` or ``pytest``.

Conventions
-----------
Sizes (:func:`parse_bytes`)
    ``kB``/``KB``, ``MB``, ``GB``, ``TB``, ``PB``, ``EB`` are decimal (powers
    of 1000); ``KiB``, ``MiB``, ``GiB``, ``TiB``, ``PiB``, ``EiB`` are binary
    (powers of 1024).  Units are case-insensitive (``"512 mb"`` is 512 MB,
    ``"2 gib"`` is 2 GiB) with one exception: a lower-case ``b`` after a
    prefix containing an upper-case letter (``"Gb"``, ``"Mb"``, ``"Kb"``,
    ``"Gib"``) is the conventional spelling of *bits*, and bits are not
    supported, so those spellings are rejected with a hint to write ``GB`` or
    ``GiB``.  ``bit``/``bits`` and ``kbit`` style units are rejected as well.
Rates (:func:`parse_rate`)
    Samples per second.  The SI suffix is case-sensitive apart from
    thousands: ``k``/``K`` (1e3), ``M`` (1e6), ``G`` (1e9); a lower-case ``m``
    or ``g`` is rejected rather than guessed.
Counts (:func:`parse_count`)
    Parameter and FLOP counts.  Suffixes ``k`` (1e3), ``M`` (1e6), ``G`` or
    ``B`` (1e9, *billion* -- as in "a 7B model", never bytes), ``T`` (1e12),
    case-insensitive because a count cannot be fractional, so ``m`` can only
    mean million.
Durations (:func:`parse_duration`)
    Seconds; units ``ns``, ``us``/``µs``, ``ms``, ``s``, ``min`` (or ``m``),
    ``h``, ``d`` and their spelled-out forms.  A single number-unit pair only
    (no ``"1h30m"``).

Fractional byte and count results are rounded to the nearest integer.
"""

from __future__ import annotations

import decimal
import math
import numbers
import re
from typing import Any, Sequence
from .errors import UsageError

__all__ = [
    "UnitError",
    "parse_bytes",
    "format_bytes",
    "parse_rate",
    "format_rate",
    "parse_count",
    "format_count",
    "parse_duration",
    "format_duration",
]


class UnitError(UsageError):
    """A quantity could not be parsed (or formatted).

    The message is a single line naming what was given and what is expected:

    >>> parse_bytes("two gigs")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.units.UnitError: expected a size such as '512 MB', '2 GiB' or a number of bytes, got 'two gigs'
    """


# ---------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------

_BYTES_EXPECTED = "a size such as '512 MB', '2 GiB' or a number of bytes"
_RATE_EXPECTED = "a rate such as '500 samples/s' or '1.5k samples/s'"
_COUNT_EXPECTED = "a count such as 25000, '25k', '1.5M' or '7B'"
_DURATION_EXPECTED = "a duration such as '30s', '2 min', '500ms' or a number of seconds"

_MAX_SHOWN = 60

# A plain decimal number, optionally signed, optionally in scientific notation.
# ASCII digits only, so that anything matching is valid for float() and
# decimal.Decimal() alike.
_NUMBER_RE = re.compile(
    r"\s*(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*(?P<rest>.*?)\s*",
    re.ASCII | re.DOTALL,
)


def _show(value: object) -> str:
    """``repr`` of ``value`` on one line, shortened if long."""
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    # repr() of a str escapes newlines; other objects might not.
    return " ".join(text.splitlines())


def _error(expected: str, value: object, hint: str | None = None) -> UnitError:
    message = f"expected {expected}, got {_show(value)}"
    if hint:
        message += f" ({hint})"
    return UnitError(message)


def is_int(value: Any) -> bool:
    """A Python int that is not a bool (argument validation).

    >>> is_int(3), is_int(True), is_int(3.0)
    (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A Python int or float that is not a bool (argument validation).

    >>> is_number(2.5), is_number(False), is_number("2")
    (True, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def dtype_name(dtype: Any) -> str:
    """A torch dtype's name without the ``torch.`` prefix (``float32``, ``bfloat16``).

    >>> import torch
    >>> dtype_name(torch.float32), dtype_name(torch.complex64)
    ('float32', 'complex64')
    """
    return str(dtype).replace("torch.", "")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _split(value: str, expected: str) -> tuple[str, str]:
    """Split ``value`` into its leading number and the unit text after it."""
    match = _NUMBER_RE.fullmatch(value)
    if match is None:
        raise _error(expected, value)
    return match.group("num"), match.group("rest")


def _decimal(num: str, expected: str, value: object) -> decimal.Decimal:
    try:
        result = decimal.Decimal(num)
    except (decimal.InvalidOperation, ValueError):
        raise _error(expected, value, "number out of range") from None
    # Refuse absurd magnitudes before doing arithmetic with them; values too
    # small to matter are zero.
    if result and result.adjusted() > 60:
        raise _error(expected, value, "number out of range")
    if result and result.adjusted() < -60:
        return decimal.Decimal(0)
    return result


def _to_int(amount: decimal.Decimal) -> int:
    return int(amount.to_integral_value(rounding=decimal.ROUND_HALF_EVEN))


def _scale_exact(num: str, factor: int | decimal.Decimal, expected: str, value: object) -> int:
    with decimal.localcontext() as ctx:
        ctx.prec = 100
        return _to_int(_decimal(num, expected, value) * factor)


def _format_scaled(
    magnitude: float | int,
    scales: Sequence[tuple[float | int, str]],
) -> tuple[str, int]:
    """Pick a scale for ``magnitude`` (> 0) and format it with 2 decimals.

    ``scales`` is a list of ``(factor, label)`` in ascending order of factor.
    Returns the number text and the index of the chosen scale.  When rounding
    to two decimals reaches the next scale (``1023.999 KiB``), the next scale
    is used instead (``1.00 MiB``).
    """
    index = 0
    for i, (factor, _label) in enumerate(scales):
        if magnitude >= factor:
            index = i
    try:
        text = f"{magnitude / scales[index][0]:.2f}"
        if index + 1 < len(scales) and float(text) * scales[index][0] >= scales[index + 1][0]:
            index += 1
            text = f"{magnitude / scales[index][0]:.2f}"
    except OverflowError:
        raise UnitError(f"expected a number small enough to format, got {_show(magnitude)}") from None
    return text, index


def _strip_zero_decimals(text: str) -> str:
    return text[:-3] if text.endswith(".00") else text


def _formattable(value: object, what: str) -> float | int:
    if not _is_number(value):
        raise UnitError(f"expected {what}, got {_show(value)}")
    if isinstance(value, numbers.Integral):
        return int(value)
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise UnitError(f"expected {what}, got {_show(value)}")
    return number


# ---------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------

_PREFIXES = "kmgtpe"

_BYTE_UNITS: dict[str, int] = {"": 1, "b": 1, "byte": 1, "bytes": 1}
for _power, _prefix in enumerate(_PREFIXES, start=1):
    _BYTE_UNITS[_prefix + "b"] = 1000**_power
    _BYTE_UNITS[_prefix + "ib"] = 1024**_power
del _power, _prefix

_BINARY_LABELS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
_BINARY_SCALES = [(1024**i, label) for i, label in enumerate(_BINARY_LABELS)]

_BITS_RE = re.compile(r"(?:[kmgtpe]i?)?bits?", re.IGNORECASE)


def _bits_hint(unit: str) -> str | None:
    """A hint if ``unit`` looks like a unit of bits, else ``None``."""
    prefix = unit[:1].upper()
    if prefix == "K":
        suggestion = "'kB' or 'KiB'"
    elif prefix in _PREFIXES.upper():
        suggestion = f"'{prefix}B' or '{prefix}iB'"
    else:
        suggestion = "'B'"
    if _BITS_RE.fullmatch(unit):
        return f"bits are not supported; use {suggestion}"
    # 'Gb', 'Mb', 'Kb', 'Gib': an upper-case prefix with a lower-case b.
    if (
        len(unit) >= 2
        and unit.endswith("b")
        and unit.lower() in _BYTE_UNITS
        and any(c.isupper() for c in unit[:-1])
    ):
        return f"{unit!r} means bits, which are not supported; use {suggestion}"
    return None


def parse_bytes(value: object) -> int:
    """Parse a size in bytes.

    Accepts a non-negative finite number of bytes (``int`` or ``float``;
    ``bool`` is rejected) or a string made of a number and an optional unit:
    decimal ``kB``, ``MB``, ``GB``, ``TB`` (1000-based), binary ``KiB``,
    ``MiB``, ``GiB``, ``TiB`` (1024-based), or ``B``/``byte``/``bytes``.
    ``PB``/``PiB`` and ``EB``/``EiB`` are understood too.  Units are
    case-insensitive and may follow the number with or without a space, but
    ``Gb``/``Mb``-style spellings (an upper-case prefix before a lower-case
    ``b``) denote bits and are rejected.  Fractional byte counts are rounded
    to the nearest integer.

    >>> parse_bytes("512 MB")
    512000000
    >>> parse_bytes("2 GiB")
    2147483648
    >>> parse_bytes("1.5GiB")
    1610612736
    >>> parse_bytes(4096)
    4096
    >>> parse_bytes("2 Gb")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.units.UnitError: expected a size such as '512 MB', '2 GiB' or a number of bytes, got '2 Gb' ('Gb' means bits, which are not supported; use 'GB' or 'GiB')
    """
    if _is_number(value):
        number = value
        if isinstance(number, numbers.Integral):
            if number < 0:
                raise _error(_BYTES_EXPECTED, value, "must not be negative")
            return int(number)
        number = float(number)  # type: ignore[arg-type]
        if not math.isfinite(number):
            raise _error(_BYTES_EXPECTED, value, "must be finite")
        if number < 0:
            raise _error(_BYTES_EXPECTED, value, "must not be negative")
        return int(round(number))
    if not isinstance(value, str):
        raise _error(_BYTES_EXPECTED, value)
    num, unit = _split(value, _BYTES_EXPECTED)
    hint = _bits_hint(unit)
    if hint is not None:
        raise _error(_BYTES_EXPECTED, value, hint)
    factor = _BYTE_UNITS.get(unit.lower())
    if factor is None:
        raise _error(_BYTES_EXPECTED, value, f"unknown unit {_show(unit)}")
    if num.startswith("-") and _decimal(num, _BYTES_EXPECTED, value) != 0:
        raise _error(_BYTES_EXPECTED, value, "must not be negative")
    return _scale_exact(num, factor, _BYTES_EXPECTED, value)


def format_bytes(n: float | int) -> str:
    """Format a number of bytes with binary units.

    Below 1 KiB the count is shown as is; above, two decimals of the largest
    binary unit that fits (``KiB`` up to ``EiB``).  Negative values (for
    example a change in memory use) get a leading minus sign.  The result
    can be read back with :func:`parse_bytes` (for non-negative values).

    >>> format_bytes(512)
    '512 B'
    >>> format_bytes(1536)
    '1.50 KiB'
    >>> format_bytes(3 * 1024**3)
    '3.00 GiB'
    >>> format_bytes(-2048)
    '-2.00 KiB'
    """
    number = _formattable(n, "a finite number of bytes")
    sign = "-" if number < 0 else ""
    magnitude = abs(number)
    if magnitude == 0:
        return "0 B"
    text, index = _format_scaled(magnitude, _BINARY_SCALES)
    if index == 0:
        text = _strip_zero_decimals(text)
    return f"{sign}{text} {_BINARY_SCALES[index][1]}"


# ---------------------------------------------------------------------------
# rates
# ---------------------------------------------------------------------------

_RATE_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}

_RATE_REST_RE = re.compile(
    r"(?P<si>[kKMG]?)\s*"
    r"(?P<noun>(?i:samples?|items?|it)?)\s*"
    r"(?P<per>(?i:/\s*(?:s|sec|secs|second)|per\s+(?:s|sec|second)))?",
    re.ASCII,
)

_RATE_SCALES = [(1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G")]


def parse_rate(value: object) -> float:
    """Parse a throughput in samples per second.

    Accepts a positive finite number or a string: a number, an optional SI
    suffix (``k``/``K`` thousand, ``M`` million, ``G`` billion), then
    optionally ``samples``/``items``/``it`` and ``/s``, ``/sec`` or
    ``per second``.  A noun without a per-time part (``"300 samples"``) is
    rejected because it is not a rate.

    >>> parse_rate("1.5k samples/s")
    1500.0
    >>> parse_rate("300 samples/sec")
    300.0
    >>> parse_rate("50 it/s")
    50.0
    >>> parse_rate("2k/s")
    2000.0
    >>> parse_rate(250)
    250.0
    """
    if _is_number(value):
        rate = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        num, rest = _split(value, _RATE_EXPECTED)
        match = _RATE_REST_RE.fullmatch(rest)
        if match is None:
            hint = None
            if rest[:1] in ("m", "g"):
                hint = f"use {rest[:1].upper()!r} for {'million' if rest[0] == 'm' else 'billion'}"
            raise _error(_RATE_EXPECTED, value, hint)
        if match.group("noun") and not match.group("per"):
            raise _error(_RATE_EXPECTED, value, "add '/s' to make it a rate")
        rate = float(num) * _RATE_SI[match.group("si")]
    else:
        raise _error(_RATE_EXPECTED, value)
    if not math.isfinite(rate):
        raise _error(_RATE_EXPECTED, value, "must be finite")
    if rate <= 0:
        raise _error(_RATE_EXPECTED, value, "must be positive")
    return rate


def format_rate(x: float | int) -> str:
    """Format a rate in samples per second.

    Rates of 1000 and above use ``k``, ``M`` or ``G`` with two decimals;
    smaller rates are shown with two decimals (dropped when they are
    zero), and rates below 1 with three significant digits.  The result can
    be read back with :func:`parse_rate` (for positive values).

    >>> format_rate(1500)
    '1.50k samples/s'
    >>> format_rate(512)
    '512 samples/s'
    >>> format_rate(12.345)
    '12.35 samples/s'
    >>> format_rate(2.5e6)
    '2.50M samples/s'
    """
    number = _formattable(x, "a finite rate")
    sign = "-" if number < 0 else ""
    magnitude = abs(number)
    if magnitude == 0:
        return "0 samples/s"
    if magnitude < 1:
        text = f"{magnitude:.3g}"
        if float(text) < 1:
            return f"{sign}{text} samples/s"
    text, index = _format_scaled(magnitude, _RATE_SCALES)
    suffix = _RATE_SCALES[index][1]
    if not suffix:
        text = _strip_zero_decimals(text)
    return f"{sign}{text}{suffix} samples/s"


# ---------------------------------------------------------------------------
# counts
# ---------------------------------------------------------------------------

_COUNT_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}

_COUNT_REST_RE = re.compile(
    r"(?P<suffix>[kmgbt]?)\s*(?P<noun>params|parameters|flops|macs)?",
    re.ASCII | re.IGNORECASE,
)

_COUNT_SCALES = [(1, ""), (10**3, "k"), (10**6, "M"), (10**9, "G"), (10**12, "T")]


def parse_count(value: object) -> int:
    """Parse a parameter or FLOP count.

    Accepts a non-negative finite number or a string: a number with an
    optional suffix ``k`` (thousand), ``M`` (million), ``G`` or ``B``
    (billion -- ``B`` as in "a 7B model", never bytes), ``T`` (trillion),
    optionally followed by ``params``, ``parameters``, ``FLOPs`` or ``MACs``.
    Suffixes and words are case-insensitive.  Fractional results are
    rounded to the nearest integer.

    >>> parse_count("25k")
    25000
    >>> parse_count("1.5M")
    1500000
    >>> parse_count("7B")
    7000000000
    >>> parse_count("4.1 GFLOPs")
    4100000000
    >>> parse_count(25000)
    25000
    """
    if _is_number(value):
        if isinstance(value, numbers.Integral):
            if value < 0:
                raise _error(_COUNT_EXPECTED, value, "must not be negative")
            return int(value)
        number = float(value)  # type: ignore[arg-type]
        if not math.isfinite(number):
            raise _error(_COUNT_EXPECTED, value, "must be finite")
        if number < 0:
            raise _error(_COUNT_EXPECTED, value, "must not be negative")
        return int(round(number))
    if not isinstance(value, str):
        raise _error(_COUNT_EXPECTED, value)
    num, rest = _split(value, _COUNT_EXPECTED)
    match = _COUNT_REST_RE.fullmatch(rest)
    if match is None:
        raise _error(_COUNT_EXPECTED, value, f"unknown suffix {_show(rest)}")
    if num.startswith("-") and _decimal(num, _COUNT_EXPECTED, value) != 0:
        raise _error(_COUNT_EXPECTED, value, "must not be negative")
    factor = _COUNT_SUFFIXES[match.group("suffix").lower()]
    return _scale_exact(num, factor, _COUNT_EXPECTED, value)


def format_count(n: float | int) -> str:
    """Format a parameter or FLOP count with ``k``, ``M``, ``G`` or ``T``.

    Counts below 1000 are shown as they are; larger ones with two decimals
    and an SI suffix (``G`` for billions, which :func:`parse_count` reads
    back, as it does ``B``).

    >>> format_count(1_500_000)
    '1.50M'
    >>> format_count(999)
    '999'
    >>> format_count(7_000_000_000)
    '7.00G'
    """
    number = _formattable(n, "a finite count")
    sign = "-" if number < 0 else ""
    magnitude = abs(number)
    if magnitude == 0:
        return "0"
    text, index = _format_scaled(magnitude, _COUNT_SCALES)
    suffix = _COUNT_SCALES[index][1]
    if not suffix:
        text = _strip_zero_decimals(text)
    return f"{sign}{text}{suffix}"


# ---------------------------------------------------------------------------
# durations
# ---------------------------------------------------------------------------

# unit -> (multiplier, divisor); sub-second units divide so that "5 us" is the
# float nearest to 5e-6 rather than 5 * 1e-6.
_DURATION_UNITS: dict[str, tuple[float, float]] = {"": (1.0, 1.0)}
for _names, _factor in (
    (("ns", "nsec", "nanosecond", "nanoseconds"), (1.0, 1e9)),
    (("us", "\u00b5s", "\u03bcs", "usec", "microsecond", "microseconds"), (1.0, 1e6)),
    (("ms", "msec", "millisecond", "milliseconds"), (1.0, 1e3)),
    (("s", "sec", "secs", "second", "seconds"), (1.0, 1.0)),
    (("m", "min", "mins", "minute", "minutes"), (60.0, 1.0)),
    (("h", "hr", "hrs", "hour", "hours"), (3600.0, 1.0)),
    (("d", "day", "days"), (86400.0, 1.0)),
):
    for _name in _names:
        _DURATION_UNITS[_name] = _factor
del _names, _name, _factor

_DURATION_SCALES = [
    (1e-9, "ns"),
    (1e-6, "us"),
    (1e-3, "ms"),
    (1.0, "s"),
    (60.0, "min"),
    (3600.0, "h"),
]


def parse_duration(value: object) -> float:
    """Parse a duration in seconds.

    Accepts a non-negative finite number of seconds or a string: a number
    with an optional unit -- ``ns``, ``us``/``µs``, ``ms``, ``s``/``sec``,
    ``m``/``min``, ``h``/``hr``, ``d``/``day`` or the spelled-out words,
    case-insensitive.  A bare number means seconds.

    >>> parse_duration("30s")
    30.0
    >>> parse_duration("2 min")
    120.0
    >>> parse_duration("500ms")
    0.5
    >>> parse_duration("1.5h")
    5400.0
    """
    if _is_number(value):
        seconds = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        num, unit = _split(value, _DURATION_EXPECTED)
        factor = _DURATION_UNITS.get(unit.lower())
        if factor is None:
            raise _error(_DURATION_EXPECTED, value, f"unknown unit {_show(unit)}")
        multiplier, divisor = factor
        seconds = float(num) * multiplier / divisor
    else:
        raise _error(_DURATION_EXPECTED, value)
    if not math.isfinite(seconds):
        raise _error(_DURATION_EXPECTED, value, "must be finite")
    if seconds < 0:
        raise _error(_DURATION_EXPECTED, value, "must not be negative")
    return seconds


def format_duration(seconds: float | int) -> str:
    """Format a duration given in seconds.

    Uses the largest of ``ns``, ``us``, ``ms``, ``s``, ``min`` and ``h`` that
    fits, with two decimals (dropped when they are zero).  The result can be
    read back with :func:`parse_duration` (for non-negative values).

    >>> format_duration(30)
    '30 s'
    >>> format_duration(0.5)
    '500 ms'
    >>> format_duration(5400)
    '1.50 h'
    >>> format_duration(0.0000123)
    '12.30 us'
    """
    number = _formattable(seconds, "a finite number of seconds")
    sign = "-" if number < 0 else ""
    magnitude = abs(number)
    if magnitude == 0:
        return "0 s"
    text, index = _format_scaled(magnitude, _DURATION_SCALES)
    return f"{sign}{_strip_zero_decimals(text)} {_DURATION_SCALES[index][1]}"
