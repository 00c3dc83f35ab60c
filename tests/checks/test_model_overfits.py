"""model_overfits: direct calls on healthy and planted-bug models, usage errors, the marker."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks import model_overfits

BARS = set("▁▂▃▄▅▆▇█×")


def _mlp(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 5))


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 8, generator=g), torch.randint(0, 5, (16,), generator=g)


class ZeroedOutput(nn.Module):
    """Logits multiplied by zero: every class gets probability 1/5, and no gradient flows."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, x):
        return self.net(x) * 0.0


class NaNAfterFourSteps(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.net(x)
        if self.training and self.calls > 4:
            out = out * float("nan")
        return out


def _curve(headline):
    return headline.rsplit(" ", 1)[1]


# -- passing ---------------------------------------------------------------------------------
def test_healthy_mlp_overfits_one_batch():
    model, (x, y) = _mlp(), _batch()
    r = model_overfits(steps=30, lr=1e-2, model=model, batch=(x, y))
    assert r.passed is True, r.headline
    with torch.no_grad():
        initial = float(F.cross_entropy(model(x), y))
    assert r.metrics["initial_loss"] == pytest.approx(initial, rel=1e-6)
    goal = 0.3 * initial
    assert r.metrics["goal"] == pytest.approx(goal, rel=1e-6)
    m = r.metrics
    assert r.headline.startswith(f"expected loss <= 0.3 x initial {m['initial_loss']:.4g} ="
                                 f" {m['goal']:.4g} within 30 steps, observed {m['best_loss']:.4g} ")
    assert m["best_loss"] <= m["goal"]
    assert r.metrics["loss_fn"] == "cross_entropy" and r.metrics["optimizer"] == "adam"


def test_sparkline_in_the_headline_follows_the_losses():
    r = model_overfits(steps=30, model=_mlp(), batch=_batch())  # lr 3e-3: a slow fit
    curve = _curve(r.headline)
    n = r.metrics["steps_run"]
    assert r.passed is True and n > 30  # extended while falling, stopped at the goal
    assert set(curve) <= BARS
    assert len(curve) == 24  # n losses sampled down to the sparkline's width
    assert curve[0] == "█" and curve[-1] == "▁"  # falls from the initial loss to the best one
    assert r.details.splitlines()[0] == f"loss curve ({n} steps, adam lr=0.003): {curve}"


def test_metrics_hold_every_step_loss():
    r = model_overfits(steps=12, lr=1e-2, model=_mlp(), batch=_batch())
    losses = r.metrics["losses"]
    assert len(losses) == r.metrics["steps_run"] == 12
    assert losses[0] == round(r.metrics["initial_loss"], 6)
    assert min(losses) == round(r.metrics["best_loss"], 6)
    assert losses[-1] == round(r.metrics["final_loss"], 6)
    assert len(_curve(r.headline)) == 12  # one bar per step when there are few


def test_two_runs_give_identical_losses():
    first = model_overfits(steps=15, lr=1e-2, model=_mlp(dropout=0.3), batch=_batch())
    second = model_overfits(steps=15, lr=1e-2, model=_mlp(dropout=0.3), batch=_batch())
    assert first.metrics["losses"] == second.metrics["losses"]
    assert first.headline == second.headline


def test_the_seed_drives_the_randomness_of_training():
    a = model_overfits(steps=5, seed=0, model=_mlp(dropout=0.3), batch=_batch())
    b = model_overfits(steps=5, seed=1, model=_mlp(dropout=0.3), batch=_batch())
    assert a.metrics["losses"][0] != b.metrics["losses"][0]  # different dropout masks


def test_caller_rng_is_not_reseeded():
    model, batch = _mlp(dropout=0.3), _batch()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model_overfits(steps=3, model=model, batch=batch)
    assert torch.equal(torch.rand(3), expected)


def test_absolute_target():
    r = model_overfits(steps=30, lr=1e-2, target=0.5, model=_mlp(), batch=_batch())
    assert r.passed is True, r.headline
    assert r.headline.startswith("expected loss <= 0.5 within 30 steps, observed ")
    assert r.metrics["goal"] == 0.5


def test_loss_terms_from_a_dict_loss_are_kept():
    def loss(out, target):
        return {"ce": F.cross_entropy(out, target), "logit_l2": 1e-3 * out.pow(2).mean()}

    r = model_overfits(steps=6, lr=1e-2, loss=loss, model=_mlp(), batch=_batch())
    assert sorted(r.metrics["terms"]) == ["ce", "logit_l2"]
    assert len(r.metrics["terms"]["ce"]) == 6
    assert any(line.startswith("  term ce: ") for line in r.details.splitlines())


# -- failing ---------------------------------------------------------------------------------
def test_zeroed_output_is_stuck_at_chance_level():
    r = model_overfits(steps=20, chance_level=math.log(5), model=ZeroedOutput(), batch=_batch())
    assert r.passed is False
    # uniform logits over 5 classes: cross-entropy ln 5 = 1.609 at every step
    assert r.headline == ("expected loss <= 0.3 x initial 1.609 = 0.4828 within 20 steps, observed"
                          " stuck at chance level 1.609 (final 1.609) " + "▁" * 20)
    assert r.metrics["stuck_at_chance"] is True
    assert r.metrics["losses"] == [round(math.log(5), 6)] * 20
    assert "hints:" in r.details


def test_zeroed_output_without_chance_level_is_a_flat_loss():
    r = model_overfits(steps=20, model=ZeroedOutput(), batch=_batch())
    assert r.passed is False
    assert r.headline.endswith("observed loss flat at 1.609 " + "▁" * 20)
    assert r.metrics["stuck_at_chance"] is False


def test_chance_level_far_from_the_final_loss_is_not_claimed():
    r = model_overfits(steps=20, chance_level=math.log(100), model=ZeroedOutput(), batch=_batch())
    assert r.passed is False
    assert "loss flat at 1.609" in r.headline and "chance" not in r.headline


def test_unreachable_absolute_target_reports_the_best_loss():
    r = model_overfits(steps=5, target=1e-6, model=_mlp(), batch=_batch())
    assert r.passed is False
    best, final = r.metrics["best_loss"], r.metrics["final_loss"]
    assert r.headline.startswith(f"expected loss <= 1e-06 within 5 steps, observed best {best:.4g}"
                                 f" (final {final:.4g}) ")


def test_nan_loss_stops_early():
    r = model_overfits(steps=20, model=NaNAfterFourSteps(), batch=_batch())
    assert r.passed is False
    assert "observed a non-finite loss: loss became nan at step 4 " in r.headline
    assert r.metrics["steps_run"] == 5
    assert r.metrics["losses"][-1] == "nan"
    assert _curve(r.headline).endswith("×")


def test_nan_loss_at_the_first_step():
    model = nn.Sequential(nn.Linear(8, 5), nn.LogSigmoid())
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    r = model_overfits(steps=10, model=model, batch=_batch())
    assert r.passed is False
    assert "loss became nan at step 0" in r.headline
    assert r.metrics["steps_run"] == 1


def test_model_that_raises_becomes_a_failed_result():
    r = model_overfits(steps=5, model=nn.Sequential(nn.Linear(8, 4), nn.Linear(3, 5)), batch=_batch())
    assert r.passed is False
    assert r.headline.startswith("forward raised RuntimeError in module '1' (Linear)")


# -- usage errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps=0: expected a positive integer"),
    ({"steps": -3}, "steps=-3: expected a positive integer"),
    ({"steps": 2.5}, "steps=2.5: expected a positive integer"),
    ({"steps": True}, "steps=True: expected a positive integer"),
    ({"steps": "10"}, "steps='10': expected a positive integer"),
    ({"lr": 0}, "lr=0: expected a positive number"),
    ({"lr": "big"}, "lr='big': expected a positive number"),
    ({"lr": float("nan")}, "lr=nan: expected a positive number"),
    ({"lr": float("inf")}, "lr=inf: expected a positive number"),
    ({"optimizer": "lion"}, "optimizer='lion': expected one of adam, adamw, sgd, rmsprop"),
    ({"optimizer": 3}, "optimizer=3: expected one of"),
    ({"target_ratio": 1.0}, "target_ratio=1.0: expected a fraction of the initial loss below 1"),
    ({"target_ratio": 0}, "target_ratio=0: expected a positive number"),
    ({"target": "low"}, "target='low': expected a number"),
    ({"target": float("nan")}, "target=nan: expected a number"),
    ({"chance_level": "chance"}, "chance_level='chance': expected a number"),
    ({"seed": 0.5}, "seed=0.5: expected "),
    ({"epochs": 3}, "got an unexpected keyword argument 'epochs'; expected model_overfits("),
])
def test_bad_arguments_raise_usage_error_in_one_line(kwargs, message):
    calls = []

    class Spy(nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    with pytest.raises(UsageError) as info:
        model_overfits(**kwargs, model=Spy(8, 5), batch=_batch())
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text
    assert not calls  # rejected before the model ran


def test_batch_without_target_and_no_loss_is_a_usage_error():
    x, _ = _batch()
    with pytest.raises(UsageError) as info:
        model_overfits(model=_mlp(), batch=x)
    assert str(info.value) == ("model_overfits needs a target in the batch or a loss= callable;"
                               " got a batch without target")


def test_batch_without_target_trains_with_a_loss_callable():
    x, _ = _batch()
    r = model_overfits(steps=20, lr=1e-2, loss=lambda out, target: out.pow(2).mean(), model=_mlp(),
                       batch=x)
    assert r.passed is True, r.headline


# -- the marker ------------------------------------------------------------------------------
def test_marker_passes_on_healthy_and_fails_at_chance_level(healthy_project):
    healthy_project.makepyfile("""
        import math
        import pytest, torch
        from torch import nn

        class Zeroed(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
            def forward(self, x):
                return self.net(x) * 0.0

        @pytest.fixture
        def zeroed():
            torch.manual_seed(0)
            return Zeroed()

        @pytest.mark.model_overfits(steps=30, lr=1e-2)
        def test_healthy():
            pass

        @pytest.mark.model_overfits(steps=20, chance_level=math.log(5), model_fixture="zeroed")
        def test_zeroed():
            pass
    """)
    result = healthy_project.runpytest("--modelcheck", "-W", "error")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*_ test_zeroed _*",
        "1 model check failed:",
        "  ?model_overfits? expected loss <= 0.3 x initial 1.609 = 0.4828 within 20 steps, observed"
        " stuck at chance level 1.609 (final 1.609) ▁▁▁▁*",
        "*Captured modelcheck call*",
        "*loss curve (20 steps, adam lr=0.003): ▁▁▁▁*",
        "*hints:*",
        "FAILED *::test_zeroed*",
    ])


# -- the run stops once the goal is met ------------------------------------------------------
def test_run_stops_at_the_step_the_goal_is_met():
    r = model_overfits(steps=100, lr=1e-2, model=_mlp(), batch=_batch())
    m = r.metrics
    k = m["goal_met_at_step"]
    assert r.passed is True and 10 <= k < 100
    assert m["steps_run"] == k + 1 == len(m["losses"])  # not the 100 allowed
    assert all(v > m["goal"] for v in m["losses"][:k]) and m["losses"][k] <= round(m["goal"], 6)
    assert f"observed {m['best_loss']:.4g} (goal met at step {k} of up to 100) " in r.headline


def test_goal_met_at_once_still_runs_the_minimum_steps():
    # a 0.95 x initial goal is met after one Adam step; the run goes on to MIN_STEPS (10)
    from pytest_modelcheck.checks.overfit import MIN_STEPS

    r = model_overfits(steps=100, lr=1e-2, target_ratio=0.95, model=_mlp(), batch=_batch())
    assert r.passed is True and r.metrics["goal_met_at_step"] < MIN_STEPS
    assert r.metrics["steps_run"] == MIN_STEPS == 10


def test_a_fit_that_turns_nan_within_the_minimum_steps_fails():
    # the goal (0.95 x initial) is met before step 4, where the loss turns NaN
    r = model_overfits(steps=100, lr=1e-2, target_ratio=0.95, model=NaNAfterFourSteps(),
                       batch=_batch())
    assert r.passed is False
    assert "loss became nan at step 4" in r.headline
    assert r.metrics["goal_met_at_step"] is not None and r.metrics["goal_met_at_step"] < 4
