import doctest
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_modelcheck.core import units
from pytest_modelcheck.core.units import (
    UnitError,
    format_bytes,
    format_count,
    format_duration,
    format_rate,
    parse_bytes,
    parse_count,
    parse_duration,
    parse_rate,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4


def assert_one_line_unit_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith("expected ")
    assert " got " in message
    for fragment in fragments:
        assert fragment in message


# --------------------------------------------------------------------------- bytes


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (0, 0),
        (1024, 1024),
        (1536.0, 1536),
        (1.5, 2),  # rounded to nearest, half to even
        (2.5, 2),
        ("1024", 1024),
        ("0", 0),
        ("  42  ", 42),
        ("100 B", 100),
        ("100B", 100),
        ("100 b", 100),  # a lone b (no prefix) is bytes
        ("1 byte", 1),
        ("3 bytes", 3),
        ("512 MB", 512_000_000),  # 512 * 10**6
        ("512MB", 512_000_000),
        ("512 mb", 512_000_000),  # all lower case: bytes
        ("1 kB", 1000),
        ("1 KB", 1000),
        ("1 kb", 1000),
        ("3 GB", 3_000_000_000),
        ("2 TB", 2 * 10**12),
        ("2 GiB", 2 * GiB),  # 2 * 1073741824 = 2147483648
        ("2 gib", 2 * GiB),
        ("2 GIB", 2 * GiB),
        ("1.5GiB", 1_610_612_736),  # 1.5 * 1073741824
        ("1 KiB", 1024),
        ("10 MiB", 10 * MiB),  # 10485760
        ("1 TiB", TiB),
        ("1 PiB", 1024**5),
        ("1 EB", 10**18),
        ("0.3 kB", 300),  # exact decimal arithmetic, not 300.00000000000006
        ("0.5 KiB", 512),
        (".5 KiB", 512),
        ("1e3", 1000),
        ("2.5e3 B", 2500),
        ("+5 MB", 5_000_000),
        ("-0", 0),
    ],
)
def test_parse_bytes_valid(given, expected):
    result = parse_bytes(given)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("two gigs", "got 'two gigs'"),
        ("", "got ''"),
        ("   ", None),
        ("MB", None),
        ("2 GiBs", "unknown unit 'GiBs'"),
        ("2 GBs", "unknown unit"),
        ("512M", "unknown unit 'M'"),  # MB or MiB? refuse to guess
        ("1 ZiB", "unknown unit"),
        ("2 Gb", "use 'GB' or 'GiB'"),  # gigabits
        ("2 Mb", "use 'MB' or 'MiB'"),
        ("2 Kb", "use 'kB' or 'KiB'"),
        ("2 Gib", "use 'GB' or 'GiB'"),  # gibibits
        ("8 bits", "bits are not supported"),
        ("1 Gbit", "bits are not supported"),
        ("-5 MB", "must not be negative"),
        ("-1", "must not be negative"),
        ("nan", None),
        ("inf", None),
        ("1e999999 B", "out of range"),
        ("1,024", None),
        ("1 024", None),
        ("1.2.3 MB", None),
        ("512 MB/s", None),
        ("\uff15 MB", None),  # full-width digit
        (-1, "must not be negative"),
        (-0.5, "must not be negative"),
        (float("nan"), "must be finite"),
        (float("inf"), "must be finite"),
        (True, "got True"),
        (None, "got None"),
        ([512], None),
        (b"512", None),
    ],
)
def test_parse_bytes_invalid(given, fragment):
    with pytest.raises(UnitError) as excinfo:
        parse_bytes(given)
    assert_one_line_unit_error(
        excinfo, "expected a size such as '512 MB', '2 GiB' or a number of bytes", *([fragment] if fragment else [])
    )


def test_unit_error_is_value_error_with_the_documented_message():
    with pytest.raises(ValueError) as excinfo:
        parse_bytes("two gigs")
    assert isinstance(excinfo.value, UnitError)
    assert str(excinfo.value) == (
        "expected a size such as '512 MB', '2 GiB' or a number of bytes, got 'two gigs'"
    )


def test_long_or_multiline_input_is_shown_on_one_short_line():
    with pytest.raises(UnitError) as excinfo:
        parse_bytes("12 MB\n" + "x" * 500)
    message = str(excinfo.value)
    assert "\n" not in message
    assert len(message) < 250  # the given text is shortened


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (512.5, "512.50 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),  # 1536 / 1024 = 1.5
        (1023.999, "1.00 KiB"),  # would round to "1024.00 B"
        (MiB - 1, "1.00 MiB"),  # 1023.999 KiB rounds up to the next unit
        (10 * MiB, "10.00 MiB"),
        (int(2.25 * GiB), "2.25 GiB"),
        (3 * TiB, "3.00 TiB"),
        (1024**6, "1.00 EiB"),
        (1024**7, "1024.00 EiB"),  # largest unit, no further scaling
        (-2048, "-2.00 KiB"),
        (-5, "-5 B"),
    ],
)
def test_format_bytes(given, expected):
    assert format_bytes(given) == expected


@pytest.mark.parametrize("given", [float("nan"), float("inf"), "1 KiB", None, True])
def test_format_bytes_rejects_non_numbers(given):
    with pytest.raises(UnitError):
        format_bytes(given)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**70))
def test_bytes_round_trip_within_formatting_precision(n):
    back = parse_bytes(format_bytes(n))
    if n < 1024:
        assert back == n
    else:
        # two decimals of a unit value >= 1: relative error at most 0.005
        assert abs(back - n) <= 0.005 * n + 1


# --------------------------------------------------------------------------- rates


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (100, 100.0),
        (0.5, 0.5),
        ("100", 100.0),
        ("1.5k samples/s", 1500.0),
        ("1.5K samples/s", 1500.0),
        ("1.5ksamples/s", 1500.0),
        ("2k/s", 2000.0),
        ("2k", 2000.0),
        ("2 k / s", 2000.0),
        ("300 samples/sec", 300.0),
        ("300 Samples/Sec", 300.0),
        ("1 sample/s", 1.0),
        ("1.2M samples/s", 1_200_000.0),
        ("3G samples/s", 3e9),
        ("50 it/s", 50.0),
        ("50 items/s", 50.0),
        ("250/s", 250.0),
        ("250 /s", 250.0),
        ("7 samples per second", 7.0),
        ("7 per s", 7.0),
        ("12 samples/second", 12.0),
        ("1e3 samples/s", 1000.0),
        ("0.001 samples/s", 0.001),
    ],
)
def test_parse_rate_valid(given, expected):
    result = parse_rate(given)
    assert result == pytest.approx(expected, rel=1e-12)
    assert type(result) is float


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("fast", "got 'fast'"),
        ("", None),
        ("0", "must be positive"),
        ("0 samples/s", "must be positive"),
        ("-5 samples/s", "must be positive"),
        ("300 samples", "add '/s'"),  # a count, not a rate
        ("1.5m samples/s", "use 'M' for million"),  # milli or mega? refuse
        ("2 g/s", "use 'G' for billion"),
        ("2 T samples/s", None),
        ("5 s", None),  # a duration, not a rate
        ("5 samples/min", None),
        ("5 samples/s/s", None),
        ("k samples/s", None),
        ("1e400 samples/s", "must be finite"),
        ("nan", None),
        (0, "must be positive"),
        (-1.0, "must be positive"),
        (float("inf"), "must be finite"),
        (float("nan"), "must be finite"),
        (False, "got False"),
        (None, None),
    ],
)
def test_parse_rate_invalid(given, fragment):
    with pytest.raises(UnitError) as excinfo:
        parse_rate(given)
    assert_one_line_unit_error(
        excinfo, "expected a rate such as '500 samples/s' or '1.5k samples/s'", *([fragment] if fragment else [])
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (0, "0 samples/s"),
        (512, "512 samples/s"),
        (512.0, "512 samples/s"),
        (12.345, "12.35 samples/s"),  # %.2f of 12.345 (binary 12.3450000000000006)
        (999.996, "1.00k samples/s"),  # would be "1000.00 samples/s"
        (1000, "1.00k samples/s"),
        (1500, "1.50k samples/s"),  # 1500 / 1000
        (1_200_000, "1.20M samples/s"),
        (3e9, "3.00G samples/s"),
        (2e12, "2000.00G samples/s"),  # G is the largest suffix
        (0.5, "0.5 samples/s"),  # below 1: three significant digits
        (0.0001234, "0.000123 samples/s"),
        (-1500, "-1.50k samples/s"),
    ],
)
def test_format_rate(given, expected):
    assert format_rate(given) == expected


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=1e-9, max_value=1e15, allow_nan=False, allow_infinity=False))
def test_rate_round_trip_within_formatting_precision(x):
    back = parse_rate(format_rate(x))
    # two decimals of a value >= 1, or three significant digits: <= 0.5 %
    assert back == pytest.approx(x, rel=0.005 + 1e-12)


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (0, 0),
        (25000, 25000),
        (2.6, 3),
        ("25000", 25000),
        ("25k", 25_000),
        ("25K", 25_000),
        ("1.5M", 1_500_000),
        ("1.5m", 1_500_000),  # a count cannot be fractional: m is million
        ("4.1G", 4_100_000_000),  # exact: 4.1 * 10**9
        ("7B", 7_000_000_000),  # B is billion ("a 7B model"), not bytes
        ("7b", 7_000_000_000),
        ("3T", 3_000_000_000_000),
        ("0.5k", 500),
        ("1.2345k", 1234),  # 1234.5 rounds half to even
        ("25M params", 25_000_000),
        ("110 M parameters", 110_000_000),
        ("4.1 GFLOPs", 4_100_000_000),
        ("600 MMACs", 600_000_000),
        ("12 flops", 12),
    ],
)
def test_parse_count_valid(given, expected):
    result = parse_count(given)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("lots", "got 'lots'"),
        ("", None),
        ("25 kk", "unknown suffix"),
        ("25 KB", "unknown suffix"),  # a size, not a count
        ("1P", "unknown suffix"),
        ("-3k", "must not be negative"),
        ("1e999 T", "out of range"),
        (-1, "must not be negative"),
        (-0.5, "must not be negative"),
        (float("inf"), "must be finite"),
        (float("nan"), "must be finite"),
        (True, None),
        (None, None),
    ],
)
def test_parse_count_invalid(given, fragment):
    with pytest.raises(UnitError) as excinfo:
        parse_count(given)
    assert_one_line_unit_error(
        excinfo, "expected a count such as 25000, '25k', '1.5M' or '7B'", *([fragment] if fragment else [])
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1.00k"),
        (25_000, "25.00k"),
        (1_500_000, "1.50M"),
        (999_999, "1.00M"),  # 999.999k would round to "1000.00k"
        (7_000_000_000, "7.00G"),
        (3 * 10**12, "3.00T"),
        (-1500, "-1.50k"),
    ],
)
def test_format_count(given, expected):
    assert format_count(given) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**15))
def test_count_round_trip_within_formatting_precision(n):
    back = parse_count(format_count(n))
    assert abs(back - n) <= 0.005 * n + 1


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (0, 0.0),
        (1.5, 1.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("30 sec", 30.0),
        ("30 seconds", 30.0),
        ("2 min", 120.0),
        ("2m", 120.0),
        ("2 minutes", 120.0),
        ("500ms", 0.5),
        ("500 MS", 0.5),
        ("1.5h", 5400.0),  # 1.5 * 3600
        ("2 hours", 7200.0),
        ("1 d", 86400.0),
        ("5 us", 5e-6),
        ("5 \u00b5s", 5e-6),  # micro sign
        ("5 \u03bcs", 5e-6),  # greek mu
        ("250 ns", 250e-9),
    ],
)
def test_parse_duration_valid(given, expected):
    result = parse_duration(given)
    assert result == expected
    assert type(result) is float


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("soon", "got 'soon'"),
        ("", None),
        ("1 fortnight", "unknown unit 'fortnight'"),
        ("1h30m", "unknown unit"),  # compound durations are not supported
        ("-1s", "must not be negative"),
        ("1e400 s", "must be finite"),
        (-1, "must not be negative"),
        (float("inf"), "must be finite"),
        (float("nan"), "must be finite"),
        (True, None),
        (None, None),
    ],
)
def test_parse_duration_invalid(given, fragment):
    with pytest.raises(UnitError) as excinfo:
        parse_duration(given)
    assert_one_line_unit_error(excinfo, "expected a duration such as '30s'", *([fragment] if fragment else []))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (0, "0 s"),
        (30, "30 s"),
        (1.25, "1.25 s"),
        (0.5, "500 ms"),
        (0.0123, "12.30 ms"),
        (0.0000123, "12.30 us"),
        (2.5e-8, "25 ns"),
        (59.999, "1 min"),  # "60.00 s" moves up a unit
        (120, "2 min"),
        (5400, "1.50 h"),
        (-0.5, "-500 ms"),
    ],
)
def test_format_duration(given, expected):
    assert format_duration(given) == expected


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-9, max_value=1e7, allow_nan=False, allow_infinity=False))
def test_duration_round_trip_within_formatting_precision(x):
    assert parse_duration(format_duration(x)) == pytest.approx(x, rel=0.005 + 1e-12)


# --------------------------------------------------------------------------- arbitrary input

PARSERS = [parse_bytes, parse_rate, parse_count, parse_duration]

# Text that looks like a quantity some of the time, to get past the number.
quantity_like = st.builds(
    lambda sign, number, space, unit: f"{sign}{number}{space}{unit}",
    st.sampled_from(["", "-", "+"]),
    st.one_of(
        st.integers(min_value=0, max_value=10**30).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.from_regex(r"[0-9]{0,4}\.?[0-9]{0,4}([eE][+-]?[0-9]{1,25})?", fullmatch=True),
    ),
    st.sampled_from(["", " ", "  ", "\t", "\n"]),
    st.one_of(
        st.sampled_from(
            ["B", "Gb", "GiB", "kb", "k", "M", "m", "G", "B", "T", "samples/s", "k/s", "it/s", "s", "ms", "min", "h"]
        ),
        st.text(max_size=12),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PARSERS), st.one_of(st.text(), quantity_like))
def test_arbitrary_text_parses_or_raises_a_one_line_unit_error(parse, text):
    try:
        result = parse(text)
    except UnitError as error:
        message = str(error)
        assert message.startswith("expected ")
        assert "\n" not in message and "\r" not in message
    else:
        assert isinstance(result, (int, float))
        assert not isinstance(result, bool)
        assert math.isfinite(result)
        assert result >= 0


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(PARSERS),
    st.one_of(
        st.none(),
        st.booleans(),
        st.binary(max_size=8),
        st.lists(st.integers(), max_size=2),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(10**20), max_value=10**20),
    ),
)
def test_arbitrary_values_parse_or_raise_unit_error(parse, value):
    try:
        parse(value)
    except UnitError as error:
        assert "\n" not in str(error)


# --------------------------------------------------------------------------- module hygiene


def test_doctests(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' mkdtemp()
    result = doctest.testmod(units, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_importing_units_does_not_import_torch_or_pytest():
    code = (
        "import sys\n"
        "import pytest_modelcheck.core.units\n"
        "bad = [name for name in ('torch', 'pytest') if name in sys.modules]\n"
        "assert not bad, bad\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
