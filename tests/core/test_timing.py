import doctest
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_modelcheck.core import timing
from pytest_modelcheck.core.timing import (
    CudaEventTimer,
    ThroughputMeasurement,
    TimingStats,
    cuda_event_timer,
    measure_throughput,
)
from pytest_modelcheck.core.units import UnitError

REPO_ROOT = Path(__file__).resolve().parents[2]


class ScriptedClock:
    """A fake clock: for each scripted run duration, reads t0 then t0 + d.

    Durations are multiples of 1/64 s, so all readings and differences are
    exact in binary floating point.
    """

    def __init__(self, durations, gap=1 / 64):
        self.readings = []
        t = 0.0
        for d in durations:
            self.readings += [t, t + d]
            t += d + gap
        self.reads = 0

    def __call__(self):
        if self.reads >= len(self.readings):
            raise AssertionError(f"clock read more than the {len(self.readings)} scripted times")
        value = self.readings[self.reads]
        self.reads += 1
        return value

    @property
    def runs_timed(self):
        return self.reads // 2


class CountingStep:
    def __init__(self, log=None):
        self.calls = 0
        self.log = log

    def __call__(self):
        self.calls += 1
        if self.log is not None:
            self.log.append("step")


def measure(durations, batch_size=32, **kwargs):
    clock = ScriptedClock(durations)
    step = CountingStep()
    kwargs.setdefault("max_time", 1000.0)
    result = measure_throughput(step, batch_size, timer=clock, **kwargs)
    return result, clock, step


# --------------------------------------------------------------------------- TimingStats


def test_stats_of_one_to_ten_in_shuffled_order():
    times = [7.0, 2.0, 9.0, 1.0, 10.0, 4.0, 3.0, 8.0, 6.0, 5.0]
    stats = TimingStats.from_times(times)
    # sorted: 1..10; quantile position h = (n - 1) * q = 9q
    assert stats.times == times  # run order is kept
    assert stats.median == 5.5  # h = 4.5: halfway between 5 and 6
    assert stats.mean == 5.5  # 55 / 10
    assert stats.q1 == 3.25  # h = 2.25: 3 + 0.25 * (4 - 3)
    assert stats.q3 == 7.75  # h = 6.75: 7 + 0.75 * (8 - 7)
    assert stats.iqr == 4.5  # 7.75 - 3.25
    assert stats.p90 == pytest.approx(9.1)  # h = 8.1: 9 + 0.1 * (10 - 9)
    # sample std: sum of squared deviations 2 * (0.25 + 2.25 + 6.25 + 12.25 + 20.25) = 82.5
    assert stats.std == pytest.approx(math.sqrt(82.5 / 9))
    assert (stats.min, stats.max) == (1.0, 10.0)
    assert stats.spread == pytest.approx(4.5 / 5.5)


def test_stats_of_an_odd_count():
    stats = TimingStats.from_times([5, 1, 4, 2, 3])
    # sorted 1..5; h = 4q
    assert stats.median == 3.0  # h = 2
    assert stats.q1 == 2.0  # h = 1
    assert stats.q3 == 4.0  # h = 3
    assert stats.iqr == 2.0
    assert stats.p90 == pytest.approx(4.6)  # h = 3.6: 4 + 0.6 * (5 - 4)
    assert stats.std == pytest.approx(math.sqrt(2.5))  # (4 + 1 + 0 + 1 + 4) / 4
    assert all(type(t) is float for t in stats.times)


def test_stats_of_a_single_run():
    stats = TimingStats.from_times([0.5])
    assert (stats.median, stats.mean, stats.min, stats.max, stats.p90) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert (stats.q1, stats.q3, stats.iqr, stats.std) == (0.5, 0.5, 0.0, 0.0)
    assert stats.spread == 0.0


def test_spread_with_zero_median():
    assert TimingStats.from_times([0.0, 0.0, 0.0]).spread == 0.0
    # sorted 0, 0, 0, 1: median 0, q3 = 0.25 (h = 2.25)
    assert TimingStats.from_times([0.0, 0.0, 0.0, 1.0]).spread == math.inf


@pytest.mark.parametrize("times", [[], [1.0, -0.5], [float("nan")], [float("inf"), 1.0]])
def test_stats_reject_empty_negative_and_non_finite(times):
    with pytest.raises(ValueError) as excinfo:
        TimingStats.from_times(times)
    assert "\n" not in str(excinfo.value)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e3), min_size=1, max_size=40))
def test_quantiles_match_numpy_linear_interpolation(times):
    np = pytest.importorskip("numpy")
    stats = TimingStats.from_times(times)
    q1, median, q3, p90 = np.percentile(np.array(times), [25, 50, 75, 90])
    assert stats.q1 == pytest.approx(q1, abs=1e-9)
    assert stats.median == pytest.approx(median, abs=1e-9)
    assert stats.q3 == pytest.approx(q3, abs=1e-9)
    assert stats.p90 == pytest.approx(p90, abs=1e-9)
    assert stats.min <= stats.q1 <= stats.median <= stats.q3 <= stats.p90 <= stats.max


# --------------------------------------------------------------------------- measure_throughput


def test_quiet_measurement_stops_at_min_runs():
    result, clock, step = measure([0.25] * 10, batch_size=32)
    assert result.runs == 10
    assert clock.reads == 20  # two readings per run, no more
    assert step.calls == 3 + 10  # warmup + timed runs
    assert result.warmup == 3
    assert result.extended is False
    assert result.noisy is False
    assert result.samples_per_s == 128.0  # 32 / 0.25
    assert result.stats.median == 0.25
    assert result.spread == 0.0
    assert result.method == "perf_counter"
    assert result.device == "cpu"


def test_small_spread_below_threshold_is_not_extended():
    durations = [1.0] * 4 + [1.0625] * 2 + [1.03125] * 4
    result, clock, _ = measure(durations, batch_size=33)
    # sorted: 1 x4, 1.03125 x4, 1.0625 x2; h = 9q
    # q1 (h = 2.25) = 1.0; median (h = 4.5) = 1.03125; q3 (h = 6.75) = 1.03125
    assert result.stats.q1 == 1.0
    assert result.stats.median == 1.03125
    assert result.stats.q3 == 1.03125
    assert result.spread == pytest.approx(0.03125 / 1.03125)  # ~3 % <= 10 %
    assert result.samples_per_s == pytest.approx(33 / 1.03125)  # = 32.0
    assert (result.runs, result.extended, result.noisy) == (10, False, False)
    assert clock.reads == 20


def test_noisy_first_window_is_extended_until_quiet():
    durations = [0.25, 0.5] * 5 + [0.25] * 30
    result, clock, step = measure(durations, batch_size=32)
    # 10 runs: 0.25 x5, 0.5 x5 -> q1 0.25, q3 0.5, median 0.375: spread 2/3 > 0.1
    # +10 -> 20 runs: 0.25 x15, 0.5 x5 -> median 0.25, q3 (h = 14.25) 0.3125: spread 0.25
    # +20 -> 40 runs: 0.25 x35, 0.5 x5 -> q3 (h = 29.25) 0.25: spread 0
    assert result.runs == 40
    assert clock.reads == 80  # every scripted reading used, none beyond
    assert step.calls == 3 + 40
    assert result.extended is True
    assert result.noisy is False
    assert result.stats.median == 0.25
    assert result.stats.iqr == 0.0
    assert result.samples_per_s == 128.0
    assert result.stats.times == durations


def test_noisy_measurement_is_extended_up_to_max_runs():
    durations = [0.25, 0.5] * 50
    result, clock, _ = measure(durations, batch_size=32, max_runs=25)
    # 10 -> 20 (doubling) -> 25 (capped at max_runs)
    assert result.runs == 25
    assert clock.reads == 50
    assert result.extended is True
    assert result.noisy is True
    # 25 runs: 0.25 x13, 0.5 x12; h = 24q: q1 (h = 6) 0.25, median (h = 12) 0.25, q3 (h = 18) 0.5
    assert (result.stats.q1, result.stats.median, result.stats.q3) == (0.25, 0.25, 0.5)
    assert result.spread == 1.0  # 0.25 / 0.25
    assert result.samples_per_s == 128.0
    assert result.samples_per_s_range == (64.0, 128.0)  # (32 / q3, 32 / q1)


def test_extension_stops_once_max_time_is_measured():
    durations = [1.0, 2.0] * 50
    result, clock, _ = measure(durations, max_time=20.0)
    # 10 runs measure 15 s < 20 s, so the sample is extended; runs 11..14 add
    # 1 + 2 + 1 + 2 s, reaching 21 s >= 20 s after run 14.
    assert result.runs == 14
    assert clock.reads == 28
    assert result.extended is True
    assert result.noisy is True


def test_min_runs_are_taken_even_past_max_time():
    durations = [1.0, 2.0] * 5
    result, _, _ = measure(durations, max_time=10.0)
    # 15 s measured >= 10 s: no extension, still noisy
    assert (result.runs, result.extended, result.noisy) == (10, False, True)


def test_max_time_accepts_a_duration_string():
    durations = [1.0, 2.0] * 50
    result, _, _ = measure(durations, max_time="20s")
    assert result.runs == 14


def test_higher_noise_threshold_accepts_the_first_window():
    durations = [0.25, 0.5] * 5
    result, clock, _ = measure(durations, noise=1.0)
    # spread 0.25 / 0.375 = 2/3 <= 1.0
    assert result.spread == pytest.approx(2 / 3)
    assert (result.runs, result.extended, result.noisy) == (10, False, False)
    assert result.samples_per_s == pytest.approx(32 / 0.375)
    assert clock.reads == 20


def test_no_extension_when_max_runs_equals_min_runs():
    result, _, _ = measure([0.25, 0.5] * 5, max_runs=10)
    assert (result.runs, result.extended, result.noisy) == (10, False, True)


def test_custom_run_counts():
    result, clock, step = measure([0.5] * 4, warmup=0, min_runs=4, max_runs=4)
    assert (result.runs, result.warmup, step.calls, clock.reads) == (4, 0, 4, 8)


def test_sync_brackets_every_timed_run():
    log = []
    clock = ScriptedClock([0.25] * 2)

    def timer():
        log.append("clock")
        return clock()

    measure_throughput(
        CountingStep(log),
        4,
        warmup=2,
        min_runs=2,
        max_runs=2,
        timer=timer,
        sync=lambda: log.append("sync"),
    )
    run = ["sync", "clock", "step", "sync", "clock"]
    assert log == ["step", "step", "sync"] + run + run


def test_zero_median_gives_infinite_rate_without_crashing():
    result = measure_throughput(lambda: None, 8, timer=lambda: 1.0)
    assert result.samples_per_s == math.inf
    assert result.spread == 0.0
    assert result.noisy is False
    assert result.samples_per_s_range == (math.inf, math.inf)
    assert "inf samples/s" in result.summary()


def test_a_clock_running_backwards_is_reported():
    readings = iter([5.0, 4.0] * 10)
    with pytest.raises(ValueError, match="monotonic") as excinfo:
        measure_throughput(lambda: None, 8, timer=readings.__next__)
    assert "\n" not in str(excinfo.value)


def test_to_dict_has_builtin_types_only():
    result, _, _ = measure([0.25, 0.5] * 50, batch_size=32, max_runs=25)
    data = result.to_dict()

    def check(value):
        if isinstance(value, dict):
            assert all(type(k) is str for k in value)
            for item in value.values():
                check(item)
        elif isinstance(value, list):
            for item in value:
                check(item)
        else:
            assert type(value) in (int, float, bool, str), (value, type(value))

    check(data)
    assert data["samples_per_s"] == 128.0
    assert data["samples_per_s_range"] == [64.0, 128.0]
    assert data["runs"] == 25
    assert data["noisy"] is True
    assert data["extended"] is True
    assert data["method"] == "perf_counter"
    assert data["stats"]["q3"] == 0.5
    assert len(data["stats"]["times"]) == 25
    json.dumps(data)


def test_summary_mentions_rate_runs_and_noise():
    quiet, _, _ = measure([0.25] * 10, batch_size=32)
    assert quiet.summary() == "128 samples/s (batch 32, median 250 ms over 10 runs, spread 0.0%, cpu, perf_counter)"
    noisy, _, _ = measure([0.25, 0.5] * 50, batch_size=32, max_runs=25)
    assert "spread 100.0% > 10%, noisy" in noisy.summary()


def test_result_is_a_throughput_measurement():
    result, _, _ = measure([0.25] * 10)
    assert isinstance(result, ThroughputMeasurement)
    assert isinstance(result.stats, TimingStats)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"batch_size": 0}, ValueError),
        ({"batch_size": -4}, ValueError),
        ({"batch_size": True}, TypeError),
        ({"batch_size": 2.0}, TypeError),
        ({"warmup": -1}, ValueError),
        ({"min_runs": 0}, ValueError),
        ({"min_runs": 20, "max_runs": 10}, ValueError),
        ({"noise": -0.1}, ValueError),
        ({"noise": float("nan")}, ValueError),
        ({"max_time": -1.0}, ValueError),
        ({"max_time": "soon"}, UnitError),
        ({"timer": "perf_counter"}, TypeError),
        ({"step": None}, TypeError),
    ],
)
def test_invalid_arguments_are_rejected_before_running(kwargs, error):
    step = CountingStep()
    arguments = {"step": step, "batch_size": 8, "timer": ScriptedClock([0.25] * 100)}
    arguments.update(kwargs)
    with pytest.raises(error) as excinfo:
        measure_throughput(arguments.pop("step"), arguments.pop("batch_size"), **arguments)
    assert "\n" not in str(excinfo.value)
    assert step.calls == 0


# --------------------------------------------------------------------------- CUDA events (faked)


class FakeCuda:
    """Stands in for torch.cuda: a GPU clock in milliseconds that steps advance."""

    def __init__(self):
        self.now_ms = 0.0
        self.calls = []
        self.events = []
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.enable_timing = enable_timing
                self.at = None
                self.stream = None
                fake.events.append(self)

            def record(self, stream=None):
                fake.calls.append(("record", stream))
                self.stream = stream
                self.at = fake.now_ms

            def elapsed_time(self, end):
                assert self.enable_timing and end.enable_timing
                assert self.at is not None and end.at is not None
                return end.at - self.at

        self.Event = Event

    def synchronize(self, device=None):
        self.calls.append(("synchronize", device))

    def current_stream(self, device=None):
        return f"stream({device})"

    def step_taking(self, durations_ms):
        remaining = iter(durations_ms)

        def step():
            self.now_ms += next(remaining)
            self.calls.append(("step",))

        return step


def test_cuda_event_timer_times_one_step_in_seconds():
    cuda = FakeCuda()
    timer = cuda_event_timer(
        "cuda:1", event_factory=cuda.Event, synchronize=cuda.synchronize, current_stream=cuda.current_stream
    )
    assert isinstance(timer, CudaEventTimer)
    assert timer(cuda.step_taking([250.0])) == 0.25  # 250 ms
    assert cuda.calls == [
        ("synchronize", "cuda:1"),
        ("record", "stream(cuda:1)"),
        ("step",),
        ("record", "stream(cuda:1)"),
        ("synchronize", "cuda:1"),
    ]
    assert len(cuda.events) == 2
    assert all(event.enable_timing for event in cuda.events)


def test_measure_throughput_with_cuda_events():
    cuda = FakeCuda()
    step = cuda.step_taking([999.0] * 3 + [250.0, 500.0] * 5 + [250.0] * 30)
    timer = cuda_event_timer(
        "cuda:0", event_factory=cuda.Event, synchronize=cuda.synchronize, current_stream=cuda.current_stream
    )
    result = measure_throughput(step, 64, device="cuda:0", timer=timer, max_time=60)
    # warm-up steps (999 ms) are not timed; the timed runs replay the noisy
    # then quiet script of test_noisy_first_window_is_extended_until_quiet.
    assert result.method == "cuda-events"
    assert result.device == "cuda:0"
    assert result.runs == 40
    assert result.extended is True
    assert result.noisy is False
    assert result.stats.median == 0.25
    assert result.samples_per_s == 256.0  # 64 / 0.25
    assert cuda.calls[:4] == [("step",)] * 3 + [("synchronize", "cuda:0")]
    assert sum(1 for call in cuda.calls if call[0] == "record") == 80


def test_cuda_device_defaults_to_cuda_events_from_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    cuda = FakeCuda()
    monkeypatch.setattr(torch.cuda, "Event", cuda.Event)
    monkeypatch.setattr(torch.cuda, "synchronize", cuda.synchronize)
    monkeypatch.setattr(torch.cuda, "current_stream", cuda.current_stream)
    step = cuda.step_taking([1.0] * 3 + [125.0] * 10)
    result = measure_throughput(step, 16, device="cuda")
    assert result.method == "cuda-events"
    assert result.samples_per_s == 128.0  # 16 / 0.125
    assert result.runs == 10
    assert ("synchronize", "cuda") in cuda.calls
    assert ("record", "stream(cuda)") in cuda.calls


def test_cuda_events_with_a_user_sync(monkeypatch):
    torch = pytest.importorskip("torch")
    cuda = FakeCuda()
    monkeypatch.setattr(torch.cuda, "Event", cuda.Event)
    monkeypatch.setattr(torch.cuda, "current_stream", cuda.current_stream)

    def must_not_be_called(device=None):
        raise AssertionError("torch.cuda.synchronize called despite sync=")

    monkeypatch.setattr(torch.cuda, "synchronize", must_not_be_called)
    syncs = []
    step = cuda.step_taking([1.0] * 3 + [125.0] * 10)
    result = measure_throughput(step, 16, device="cuda:0", sync=lambda: syncs.append(1))
    assert result.method == "cuda-events"
    assert result.samples_per_s == 128.0
    assert len(syncs) == 1 + 2 * 10  # after warm-up, then around each run


def test_host_clock_on_cuda_device_syncs_with_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    result = measure_throughput(lambda: None, 8, device="cuda:0", timer=ScriptedClock([0.5] * 10))
    assert result.method == "perf_counter"
    assert result.samples_per_s == 16.0
    assert synced == ["cuda:0"] * (1 + 2 * 10)


def test_event_timer_and_sync_cannot_be_combined():
    cuda = FakeCuda()
    timer = cuda_event_timer("cuda", event_factory=cuda.Event, synchronize=cuda.synchronize, current_stream=cuda.current_stream)
    with pytest.raises(ValueError, match="synchronize="):
        measure_throughput(lambda: None, 8, timer=timer, sync=lambda: None)


# --------------------------------------------------------------------------- module hygiene


def test_doctests(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' mkdtemp()
    result = doctest.testmod(timing, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_importing_timing_does_not_import_torch_or_pytest():
    code = (
        "import sys\n"
        "import pytest_modelcheck.core.timing\n"
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


# --------------------------------------------------------------------------- interval and verdict


def test_median_ranks_by_hand():
    # coverage of (t(j), t(n+1-j)) is 1 - 2 P(Bin(n, 1/2) <= j - 1)
    # n = 10: j = 2 -> 1 - 2 * 11/1024 = 0.979; j = 3 -> 1 - 2 * 56/1024 = 0.891 < 0.95
    assert timing.median_ranks(10) == (2, 9)
    # n = 6: j = 1 -> 1 - 2/64 = 0.969; j = 2 -> 1 - 2 * 7/64 = 0.781
    assert timing.median_ranks(6) == (1, 6)
    # n = 5: even j = 1 covers only 1 - 2/32 = 0.9375: the extremes, below 95%
    assert timing.median_ranks(5) == (1, 5)
    assert timing.median_ranks(1) == (1, 1)
    assert timing.median_ranks(10, confidence=0.8) == (3, 8)


def test_fast_rank_by_hand():
    # P(t(r) <= x_0.1) = P(Bin(n, 0.1) >= r); r = 1: 1 - 0.9**n, 95% from n = 29 on
    assert timing.fast_rank(28) == (1, pytest.approx(1 - 0.9 ** 28))  # 0.948: best there is
    assert timing.fast_rank(29) == (1, pytest.approx(1 - 0.9 ** 29))  # 0.953
    # n = 50: P(Bin >= 2) = 1 - 0.9**50 - 50 * 0.1 * 0.9**49 = 0.966; P(Bin >= 3) = 0.888
    r, coverage = timing.fast_rank(50)
    assert r == 2 and coverage == pytest.approx(1 - 0.9 ** 50 - 5 * 0.9 ** 49)
    assert timing.fast_rank(1) == (1, pytest.approx(0.1))


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=400))
def test_ranks_are_valid_and_meet_the_confidence_when_they_can(n):
    j, k = timing.median_ranks(n)
    assert 1 <= j <= k == n + 1 - j <= n
    r, coverage = timing.fast_rank(n)
    assert 1 <= r <= max(1, n // 2)
    assert coverage >= 0.95 or r == 1
    assert (coverage >= 0.95) == (n >= 29)


def quiet(load=1.0, cores=2):
    return lambda: (load, cores)


def test_interval_of_a_busy_run():
    # runs: 0.125 s x 3, 0.25 s x 7 (32 samples): median 0.25 -> 128 samples/s
    durations = [0.25, 0.125, 0.25, 0.25, 0.125, 0.25, 0.25, 0.125, 0.25, 0.25]
    result, _, _ = measure(durations, max_runs=10, load=quiet())
    # lo: t(9) of 10 = 0.25 -> 128; hi: t(1) = 0.125 -> 256 (load 1 on 2 cores: no allowance)
    assert result.samples_per_s_interval == (128.0, 256.0)
    assert result.fast_samples_per_s == 256.0 and result.load_allowance == 1.0
    assert result.verdict(128) == "passed"
    assert result.verdict(200) == "inconclusive"
    assert result.verdict(257) == "failed"
    assert result.confident is False  # 10 runs: 65% < 95%


def test_load_allowance_uses_the_higher_reading_over_the_cores():
    calls = []

    def load():
        calls.append("load")
        return [(3.0, 2), (5.0, 2)][len(calls) - 1]

    result, _, _ = measure([0.25] * 10, load=load)
    assert (result.load_before, result.load_after, result.cores) == (3.0, 5.0, 2)
    assert result.load_allowance == 2.5  # 5 / 2
    assert result.samples_per_s_interval == (128.0, 320.0)  # 128 x 2.5
    assert calls == ["load", "load"]


def test_unknown_load_gives_no_allowance():
    result, _, _ = measure([0.25] * 10, load=lambda: (None, 4))
    assert result.load_before is None and result.load_allowance == 1.0
    assert "load_before" not in result.to_dict() and result.to_dict()["cores"] == 4


def test_load_is_read_just_before_the_first_and_after_the_last_timed_run():
    log = []
    clock = ScriptedClock([0.25] * 3)

    def timer():
        log.append("clock")
        return clock()

    measure_throughput(CountingStep(log), 4, warmup=1, min_runs=3, max_runs=3, timer=timer,
                       load=lambda: log.append("load") or (1.0, 2))
    assert log == ["step", "load"] + ["clock", "step", "clock"] * 3 + ["load"]


def test_threads_are_recorded():
    torch = pytest.importorskip("torch")
    result, _, _ = measure([0.25] * 10, load=quiet())
    assert result.threads == torch.get_num_threads()
    assert result.to_dict()["threads"] == torch.get_num_threads()


def test_floor_extends_an_inconclusive_measurement():
    # 10 runs as in test_interval_of_a_busy_run, then more of the same: inconclusive against
    # 200 samples/s. The spread (37.5%) is let through (noise=1.0), so only the floor extends:
    # 10 (65%) -> 20 (88%) -> 40 runs (98.5% >= 95%: the fast-run bound is confident; stop)
    durations = [0.25, 0.125, 0.25, 0.25, 0.125, 0.25, 0.25, 0.125, 0.25, 0.25] * 10
    result, _, _ = measure(durations, noise=1.0, floor=200, load=quiet())
    assert (result.runs, result.extended, result.confident) == (40, True, True)
    assert result.verdict(200) == "inconclusive"
    without, _, _ = measure(durations, noise=1.0, load=quiet())
    assert (without.runs, without.extended) == (10, False)  # no floor: spread alone decides


def test_floor_extends_a_failure_until_it_is_confident():
    # steady 0.25 s = 128 samples/s against 200: failed, but 10 runs give 65% confidence
    result, _, _ = measure([0.25] * 100, floor=200, load=quiet())
    assert result.verdict(200) == "failed"
    assert (result.runs, result.confident) == (40, True)  # 10 (65%) -> 20 (88%) -> 40 (98.5%)
    passed, _, _ = measure([0.25] * 100, floor=100, load=quiet())
    assert passed.runs == 10  # a pass needs no more runs


def test_floor_and_load_are_validated():
    with pytest.raises(ValueError):
        measure([0.25] * 10, floor=-1)
    with pytest.raises(TypeError):
        measure([0.25] * 10, load=(1.0, 2))


def test_machine_load_is_plausible():
    load, cores = timing.machine_load()
    assert isinstance(cores, int) and cores >= 1
    assert load is None or load >= 0


def test_cheap_steps_get_more_runs_for_the_gate_and_slow_ones_do_not():
    import itertools

    fast = measure_throughput(lambda: None, 8, timer=itertools.count(0.0, 0.001).__next__,
                              cheap_runs=30)  # 30 runs of 1 ms fit in 0.5 s
    slow = measure_throughput(lambda: None, 8, timer=itertools.count(0.0, 0.1).__next__,
                              cheap_runs=30)  # 30 runs of 100 ms would take 3 s
    off = measure_throughput(lambda: None, 8, timer=itertools.count(0.0, 0.001).__next__)
    assert (fast.runs, slow.runs, off.runs) == (30, 10, 10)


def test_a_clear_miss_is_settled_without_more_runs_and_a_close_one_is_not():
    import itertools

    quiet = lambda: (0.0, 2)  # noqa: E731 - an idle 2-core machine
    # 8 samples per 0.1 s = 80 samples/s: against 1000/s a miss by 12x, against 100/s by 1.25x
    clear = measure_throughput(lambda: None, 8, timer=itertools.count(0.0, 0.1).__next__,
                               load=quiet, floor=1000.0, max_time=60)
    close = measure_throughput(lambda: None, 8, timer=itertools.count(0.0, 0.1).__next__,
                               load=quiet, floor=100.0, max_time=60)
    assert clear.verdict(1000.0) == "failed" and clear.runs == 10
    assert close.verdict(100.0) == "failed" and close.runs >= 29 and close.confident


def test_a_clear_miss_is_not_extended_for_noise_either():
    # alternating 0.1 s and 0.2 s runs: IQR far above 10%, but 8 samples per 0.1 s at best is
    # 80 samples/s, a 12x miss of 1000/s: more runs cannot change the verdict
    durations = [0.1, 0.2] * 50
    readings = iter([r for d in durations for r in (0.0, d)])
    m = measure_throughput(lambda: None, 8, timer=readings.__next__, load=lambda: (0.0, 2),
                           floor=1000.0, max_time=60)
    assert m.noisy and m.runs == 10 and m.verdict(1000.0) == "failed"
