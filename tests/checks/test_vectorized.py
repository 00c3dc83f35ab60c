"""vectorized: a Python loop over samples fails naming the module; batched twins pass."""
import pytest
import torch
from torch import nn

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.dispatch_checks import vectorized


class Encoder(nn.Module):
    def __init__(self, loop):
        super().__init__()
        self.f = nn.Linear(4, 8)
        self.loop = loop

    def forward(self, x):
        if self.loop:
            return torch.stack([self.f(x[i]) for i in range(x.shape[0])])
        return self.f(x)


class Net(nn.Module):
    def __init__(self, loop=False):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = Encoder(loop)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.encoder(x)))


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_loop_over_samples_fails_naming_the_module():
    r = vectorized(model=Net(loop=True), batch=_batch())
    assert r.passed is False
    # per sample: select + Linear on a vector (view, t, addmm, view) = 5 ops; 4 more samples
    # add 4*5 = 20 ops
    small, large = r.metrics["ops_by_batch_size"]["4"], r.metrics["ops_by_batch_size"]["8"]
    assert large - small == 20
    assert r.headline == ("expected the same number of ops at batch sizes 4 and 8, observed"
                          f" {small} -> {large} (+20); grew in module 'encoder' (+20)")
    assert r.metrics["grew_module"] == "encoder"
    assert "encoder.f" in r.details and "remedy:" in r.details


def test_vectorized_twin_passes():
    r = vectorized(model=Net(loop=False), batch=_batch())
    assert r.passed is True, r.headline
    assert r.headline.startswith("expected the same number of ops at batch sizes 4 and 8, observed ")


def test_tolerance_and_three_sizes():
    assert vectorized((2, 3), tolerance=5, model=Net(loop=True), batch=_batch()).passed is True
    r = vectorized((2, 3, 5), model=Net(loop=True), batch=_batch())
    assert r.passed is False and "at batch sizes 2 and 3" in r.headline


def test_icecube_loop_fails_and_vectorized_passes():
    from example_models import icecube_deepsets as ice

    bad = vectorized(model=ice.build_model(vectorized=False), batch=ice.make_batch)
    assert bad.passed is False
    assert "grew in module 'event_transformer'" in bad.headline
    good = vectorized(model=ice.build_model(), batch=ice.make_batch)
    assert good.passed is True, good.headline


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_sizes": (8, 4)}, r"^batch_sizes=\(8, 4\): expected two or more increasing ints >= 1"),
    ({"batch_sizes": (4,)}, r"^batch_sizes=\(4,\): expected two or more"),
    ({"batch_sizes": (0, 4)}, r"^batch_sizes=\(0, 4\): expected"),
    ({"batch_sizes": "48"}, r"^batch_sizes='48': expected"),
    ({"tolerance": -1}, r"^tolerance=-1: expected an int >= 0"),
    ({"tolerance": 0.5}, r"^tolerance=0.5: expected an int >= 0"),
])
def test_bad_arguments_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message) as info:
        vectorized(**kwargs, model=Net(), batch=_batch())
    assert "\n" not in str(info.value)


def test_marker_in_pytester_project(healthy_project):
    healthy_project.makeconftest(
        "import pytest_modelcheck.checks.dispatch_checks\n"
        + (healthy_project.path / "conftest.py").read_text())
    healthy_project.makepyfile(test_vec='''
        import pytest
        import torch

        @pytest.mark.vectorized
        def test_ok(model, batch):
            pass

        @pytest.fixture
        def looping():
            class Loop(torch.nn.Module):
                def forward(self, x):
                    return torch.stack([x[i] * 2 for i in range(x.shape[0])])
            return Loop()

        @pytest.mark.vectorized(batch_sizes=(2, 4), model_fixture="looping")
        def test_bad(looping, batch):
            pass
    ''')
    result = healthy_project.runpytest("--modelcheck", "-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*expected the same number of ops at batch sizes 2 and 4*"])
