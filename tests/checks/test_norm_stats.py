"""norm_stats: a BatchNorm left in eval mode during training (planted bug) and its healthy twin,
frozen layers, collapse, configuration mismatches, usage errors, public models."""
import importlib.util

import pytest
import torch
from torch import nn

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.norms import norm_stats


def _x(n=8, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


class Net(nn.Module):
    """conv -> BN -> ReLU -> pool -> linear; ``kind`` plants one bug."""

    def __init__(self, kind="healthy"):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, momentum=0.0 if kind == "momentum0" else 0.1)
        self.unused_bn = nn.BatchNorm2d(6)  # never called: not reached, not flagged
        self.head = nn.Linear(6, 2)
        if kind == "frozen_params":
            for p in self.bn.parameters():
                p.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        if self.kind in ("train_override", "frozen_params", "declared"):
            self.bn.eval()  # the bug (or, for the frozen kinds, the documented freeze)
        return self

    def forward(self, x):
        h = self.conv(x)
        if self.kind == "forward_eval":
            self.bn.eval()
        if self.kind == "collapse":
            h = torch.cat([h[:, :5], torch.full_like(h[:, 5:], 0.5)], 1)  # a constant channel
        h = torch.relu(self.bn(h))
        return self.head(h.mean((2, 3)))


def _batch():
    return _x(), torch.randn(8, 2, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["train_override", "forward_eval"])
def test_batchnorm_left_in_eval_during_training_fails(kind):
    r = norm_stats(model=Net(kind), batch=_batch())
    assert r.passed is False, r.headline
    assert "bn (BatchNorm2d) in eval mode during the training forward" in r.headline
    assert "running statistics never move" in r.headline
    assert "initial statistics" in r.headline
    assert r.metrics["flagged"] == ["bn"]
    assert "unused_bn" in r.details and "not reached by the forward" in r.details


def test_healthy_twin_passes_and_nothing_of_the_user_changes():
    model, batch = Net(), _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = norm_stats(model=model, batch=batch)
    assert r.passed is True, r.headline
    assert r.metrics["layers"] == 2 and r.metrics["reached"] == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training


def test_momentum_zero_never_moves():
    r = norm_stats(model=Net("momentum0"), batch=_batch())
    assert r.passed is False
    assert "in train mode but its running statistics never moved (momentum=0.0)" in r.headline


def test_frozen_layers_pass_when_frozen_on_purpose():
    # eval in training with requires_grad=False on weight and bias: the documented freeze
    r = norm_stats(model=Net("frozen_params"), batch=_batch())
    assert r.passed is True, r.headline
    assert "frozen: weight and bias have requires_grad=False" in r.details
    # or named by frozen=
    r = norm_stats(frozen=("b*",), model=Net("declared"), batch=_batch())
    assert r.passed is True, r.headline
    assert "declared frozen" in r.details


def test_declared_frozen_layer_that_trains_fails():
    r = norm_stats(frozen="bn", model=Net(), batch=_batch())
    assert r.passed is False
    assert "declared frozen, but its running statistics moved in training" in r.headline


def test_constant_channel_is_collapse():
    r = norm_stats(model=Net("collapse"), batch=_batch())
    assert r.passed is False
    assert "collapsed: 1 of 6 input channels are constant" in r.headline


def test_train_mode_in_eval_forward_fails():
    class Sticky(Net):
        def forward(self, x):
            self.bn.train()  # inference with batch statistics
            return super().forward(x)

    r = norm_stats(model=Sticky(), batch=_batch())
    assert r.passed is False
    assert "in train mode during the eval forward" in r.headline


def test_instance_norm_configuration():
    def net(**kw):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, **kw), nn.Flatten(),
                             nn.Linear(144, 2))

    assert norm_stats(model=net(), batch=_batch()).passed is True  # untracked: no statistics
    assert norm_stats(model=net(track_running_stats=True, affine=True),
                      batch=_batch()).passed is True
    r = norm_stats(affine=True, model=net(), batch=_batch())
    assert r.passed is False
    assert "affine=False: no learnable weight and bias (expected affine=True)" in r.headline
    # buffers present although track_running_stats was switched off after construction
    m = net(track_running_stats=True)
    m[1].track_running_stats = False
    r = norm_stats(model=m, batch=_batch())
    assert r.passed is False and "track_running_stats=False yet running statistics" in r.headline


def test_model_without_norm_layers_is_skipped():
    r = norm_stats(model=nn.Linear(4, 2), batch=torch.randn(3, 4))
    assert r.passed is None and "no BatchNorm/InstanceNorm layer" in r.headline


@pytest.mark.parametrize("kwargs, fragment", [
    ({"frozen": 3}, "frozen=3: expected module-name patterns"),
    ({"frozen": ["ok", ""]}, "frozen=['ok', '']: expected module-name patterns"),
    ({"affine": "yes"}, "affine='yes': expected True"),
    ({"steps": 0}, "steps=0: expected a positive integer"),
    ({"steps": 10**9}, "steps=1000000000: expected at most"),
    ({"seed": -1}, "seed=-1: expected an integer"),
])
def test_bad_arguments_are_one_line_usage_errors(kwargs, fragment):
    with pytest.raises(UsageError) as info:
        norm_stats(**kwargs, model=Net(), batch=_batch())
    assert str(info.value).startswith(fragment)
    assert "\n" not in str(info.value)


def test_marker_usage_error_names_the_marker(healthy_project):
    healthy_project.makepyfile(test_norms='''
        import pytest

        @pytest.mark.norm_stats(affine="yes")
        def test_bad(model, batch):
            pass
    ''')
    result = healthy_project.runpytest_subprocess("--modelcheck", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.norm_stats: affine='yes': expected True*"])


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision")
def test_public_models_no_false_alarm():
    from tests.conformance.zoo import import_torchvision

    tv = import_torchvision()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    r = norm_stats(model=tv.models.resnet18(num_classes=10), batch=(x, y))
    assert r.passed is True, r.headline
    # a detection-style backbone: FrozenBatchNorm2d is frozen by construction
    frozen = tv.models.resnet18(num_classes=10, norm_layer=tv.ops.FrozenBatchNorm2d)
    r = norm_stats(model=frozen, batch=(x, y))
    assert r.passed is None and "20 frozen by construction" in r.headline
