"""Hostile files, hostile arguments and misbehaving models: each gets a one-line error or a
failed check naming the problem, never a hang, a traceback from inside the plugin, or a change
left behind."""
import os
import pickle
import time
import zipfile

import pytest
import torch
from torch import nn

from pytest_modelcheck.checks import grads_finite, model_overfits, shapes_consistent
from pytest_modelcheck.core.checkpoint import (CheckpointError, compare_checkpoints,
                                               inspect_checkpoint)
from pytest_modelcheck.core.errors import UsageError


# -- checkpoint files ------------------------------------------------------------------------
def test_shared_nested_config_is_cut_not_expanded(tmp_path):
    laughs = ["ha"]
    for _ in range(40):  # 2**40 leaves once expanded, a few KB on disk
        laughs = [laughs, laughs]
    path = tmp_path / "laughs.pt"
    torch.save({"model": {"w": torch.ones(2)}, "config": laughs}, path)
    start = time.perf_counter()
    info = inspect_checkpoint(path)
    assert time.perf_counter() - start < 30
    assert "<truncated>" in str(info.config) or "<cut" in str(info.config)
    assert "Config:" in info.render()


def test_zip_bomb_record_is_refused_before_inflating(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        dst.writestr("good/extra/huge", b"\0" * (80 << 20), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="inflates to .* zip bomb"):
        inspect_checkpoint(bomb)


def test_wrapper_with_a_step_tensor_keeps_its_weights(tmp_path):
    path = tmp_path / "ck.pt"
    weights = nn.Linear(6, 4).state_dict()
    torch.save({"model_state_dict": weights, "step": torch.tensor(1000)}, path)
    info = inspect_checkpoint(path)
    assert info.state_key == "model_state_dict"
    assert sorted(info.tensors) == ["bias", "weight"]
    assert info.metadata["step"] == 1000


def test_expanded_tensor_is_not_materialised(tmp_path):
    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.ones(1).expand(1 << 40)}, path)  # 4 TiB of view, 4 bytes stored
    start = time.perf_counter()
    info = inspect_checkpoint(path)
    report = compare_checkpoints(str(path), str(path))
    assert time.perf_counter() - start < 30
    assert info.total_bytes == 4
    assert report.tensors == []  # too large to compare element by element: left out


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_nested_quantized_and_sparse_tensors(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"n": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
                "q": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8),
                "s": torch.eye(3).to_sparse()}, path)
    inspect_checkpoint(path).render()
    report = compare_checkpoints(str(path), str(path))
    assert set(report.unchanged) >= {"q", "s"}


def test_names_from_the_file_are_printed_escaped(tmp_path):
    path = tmp_path / "names.pt"
    torch.save({"line1\nline2\x1b[31m": torch.ones(2), "a\udc80b": torch.ones(2)}, path)
    text = inspect_checkpoint(path).render(verbose=True)
    assert "\x1b" not in text and "line1\\nline2\\x1b[31m" in text
    text.encode("utf-8")  # no lone surrogate left to break a strict terminal


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        inspect_checkpoint(fifo)


def test_hostile_pickle_in_a_wrapper_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "hostile.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": Payload()}, path,
               pickle_module=pickle)
    with pytest.raises(CheckpointError, match="untrusted"):
        inspect_checkpoint(path)
    assert not marker.exists()


# -- arguments and models --------------------------------------------------------------------
def test_a_model_that_is_not_a_module_is_a_usage_error():
    with pytest.raises(UsageError, match="expected a torch.nn.Module, got function"):
        grads_finite(model=lambda x: x, batch=torch.ones(2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated
def test_a_torchscript_model_is_a_usage_error_and_keeps_its_grads():
    scripted = torch.jit.script(nn.Linear(3, 2))
    with pytest.raises(UsageError, match="TorchScript"):
        grads_finite(model=scripted, batch=(torch.ones(2, 3), torch.ones(2, 2)))
    assert all(p.grad is None for p in scripted.parameters())


@pytest.mark.parametrize("device", ["5 parsecs", "", [1], -1])
def test_a_bad_device_is_a_usage_error(device):
    with pytest.raises(UsageError, match="expected a device such as"):
        grads_finite(model=nn.Linear(3, 2), batch=torch.ones(2, 3), device=device)


def test_a_loss_that_raises_fails_the_check_naming_the_loss():
    def loss(out, target):
        raise IndexError("Target 10 is out of bounds.")

    r = grads_finite(model=nn.Linear(3, 2), batch=(torch.ones(2, 3), torch.ones(2)), loss=loss)
    assert r.passed is False and "the loss" in r.headline and "IndexError" in r.headline


def test_a_loss_that_returns_a_vector_fails_the_check():
    r = grads_finite(model=nn.Linear(3, 2), batch=(torch.ones(2, 3), torch.ones(2, 2)),
                     loss=lambda out, target: (out - target) ** 2)
    assert r.passed is False and "expected a scalar" in r.headline


class ReturnsNothing(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        self.lin(x)


def test_a_forward_returning_no_tensor_fails_shapes_consistent():
    r = shapes_consistent(out=("B", 2), model=ReturnsNothing(), batch=torch.ones(2, 3))
    assert r.passed is False and "returned NoneType with no tensor" in r.headline


def test_a_model_without_trainable_parameters_fails_model_overfits():
    frozen = nn.Linear(3, 1).requires_grad_(False)
    r = model_overfits(model=frozen, batch=(torch.ones(4, 3), torch.ones(4, 1)))
    assert r.passed is False and "no trainable parameters" in r.headline


class SetsDefaultDevice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        torch.set_default_device("meta")
        torch.backends.mkldnn.enabled = False
        return self.lin(x)


def test_settings_a_forward_changes_are_put_back():
    grads_finite(model=SetsDefaultDevice(), batch=(torch.ones(2, 3), torch.ones(2, 2)))
    assert torch.empty(1).device.type == "cpu"
    assert torch.backends.mkldnn.enabled


# -- plugin options and a hanging forward ----------------------------------------------------
def test_missing_baseline_and_directory_report_are_refused_at_start(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--modelcheck", "--modelcheck-baseline=missing.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--modelcheck-baseline=missing.json: no such file*"])
    os.mkdir(pytester.path / "adir")
    result = pytester.runpytest("--modelcheck", "--modelcheck-json=adir")
    result.stderr.fnmatch_lines(["*--modelcheck-json=adir: is a directory*"])


def test_a_hanging_forward_is_stopped_by_the_timeout(pytester):
    pytester.makeconftest("""
import time
import pytest
import torch
from torch import nn

class Hangs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        time.sleep(3600)
        return self.lin(x)

@pytest.fixture
def model():
    return Hangs()

@pytest.fixture
def batch():
    return torch.ones(2, 3)
""")
    pytester.makepyfile("""
import pytest

@pytest.mark.shapes_consistent(out=("B", 2))
def test_hangs():
    pass

def test_next():
    pass
""")
    start = time.perf_counter()
    result = pytester.runpytest("--modelcheck", "--modelcheck-timeout=1s", "-p",
                                "no:cacheprovider")
    assert time.perf_counter() - start < 120
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*time budget of 1 s*"])


def test_an_absurd_batch_size_is_refused_before_allocating():
    with pytest.raises(UsageError, match="more than half the memory available"):
        shapes_consistent(out=("B", 2), batch_sizes=(10 ** 12,), model=nn.Linear(3, 2),
                          batch=torch.ones(2, 3))


def test_an_absurd_input_size_is_refused_before_allocating():
    from pytest_modelcheck.checks import vit_patches

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 8, 4, stride=4)

        def forward(self, x):
            return self.proj(x).flatten(2).mean(-1)

    with pytest.raises(UsageError, match="too large|more than half the memory"):
        vit_patches(sizes=(10 ** 9,), model=Tiny(), batch=torch.ones(2, 3, 8, 8))


def test_overlapping_safetensors_offsets_are_refused(tmp_path):
    import json
    import struct

    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [3], "data_offsets": [4, 16]}}).encode()
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="overlaps the tensor before it"):
        inspect_checkpoint(path)


def test_a_meta_model_is_counted_and_a_check_that_runs_it_says_why_it_cannot():
    from pytest_modelcheck.checks import params_under

    with torch.device("meta"):
        model = nn.Linear(4, 2)
    batch = (torch.empty(2, 4, device="meta"), torch.empty(2, 2, device="meta"))
    assert params_under("1M", model=model, batch=batch).passed is True
    r = grads_finite(model=model, batch=batch)
    assert r.passed is False and "meta device" in r.headline


# -- SystemExit and other BaseExceptions from the model (issue 11, item 3) -------------------
class _OwnBaseException(BaseException):
    """A library's control-flow exception that does not derive from Exception."""


class Exits(nn.Module):
    def __init__(self, exc):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.exc = exc

    def forward(self, x):
        raise self.exc


@pytest.mark.parametrize("exc, named", [
    (SystemExit(3), "observed SystemExit (sys.exit(3)) raised while it ran"),
    (_OwnBaseException("stop here"), "observed _OwnBaseException: stop here raised while it ran"),
], ids=["SystemExit", "BaseException"])
def test_a_base_exception_from_the_forward_is_a_failed_check_naming_it(exc, named):
    r = grads_finite(model=Exits(exc), batch=(torch.ones(2, 3), torch.ones(2, 2)))
    assert r.passed is False and named in r.headline, r.headline
    assert r.metrics["error"] == type(exc).__name__
    assert "in forward" in r.details  # where it came from


def test_keyboard_interrupt_from_the_forward_still_stops():
    with pytest.raises(KeyboardInterrupt):
        grads_finite(model=Exits(KeyboardInterrupt()), batch=(torch.ones(2, 3), torch.ones(2, 2)))


def test_sys_exit_in_a_forward_fails_one_check_and_the_others_run(pytester):
    pytester.makeconftest("""
import sys
import pytest
import torch
from torch import nn

class ExitsWhenTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        if torch.is_grad_enabled():  # grads_finite's backward pass; shapes run without grad
            sys.exit(3)
        return self.lin(x)

@pytest.fixture
def model():
    return ExitsWhenTraining()

@pytest.fixture
def batch():
    return torch.ones(4, 3), torch.ones(4, 2)
""")
    pytester.makepyfile("""
import pytest

@pytest.mark.grads_finite
@pytest.mark.shapes_consistent(out=("B", 2))
def test_exits():
    pass

def test_next():
    pass
""")
    result = pytester.runpytest("--modelcheck", "--modelcheck-json=report.json", "-p",
                                "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*observed SystemExit (sys.exit(3)) raised while it ran*",
                                 "*model health summary*"])
    import json

    doc = json.loads((pytester.path / "report.json").read_text())
    (test,) = [t for t in doc["tests"] if t["nodeid"].endswith("test_exits")]
    assert {r["check"]: r["status"] for r in test["results"]} == {
        "grads_finite": "failed", "shapes_consistent": "passed"}


# -- an outer SIGALRM deadline is never pushed back (issue 11, item 4) -----------------------
class Sleeps(nn.Module):
    """Each forward sleeps; shapes_consistent runs it once per batch size (1, 2, 3)."""

    def __init__(self, seconds):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.lin(x)


def _outer_alarm(seconds):
    """A user's (or pytest-timeout's) own SIGALRM deadline; returns the delivery times."""
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(time.monotonic()))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return fired, previous


def _run_sleepy(seconds):
    from pytest_modelcheck.checks import all_checks

    spec = all_checks()["shapes_consistent"]
    return spec.run(spec.bind((), {"out": ("B", 2)}), model=Sleeps(seconds),
                    batch=torch.ones(2, 3), timeout=60)


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="POSIX timers")
def test_an_outer_alarm_due_after_the_check_keeps_its_deadline():
    """A 2 s alarm armed before a check of at least 1.5 s fires at 2 s, not at 3.5 s."""
    import signal

    start = time.monotonic()
    fired, previous = _outer_alarm(2.0)
    try:
        r = _run_sleepy(0.5)
        check_end = time.monotonic() - start
        while not fired and time.monotonic() - start < 10:
            time.sleep(0.01)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert r.passed, r.headline
    assert check_end >= 1.5  # three 0.5 s forwards at least
    assert len(fired) == 1
    # on time, with room for a loaded machine; pushed back it would be 2 + 1.5 s or later
    assert 1.95 <= fired[0] - start < 2.9, (fired[0] - start, check_end)


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="POSIX timers")
def test_an_outer_alarm_due_during_the_check_is_delivered_then_and_the_check_goes_on():
    import signal

    start = time.monotonic()
    fired, previous = _outer_alarm(0.3)
    try:
        r = _run_sleepy(0.5)
        check_end = time.monotonic() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert r.passed, r.headline  # the handler returned: the check carried on under its budget
    assert check_end >= 1.5
    assert len(fired) == 1
    assert 0.25 <= fired[0] - start < 1.2, fired[0] - start  # not at the end of the check
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # delivered: not armed again


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="POSIX timers")
def test_the_check_budget_still_holds_after_an_outer_alarm_was_delivered():
    import signal

    from pytest_modelcheck.core.guard import CheckTimeout, time_budget

    start = time.monotonic()
    fired, previous = _outer_alarm(0.2)
    try:
        with pytest.raises(CheckTimeout):
            with time_budget(1.0):
                time.sleep(30)
        stopped = time.monotonic() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(fired) == 1 and fired[0] - start < 0.9
    assert 0.95 <= stopped < 5


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="POSIX timers")
def test_an_outer_timeout_that_fails_the_test_is_not_turned_into_a_check_result():
    """pytest-timeout's signal method: its SIGALRM handler calls ``pytest.fail("Timeout")``.
    Inside a check that is delivered on time and propagates (the test fails as a timeout),
    instead of waiting for the check to end or becoming a failed check."""
    import signal

    def pytest_timeout_like(signum, frame):
        pytest.fail("Timeout >0.3s")

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, pytest_timeout_like)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(pytest.fail.Exception, match="Timeout"):
            _run_sleepy(1.0)
        stopped = time.monotonic() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert stopped < 1.5, stopped  # the forward sleeps 1 s per batch size: 3 s unstopped
