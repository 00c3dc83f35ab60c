"""throughput_at_least on a fake clock: pass/fail thresholds, noise extension, phases, usage errors.

Every timing here comes from the FakeClock installed through the check's ``TIMER`` seam
(see conftest.py), and the machine's load from the ``LOAD`` seam (a quiet machine unless a test
says otherwise), so no assertion depends on how fast or how busy this machine is.
"""
import pytest
import torch
from torch import nn

import pytest_modelcheck.checks.throughput as throughput_module
from pytest_modelcheck import UsageError
from pytest_modelcheck.checks import throughput_at_least


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """Load 1.0 on 2 cores: no load allowance (1 / 2 < 1)."""
    monkeypatch.setattr(throughput_module, "LOAD", lambda: (1.0, 2))


class Recorder(nn.Module):
    """A small classifier that records (training, grad enabled, batch rows) for every call."""

    calls = []  # class attribute: shared by the copies the check makes

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        Recorder.calls.append((self.training, torch.is_grad_enabled(), x.shape[0]))
        return self.lin(x)


@pytest.fixture
def model():
    Recorder.calls.clear()
    return Recorder()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


# -- a steady clock --------------------------------------------------------------------------
def test_steady_clock_passes_below_the_observed_rate(fake_timer, model, batch):
    clock = fake_timer(then=0.25)
    r = throughput_at_least("100 samples/s", model=model, batch=batch)
    assert r.passed is True, r.headline
    # 32 samples every 0.25 s = 128 samples/s
    assert r.headline == ("expected inference throughput >= 100 samples/s, observed 128 samples/s"
                          " (IQR 0% of the median over 10 runs)")
    assert r.metrics["samples_per_s"] == 128.0
    assert r.metrics["median_s"] == 0.25
    assert r.metrics["runs"] == 10 and r.metrics["extended"] is False and r.metrics["noisy"] is False
    assert clock.reads == 20  # two readings per timed run; warm-up runs are not timed


def test_steady_clock_fails_above_the_observed_rate(fake_timer, model, batch):
    fake_timer(then=0.25)
    r = throughput_at_least("200 samples/s", model=model, batch=batch)
    assert r.passed is False
    # every run is 128 samples/s < 200, on a quiet machine: a failure, once there are runs enough
    # for the fast-run bound to be 95% confident (1 - 0.9**n >= 0.95 needs n >= 29):
    # 10 -> 20 (88%) -> 40 runs (98.5%), which also reaches max_time = 10 s
    assert r.headline == ("expected inference throughput >= 200 samples/s, observed 128 samples/s,"
                          " at best 128 samples/s (IQR 0% of the median over 40 runs)")
    assert r.metrics["verdict"] == "failed" and r.metrics["inconclusive"] is False
    assert "median 250.000 ms per batch" in r.details
    assert "remedy:" in r.details


def test_the_threshold_itself_passes(fake_timer, model, batch):
    fake_timer(then=0.25)
    assert throughput_at_least("128 samples/s", model=model, batch=batch).passed is True


@pytest.mark.parametrize("rate", ["0.1k samples/s", "100 it/s", "100/s", 100, 100.0, "100 per second"])
def test_rate_spellings(fake_timer, model, batch, rate):
    fake_timer(then=0.25)
    r = throughput_at_least(rate, model=model, batch=batch)
    assert r.passed is True
    assert r.metrics["rate"] == 100.0


def test_inference_runs_in_eval_mode_without_grad(fake_timer, model, batch):
    fake_timer(then=0.25)
    throughput_at_least("1 samples/s", model=model, batch=batch)
    # 3 warm-up runs + 10 timed runs
    assert Recorder.calls == [(False, False, 32)] * 13


def test_warmup_and_min_runs(fake_timer, model, batch):
    clock = fake_timer(then=0.25)
    r = throughput_at_least("1 samples/s", warmup=0, min_runs=3, model=model, batch=batch)
    assert r.metrics["runs"] == 3 and clock.reads == 6
    assert len(Recorder.calls) == 3


def test_batch_size_argument_resizes_the_batch(fake_timer, model, batch):
    fake_timer(then=0.25)
    r = throughput_at_least("100 samples/s", batch_size=8, model=model, batch=batch)
    assert r.passed is False
    # 8 samples every 0.25 s = 32 samples/s
    assert "observed 32 samples/s" in r.headline
    assert r.metrics["batch_size"] == 8
    assert {rows for _, _, rows in Recorder.calls} == {8}


def test_train_phase_times_full_training_steps(fake_timer, model, batch):
    fake_timer(then=0.25)
    r = throughput_at_least("100 samples/s", phase="train", model=model, batch=batch)
    assert r.passed is True, r.headline
    assert r.headline.startswith("expected training throughput >= 100 samples/s, observed 128 samples/s")
    assert r.metrics["phase"] == "train"
    # one forward without grad to pick the loss, then 3 warm-up + 10 timed training steps
    assert Recorder.calls == [(True, False, 32)] + [(True, True, 32)] * 13


def test_train_phase_leaves_the_caller_model_alone(fake_timer, model, batch):
    fake_timer(then=0.25)
    weight = model.lin.weight.detach().clone()
    throughput_at_least("1 samples/s", phase="train", model=model, batch=batch)
    assert torch.equal(model.lin.weight, weight) and model.lin.weight.grad is None
    assert model.training


# -- a noisy clock ---------------------------------------------------------------------------
def test_noisy_start_is_extended_until_quiet(fake_timer, model, batch):
    fake_timer([0.25, 0.5] * 5, then=0.25)
    r = throughput_at_least("100 samples/s", model=model, batch=batch)
    # 10 runs (5 x 0.25, 5 x 0.5): q1 0.25, median 0.375, q3 0.5 -> IQR 67% > 10%: 10 more runs
    # 20 runs (15 x 0.25, 5 x 0.5): median 0.25, q3 0.3125 -> 25%: up to 20 more, but the
    #   measured time reaches max_time = 10 s after 15 of them (6.25 s + 15 x 0.25 s)
    # 35 runs (30 x 0.25, 5 x 0.5): q1 = q3 = 0.25 -> quiet
    assert r.passed is True, r.headline
    assert r.metrics["extended"] is True and r.metrics["noisy"] is False
    assert r.metrics["runs"] == 35
    assert r.metrics["samples_per_s"] == 128.0


def test_extension_stops_at_max_runs(fake_timer, model, batch):
    fake_timer([0.25, 0.5] * 5, then=0.25)
    r = throughput_at_least("100 samples/s", max_time=60, model=model, batch=batch)
    # as above, but the third round is not cut short: 20 + 20 = 40 runs, 35 x 0.25 and 5 x 0.5
    assert r.metrics["runs"] == 40 and r.metrics["noisy"] is False


def test_still_noisy_failure_prints_the_spread(fake_timer, model, batch):
    fake_timer([0.25, 0.5] * 100)
    r = throughput_at_least("200 samples/s", model=model, batch=batch)
    # 10 runs: IQR 67% -> 20 runs (7.5 s measured): still 67% -> up to 20 more, cut at 10 s:
    # runs 21..27 alternate 0.25/0.5 and the 27th brings the total to exactly 10.0 s.
    # 27 runs = 14 x 0.25 + 13 x 0.5: median 0.25 (sorted index 13), q1 0.25, q3 0.5 -> IQR 100%
    # the fastest run is 0.25 s = 128 samples/s < 200 on a quiet machine: failed
    assert r.passed is False
    assert r.headline == ("expected inference throughput >= 200 samples/s, observed 128 samples/s,"
                          " at best 128 samples/s (IQR 100% of the median over 27 runs, noisy)")
    assert r.metrics["extended"] is True and r.metrics["noisy"] is True
    assert r.metrics["spread"] == 1.0
    assert r.metrics["times_s"] == [0.25, 0.5] * 13 + [0.25]
    # q3 0.5 s -> 64 samples/s, q1 0.25 s -> 128 samples/s
    assert "samples/s range (q3..q1 times) 64 samples/s .. 128 samples/s" in r.details
    assert "still noisy after extension" in r.details


def test_model_that_raises_becomes_a_failed_result(fake_timer, batch):
    fake_timer(then=0.25)
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(3, 4))
    r = throughput_at_least("1 samples/s", model=model, batch=batch)
    assert r.passed is False
    assert r.headline.startswith("forward raised RuntimeError in module '1' (Linear)")


# -- usage errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, kwargs, message", [
    (("fast",), {}, "rate='fast': expected"),
    ((0,), {}, "rate=0: expected"),
    ((-5,), {}, "rate=-5: expected"),
    (("300 samples",), {}, "rate='300 samples': expected"),
    (("5 m/s",), {}, "rate='5 m/s': expected"),
    (("1e400 samples/s",), {}, "rate='1e400 samples/s': expected"),
    (("1 samples/s",), {"phase": "eval"}, "phase='eval': expected 'inference' or 'train'"),
    (("1 samples/s",), {"batch_size": 0}, "batch_size=0: expected an integer >= 1"),
    (("1 samples/s",), {"batch_size": 2.5}, "batch_size=2.5: expected an integer >= 1"),
    (("1 samples/s",), {"warmup": -1}, "warmup=-1: expected an integer >= 0"),
    (("1 samples/s",), {"warmup": True}, "warmup=True: expected an integer >= 0"),
    (("1 samples/s",), {"min_runs": 2}, "min_runs=2: expected an integer >= 3"),
    (("1 samples/s",), {"max_time": "forever"}, "max_time='forever': expected"),
    (("1 samples/s",), {"max_time": -1}, "max_time=-1: expected"),
    (("1 samples/s",), {"strict": "yes"}, "strict='yes': expected True or False"),
    ((), {}, "missing a required argument: 'rate'; expected throughput_at_least("),
    (("1 samples/s",), {"speed": 3}, "got an unexpected keyword argument 'speed'"),
])
def test_bad_arguments_raise_usage_error_in_one_line(fake_timer, model, batch, args, kwargs, message):
    clock = fake_timer(then=0.25)
    with pytest.raises(UsageError) as info:
        throughput_at_least(*args, **kwargs, model=model, batch=batch)
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text
    assert not Recorder.calls and clock.reads == 0  # rejected before anything ran


# -- the marker ------------------------------------------------------------------------------
def test_marker_with_a_fake_clock(healthy_project):
    healthy_project.makepyfile("""
        import itertools
        import pytest
        import pytest_modelcheck.checks.throughput as throughput

        @pytest.fixture(autouse=True)
        def quarter_second_runs(monkeypatch):
            # every reading is 0.25 s after the previous one: each timed run takes 0.25 s
            monkeypatch.setattr(throughput, "TIMER", itertools.count(0.0, 0.25).__next__)
            monkeypatch.setattr(throughput, "LOAD", lambda: (1.0, 2))  # a quiet machine

        # the healthy batch holds 16 samples: 16 / 0.25 s = 64 samples/s
        @pytest.mark.throughput_at_least("50 samples/s")
        def test_fast_enough():
            pass

        @pytest.mark.throughput_at_least("100 samples/s")
        def test_too_slow():
            pass
    """)
    result = healthy_project.runpytest("--modelcheck", "-W", "error")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*_ test_too_slow _*",
        "1 model check failed:",
        "  ?throughput_at_least? expected inference throughput >= 100 samples/s, observed"
        " 64 samples/s, at best 64 samples/s (IQR 0% of the median over 40 runs)",
        "*Captured modelcheck call*",
        "*batch size 16, inference, perf_counter: median 250.000 ms per batch*",
        "FAILED *::test_too_slow*",
    ])


# -- busy machines: passed / failed with confidence / inconclusive ---------------------------
# A healthy model on a busy runner: most runs are slowed to 0.25 s (128 samples/s), one in four
# runs unhindered at 0.125 s (256 samples/s). The floor, 200 samples/s, lies between the two.
BUSY = [0.125, 0.25, 0.25, 0.25]


def test_busy_runner_with_fast_runs_above_the_floor_is_inconclusive_and_passes(fake_timer, model,
                                                                               batch):
    fake_timer(BUSY * 100)
    r = throughput_at_least("200 samples/s", max_time=5, model=model, batch=batch)
    # median 0.25 s -> 128 samples/s < 200: not a pass. The fastest tenth of the runs takes
    # 0.125 s -> 256 samples/s >= 200: not a failure either. The measurement is extended while
    # undecided, until max_time: 10 runs (2.125 s) -> 20 runs (4.375 s) -> 5 s after run 23
    # (4.375 + 0.125 + 0.25 + 0.25 = 5.0)
    assert r.passed is True
    assert r.metrics["verdict"] == "inconclusive" and r.metrics["inconclusive"] is True
    assert r.metrics["strict"] is False
    assert r.metrics["runs"] == 23 and r.metrics["extended"] is True
    assert r.metrics["interval_samples_per_s"] == [128.0, 256.0]
    assert r.headline == (
        "inconclusive: expected inference throughput >= 200 samples/s, observed 128 samples/s,"
        " interval 128 .. 256 samples/s over 23 runs, load 1.00 -> 1.00 on 2 cores, 1 torch"
        " thread; this machine cannot tell a slow model from a busy one: use a dedicated runner,"
        " more max_time, or strict=True to fail instead")
    assert "remedy:" not in r.details


def test_strict_fails_an_inconclusive_measurement(fake_timer, model, batch):
    fake_timer(BUSY * 100)
    r = throughput_at_least("200 samples/s", max_time=5, strict=True, model=model, batch=batch)
    assert r.passed is False
    assert r.metrics["verdict"] == "inconclusive" and r.metrics["strict"] is True
    assert r.metrics["inconclusive"] is False  # a failure, not a pass without a verdict
    assert r.headline.startswith(
        "inconclusive, failed because strict=True: expected inference throughput >= 200 samples/s,"
        " observed 128 samples/s, interval 128 .. 256 samples/s over 23 runs")
    assert "advice:" in r.details and "dedicated runner" in r.details


def test_strict_does_not_change_a_clear_pass(fake_timer, model, batch):
    fake_timer(then=0.25)
    r = throughput_at_least("100 samples/s", strict=True, model=model, batch=batch)
    assert r.passed is True and r.metrics["verdict"] == "passed"
    assert r.metrics["inconclusive"] is False and r.metrics["runs"] == 10


def test_genuinely_slow_model_fails_with_confidence_even_on_a_busy_machine(fake_timer, model,
                                                                           batch, monkeypatch):
    monkeypatch.setattr(throughput_module, "LOAD", lambda: (4.0, 2))  # oversubscribed: x2
    fake_timer(then=0.5)
    r = throughput_at_least("200 samples/s", model=model, batch=batch)
    # every run 0.5 s = 64 samples/s; the load allows the fast runs x 4 / 2 = 128 samples/s,
    # still below 200: too slow with confidence. 10 -> 20 runs = 10 s = max_time; the fastest
    # of 20 runs bounds the 10th percentile with 1 - 0.9**20 = 88% confidence
    assert r.passed is False
    assert r.metrics["verdict"] == "failed" and r.metrics["inconclusive"] is False
    assert r.metrics["interval_samples_per_s"] == [64.0, 128.0]
    assert r.metrics["load_allowance"] == 2.0 and r.metrics["runs"] == 20
    assert r.metrics["fast_confidence"] == pytest.approx(1 - 0.9 ** 20)
    assert r.headline == ("expected inference throughput >= 200 samples/s, observed 64 samples/s,"
                          " at best 128 samples/s (IQR 0% of the median over 20 runs)")
    assert "x 2.00 for the load" in r.details and "remedy:" in r.details


def test_the_same_runs_are_inconclusive_only_when_the_machine_was_oversubscribed(
        fake_timer, model, batch, monkeypatch):
    # 0.25 s runs = 128 samples/s against 200: a failure on a quiet machine (test above), but
    # load 4 on 2 cores may have halved every run: 128 x 2 = 256 >= 200 -> inconclusive
    monkeypatch.setattr(throughput_module, "LOAD", lambda: (4.0, 2))
    fake_timer(then=0.25)
    r = throughput_at_least("200 samples/s", model=model, batch=batch)
    assert r.passed is True and r.metrics["verdict"] == "inconclusive"
    assert "load 4.00 -> 4.00 on 2 cores" in r.headline
    monkeypatch.setattr(throughput_module, "LOAD", lambda: (1.0, 2))
    fake_timer(then=0.25)
    assert throughput_at_least("200 samples/s", model=model, batch=batch).metrics["verdict"] == "failed"


def test_load_after_the_runs_counts_too(fake_timer, model, batch, monkeypatch):
    readings = iter([(1.0, 2), (6.0, 2)])  # quiet before, busy after (load 6 on 2 cores: x3)
    monkeypatch.setattr(throughput_module, "LOAD", lambda: next(readings))
    fake_timer(then=0.5)
    r = throughput_at_least("100 samples/s", min_runs=40, max_time=1000, model=model, batch=batch)
    # 64 samples/s x 3 = 192 >= 100: inconclusive (40 runs: no extension needed to be confident)
    assert (r.metrics["load_before"], r.metrics["load_after"], r.metrics["cores"]) == (1.0, 6.0, 2)
    assert r.metrics["load_allowance"] == 3.0 and r.metrics["verdict"] == "inconclusive"


def test_clean_fast_model_passes(fake_timer, model, batch):
    fake_timer(then=0.125)
    r = throughput_at_least("200 samples/s", model=model, batch=batch)
    # 32 / 0.125 = 256 samples/s >= 200
    assert r.passed is True
    assert r.metrics["verdict"] == "passed" and r.metrics["inconclusive"] is False
    assert r.headline == ("expected inference throughput >= 200 samples/s, observed 256 samples/s"
                          " (IQR 0% of the median over 10 runs)")


def test_conditions_are_recorded_and_stated(fake_timer, model, batch, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setattr(throughput_module, "LOAD", lambda: (2.5, 4))
    fake_timer(then=0.25)
    r = throughput_at_least("100 samples/s", model=model, batch=batch)
    assert r.metrics["threads"] == torch.get_num_threads() == 1  # conftest: one torch thread
    assert r.metrics["xdist_workers"] == 2
    assert (r.metrics["load_before"], r.metrics["load_after"], r.metrics["cores"]) == (2.5, 2.5, 4)
    assert "conditions: load 2.50 -> 2.50 on 4 cores, 1 torch thread, 2 xdist workers" in r.details
    # the metrics the baseline gate reads are still there
    assert {"times_s", "calibration_s", "median_s", "spread", "runs"} <= set(r.metrics)


def test_xdist_workers_default_to_one(fake_timer, model, batch, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    fake_timer(then=0.25)
    r = throughput_at_least("100 samples/s", model=model, batch=batch)
    assert r.metrics["xdist_workers"] == 1


def test_threads_are_read_while_measuring(fake_timer, model, batch):
    fake_timer(then=0.25)
    torch.set_num_threads(2)  # the conftest fixture puts the original count back
    r = throughput_at_least("100 samples/s", model=model, batch=batch)
    assert r.metrics["threads"] == 2 and "2 torch threads" in r.details
    assert torch.get_num_threads() == 2  # left as the user had it


def test_spread_is_over_independent_runs_and_printed_with_enough_digits(fake_timer, model, batch):
    # ten distinct run times around 23 ms (too slow for the cheap-step extension to 30 runs),
    # 1/2048 ms apart: a spread of a few hundredths of a percent that a whole-percent format
    # would print as 0%, and quartile rates that three significant digits would print alike
    step = 2.0 ** -21
    durations = [0.0234375 + k * step for k in (3, 0, 7, 1, 9, 4, 2, 8, 5, 6)]
    fake_timer(durations)
    r = throughput_at_least("1k samples/s", model=model, batch=batch)
    times = r.metrics["times_s"]
    assert len(set(times)) == r.metrics["runs"] == 10  # each run timed on its own
    assert r.metrics["spread"] > 0
    assert "IQR 0%" not in r.headline and "IQR 0.0" in r.headline
    low, high = r.details.split("samples/s range (q3..q1 times) ")[1].split(";")[0].split(" .. ")
    assert low != high and low.startswith("1.36") and high.startswith("1.36")


def test_bad_strict_is_a_usage_error_at_bind():
    from pytest_modelcheck.checks.registry import get_check

    spec = get_check("throughput_at_least")
    assert spec.bind(("1 samples/s",), {"strict": True})["strict"] is True
    assert spec.bind(("1 samples/s",), {"strict": False})["strict"] is False
    # not given: left out of the bound values, so --modelcheck-strict-timing may set it
    assert "strict" not in spec.bind(("1 samples/s",), {})
    for bad in ("yes", 1, None):
        with pytest.raises(UsageError) as info:
            spec.bind(("1 samples/s",), {"strict": bad})
        assert str(info.value) == f"strict={bad!r}: expected True or False"


# A test module whose machine is busy: each timed run takes 0.25 s (16 samples / 0.25 s = 64
# samples/s) at load 4 on 2 cores, which may have halved it: the fast runs could reach 128/s.
BUSY_MACHINE = """
        import itertools
        import pytest
        import pytest_modelcheck.checks.throughput as throughput

        @pytest.fixture(autouse=True)
        def busy_machine(monkeypatch):
            monkeypatch.setattr(throughput, "TIMER", itertools.count(0.0, 0.25).__next__)
            monkeypatch.setattr(throughput, "LOAD", lambda: (4.0, 2))

        @pytest.mark.throughput_at_least("100 samples/s")
        def test_undecided():
            pass
"""


def test_marker_on_a_busy_machine_inconclusive_passes_and_strict_fails(healthy_project):
    healthy_project.makepyfile(BUSY_MACHINE + """
        @pytest.mark.throughput_at_least("100 samples/s", strict=True)
        def test_undecided_strict():
            pass
    """)
    result = healthy_project.runpytest("--modelcheck")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*_ test_undecided_strict _*",
        "1 model check failed:",
        "  ?throughput_at_least? inconclusive, failed because strict=True: expected inference"
        " throughput >= 100 samples/s, observed 64 samples/s, interval 64 .. 128 samples/s over"
        " 40 runs, load 4.00 -> 4.00 on 2 cores, 1 torch thread;*",
        "FAILED *::test_undecided_strict*",
    ])


def test_strict_timing_option_fails_an_undecided_marker_unless_it_says_strict_false(
        healthy_project):
    healthy_project.makepyfile(BUSY_MACHINE + """
        @pytest.mark.throughput_at_least("100 samples/s", strict=False)
        def test_undecided_not_strict():
            pass
    """)
    result = healthy_project.runpytest("--modelcheck", "--modelcheck-strict-timing")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*inconclusive, failed because strict=True*"])
    # The summary line may or may not carry the message, depending on the terminal width.
    result.stdout.re_match_lines([r"FAILED \S*::test_undecided( - .*)?$"])
