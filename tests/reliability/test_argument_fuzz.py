"""Marker arguments never crash: arbitrary values bind or raise a one-line ``UsageError``.

For every registered check, Hypothesis draws arbitrary keyword arguments for its user
parameters (and for the ``loss``/``device`` context a marker may set): strings, numbers
including NaN, infinities and negatives, None, booleans, lists, tuples, dicts, callables of the
wrong arity. ``spec.bind((), kwargs)`` must either succeed or raise ``UsageError`` whose message
is one line; a ``TypeError``/``AttributeError``/... out of a ``validate`` function is a bug.
The unit parsers get the round-trip property that ``tests/core/test_units.py`` does not state:
formatting is a fixed point (format(parse(format(x))) == format(x)) and zero round-trips exactly.
A pytester run shows that a bad marker argument fails at setup naming the marker, without a
traceback.
"""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_modelcheck.checks import all_checks
from pytest_modelcheck.core.errors import UsageError
from pytest_modelcheck.core.units import (
    format_bytes,
    format_count,
    format_duration,
    format_rate,
    parse_bytes,
    parse_count,
    parse_duration,
    parse_rate,
)

# strings a check's validate looks for, so that some draws get past the first test
WORDS = ["2 GiB", "1M", "500 samples/s", "10 s", "cosine", "linear", "step", "bf16", "fp16",
         "train", "inference", "eval", "adam", "sgd", "B", "C", "cpu", "cuda", "meta", "mse",
         "cross_entropy", "range", "*", "head.*", "", " ", "nan", "-1", "1e400", "\n"]


def _wrong_arity(a, b, c):  # a callable that fits no parameter
    return a


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.sampled_from([0, 1, -1, 2**63, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-300, 1e300]),
    st.text(max_size=12),
    st.sampled_from(WORDS),
    st.binary(max_size=4),
    st.sampled_from([len, _wrong_arity, lambda: None, object(), object, int, Ellipsis, 1j]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.tuples(inner),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-3, 3), st.sampled_from(WORDS)),
                        inner, max_size=3),
        st.frozensets(st.integers(-3, 3), max_size=3),
    ),
    max_leaves=8,
)

CHECKS = sorted(all_checks().items())


def _kwargs_for(spec):
    """Every required argument present (so that ``validate`` runs), any optional one maybe."""
    optional = [p.name for p in spec.user_params if p.name not in spec.required]
    return st.fixed_dictionaries({n: values for n in spec.required},
                                 optional={n: values for n in optional + ["loss", "device"]})


def _one_line(message):
    return message.strip() != "" and "\n" not in message and "\r" not in message


@pytest.mark.parametrize("name, fn", CHECKS, ids=[n for n, _ in CHECKS])
def test_arbitrary_marker_arguments_bind_or_raise_a_one_line_usage_error(name, fn):
    spec = fn

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(kwargs=_kwargs_for(spec))
    def fuzz(kwargs):
        try:
            bound = spec.bind((), kwargs)
        except UsageError as exc:
            assert _one_line(str(exc)), f"{name}({kwargs!r}): multi-line message {str(exc)!r}"
        except Exception as exc:  # noqa: BLE001 - the property under test
            raise AssertionError(f"{name}(**{kwargs!r}) raised {type(exc).__name__}: {exc}") from exc
        else:
            assert isinstance(bound, dict)

    fuzz()


@pytest.mark.parametrize("name, fn", CHECKS, ids=[n for n, _ in CHECKS])
def test_positional_overflow_and_unknown_names_are_usage_errors(name, fn):
    spec = fn
    with pytest.raises(UsageError) as info:
        spec.bind((), {"no_such_argument_xyz": 1})
    assert _one_line(str(info.value))
    if not spec.required:  # otherwise the missing required argument is named first
        assert "no_such_argument_xyz" in str(info.value)
    with pytest.raises(UsageError) as info:
        spec.bind(tuple(range(len(spec.user_params) + 3)), {})
    assert _one_line(str(info.value))


# ---------------------------------------------------- values that used to get through (issue 11)

def _absent_device_index():
    """An accelerator index this machine does not have (5 on a machine with fewer devices)."""
    import torch

    return max(5, torch.cuda.device_count() + 5)


@pytest.mark.parametrize("name, args, kwargs, message", [
    ("model_overfits", (), {"steps": 10**12},
     "steps=1000000000000: expected at most 1000000 steps"),
    ("grad_norms_stable", (), {"steps": 10**400}, "expected at most 1000000 steps"),
    ("params_learn", (), {"steps": 10**7}, "steps=10000000: expected an int >= 1 (at most 1000000)"),
    ("model_overfits", (), {"seed": 2**70},
     "seed=1180591620717411303424: expected an integer from 0 to 2**63 - 1"),
    ("model_overfits", (), {"seed": -1}, "seed=-1: expected an integer from 0 to 2**63 - 1"),
    ("grads_finite", (), {"device": "absent index"}, "device={index}: "),
    ("memory_under", (10**400,), {}, "got a number too large to be a memory size"),
    ("flops_under", (10**400,), {}, "got a number too large to print"),
    ("params_under", ("1.5",), {},
     "limit='1.5': expected a whole count such as '25M' (parameters), not a fraction"),
    ("params_under", (1.5,), {}, "limit=1.5: expected a whole count"),
    ("flops_under", ("2.0005k",), {}, "limit='2.0005k': expected a whole count"),
    ("shapes_consistent", (), {"batch_sizes": 3},
     "batch_sizes=3: expected a tuple of positive ints such as (1, 2, 3); for the one batch size"
     " 3 write (3,)"),
], ids=["steps", "steps_huge", "params_learn_steps", "seed_huge", "seed_negative", "device",
        "memory_huge", "flops_huge", "params_fraction", "params_float", "flops_fraction",
        "batch_sizes_int"])
def test_values_that_used_to_get_through_are_usage_errors_at_bind(name, args, kwargs, message):
    if kwargs.get("device") == "absent index":
        kwargs = {"device": _absent_device_index()}
        message = message.format(index=kwargs["device"])
    with pytest.raises(UsageError) as info:
        all_checks()[name].bind(args, kwargs)
    assert message in str(info.value) and _one_line(str(info.value)), str(info.value)


@pytest.mark.parametrize("name, args, kwargs, key, expected", [
    ("model_overfits", (), {"steps": 10**6, "seed": 2**63 - 1}, "seed", 2**63 - 1),
    ("model_overfits", (), {"steps": 200.0}, "steps", 200),
    ("params_under", ("1.5M",), {}, "limit", 1_500_000),
    ("params_under", (2.0,), {}, "limit", 2),
    ("flops_under", ("4.1 GFLOPs",), {}, "limit", 4_100_000_000),
    ("memory_under", (10**30,), {}, "limit", 10**30),
    ("shapes_consistent", (), {"batch_sizes": (3,)}, "batch_sizes", (3,)),
    ("grads_finite", (), {"device": "cuda:7"}, "device", "cuda:7"),
], ids=["limits", "float_steps", "params_suffix", "params_float_whole", "flops", "memory_large",
        "one_batch_size", "cuda_string"])
def test_the_nearby_good_values_still_bind(name, args, kwargs, key, expected):
    import torch

    if kwargs.get("device") == "cuda:7" and torch.cuda.device_count() > 0:
        pytest.skip("cuda:7 is refused on a machine with CUDA but fewer devices")
    assert all_checks()[name].bind(args, kwargs)[key] == expected


def test_an_empty_check_selection_is_a_usage_error():
    import torch

    from pytest_modelcheck import check_model
    from pytest_modelcheck.api import plan_checks

    with pytest.raises(UsageError, match=r"^checks=\[\]: an empty selection runs nothing"):
        plan_checks([])
    with pytest.raises(UsageError, match="an empty selection"):
        check_model(torch.nn.Linear(2, 2), torch.ones(2, 2), checks=())
    # a per-check dict selects that check: not empty
    assert [s.name for s, _ in plan_checks([], params_under={"limit": "1M"})] == ["params_under"]


# --------------------------------------------------------------------------- units

UNITS = [
    ("bytes", parse_bytes, format_bytes, st.integers(min_value=0, max_value=2**70)),
    ("count", parse_count, format_count, st.integers(min_value=0, max_value=10**15)),
    ("rate", parse_rate, format_rate,
     st.floats(min_value=1e-9, max_value=1e15, allow_nan=False, allow_infinity=False)),
    ("duration", parse_duration, format_duration,
     st.floats(min_value=1e-9, max_value=1e7, allow_nan=False, allow_infinity=False)),
]


@pytest.mark.parametrize("what, parse, fmt, numbers", UNITS, ids=[u[0] for u in UNITS])
def test_formatting_is_a_fixed_point_of_parse(what, parse, fmt, numbers):
    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(numbers)
    def prop(x):
        text = fmt(x)
        assert fmt(parse(text)) == text, (x, text, parse(text))

    prop()


@pytest.mark.parametrize("what, parse, fmt, numbers", [u for u in UNITS if u[0] != "rate"],
                         ids=["bytes", "count", "duration"])
def test_zero_round_trips_exactly(what, parse, fmt, numbers):
    assert parse(fmt(0)) == 0


def test_a_zero_rate_formats_but_is_refused_as_a_limit():
    from pytest_modelcheck.core.units import UnitError

    assert format_rate(0) == "0 samples/s"
    with pytest.raises(UnitError, match="must be positive"):
        parse_rate(format_rate(0))


# --------------------------------------------------------------------------- through pytest

BAD_MARKERS = [
    ("memory_under", "limit='two gigs'"),
    ("throughput_at_least", "rate=-5"),
    ("shapes_consistent", "batch_sizes='abc'"),
    ("model_overfits", "steps=float('nan')"),
    ("grad_norms_stable", "max_ratio=None, steps=[1, 2]"),
    ("flops_under", "limit={'a': 1}"),
    ("lr_schedule", "expected=42"),
    ("permutation_invariant", "dim='x'"),
    ("model_overfits", "steps=10**12"),
    ("model_overfits", "seed=2**70"),
    ("memory_under", "10**400"),
    ("params_under", "'1.5'"),
    ("shapes_consistent", "batch_sizes=3"),
    ("grads_finite", "device=1000"),
    ("model_health", "checks=[]"),
]


def test_a_bad_marker_argument_is_a_setup_error_without_traceback(healthy_project):
    healthy_project.makepyfile("import pytest\n" + "".join(
        f"\n@pytest.mark.{marker}({args})\ndef test_{i}_{marker}(model, batch):\n    pass\n"
        for i, (marker, args) in enumerate(BAD_MARKERS)))
    result = healthy_project.runpytest("--modelcheck", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=len(BAD_MARKERS))
    out = result.stdout.str()
    for marker, _ in BAD_MARKERS:
        result.stdout.fnmatch_lines([f"*@pytest.mark.{marker}: *"])
    assert "Traceback" not in out
    assert "pytest_modelcheck/" not in out  # no frames of the plugin or library
