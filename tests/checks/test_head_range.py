"""head_range: a sigmoid on an unbounded regression head (planted bug) and its identity twin,
other bounds, declared target ranges, usage errors."""
import pytest
import torch
from torch import nn

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.numerics import head_range


class Regressor(nn.Module):
    """A tiny MLP regressor; ``final`` is its last activation."""

    def __init__(self, final=None):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
        self.final = final or nn.Identity()

    def forward(self, x):
        return self.final(self.body(x))


def _batch(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = 7.5 + 6.0 * x[:, :1] + 2.0 * x[:, 1:2]  # unbounded; this batch spans about [-5, 20]
    return x, y.clamp(-5, 20)


def test_sigmoid_on_unbounded_regression_head_fails():
    r = head_range(model=Regressor(nn.Sigmoid()), batch=_batch())
    assert r.passed is False, r.headline
    assert "bounded to (0, 1) by a sigmoid (saturating) in module 'final'" in r.headline
    assert "targets leave that range" in r.headline
    assert "after the overfit run" in r.headline
    assert r.metrics["after"]["max"] < 1.0 and r.metrics["target_range"][1] > 15


def test_identity_twin_passes_and_reports_the_overfit_run():
    r = head_range(model=Regressor(), batch=_batch())
    assert r.passed is True, r.headline
    assert "an unbounded head" in r.headline
    assert r.metrics["after"]["max"] > r.metrics["init"]["max"]  # the run moved the outputs
    assert "after 30 overfit steps" in r.details


@pytest.mark.parametrize("final, fragment", [
    (nn.Tanh(), "bounded to (-1, 1) by a tanh (saturating)"),
    (nn.ReLU(), "bounded to [0, inf) by a ReLU"),
    (nn.Hardtanh(-2, 2), "bounded to [-2, 2] by a hardtanh"),
])
def test_other_bounds_are_named(final, fragment):
    r = head_range(steps=3, model=Regressor(final), batch=_batch())
    assert r.passed is False
    assert fragment in r.headline


def test_scaled_sigmoid_is_tracked_and_passes_when_it_holds_the_targets():
    class Scaled(Regressor):
        def forward(self, x):
            return 30 * torch.sigmoid(self.body(x)) - 10  # (-10, 20)

    r = head_range(steps=3, model=Scaled(), batch=_batch())
    assert r.passed is True, r.headline
    assert "a bound (-10, 20) holding them" in r.headline
    # and fails against a declared unbounded range
    r = head_range(target_range=(None, None), steps=3, model=Scaled(), batch=_batch())
    assert r.passed is False and "bounded to (-10, 20)" in r.headline


def test_targets_inside_the_sigmoid_range_pass():
    x, y = _batch()
    r = head_range(steps=3, model=Regressor(nn.Sigmoid()), batch=(x, torch.sigmoid(y / 10)))
    assert r.passed is True, r.headline


def test_hidden_clamp_is_caught_after_the_overfit_run():
    class Hidden(Regressor):
        def forward(self, x):
            y = self.body(x)
            return torch.where(y > 3, torch.full_like(y, 3.0), y)  # no bounding op to see

    r = head_range(steps=60, model=Hidden(), batch=_batch())
    assert r.passed is False, r.headline
    assert "pinned at 3" in r.headline


def test_integer_target_is_a_usage_error():
    with pytest.raises(UsageError, match="head_range is for regression heads"):
        head_range(model=nn.Linear(4, 3), batch=(torch.randn(4, 4), torch.tensor([0, 1, 2, 0])))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"target_range": 5}, "target_range=5: expected None (the batch's target) or a (lo, hi)"),
    ({"target_range": (3, 1)}, "target_range=(3, 1): expected lo <= hi"),
    ({"steps": 0}, "steps=0: expected a positive integer"),
    ({"steps": 5000}, "steps=5000: expected at most 1000"),
    ({"lr": -1}, "lr=-1: expected a positive number"),
])
def test_bad_arguments_are_one_line_usage_errors(kwargs, fragment):
    with pytest.raises(UsageError) as info:
        head_range(**kwargs, model=Regressor(), batch=_batch())
    assert str(info.value).startswith(fragment)
    assert "\n" not in str(info.value)


def test_marker_usage_error_names_the_marker(healthy_project):
    healthy_project.makepyfile(test_head='''
        import pytest

        @pytest.mark.head_range(target_range="wide")
        def test_bad(model, batch):
            pass
    ''')
    result = healthy_project.runpytest_subprocess("--modelcheck", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.head_range: target_range='wide': expected None*"])
