"""Every private torch and CPython internal the package reaches, behind one module.

torch's public API does not offer everything the checks need: the base class of dispatch modes
(``torch.utils._python_dispatch.TorchDispatchMode``), pytree flattening, fake tensors, the
convolution backend torch would pick, ``MemTracker``'s current snapshot, the fused
``_foreach_norm``, the device set by ``torch.set_default_device``; and from CPython, the
caller's frame and its current instruction. Each is reached here and nowhere else, so a torch
release that moves one breaks one function, and :func:`require` turns its absence into a clear
error naming the feature and the torch version.

The tested torch range is stated in ``pyproject.toml`` (``TESTED_TORCH`` below); :func:`probe`
reports, feature by feature, what this torch offers (``tests/test_torch_compat.py`` runs it).
No torch import happens at module import.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

#: The torch releases the test suite runs against (CI installs the first; keep in step with the
#: ``torch`` requirement in pyproject.toml).
TESTED_TORCH = ("2.13", "2.14")


class TorchFeatureMissing(RuntimeError):
    """A private torch feature the check needs is absent from this torch release."""

    def __init__(self, feature: str, cause: Optional[BaseException] = None):
        version = _torch_version()
        super().__init__(
            f"this torch ({version}) lacks {feature}, which pytest-modelcheck needs here;"
            f" the tested torch releases are {', '.join(TESTED_TORCH)}"
            + (f" ({type(cause).__name__}: {cause})" if cause is not None else ""))
        self.feature = feature


def _torch_version() -> str:
    torch = sys.modules.get("torch")
    return getattr(torch, "__version__", "not imported")


def require(feature: str, getter: Callable[[], Any]) -> Any:
    """``getter()``, or :class:`TorchFeatureMissing` naming ``feature`` when this torch lacks it.

    >>> require("math.pi", lambda: __import__("math").pi) > 3
    True
    >>> require("torch.no_such_thing", lambda: __import__("torch").no_such_thing)
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core._torch_compat.TorchFeatureMissing: this torch (...) lacks torch.no_such_thing, ...
    """
    try:
        return getter()
    except (ImportError, AttributeError) as exc:
        raise TorchFeatureMissing(feature, exc) from None


# ----------------------------------------------------------------------------- dispatch modes


def dispatch_mode_base() -> type:
    """``TorchDispatchMode``: the base class of the op interceptors (op counts, FLOPs, memory,
    host syncs, mixing and non-finite origins).

    >>> dispatch_mode_base().__name__
    'TorchDispatchMode'
    """
    def get() -> type:
        from torch.utils._python_dispatch import TorchDispatchMode

        return TorchDispatchMode

    return require("torch.utils._python_dispatch.TorchDispatchMode", get)


def tree_leaves(tree: Any) -> list:
    """The leaves of a nest of lists, tuples, dicts (and torch's registered containers).

    >>> tree_leaves({"a": [1, (2, 3)]})
    [1, 2, 3]
    """
    def get() -> Callable:
        from torch.utils._pytree import tree_leaves as leaves

        return leaves

    return require("torch.utils._pytree.tree_leaves", get)(tree)


# ------------------------------------------------------------------------------- fake tensors


def fake_tensor_module() -> Any:
    """``torch._subclasses.fake_tensor``: ``FakeTensorMode``, ``FakeTensor`` and the exceptions
    of ops fake tensors cannot run.

    >>> fake_tensor_module().FakeTensorMode.__name__
    'FakeTensorMode'
    """
    def get() -> Any:
        from torch._subclasses import fake_tensor

        return fake_tensor

    return require("torch._subclasses.fake_tensor", get)


def fake_tensor_logger_name() -> str:
    """The logger fake tensors report failing ops to.

    >>> fake_tensor_logger_name()
    'torch._subclasses.fake_tensor'
    """
    return fake_tensor_module().__name__


# ------------------------------------------------------------------------ kernels and memory


def select_conv_backend(inp: Any, weight: Any, bias: Any, stride: Any, padding: Any,
                        dilation: Any, transposed: bool, output_padding: Any,
                        groups: int) -> Optional[Any]:
    """The convolution backend torch would run these arguments with (a ``_ConvBackend`` value),
    or None when this torch cannot say (the binding is absent or refuses the arguments).

    >>> import torch
    >>> x, w = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3)
    >>> select_conv_backend(x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1) is not None
    True
    """
    import torch

    select = getattr(torch._C, "_select_conv_backend", None)
    if select is None:
        return None
    try:
        return select(inp, weight, bias, list(stride), list(padding), list(dilation),
                      bool(transposed), list(output_padding), int(groups), None)
    except Exception:  # noqa: BLE001 - arguments this torch's binding does not take: unknown
        return None


def conv_backend_members() -> dict:
    """The named values of torch's ``ConvBackend`` enum (empty when this torch does not bind it).

    >>> "Mkldnn" in conv_backend_members()
    True
    """
    import torch

    enum = getattr(torch._C, "_ConvBackend", None)
    return dict(getattr(enum, "__members__", {}) or {})


def mem_tracker_class() -> type:
    """``torch.distributed._tools.mem_tracker.MemTracker``: memory by category (parameters,
    gradients, activations, optimizer state) of tensors created under it.

    >>> mem_tracker_class().__name__
    'MemTracker'
    """
    def get() -> type:
        from torch.distributed._tools.mem_tracker import MemTracker

        return MemTracker

    return require("torch.distributed._tools.mem_tracker.MemTracker", get)


def mem_tracker_snapshot(tracker: Any) -> dict:
    """A ``MemTracker``'s current snapshot (device -> category -> bytes), which it keeps in a
    private attribute.

    >>> mem_tracker_snapshot(mem_tracker_class()())
    {}
    """
    return require("MemTracker._curr_mem_snap", lambda: tracker._curr_mem_snap)


def mem_tracker_mod_state() -> type:
    """``torch.distributed._tools.mem_tracker._ModState``: the module states (``PRE_FW``,
    ``POST_FW``, ``PEAK_FW``, ...) that key a tracked module's snapshots.

    >>> mem_tracker_mod_state().PEAK_FW.name
    'PEAK_FW'
    """
    def get() -> type:
        from torch.distributed._tools.mem_tracker import _ModState

        return _ModState

    return require("torch.distributed._tools.mem_tracker._ModState", get)


def cpu_isa_support() -> dict:
    """Whether this CPU has AVX-512 and AVX2, as torch's cpuinfo reads the hardware
    (``torch.cpu._is_avx512_supported``, ``_is_avx2_supported``; environment variables such as
    ATEN_CPU_CAPABILITY do not lower it).

    >>> sorted(cpu_isa_support())
    ['avx2', 'avx512']
    """
    import torch

    avx512 = require("torch.cpu._is_avx512_supported", lambda: torch.cpu._is_avx512_supported)
    avx2 = require("torch.cpu._is_avx2_supported", lambda: torch.cpu._is_avx2_supported)
    return {"avx512": bool(avx512()), "avx2": bool(avx2())}


def foreach_norm(tensors: list, ord: float = 2) -> list:
    """One norm per tensor in one fused call (``torch._foreach_norm``), a loop where absent.

    >>> import torch
    >>> [float(n) for n in foreach_norm([torch.tensor([3.0, 4.0]), torch.ones(4)])]
    [5.0, 2.0]
    """
    import torch

    fused = getattr(torch, "_foreach_norm", None)
    if fused is not None:
        return list(fused(tensors, ord))
    return [torch.linalg.vector_norm(t, ord) for t in tensors]


def default_device() -> Any:
    """The device set by ``torch.set_default_device`` (None when none was set).

    >>> default_device() is None
    True
    """
    def get() -> Any:
        from torch.utils import _device

        return _device

    return getattr(require("torch.utils._device", get), "CURRENT_DEVICE", None)


# ---------------------------------------------------------------------------- CPython frames


def caller_frame(depth: int = 1) -> Optional[Any]:
    """The frame ``depth`` levels above the caller of this function (None past the stack top).

    >>> def f():
    ...     return caller_frame(0).f_code.co_name
    >>> f()
    'f'
    """
    try:
        return sys._getframe(depth + 1)
    except ValueError:
        return None


def runs_binary_operator(frame: Any) -> bool:
    """Whether ``frame`` is executing a Python binary operator (``a + b``, ``a @= b``) rather
    than a call: the opcode at its current instruction.

    >>> import sys
    >>> runs_binary_operator(sys._getframe())
    False
    """
    import dis

    code = frame.f_code.co_code
    if not 0 <= frame.f_lasti < len(code):
        return False
    return dis.opname[code[frame.f_lasti]].startswith(("BINARY_", "INPLACE_"))


def probe() -> dict:
    """Which of the features above this torch offers: feature name -> True, or the error text.

    >>> all(v is True for v in probe().values())
    True
    """
    import torch

    checks = {
        "TorchDispatchMode": dispatch_mode_base,
        "tree_leaves": lambda: tree_leaves([1]),
        "fake tensors": fake_tensor_module,
        "MemTracker": mem_tracker_class,
        "MemTracker snapshot": lambda: mem_tracker_snapshot(mem_tracker_class()()),
        "select_conv_backend": lambda: select_conv_backend(
            torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3), None, [1, 1], [0, 0], [1, 1],
            False, [0, 0], 1) or require("torch._C._select_conv_backend", lambda: None) or 1,
        "ConvBackend enum": lambda: conv_backend_members() or require(
            "torch._C._ConvBackend", lambda: getattr(torch._C, "_ConvBackend")),
        "_foreach_norm": lambda: require("torch._foreach_norm", lambda: torch._foreach_norm),
        "default device": default_device,
    }
    found: dict = {}
    for name, get in checks.items():
        try:
            get()
            found[name] = True
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            found[name] = f"{type(exc).__name__}: {exc}"
    return found
