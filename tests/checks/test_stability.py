"""operator_stable: planted numerical bugs found by fuzzing, healthy twins, determinism, usage errors."""
import importlib

import pytest
import torch
from torch import nn

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.stability import operator_stable


class Net(nn.Module):
    """A linear head after a preprocessing step that is the planted bug (or its eps-guarded twin)."""

    def __init__(self, kind, eps=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(4, 2)
        self.kind, self.eps = kind, eps

    def forward(self, x):
        if self.kind == "sum_norm":
            h = x / (x.sum(-1, keepdim=True) + self.eps)  # zero rows -> 0/0 = NaN
        elif self.kind == "log":
            h = torch.log(x + self.eps)  # log(0) = -inf
        elif self.kind == "std_norm":
            h = x / (x.std() + self.eps)  # constant input -> x/0 = inf
        elif self.kind == "exp":
            h = torch.exp(x.clamp(max=80.0) if self.eps else x)  # exp(100) overflows float32
        else:
            h = x
        return self.head(h)


def _x(seed=0):
    return torch.rand(6, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind, ranges, edge, observed", [
    ("sum_norm", None, "zeros", "NaN in output"),
    ("log", (0.0, 1.0), "", "in output"),
    # zeros are out of range, so the constant 0.5: x / std = inf, and the head's inf - inf = NaN
    ("std_norm", (0.5, 1.0), "", "NaN in output"),
    ("exp", (-100.0, 100.0), "", "Inf in output"),
])
def test_planted_bug_fails_with_the_minimal_input(kind, ranges, edge, observed):
    r = operator_stable(ranges, examples=20, model=Net(kind), batch=_x())
    assert r.passed is False
    assert r.headline.startswith("expected finite outputs for inputs in the declared ranges, observed")
    assert observed in r.headline
    assert "input[0] (" in r.headline and "batch size" in r.headline
    if edge:
        assert r.headline.split("on ", 1)[1].startswith(edge), r.headline
    assert "minimal failing input (shrunk by Hypothesis)" in r.details


@pytest.mark.parametrize("kind, ranges", [("sum_norm", None), ("log", (0.0, 1.0)),
                                          ("std_norm", (0.5, 1.0)), ("exp", (-100.0, 100.0))])
def test_healthy_twin_passes(kind, ranges):
    r = operator_stable(ranges, examples=20, model=Net(kind, eps=1e-6), batch=_x())
    assert r.passed is True, r.headline
    assert r.metrics["examples_run"] >= 8  # every edge case at least once


def test_default_range_is_the_batch_range_widened_to_zero_for_nonnegative_data():
    r = operator_stable(examples=5, model=Net("none"), batch=_x())
    lo, hi = r.metrics["ranges"]["input[0]"]
    assert lo == 0.0  # min ~0.05 <= 25% of the span: non-negative data that nearly touches zero
    assert hi > float(_x().max())


class Amplifier(nn.Module):
    def __init__(self, gain):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return self.gain * torch.tanh(x)


def test_sensitivity_bound():
    # d tanh(x)/dx <= 1, so ||f(x+d)-f(x)|| / ||d|| <= gain
    bad = operator_stable((-1.0, 1.0), max_sensitivity=10.0, examples=10, model=Amplifier(1000.0),
                          batch=_x())
    assert bad.passed is False
    assert bad.headline.startswith("expected sensitivity <= 10 for inputs in the declared ranges,"
                                   " observed sensitivity ||f(x+d)-f(x)||/||d|| = ")
    good = operator_stable((-1.0, 1.0), max_sensitivity=10.0, examples=10, model=Amplifier(2.0),
                           batch=_x())
    assert good.passed is True, good.headline
    assert 0 < good.metrics["max_sensitivity_observed"] <= 2.0 + 1e-6


def test_deterministic():
    runs = [operator_stable(max_sensitivity=1e3, examples=15, model=Net("sum_norm", 1e-3), batch=_x())
            for _ in range(2)]
    assert runs[0].metrics == runs[1].metrics
    assert runs[0].headline == runs[1].headline


def test_integer_inputs_are_kept():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)

        def forward(self, x, idx):
            return x * self.emb(idx).sum(-1, keepdim=True)

    batch = ((torch.rand(4, 3), torch.tensor([0, 1, 2, 4])), None)
    r = operator_stable(examples=10, model=Embed(), batch=batch)
    assert r.passed is True, r.headline
    # idx is looked up in the embedding: fuzzed as token ids within its 5 rows
    assert r.metrics["fuzzed_inputs"] == ["input[0]", "input[1]"]


def test_per_input_ranges():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + torch.log(b)

    batch = ((torch.rand(4, 3), torch.rand(4, 3) + 1), None)
    assert operator_stable({1: (1.0, 2.0)}, examples=10, model=Two(), batch=batch).passed is True
    r = operator_stable({1: (0.0, 2.0)}, examples=10, model=Two(), batch=batch)
    assert r.passed is False and "-inf" not in r.headline and "Inf in output" in r.headline


@pytest.mark.parametrize("kwargs, message", [
    ({"ranges": (1, 0)}, "ranges=(1, 0): expected a (lo, hi) pair"),
    ({"ranges": {0: "x"}}, "ranges[0]='x': expected a (lo, hi) pair"),
    ({"max_sensitivity": -1}, "max_sensitivity=-1: expected a positive number"),
    ({"examples": 0}, "examples=0: expected a positive integer"),
    ({"eps": 2}, "eps=2: expected a number in (0, 1)"),
])
def test_usage_errors(kwargs, message):
    with pytest.raises(UsageError) as info:
        operator_stable(**kwargs, model=Net("none"), batch=_x())
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["icecube_deepsets", "genesis_dit", "pix2pixcc_gan", "vnet_unet",
                                  "fno", "vit3d", "swinir"])
def test_example_models_pass_by_default(name):
    mod = importlib.import_module(f"example_models.{name}")
    torch.manual_seed(0)
    batch = mod.make_batch if name == "icecube_deepsets" else mod.make_batch(4)
    r = operator_stable(examples=4, model=mod.build_model(), batch=batch)
    assert r.passed is True, r.headline


# -- a passing search is replayed without Hypothesis's engine --------------------------------
class SeesInputs(nn.Module):
    """Records every input it is given (shape and sum); NaN at batch size 1 when ``bad``."""

    def __init__(self, bad=False, seen=None):
        super().__init__()
        torch.manual_seed(0)
        self.head, self.bad = nn.Linear(4, 2), bad
        self.record = (seen if seen is not None else []).append  # not deep-copied: shared

    def forward(self, x):
        self.record((tuple(x.shape), round(float(x.sum()), 6)))
        if self.bad:
            x = x / (x.shape[0] - 1)  # batch size 1 (only drawn by the search): 0/0 and x/0
        return self.head(x)


def _searches(monkeypatch):
    import hypothesis

    from pytest_modelcheck.checks import stability

    operator_stable(model=SeesInputs(), batch=_x())  # the first run's imports change the key
    monkeypatch.setattr(stability, "_DRAWN", {})
    calls = []
    find = hypothesis.find
    monkeypatch.setattr(hypothesis, "find", lambda *a, **k: calls.append(1) or find(*a, **k))
    return calls


def test_a_passing_search_is_replayed_with_the_same_inputs(monkeypatch):
    calls = _searches(monkeypatch)
    seen_first, seen_second = [], []
    first = operator_stable(model=SeesInputs(seen=seen_first), batch=_x())
    second = operator_stable(model=SeesInputs(seen=seen_second), batch=_x())
    assert first.passed is second.passed is True
    assert len(calls) == 1  # the second search was replayed, not run by Hypothesis
    assert seen_first == seen_second and len(seen_first) > 20
    assert first.metrics == second.metrics and first.headline == second.headline


def test_a_failure_after_a_replay_is_shrunk_by_hypothesis_as_before(monkeypatch):
    calls = _searches(monkeypatch)
    fresh = operator_stable(model=SeesInputs(bad=True), batch=_x())  # Hypothesis alone
    operator_stable(model=SeesInputs(), batch=_x())  # records the passing search
    replayed = operator_stable(model=SeesInputs(bad=True), batch=_x())
    assert len(calls) == 3  # the failing case was handed to Hypothesis
    assert fresh.passed is replayed.passed is False
    assert fresh.metrics["failing_size"] == "one"
    assert fresh.headline == replayed.headline and fresh.metrics == replayed.metrics
