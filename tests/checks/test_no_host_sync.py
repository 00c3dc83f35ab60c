"""no_host_sync: planted syncs fail naming the user's line, healthy twins pass, usage errors."""
import pytest
import torch
from torch import nn

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.dispatch_checks import no_host_sync
from pytest_modelcheck.core.dispatch import count_ops


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


class Net(nn.Module):
    def __init__(self, bug=None):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.bug = bug

    def forward(self, x):
        h = torch.relu(self.body(x))
        if self.bug == "item":
            h = h / h.abs().max().item()  # LINE_ITEM
        elif self.bug == "branch":
            if h.sum() > 0:  # LINE_BRANCH
                h = h * 2
        elif self.bug == "mask":
            h = h[h.sum(1) > -1e9]  # LINE_MASK: boolean-mask indexing
        elif self.bug == "healthy_mask":
            h = torch.where(h > 0.5, h, torch.zeros_like(h))
        return self.head(h)


def _line(tag):
    with open(__file__) as f:
        return next(i for i, text in enumerate(f, 1) if f"# {tag}" in text)


def test_item_in_forward_fails_naming_the_line():
    r = no_host_sync(model=Net("item"), batch=_batch())
    assert r.passed is False
    assert r.headline == ("expected at most 0 host-device syncs in forward+backward, observed 1"
                          f" (aten._local_scalar_dense x1 from test_no_host_sync.py:{_line('LINE_ITEM')}"
                          " in forward)")
    assert r.metrics["count"] == 1
    assert r.metrics["by_op"] == {"aten._local_scalar_dense": 1}
    assert "remedy:" in r.details and "[forward]" in r.details


def test_tensor_condition_in_if_fails():
    r = no_host_sync(model=Net("branch"), batch=_batch())
    assert r.passed is False
    assert f"test_no_host_sync.py:{_line('LINE_BRANCH')} in forward" in r.headline
    assert "observed 1 (aten._local_scalar_dense x1" in r.headline


def test_boolean_mask_indexing_fails():
    # On CPU x[mask] dispatches aten.index.Tensor with a bool index (no separate nonzero op);
    # the mask dtype identifies it.
    r = no_host_sync(model=Net("mask"), batch=_batch())
    assert r.passed is False
    assert "aten.index (boolean mask) x1" in r.headline
    assert f"test_no_host_sync.py:{_line('LINE_MASK')} in forward" in r.headline
    # backward of a masked index is index_put with the mask: a sync attributed to backward
    assert any(s.phase == "backward" for s in
               count_ops(Net("mask"), _batch(), backward=True).syncs)


@pytest.mark.parametrize("bug", [None, "healthy_mask"])
def test_healthy_twins_pass(bug):
    r = no_host_sync(model=Net(bug), batch=_batch())
    assert r.passed is True, r.headline
    assert r.headline.startswith("expected at most 0 host-device syncs in forward+backward, observed 0")
    assert r.metrics["count"] == 0


def test_allow_accepts_that_many_syncs():
    assert no_host_sync(1, model=Net("item"), batch=_batch()).passed is True
    assert no_host_sync(allow=0, model=Net("item"), batch=_batch()).passed is False


def test_original_model_and_batch_untouched():
    model, batch = Net("item"), _batch()
    before = model.body.weight.detach().clone()
    no_host_sync(model=model, batch=batch)
    assert model.body.weight.grad is None
    assert torch.equal(model.body.weight, before)
    assert model.training


def test_icecube_loop_fails_and_vectorized_passes():
    from example_models import icecube_deepsets as ice

    bad = no_host_sync(model=ice.build_model(vectorized=False), batch=ice.make_batch,
                       loss=ice.angular_distance_loss)
    assert bad.passed is False
    assert "aten._local_scalar_dense" in bad.headline
    assert "icecube_deepsets.py:" in bad.headline and "in pack_loop" in bad.headline
    good = no_host_sync(model=ice.build_model(), batch=ice.make_batch,
                        loss=ice.angular_distance_loss)
    assert good.passed is True, good.headline


def test_model_that_raises_fails():
    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    r = no_host_sync(model=Broken(), batch=_batch())
    assert r.passed is False
    assert "forward raised ValueError" in r.headline


@pytest.mark.parametrize("allow", [-1, 1.5, True, "0"])
def test_bad_allow_is_a_usage_error(allow):
    with pytest.raises(UsageError, match=r"^allow=.*expected an int >= 0") as info:
        no_host_sync(allow, model=Net(), batch=_batch())
    assert "\n" not in str(info.value)


def test_count_ops_sees_syncs_not_visible_on_cpu_copies():
    class Syncs(nn.Module):
        def forward(self, x):
            x.tolist()  # nothing dispatched on CPU (and nothing to synchronize)
            x.cpu()  # already on the CPU: not dispatched
            torch.unique(x)
            x.nonzero()
            return x

    ops = [s.op for s in count_ops(Syncs(), torch.randn(3, 4)).syncs]
    assert ops == ["aten._unique2", "aten.nonzero"]


def test_marker_in_pytester_project(healthy_project):
    healthy_project.makeconftest(
        "import pytest_modelcheck.checks.dispatch_checks\n"
        + (healthy_project.path / "conftest.py").read_text())
    healthy_project.makepyfile(test_sync='''
        import pytest
        import torch

        @pytest.mark.no_host_sync
        def test_ok(model, batch):
            pass

        @pytest.fixture
        def peeking():
            class Peek(torch.nn.Module):
                def forward(self, x):
                    return x * x.sum().item()
            return Peek()

        @pytest.mark.no_host_sync(model_fixture="peeking")
        def test_bad(peeking, batch):
            pass
    ''')
    result = healthy_project.runpytest("--modelcheck", "-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*expected at most 0 host-device syncs*observed 1*test_sync.py*"])
