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
                          " at most 128 samples/s (IQR 0% of the median over 40 runs)")
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
                          " at most 128 samples/s (IQR 100% of the median over 27 runs, noisy)")
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
        " 64 samples/s, at most 64 samples/s (IQR 0% of the median over 40 runs)",
        "*Captured modelcheck call*",
        "*batch size 16, inference, perf_counter: median 250.000 ms per batch*",
        "FAILED *::test_too_slow*",
    ])
