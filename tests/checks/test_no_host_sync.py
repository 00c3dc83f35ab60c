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


# ------------------------------------------------------------------ syncs inside installed packages
FAKE_PACKAGE = '''
def peek(x):
    return x * x.sum().item()  # the package's own sync


def apply(fn, x):
    return fn(x)  # calls back into the user's code
'''


@pytest.fixture
def fakepkg(tmp_path, monkeypatch):
    """A third-party package 'installed' in a site-packages directory of its own."""
    import importlib
    import sys

    site = tmp_path / "venv" / "lib" / "site-packages"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "__init__.py").write_text(FAKE_PACKAGE)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "fakepkg", raising=False)
    yield importlib.import_module("fakepkg")
    sys.modules.pop("fakepkg", None)


class UsesPackage(nn.Module):
    def __init__(self, pkg, callback=False):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 3)
        self.peek, self.apply, self.callback = pkg.peek, pkg.apply, callback  # functions copy

    def forward(self, x):
        h = self.body(x)
        if self.callback:
            return self.apply(lambda t: t / t.abs().max().item(), h)  # LINE_CALLBACK
        return self.peek(h)  # LINE_CALLS_PACKAGE


def test_sync_inside_an_installed_package_is_information_not_failure(fakepkg):
    r = no_host_sync(model=UsesPackage(fakepkg), batch=_batch())
    assert r.passed is True, r.headline
    assert r.headline.endswith("observed 0 in %d dispatched ops; 1 more inside installed packages"
                               " (fakepkg), not counted" % r.metrics["ops"])
    assert r.metrics["count"] == 0 and r.metrics["all_syncs"] == 1
    assert r.metrics["package_syncs"] == {"fakepkg": 1}
    # the package, its file and line, and the user's line that called into it
    assert ("fakepkg: fakepkg/__init__.py:3 in peek, called from"
            f" tests/checks/test_no_host_sync.py:{_line('LINE_CALLS_PACKAGE')} in forward") in r.details
    assert "information: 1 syncs inside installed packages, not counted" in r.details


def test_strict_counts_syncs_inside_installed_packages(fakepkg):
    r = no_host_sync(strict=True, model=UsesPackage(fakepkg), batch=_batch())
    assert r.passed is False
    assert r.headline == ("expected at most 0 host-device syncs in forward+backward (strict:"
                          " installed packages' too), observed 1 (aten._local_scalar_dense x1 from"
                          " __init__.py:3 in peek (fakepkg))")


@pytest.mark.parametrize("pattern", ["fakepkg", "fakepkg/__init__.py", "fakepkg/__init__.py:3",
                                     "fakepkg:peek", ["fakepkg:pe*", 0]])
def test_allow_patterns_accept_known_syncs(fakepkg, pattern):
    r = no_host_sync(pattern, strict=True, model=UsesPackage(fakepkg), batch=_batch())
    assert r.passed is True, r.headline
    assert r.metrics["accepted"] == 1
    assert "accepted by allow=" in r.details


@pytest.mark.parametrize("pattern", ["otherpkg", "fakepkg/__init__.py:7", "fakepkg:apply"])
def test_allow_patterns_that_name_other_places_accept_nothing(fakepkg, pattern):
    r = no_host_sync(pattern, strict=True, model=UsesPackage(fakepkg), batch=_batch())
    assert r.passed is False
    assert r.metrics["accepted"] == 0


def test_allow_pattern_for_a_users_own_line():
    assert no_host_sync(f"test_no_host_sync.py:{_line('LINE_ITEM')}", model=Net("item"),
                        batch=_batch()).passed is True
    assert no_host_sync(f"{__name__}:Net.forward", model=Net("item"),
                        batch=_batch()).passed is True
    assert no_host_sync("test_no_host_sync.py:1", model=Net("item"), batch=_batch()).passed is False


def test_user_code_called_back_by_a_package_is_the_users(fakepkg):
    # the nearest frame outside torch is the user's lambda: the user's sync, counted
    r = no_host_sync(model=UsesPackage(fakepkg, callback=True), batch=_batch())
    assert r.passed is False
    assert f"from test_no_host_sync.py:{_line('LINE_CALLBACK')} in <lambda>" in r.headline


def test_code_owner_tells_packages_from_the_users_project(tmp_path):
    from pytest_modelcheck.core.dispatch import code_owner

    site = tmp_path / "lib" / "dist-packages"
    installed = str(site / "ownpkg" / "mod.py")
    assert code_owner(installed) == ("package", "ownpkg", "ownpkg/mod.py")
    # the same package is also the project's own (a non-editable install of the user's project)
    (tmp_path / "proj" / "src" / "ownpkg").mkdir(parents=True)
    (tmp_path / "proj" / "src" / "ownpkg" / "__init__.py").write_text("")
    assert code_owner(installed, str(tmp_path / "proj"))[0] == "user"
    # an editable install leaves the files in the project: user code
    assert code_owner(str(tmp_path / "proj" / "src" / "ownpkg" / "mod.py"))[0] == "user"
    assert code_owner(torch.nn.functional.__file__)[0] == "torch"
    assert code_owner(pytest.__file__)[0] == "package"  # an installed third-party package


def test_hugging_face_mask_helpers_are_information_strict_fails():
    pytest.importorskip("transformers")
    from pytest_modelcheck.core.batch import Batch
    from tests.conformance.zoo import build_case

    torch.set_num_threads(1)
    model, batch, _ = build_case("hf_bert")
    r = no_host_sync(model=model, batch=Batch(kwargs=batch))
    assert r.passed is True, r.headline
    assert "transformers/masking_utils.py:" in r.details and "_ignore_" in r.details
    assert list(r.metrics["package_syncs"]) and all(
        k.startswith("transformers ") for k in r.metrics["package_syncs"])
    strict = no_host_sync(strict=True, model=model, batch=Batch(kwargs=batch))
    assert strict.passed is False
    assert "masking_utils.py:" in strict.headline and "(transformers " in strict.headline
    assert no_host_sync("transformers/masking_utils.py", strict=True, model=model,
                        batch=Batch(kwargs=batch)).passed is True


@pytest.mark.parametrize("kwargs, fragment", [
    ({"allow": [1, 2]}, "allow=[1, 2]: expected an int >= 0"),
    ({"allow": ""}, "allow='': pattern '' is not a non-empty string"),
    ({"allow": ["a b"]}, "allow=['a b']: pattern 'a b' is neither a path"),
    ({"allow": ["x.py:"]}, "has an empty part around ':'"),
    ({"allow": ["pkg.mod:1x"]}, "'1x' after ':' is neither a line number nor a function"),
    ({"allow": []}, "allow=[]: expected"),
    ({"allow": [None]}, "allow=[None]: expected"),
    ({"strict": "yes"}, "strict='yes': expected True"),
])
def test_bad_allow_patterns_and_strict_are_usage_errors(kwargs, fragment):
    with pytest.raises(UsageError) as info:
        no_host_sync(**kwargs, model=Net(), batch=_batch())
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_marker_strict_and_allow_patterns_in_pytester_project(healthy_project):
    healthy_project.makepyfile(test_sync_patterns='''
        import pytest

        @pytest.mark.no_host_sync(allow=["transformers/masking_utils.py", 1], strict=True)
        def test_ok(model, batch):
            pass

        @pytest.mark.no_host_sync(allow=["not a pattern"])
        def test_bad_pattern(model, batch):
            pass
    ''')
    result = healthy_project.runpytest("--modelcheck", "-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["@pytest.mark.no_host_sync: allow=*: pattern 'not a pattern' is"
                                 " neither a path*"])  # at setup, before anything ran
