"""core.ab: A/B timing interleaved in one process, with a fake clock that the models advance."""
import json

import pytest
import torch

from pytest_modelcheck.core.ab import ABReport, FactComparison, compare_ab
from pytest_modelcheck.core.errors import UsageError
from pytest_modelcheck.core.state import fingerprints_equal, model_fingerprint


class FakeClock:
    """Seconds that pass only when a model's forward says so."""

    def __init__(self):
        self.now = 0.0
        self.calls = 0

    def __call__(self):
        return self.now


CLOCK = FakeClock()


class Costly(torch.nn.Module):
    """A small MLP whose forward advances CLOCK by ``cost`` seconds, with a deterministic jitter
    of 0..4% so that the samples are not all ties."""

    def __init__(self, cost, hidden=16):
        super().__init__()
        self.cost = cost
        self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, 3))

    def forward(self, x):
        CLOCK.calls += 1
        CLOCK.now += self.cost * (1 + 0.01 * (CLOCK.calls % 5))
        return self.net(x)


def _pair(cost_b=1.0, hidden_b=16):
    torch.manual_seed(0)
    a = Costly(1.0)
    torch.manual_seed(0)
    b = Costly(cost_b, hidden_b)
    return a, b


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)


def test_candidate_25_percent_slower_regresses(batch):
    a, b = _pair(cost_b=1.25)
    r = compare_ab(a, b, batch, runs=20, warmup=2, timer=CLOCK)
    assert r.timing.regressed and r.regressed and r.verdict == "regressed"
    # medians: A ~1.02 s, B ~1.25 * 1.02 s -> ratio 1.25 within the jitter (1.25*1.04/1.0 max)
    assert 1.2 < r.ratio < 1.31
    assert r.p_value < 0.002  # 20 vs 20 fully separated: exact p = 2 / C(40, 20) ~ 1.5e-11
    assert r.ci[0] > 1.1
    assert r.regressed_facts == []  # same architecture
    assert r.headline().startswith("expected candidate B no worse than baseline A, observed"
                                   " inference time x1.")
    assert len(r.times_a) == len(r.times_b) == len(r.order) == 20
    assert set(r.order) == {"AB", "BA"}  # seeded random order inside each pair


def test_equal_models_are_not_regressed(batch):
    a, b = _pair(cost_b=1.0)
    r = compare_ab(a, b, batch, runs=20, warmup=2, timer=CLOCK)
    assert not r.regressed and r.verdict == "same"
    assert 0.95 < r.ratio < 1.05
    assert all(f.verdict == "same" for f in r.facts)


def test_candidate_faster_is_improved(batch):
    a, b = _pair(cost_b=0.5)
    r = compare_ab(a, b, batch, runs=15, warmup=0, timer=CLOCK)
    assert not r.regressed and r.verdict == "improved"


def test_more_parameters_is_a_deterministic_regression(batch):
    a, b = _pair(cost_b=1.0, hidden_b=32)
    r = compare_ab(a, b, batch, runs=10, warmup=0, timer=CLOCK)
    assert not r.timing.regressed
    # A: 8*16+16 + 16*3+3 = 195 parameters; B: 8*32+32 + 32*3+3 = 387
    params = next(f for f in r.facts if f.name == "parameters")
    assert (params.a, params.b, params.verdict) == (195, 387, "regressed")
    # forward FLOPs at batch 4: 2*4*(8*16 + 16*3) = 1408 vs 2*4*(8*32 + 32*3) = 2816
    flops = next(f for f in r.facts if f.name == "forward_flops")
    assert (flops.a, flops.b) == (1408, 2816)
    assert r.regressed and r.regressed_facts == ["parameters", "forward_flops"]
    assert r.headline() == ("expected candidate B no worse than baseline A, observed"
                            " parameters 195 -> 387; forward_flops 1,408 -> 2,816")


def test_train_phase_runs_steps_and_leaves_models_alone(batch):
    a, b = _pair(cost_b=1.25)
    a.train(False)  # a user flag that must survive
    b.net[0].weight.grad = torch.ones_like(b.net[0].weight)  # a user .grad that must survive
    before = (model_fingerprint(a), model_fingerprint(b))
    x_before = [t.clone() for t in batch]
    rng_before = torch.get_rng_state()
    r = compare_ab(a, b, batch, phase="train", runs=12, warmup=1, timer=CLOCK, loss="cross_entropy")
    assert r.phase == "train" and r.timing.regressed
    assert fingerprints_equal(before[0], model_fingerprint(a)) == []
    assert fingerprints_equal(before[1], model_fingerprint(b)) == []
    assert all(torch.equal(x, y) for x, y in zip(x_before, batch))
    assert torch.equal(rng_before, torch.get_rng_state())


def test_inference_leaves_models_alone(batch):
    a, b = _pair(cost_b=1.25)
    before = (model_fingerprint(a), model_fingerprint(b))
    compare_ab(a, b, batch, runs=5, warmup=1, timer=CLOCK)
    assert fingerprints_equal(before[0], model_fingerprint(a)) == []
    assert fingerprints_equal(before[1], model_fingerprint(b)) == []


def test_report_serializes_and_renders(batch):
    a, b = _pair(cost_b=1.25, hidden_b=32)
    r = compare_ab(a, b, batch, runs=10, warmup=0, timer=CLOCK)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["regressed"] is True and d["timing_verdict"] == "regressed" and d["runs"] == 10
    assert [f["name"] for f in d["facts"]] == ["parameters", "forward_flops"]
    text = r.render()
    assert "parameters: A 195, B 387 (regressed)" in text
    assert "10 interleaved pairs" in text and "Mann-Whitney" in text


def test_real_clock_runs(batch):
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 3)
    r = compare_ab(m, m, batch, runs=3, warmup=1)
    assert isinstance(r, ABReport) and all(t >= 0 for t in r.times_a + r.times_b)
    assert [f.verdict for f in r.facts] == ["same", "same"]


def test_unknown_fact_is_not_judged():
    assert FactComparison("forward_flops", None, 5).verdict == "unknown"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"phase": "training"}, "phase='training': expected one of 'inference', 'train'"),
    ({"runs": 1}, "runs=1: expected an int >= 2"),
    ({"runs": 2.5}, "runs=2.5: expected an int >= 2"),
    ({"warmup": -1}, "warmup=-1: expected an int >= 0"),
    ({"threshold": -0.1}, "threshold=-0.1: expected a fraction >= 0"),
    ({"p": 1.5}, "p=1.5: expected a significance level between 0 and 1"),
    ({"timer": 3.0}, "timer=3.0: expected a zero-argument clock"),
    ({"device": "gpu0"}, "device='gpu0': expected a torch device"),
])
def test_bad_arguments(batch, kwargs, fragment):
    a, b = _pair()
    with pytest.raises(UsageError) as info:
        compare_ab(a, b, batch, **kwargs)
    message = str(info.value)
    assert fragment in message and "\n" not in message
