"""Snapshots of global state, so a check never changes the user's process behind their back.

``preserved_globals()`` saves and restores the Python, NumPy and torch (CPU and, when
initialized, CUDA) RNG states and torch's global settings: grad mode, default dtype,
deterministic-algorithms flag, anomaly mode, matmul precision, thread count, and the autocast
state (enabled flag and dtype per device type, cache flag); also the default device, backend
flags, recursion limit, working directory and ``os.environ``.
``model_fingerprint`` captures a model's parameter and buffer bytes, ``training`` flags,
``requires_grad`` and ``.grad`` so tests can prove a check left it untouched.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
from typing import Any, Iterator


def tensors_identical(a: Any, b: Any) -> bool:
    """Bitwise equality (NaN equals NaN, -0.0 differs from 0.0), shape and dtype included.

    >>> import torch
    >>> tensors_identical(torch.tensor([float('nan')]), torch.tensor([float('nan')]))
    True
    """
    import torch

    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a = a.detach().cpu().contiguous()
    b = b.detach().cpu().contiguous()
    if a.is_floating_point() or a.is_complex():
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True
    return torch.equal(a, b)


@contextlib.contextmanager
def preserved_globals() -> Iterator[None]:
    """Restore RNG states and torch global settings on exit, even if the body raises.

    >>> import torch
    >>> before = torch.get_rng_state()
    >>> with preserved_globals():
    ...     _ = torch.rand(3); _ = torch.set_grad_enabled(False)
    >>> torch.equal(before, torch.get_rng_state()), torch.is_grad_enabled()
    (True, True)
    """
    import torch

    py_state = random.getstate()
    np_mod = sys.modules.get("numpy")
    np_state = np_mod.random.get_state() if np_mod is not None else None
    cpu_state = torch.get_rng_state()
    cuda_states = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
    settings = (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.get_default_dtype(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.is_anomaly_enabled(),
        torch.is_anomaly_check_nan_enabled(),
        torch.get_float32_matmul_precision(),
        torch.get_num_threads(),
    )
    autocast = _autocast_state(torch)
    backends = _backend_flags(torch)
    default_device = _default_device(torch)
    recursion, cwd = sys.getrecursionlimit(), _cwd()
    environ = dict(os.environ)
    try:
        yield
    finally:
        random.setstate(py_state)
        if np_state is not None and np_mod is not None:
            np_mod.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        (grad, _inference, dtype, det, det_warn, anomaly, anomaly_nan, precision, threads) = settings
        # Restore only what changed: some setters have side effects on first use (importing
        # torch's compiler stack, adding warning filters).
        if torch.is_grad_enabled() != grad:
            torch.set_grad_enabled(grad)
        if torch.get_default_dtype() != dtype:
            torch.set_default_dtype(dtype)
        if (torch.are_deterministic_algorithms_enabled() != det
                or torch.is_deterministic_algorithms_warn_only_enabled() != det_warn):
            torch.use_deterministic_algorithms(det, warn_only=det_warn)
        if torch.is_anomaly_enabled() != anomaly or torch.is_anomaly_check_nan_enabled() != anomaly_nan:
            torch.autograd.set_detect_anomaly(anomaly, check_nan=anomaly_nan)
        if torch.get_float32_matmul_precision() != precision:
            torch.set_float32_matmul_precision(precision)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if _autocast_state(torch) != autocast:
            _restore_autocast(torch, autocast)
        if _backend_flags(torch) != backends:
            _restore_backend_flags(torch, backends)
        if _default_device(torch) != default_device:
            torch.set_default_device(default_device)
        if sys.getrecursionlimit() != recursion:
            sys.setrecursionlimit(recursion)
        if cwd is not None and _cwd() != cwd:
            os.chdir(cwd)
        _restore_environ(environ)


def _restore_environ(saved: dict) -> None:
    """Put ``os.environ`` back as ``saved`` (through ``os.environ``, so ``putenv``/``unsetenv``
    reach the C environment too); only the variables that changed are touched."""
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _cwd() -> Any:
    try:
        return os.getcwd()
    except OSError:  # the directory was removed
        return None


def _default_device(torch: Any) -> Any:
    """The device set by ``torch.set_default_device`` (None when none was set)."""
    from ._torch_compat import default_device

    return default_device()


def _backend_flags(torch: Any) -> tuple:
    return (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled)


def _restore_backend_flags(torch: Any, flags: tuple) -> None:
    (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled) = flags


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state(torch: Any) -> tuple:
    """(enabled, dtype) per device type, then the autocast cache flag."""
    return (tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES),
            torch.is_autocast_cache_enabled())


def _restore_autocast(torch: Any, state: tuple) -> None:
    per_device, cache = state
    for device, (enabled, dtype) in zip(_AUTOCAST_DEVICES, per_device):
        if torch.is_autocast_enabled(device) != enabled:
            torch.set_autocast_enabled(device, enabled)
        if torch.get_autocast_dtype(device) != dtype:
            torch.set_autocast_dtype(device, dtype)
    if torch.is_autocast_cache_enabled() != cache:
        torch.set_autocast_cache_enabled(cache)


def global_state_fingerprint() -> dict:
    """Everything ``preserved_globals`` restores, as comparable values (for tests)."""
    import torch

    np_mod = sys.modules.get("numpy")
    np_state = np_mod.random.get_state() if np_mod is not None else None
    return {
        "python_rng": random.getstate(),
        "numpy_rng": (np_state[0], np_state[1].tolist(), *np_state[2:]) if np_state else None,
        "torch_rng": torch.get_rng_state().tolist(),
        "grad": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "threads": torch.get_num_threads(),
        "environ": dict(os.environ),
    }


def model_fingerprint(model: Any) -> dict:
    """Copies of everything about a model a check must not change (for tests).

    Compare two fingerprints with ``fingerprints_equal``.
    """
    return {
        "params": {n: (p.detach().clone(), p.requires_grad,
                       None if p.grad is None else p.grad.detach().clone())
                   for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)},
        "training": {n: m.training for n, m in model.named_modules(remove_duplicate=False)},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules(remove_duplicate=False)},
    }


def fingerprints_equal(a: dict, b: dict) -> list:
    """Names of what differs between two ``model_fingerprint`` results (empty when equal)."""
    diffs = []
    if a["params"].keys() != b["params"].keys():
        diffs.append("parameter names")
    for n in a["params"].keys() & b["params"].keys():
        (va, ra, ga), (vb, rb, gb) = a["params"][n], b["params"][n]
        if not tensors_identical(va, vb):
            diffs.append(f"{n} (value)")
        if ra != rb:
            diffs.append(f"{n} (requires_grad)")
        if not tensors_identical(ga, gb):
            diffs.append(f"{n} (.grad)")
    for n in a["buffers"].keys() | b["buffers"].keys():
        if not tensors_identical(a["buffers"].get(n), b["buffers"].get(n)):
            diffs.append(f"{n} (buffer)")
    if a["training"] != b["training"]:
        diffs.append("training flags")
    if a["hooks"] != b["hooks"]:
        diffs.append("hooks")
    return diffs


def module_where_raised(model: Any, exc: BaseException) -> str:
    """Dotted path of the innermost submodule of ``model`` whose code was running in ``exc``.

    Walks the traceback's frames and matches each frame's ``self`` against the model's
    modules, so no hooks are needed on the normal path. Returns "" when none matches.
    """
    names = {id(m): (n or type(model).__name__) for n, m in model.named_modules()}
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if obj is not None and id(obj) in names:
            found = names[id(obj)]
        tb = tb.tb_next
    return found


def hook_managed_attributes(module: Any) -> set:
    """Names of the tensors a module's forward pre-hooks recompute before every forward and keep
    as plain attributes: ``weight`` under the old ``nn.utils.spectral_norm`` and
    ``weight_norm`` (hook objects with a ``name``, built from ``<name>_orig`` or
    ``<name>_g``/``<name>_v`` parameters). They are state the hook owns, not a user's tensor
    left out of the buffers.

    >>> import torch
    >>> hook_managed_attributes(torch.nn.utils.spectral_norm(torch.nn.Linear(2, 2)))
    {'weight'}
    """
    names = set()
    params = set(getattr(module, "_parameters", {}))
    for hook in getattr(module, "_forward_pre_hooks", {}).values():
        name = getattr(hook, "name", None)
        if isinstance(name, str) and ({f"{name}_orig", f"{name}_g", f"{name}_v"} & params):
            names.add(name)
    return names

