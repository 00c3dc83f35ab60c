"""grads_finite: direct calls on healthy and planted-bug models, usage errors, the marker."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks import grads_finite


def _batch(n=6, features=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def _healthy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


class LogActivation(nn.Module):
    def forward(self, h):
        return torch.log(h)  # NaN wherever the pre-activation is negative


class LogNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(4, 8), LogActivation())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x))


class SelfDistanceNet(nn.Module):
    """sqrt of a distance that is exactly zero: finite forward, NaN gradient in backward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x)
        dist = torch.sqrt((h - h).pow(2).sum(-1, keepdim=True))  # d sqrt/du at u=0 is inf
        return self.head(h) * (1 + dist)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)  # an auxiliary head that forward forgot to use

    def forward(self, h):
        return self.main(h)


class UnusedBranchNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 8)
        self.head = Head()

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


class DetachNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)).detach())  # cuts the graph: body gets nothing


class MultiInputNet(nn.Module):
    """model(x_sig, t, label, geom), as a detector-signal model takes its inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.sig = nn.Linear(16, 8)
        self.time = nn.Linear(1, 8)
        self.label = nn.Embedding(4, 8)
        self.geom = nn.Linear(3, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x_sig, t, label, geom):
        h = self.sig(x_sig) + self.time(t) + self.label(label) + self.geom(geom)
        return self.out(torch.tanh(h))


def _multi_batch(n=5):
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(n, 16, generator=g), torch.rand(n, 1, generator=g),
              torch.randint(0, 4, (n,), generator=g), torch.randn(n, 3, generator=g))
    return inputs, torch.randn(n, 2, generator=g)


class DictBatchNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(5, 3)

    def forward(self, batch):
        return self.enc(batch["features"])


class DictOutputNet(nn.Module):
    def __init__(self, angle_scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 8)
        self.cls = nn.Linear(8, 3)
        self.ang = nn.Linear(8, 2)
        self.angle_scale = angle_scale

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return {"logits": self.cls(h), "angles": torch.acos(torch.tanh(self.ang(h)) * self.angle_scale)}


def _line_of(func, text):
    lines, start = inspect.getsourcelines(func)
    return start + next(i for i, line in enumerate(lines) if text in line)


# -- healthy models pass ---------------------------------------------------------------------
def test_healthy_mlp_passes():
    r = grads_finite(model=_healthy(), batch=_batch())
    assert r.passed is True, r.headline
    # 2 Linear layers x (weight, bias)
    assert r.headline.startswith("expected finite gradients for all 4 trainable tensors, observed finite")
    assert r.metrics["trainable_tensors"] == 4
    assert r.metrics["nonfinite_grads"] == 0 and r.metrics["missing_grads"] == 0
    assert r.metrics["loss_fn"] == "cross_entropy"
    assert r.metrics["grad_norm"] > 0


def test_reported_loss_is_the_cross_entropy_of_the_model():
    model, (x, y) = _healthy(), _batch()
    r = grads_finite(model=model, batch=(x, y))
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x), y))
    assert r.metrics["loss"] == pytest.approx(expected, rel=1e-6)


def test_frozen_parameters_are_not_required_to_get_a_gradient():
    model = _healthy()
    model[0].requires_grad_(False)
    r = grads_finite(model=model, batch=_batch())
    assert r.passed is True, r.headline
    assert r.metrics["trainable_tensors"] == 2


def test_multi_input_model_with_tuple_of_inputs():
    r = grads_finite(model=MultiInputNet(), batch=_multi_batch())
    assert r.passed is True, r.headline
    # sig, time, geom, out: weight + bias each; label: one embedding table
    assert r.metrics["trainable_tensors"] == 9
    assert r.metrics["loss_fn"] == "mse"


def test_dict_batch_takes_the_target_from_targets():
    g = torch.Generator().manual_seed(2)
    batch = {"features": torch.randn(5, 5, generator=g), "targets": torch.randint(0, 3, (5,), generator=g)}
    model = DictBatchNet()
    r = grads_finite(model=model, batch=batch)
    assert r.passed is True, r.headline
    assert r.metrics["loss_fn"] == "cross_entropy"
    with torch.no_grad():
        expected = float(F.cross_entropy(model(batch), batch["targets"]))
    assert r.metrics["loss"] == pytest.approx(expected, rel=1e-6)


def test_dict_output_without_target_uses_the_surrogate_loss():
    x, _ = _batch()
    r = grads_finite(model=DictOutputNet(), batch=x)
    assert r.passed is True, r.headline
    assert r.metrics["loss_fn"].startswith("surrogate")
    assert r.metrics["trainable_tensors"] == 6


def test_dict_output_with_a_loss_callable():
    x, y = _batch()
    angles = torch.rand(6, 2)

    def loss(out, target):
        return F.cross_entropy(out["logits"], target["cls"]) + F.mse_loss(out["angles"], target["ang"])

    r = grads_finite(model=DictOutputNet(), batch=(x, {"cls": y, "ang": angles}), loss=loss)
    assert r.passed is True, r.headline
    assert r.metrics["loss_fn"] == "loss"


# -- planted bugs fail, naming what is wrong -------------------------------------------------
def test_log_of_negative_activations_names_the_op_and_module():
    x, y = _batch()
    with torch.no_grad():
        assert (LogNet().features[0](x) < 0).any()  # the premise: some pre-activations are negative
    r = grads_finite(model=LogNet(), batch=(x, y))
    assert r.passed is False
    line = _line_of(LogActivation.forward, "torch.log(")
    assert r.headline.startswith("expected finite outputs, loss and gradients, observed non-finite"
                                 " values in output; NaN first produced in forward by log in module"
                                 " 'features.1' at ")
    assert r.headline.endswith(f"test_grads_finite.py:{line} in forward")
    assert r.metrics["origin_op"] == "log"
    assert r.metrics["origin_module"] == "features.1"
    assert r.metrics["origin_phase"] == "forward"
    assert r.details.splitlines()[0].startswith("origin: NaN first produced in forward by log")


def test_sqrt_at_zero_is_found_in_backward():
    r = grads_finite(model=SelfDistanceNet(), batch=_batch())
    assert r.passed is False
    assert r.headline.startswith("expected finite outputs, loss and gradients, observed NaN in the"
                                 " gradient of 'body.weight' (Linear 'body')")
    assert "first produced in backward by " in r.headline
    assert r.metrics["origin_phase"] == "backward"
    assert r.metrics["origin_op"].endswith("Backward0")
    # head.* gets finite gradients (dist is 0); body.* gets NaN through dist's gradient
    assert r.metrics["nonfinite_grads"] == 2
    assert "body.bias" in r.details and "head.weight" not in r.details


def test_nan_in_a_dict_output_names_the_entry():
    x, _ = _batch()
    model = DictOutputNet(angle_scale=10.0)
    with torch.no_grad():  # the premise: some scaled values leave acos's domain [-1, 1]
        assert (torch.tanh(model.ang(torch.relu(model.trunk(x)))).abs() * 10 > 1).any()
    r = grads_finite(model=model, batch=x)
    assert r.passed is False
    assert "observed non-finite values in output['angles']" in r.headline
    assert "NaN first produced in forward by acos" in r.headline
    assert r.metrics["origin_op"] == "acos"


def test_parameter_not_used_in_forward_is_named_by_full_dotted_name():
    r = grads_finite(model=UnusedBranchNet(), batch=_batch())
    assert r.passed is False
    assert r.headline == ("expected a gradient for every trainable parameter, observed none for"
                          " 'head.aux.weight' (Linear 'head.aux') and 1 more")
    assert r.metrics["missing_grads"] == 2
    listed = [line.split()[0] for line in r.details.splitlines() if line.startswith("  ")]
    assert listed == ["head.aux.weight", "head.aux.bias"]
    assert "allow_unused=[...]" in r.details


def test_detach_in_the_middle_leaves_the_first_layer_without_gradient():
    r = grads_finite(model=DetachNet(), batch=_batch())
    assert r.passed is False
    assert r.headline == ("expected a gradient for every trainable parameter, observed none for"
                          " 'body.weight' (Linear 'body') and 1 more")
    assert ".detach()" in r.details


@pytest.mark.parametrize("allow_unused", [
    ["head.aux.weight", "head.aux.bias"],
    ["head.aux.*"],
    "head.aux.*",
    ("*.aux.*",),
    {"head.aux.weight", "head.aux.b?as"},
    ["head.aux.weight", "head.aux.bias", "no.such.parameter"],
])
def test_allow_unused_names_and_globs(allow_unused):
    r = grads_finite(allow_unused=allow_unused, model=UnusedBranchNet(), batch=_batch())
    assert r.passed is True, r.headline


def test_allow_unused_that_misses_one_still_fails_on_it():
    r = grads_finite(allow_unused=["head.aux.weight"], model=UnusedBranchNet(), batch=_batch())
    assert r.passed is False
    assert "observed none for 'head.aux.bias' (Linear 'head.aux')" in r.headline
    assert "and 1 more" not in r.headline


def test_allow_unused_globs_are_case_sensitive():
    r = grads_finite(allow_unused=["HEAD.AUX.*"], model=UnusedBranchNet(), batch=_batch())
    assert r.passed is False


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_blamed_on_the_data(bad):
    x, y = _batch()
    x[2, 1] = bad
    r = grads_finite(model=_healthy(), batch=(x, y))
    assert r.passed is False
    assert r.headline == ("expected finite inputs, observed non-finite values in input[0] of the"
                          " batch (the data, not the model, holds NaN/Inf)")
    assert r.metrics["nonfinite_inputs"] == ["input[0]"]


def test_nan_in_one_input_of_a_multi_input_model_names_that_input():
    (x_sig, t, label, geom), target = _multi_batch()
    geom[3, 0] = float("nan")
    r = grads_finite(model=MultiInputNet(), batch=((x_sig, t, label, geom), target))
    assert r.passed is False
    assert "non-finite values in input[3] of the batch" in r.headline
    assert "holds NaN" in r.headline


def test_model_that_raises_becomes_a_failed_result_naming_the_module():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(5, 3))
    r = grads_finite(model=model, batch=_batch())
    assert r.passed is False
    assert r.headline.startswith("forward raised RuntimeError in module '1' (Linear): ")
    assert r.metrics["raised_in"] == "1"


def test_caller_model_keeps_no_gradient():
    model = _healthy()
    grads_finite(model=model, batch=_batch())
    assert all(p.grad is None for p in model.parameters())


# -- usage errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, kwargs, message", [
    ((), {"allow_unused": 3}, "allow_unused=3: expected a list of parameter names or glob patterns"),
    ((), {"allow_unused": [1, "a"]}, "allow_unused=[1, 'a']: expected a list"),
    ((), {"allow_unused": {"head": 1}}, "allow_unused={'head': 1}: expected a list"),
    ((), {"allow_unused": None}, "allow_unused=None: expected a list"),
    ((), {"loss": "hinge"}, "loss='hinge': expected one of cross_entropy, mse"),
    ((), {"loss": 3}, "loss=3: expected one of"),
    ((), {"colour": "red"}, "got an unexpected keyword argument 'colour'; expected grads_finite("),
    ((["a"], "b"), {}, "too many positional arguments; expected grads_finite("),
])
def test_bad_arguments_raise_usage_error_in_one_line(args, kwargs, message):
    calls = []

    class Spy(nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    with pytest.raises(UsageError) as info:
        grads_finite(*args, **kwargs, model=Spy(4, 3), batch=_batch())
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert not calls  # rejected before the model ran


def test_batch_of_the_wrong_form_is_a_usage_error():
    with pytest.raises(UsageError, match=r"^batch: a tuple batch must be \(inputs, target\)"):
        grads_finite(model=_healthy(), batch=(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2)))


# -- the marker ------------------------------------------------------------------------------
def test_marker_passes_on_healthy_and_names_the_unused_parameter(healthy_project):
    healthy_project.makepyfile("""
        import pytest, torch
        from torch import nn

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.main = nn.Linear(32, 5)
                self.aux = nn.Linear(32, 5)
            def forward(self, h):
                return self.main(h)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Linear(8, 32)
                self.head = Head()
            def forward(self, x):
                return self.head(torch.relu(self.body(x)))

        @pytest.fixture
        def broken():
            torch.manual_seed(0)
            return Net()

        @pytest.mark.grads_finite
        def test_healthy():
            pass

        @pytest.mark.grads_finite(model_fixture="broken")
        def test_unused_head():
            pass

        @pytest.mark.grads_finite(allow_unused=["head.aux.*"], model_fixture="broken")
        def test_unused_head_allowed():
            pass
    """)
    result = healthy_project.runpytest("--modelcheck", "-W", "error")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*_ test_unused_head _*",
        "1 model check failed:",
        "  ?grads_finite? expected a gradient for every trainable parameter, observed none for"
        " 'head.aux.weight' (Linear 'head.aux') and 1 more",
        "*Captured modelcheck call*",
        "*head.aux.bias*(Linear 'head.aux')",
        "*remedy:*allow_unused=*",
        "FAILED *::test_unused_head*",
    ])
