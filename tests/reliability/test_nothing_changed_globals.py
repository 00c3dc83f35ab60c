"""Every registered check leaves hooks and torch's process-wide settings exactly as it found them.

Extends ``tests/checks/test_nothing_changed.py`` (same checks, same passing and failing
configurations, same ``Subject``) to what that file does not compare:

* the identity (not only the number) of every hook dict of every submodule: forward,
  forward-with-kwargs, forward-pre, backward, backward-pre, state-dict, state-dict-pre,
  load-state-dict-pre and -post hooks, with user hooks registered before the check runs;
* the global module hooks (every ``torch.nn.modules.module._global_*`` registry), with a user
  global forward hook registered before;
* torch settings moved away from their defaults before the check runs, so that a check which
  "restores" to the default instead of to the caller's value is caught: deterministic algorithms
  on with ``warn_only=True``, float32 matmul precision ``'medium'``, one thread, CPU autocast
  dtype float16; and grad mode, inference mode, default dtype, anomaly mode, autocast enabled
  flags and cache, the Python, NumPy, torch CPU (and CUDA, when available) RNG states.
"""
import importlib.util
import os
import pathlib
import random

import numpy as np
import pytest
import torch
import torch.nn.modules.module as module_mod

import pytest_modelcheck.checks.throughput as throughput_module
from pytest_modelcheck.checks import all_checks

_SOURCE = pathlib.Path(__file__).parents[1] / "checks" / "test_nothing_changed.py"
_spec = importlib.util.spec_from_file_location("_nothing_changed_configs", _SOURCE)
_nc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_nc)
CONFIGS, Subject, make_batch = _nc.CONFIGS, _nc.Subject, _nc._batch

HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
              "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
              "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _identity(value):
    """A comparable snapshot of a hook registry: keys and the identity of each hook."""
    if isinstance(value, dict):
        return tuple((k, id(v) if callable(v) or hasattr(v, "__dict__") else v)
                     for k, v in value.items())
    return repr(value)


def _module_hooks(model):
    return {(name, attr): _identity(getattr(m, attr, None))
            for name, m in model.named_modules(remove_duplicate=False) for attr in HOOK_DICTS}


def _global_hooks():
    return {name: _identity(getattr(module_mod, name))
            for name in dir(module_mod) if name.startswith("_global_")}


def _settings():
    state = {
        "grad": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "anomaly_check_nan": torch.is_anomaly_check_nan_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "threads": torch.get_num_threads(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "autocast_cpu_dtype": torch.get_autocast_dtype("cpu"),
        "autocast_cuda": torch.is_autocast_enabled("cuda"),
        "autocast_cuda_dtype": torch.get_autocast_dtype("cuda"),
        "autocast_cache": torch.is_autocast_cache_enabled(),
        "python_rng": random.getstate(),
        "numpy_rng": repr(np.random.get_state()),
        "torch_rng": torch.get_rng_state().tolist(),
        "environ": dict(os.environ),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _noop_hook(*args, **kwargs):
    return None


@pytest.fixture
def moved_settings(monkeypatch):
    """Torch settings away from their defaults (and a fake throughput clock); undone after."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.get_float32_matmul_precision(), torch.get_num_threads(),
             torch.get_autocast_dtype("cpu"))
    clock = iter(i * 0.25 for i in range(10**9))  # every timed run takes 0.25 s
    monkeypatch.setattr(throughput_module, "TIMER", lambda: next(clock))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_float32_matmul_precision("medium")
    torch.set_num_threads(1)
    torch.set_autocast_dtype("cpu", torch.float16)
    handle = torch.nn.modules.module.register_module_forward_hook(_noop_hook)
    try:
        yield
    finally:
        handle.remove()
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_float32_matmul_precision(saved[2])
        torch.set_num_threads(saved[3])
        torch.set_autocast_dtype("cpu", saved[4])


def _subject_with_user_hooks(model_kwargs):
    model = Subject(**model_kwargs)
    for m in (model, model.encoder[0], model.head[1]):
        m.register_forward_hook(_noop_hook)
        m.register_forward_hook(_noop_hook, with_kwargs=True, always_call=True)
        m.register_forward_pre_hook(_noop_hook)
        m.register_state_dict_pre_hook(_noop_hook)
        m._register_state_dict_hook(_noop_hook)
        m.register_load_state_dict_post_hook(_noop_hook)
    # backward hooks where the module's input requires grad (else torch warns on every backward)
    model.head[1].register_full_backward_hook(_noop_hook)
    model.head[1].register_full_backward_pre_hook(_noop_hook)
    return model


def _changes(name, which):
    args = CONFIGS[name][which]
    model_kwargs = CONFIGS[name][2] if which == 1 and len(CONFIGS[name]) > 2 else {}
    model, batch = _subject_with_user_hooks(model_kwargs), make_batch()
    random.seed(21)
    np.random.seed(22)
    torch.manual_seed(23)
    before = (_module_hooks(model), _global_hooks(), _settings())
    result = all_checks()[name](**args, model=model, batch=batch)
    after = (_module_hooks(model), _global_hooks(), _settings())
    changed = [f"hooks of {mod or 'Subject'}: {attr}" for (mod, attr) in before[0]
               if before[0][(mod, attr)] != after[0].get((mod, attr))]
    changed += [f"global module hooks: {k}" for k in before[1] if before[1][k] != after[1].get(k)]
    changed += [f"setting: {k} {before[2][k]!r} -> {after[2][k]!r}"
                if "rng" not in k and k != "environ" else f"setting: {k}"
                for k in before[2] if before[2][k] != after[2][k]]
    return result, changed


@pytest.mark.parametrize("which", [0, 1], ids=["passing", "failing"])
@pytest.mark.parametrize("name", sorted(all_checks()))
def test_check_leaves_hooks_and_torch_settings_unchanged(name, which, moved_settings):
    if name not in CONFIGS:
        pytest.fail(f"check {name!r} has no entry in CONFIGS of {_SOURCE}")
    result, changed = _changes(name, which)
    assert changed == [], f"{name} ({result.status}: {result.headline})"


@pytest.mark.parametrize("change, expected", [
    (lambda m: m.encoder[0]._forward_hooks.clear(), "hooks of encoder.0: _forward_hooks"),
    (lambda m: m.head[1].register_state_dict_pre_hook(_noop_hook),
     "hooks of head.1: _state_dict_pre_hooks"),
    (lambda m: module_mod._global_forward_hooks.clear(), "global module hooks: _global_forward_hooks"),
    (lambda m: torch.set_float32_matmul_precision("highest"), "setting: matmul_precision 'medium' -> 'highest'"),
    (lambda m: torch.set_num_threads(2), "setting: threads 1 -> 2"),
    (lambda m: torch.use_deterministic_algorithms(True), "setting: deterministic_warn_only True -> False"),
    (lambda m: torch.set_autocast_dtype("cpu", torch.bfloat16),
     "setting: autocast_cpu_dtype torch.float16 -> torch.bfloat16"),
    (lambda m: torch.set_autocast_enabled("cpu", True), "setting: autocast_cpu False -> True"),
    (lambda m: torch.autograd.set_detect_anomaly(True), "setting: anomaly False -> True"),
    (lambda m: torch.rand(1), "setting: torch_rng"),
    (lambda m: os.environ.__setitem__("MODELCHECK_TEST_FAKE_CHECK", "1"), "setting: environ"),
], ids=["hook_removed", "hook_added", "global_hook", "precision", "threads", "warn_only",
        "autocast_dtype", "autocast_enabled", "anomaly", "rng", "environ"])
def test_the_comparison_notices_each_kind_of_change(change, expected, moved_settings, monkeypatch):
    """The snapshot is sensitive: a fake check that makes one change is caught, by name."""
    from pytest_modelcheck.core.result import CheckResult

    class FakeCheck:
        def __call__(self, *, model, batch):
            change(model)
            return CheckResult("fake", True, "did one change")

    monkeypatch.setitem(CONFIGS, "fake", ({}, {}))
    monkeypatch.setattr(f"{__name__}.all_checks", lambda: {"fake": FakeCheck()})
    anomaly = torch.is_anomaly_enabled()
    try:
        _, changed = _changes("fake", 0)
    finally:
        os.environ.pop("MODELCHECK_TEST_FAKE_CHECK", None)
        torch.set_autocast_enabled("cpu", False)
        torch.autograd.set_detect_anomaly(anomaly)
    assert expected in changed


class Vandal(torch.nn.Module):
    """A model whose forward changes every process-wide setting (after computing its output)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, x):
        out = self.lin(x)
        torch.set_num_threads(3)
        torch.set_float32_matmul_precision("highest")
        torch.use_deterministic_algorithms(False)
        torch.autograd.set_detect_anomaly(True, check_nan=False)
        torch.set_autocast_enabled("cpu", True)
        torch.set_autocast_dtype("cpu", torch.bfloat16)
        torch.set_autocast_cache_enabled(False)
        torch.set_default_dtype(torch.float64)
        random.random(), np.random.rand(), torch.rand(1)
        return out


@pytest.mark.parametrize("name", ["grads_finite", "shapes_consistent", "eval_deterministic"])
def test_settings_changed_by_the_model_itself_are_put_back(name, moved_settings):
    """``preserved_globals`` (around every check) restores what the user's forward changed."""
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g))
    model = Vandal()
    before = _settings()
    try:
        all_checks()[name](model=model, batch=batch)
        after = _settings()
    finally:  # never leave a broken process behind, whatever the outcome
        torch.set_default_dtype(torch.float32)
        torch.set_autocast_enabled("cpu", False)
        torch.set_autocast_cache_enabled(True)
        torch.autograd.set_detect_anomaly(False)
    assert [k for k in before if before[k] != after[k]] == []


class EnvironVandal(torch.nn.Module):
    """A forward that sets, changes and deletes environment variables (as a library's
    import-time configuration does: CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS, HF_HOME...)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, x):
        os.environ["MODELCHECK_TEST_ADDED"] = "added by the forward"
        os.environ["MODELCHECK_TEST_CHANGED"] = "changed by the forward"
        os.environ.pop("MODELCHECK_TEST_DELETED", None)
        return self.lin(x)


@pytest.mark.parametrize("name", ["grads_finite", "shapes_consistent"])
def test_environment_changed_by_the_model_is_put_back(name, monkeypatch):
    """``os.environ`` after the check is exactly what it was before (and so is the C
    environment that subprocesses inherit): added, changed and deleted variables undone."""
    import subprocess
    import sys

    monkeypatch.setenv("MODELCHECK_TEST_CHANGED", "original")
    monkeypatch.setenv("MODELCHECK_TEST_DELETED", "still here")
    monkeypatch.delenv("MODELCHECK_TEST_ADDED", raising=False)
    before = dict(os.environ)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g))
    try:
        all_checks()[name](model=EnvironVandal(), batch=batch)
        after = dict(os.environ)
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(*(os.environ.get(f'MODELCHECK_TEST_{k}')"
             " for k in ('CHANGED', 'DELETED', 'ADDED')), sep='|')"],
            capture_output=True, text=True, check=True).stdout.strip().split("|")
    finally:
        os.environ.pop("MODELCHECK_TEST_ADDED", None)
    assert after == before
    assert child == ["original", "still here", "None"]
