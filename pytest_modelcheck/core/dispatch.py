"""Count the aten ops a model dispatches, and find the ops that synchronize host and device.

A ``TorchDispatchMode`` sees every aten op that reaches the dispatcher, in forward and in
backward. :func:`count_ops` records, per op, the number of calls; per module path (tracked with
forward pre/post hooks) the number of ops run while that module was on the call stack (the
module itself or anything below it); and every op that forces the host to wait for the device.

Host-device synchronizations recognised (checked on CPU with torch 2.13, where the same aten
ops are dispatched as on CUDA, so a CPU-only runner finds them):

* ``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``,
  ``if t:`` / ``if (x > 0).any():``, ``f"{t:.2f}"``, ``range(t)``, ``x[:int(t)]``,
  ``torch.arange(t)`` with a tensor bound, ``t.is_nonzero()``;
* ops whose output size depends on values: ``aten.nonzero`` (``torch.where(cond)`` with one
  argument, ``t.nonzero()``), ``aten.masked_select``, ``aten._unique2`` / ``unique_dim`` /
  ``unique_consecutive`` (``torch.unique``), ``aten.bincount``, ``aten.repeat_interleave``
  without ``output_size``;
* ops returning a Python bool: ``aten.equal``, ``aten.allclose``, ``aten.is_nonzero``;
* boolean-mask indexing: ``x[mask]`` and ``x[mask] = v`` dispatch ``aten.index.Tensor`` /
  ``aten.index_put_`` with a bool index (the ``nonzero`` runs inside the kernel, so it is
  recognised from the index dtype, not from a ``nonzero`` op);
* copies to the CPU from another device (``aten._to_copy`` / ``aten.copy_``): ``.cpu()``,
  ``.to("cpu")``, ``.numpy()`` / ``.tolist()`` of device tensors.

Not detected: ``.cpu()``, ``.numpy()`` and ``.tolist()`` of tensors already on the CPU (nothing
is dispatched, and nothing is synchronized either); work below the dispatcher (a custom C++/CUDA
extension that synchronizes internally, ``torch.cuda.synchronize()``, CUDA events); ops inside a
``torch.compile``'d region or a TorchScript module, which the mode does not see op by op.

This module imports neither pytest nor, until called, torch.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKWARD = "<backward>"
LOSS = "<loss>"
ROOT = "<root>"

# Ops that always make the host wait for the device (their result is read on the host, or
# the size of their output depends on the values).
SYNC_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount", "equal",
    "allclose",
})
_MASK_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


@dataclass
class Sync:
    """One host-device synchronization: the aten op, the user's source line, the phase."""

    op: str
    source: str = ""
    phase: str = "forward"  # "forward", "loss" or "backward"
    module: str = ""

    def describe(self) -> str:
        src = f" from {self.source}" if self.source else ""
        where = f" in module '{self.module}'" if self.module and not self.module.startswith("<") else ""
        return f"{self.op}{src}{where} ({self.phase})"


@dataclass
class OpCount:
    """What :func:`count_ops` recorded. Builtin-typed fields only.

    ``by_module`` maps a module path (``"<root>"`` for the model itself, ``"<loss>"`` for the
    loss, ``"<backward>"`` for backward) to the ops run while that module was on the call stack,
    so a parent's count includes its children's. ``by_module_self`` counts each op once, for the
    innermost module only.
    """

    total: int = 0
    forward: int = 0
    backward: int = 0
    by_op: dict = field(default_factory=dict)
    by_module: dict = field(default_factory=dict)
    by_module_self: dict = field(default_factory=dict)
    syncs: list = field(default_factory=list)

    def sync_groups(self) -> list:
        """``[(op, source, phase, count), ...]``, most frequent first, each distinct place once."""
        groups = Counter((s.op, s.source, s.phase) for s in self.syncs)
        return [(op, src, phase, n) for (op, src, phase), n in
                sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))]


def _op_name(func: Any) -> tuple:
    packet = getattr(func, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or str(func).split(".")[1]
    return name, f"aten.{name}"


def _is_mask(t: Any) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _sync_kind(name: str, func: Any, args: tuple, kwargs: dict) -> Optional[str]:
    """The display name of the sync this op causes, or None when it causes none."""
    import torch

    if name in SYNC_OPS:
        return f"aten.{name}"
    if name == "repeat_interleave" and kwargs.get("output_size") is None \
            and any(isinstance(a, torch.Tensor) for a in args[1:2] or args[:1]):
        return "aten.repeat_interleave (no output_size)"
    if name in _MASK_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(_is_mask(i) for i in (indices or ()) if i is not None):
            return f"aten.{name} (boolean mask)"
    if name == "_to_copy":
        src = args[0] if args else None
        dst = kwargs.get("device")
        if isinstance(src, torch.Tensor) and dst is not None and torch.device(dst).type == "cpu" \
                and src.device.type not in ("cpu", "meta"):
            return f"aten._to_copy ({src.device.type} -> cpu)"
    if name == "copy_" and len(args) >= 2:
        dst, src = args[0], args[1]
        if isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor) \
                and dst.device.type == "cpu" and src.device.type not in ("cpu", "meta"):
            return f"aten.copy_ ({src.device.type} -> cpu)"
    return None


def user_source() -> str:
    """``file:line in function`` of the user's code that dispatched the current op.

    Walks outward from the innermost frame past this package's and torch's frames; the first
    other frame is the user's. When the walk comes back into this package first (an op of
    autograd's own backward, called from a check), there is no user line and ``""`` is returned.
    """
    import torch

    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    frame = sys._getframe(1)
    left_package = False
    while frame is not None:
        f = os.path.abspath(frame.f_code.co_filename)
        in_pkg = f.startswith(_PKG_DIR)
        if in_pkg and frame.f_code.co_name == "_one_hot_marked":
            pass  # the one_hot wrapper sits between torch and the user
        elif in_pkg:
            if left_package:
                return ""
        elif f.startswith(torch_dir) or "<frozen" in f or f.endswith(("contextlib.py", "functools.py")):
            left_package = True
        else:
            rel = os.path.relpath(f)
            return f"{f if rel.startswith('..') else rel}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return ""


def _make_mode(record: dict) -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounterMode(TorchDispatchMode):
        """Counts every dispatched op and records host-device syncs into ``record``."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            name, full = _op_name(func)
            stack = record["stack"]
            phase = record["phase"]
            if phase == "forward":
                inner = stack[-1] if stack else ROOT
                for path in dict.fromkeys(stack or [ROOT]):
                    record["by_module"][path] += 1
            else:
                inner = LOSS if phase == "loss" else BACKWARD
                record["by_module"][inner] += 1
            record["by_module_self"][inner] += 1
            record["by_op"][full] += 1
            record["phase_total"][phase] += 1
            kind = _sync_kind(name, func, args, kwargs)
            if kind is not None and _reads_host_data(args, record):
                kind = None
            if kind is not None and not record.get("cpu_only_validation"):
                record["syncs"].append(Sync(kind, user_source(), phase,
                                            inner if phase == "forward" else ""))
            return func(*args, **kwargs)

    return OpCounterMode()


def _reads_host_data(args: tuple, record: dict) -> bool:
    """Whether the op reads a tensor that lives on the host by design whatever the model's
    device: the ``batch_sizes`` of a ``PackedSequence`` (recursive layers read its first entry
    with ``int()``; on a GPU it is a CPU tensor, so that is no device sync)."""
    import torch

    host = record.get("host_storages")
    if not host or not args or not isinstance(args[0], torch.Tensor):
        return False
    try:
        return args[0].untyped_storage().data_ptr() in host
    except RuntimeError:
        return False


def _note_host_tensors(args: Any, record: dict) -> None:
    """Remember the storages of ``PackedSequence.batch_sizes`` among a module's inputs."""
    from torch.nn.utils.rnn import PackedSequence

    for a in args if isinstance(args, tuple) else (args,):
        if isinstance(a, PackedSequence) and a.batch_sizes is not None:
            record.setdefault("host_storages", set()).add(
                a.batch_sizes.untyped_storage().data_ptr())


@contextlib.contextmanager
def _cpu_only_validation(record: dict) -> Iterator[None]:
    """Marks the syncs of ``F.one_hot(x, num_classes)``: on CPU it reads min and max of ``x``
    to validate it, which CUDA's kernel skips when ``num_classes`` is given (no sync there);
    they are not reported. ``torch.nn.functional.one_hot`` is wrapped for the duration and put
    back (a torch-function mode would also switch off torch's fused attention paths)."""
    import torch.nn.functional as F

    original = F.one_hot

    def _one_hot_marked(tensor: Any, num_classes: int = -1) -> Any:
        if isinstance(num_classes, int) and num_classes > 0:
            record["cpu_only_validation"] = record.get("cpu_only_validation", 0) + 1
            try:
                return original(tensor, num_classes)
            finally:
                record["cpu_only_validation"] -= 1
        return original(tensor, num_classes)

    F.one_hot = _one_hot_marked
    try:
        yield
    finally:
        F.one_hot = original


def count_ops(model: Any, batch: Any, *, backward: bool = False, loss: Any = None) -> OpCount:
    """Run ``model`` on ``batch`` (and, with ``backward=True``, the loss and its backward) under an
    op-counting dispatch mode; return an :class:`OpCount`.

    The model is run as given (its train/eval mode and device are the caller's business; checks
    pass a copy). ``batch`` is anything ``Batch.from_user`` accepts; ``loss`` anything
    ``resolve_loss`` accepts. Hooks and the mode are removed even when the model raises; a model
    that raises gives a ``ModelError`` naming the module.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> c = count_ops(m, torch.randn(2, 4))
    >>> c.by_module["<root>"], c.by_module["0"], c.by_module["1"], c.syncs  # t+addmm; relu+detach
    (4, 2, 2, [])
    >>> class Peek(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x * x.sum().item()
    >>> [s.op for s in count_ops(Peek(), torch.randn(2, 4)).syncs]
    ['aten._local_scalar_dense']
    """
    import torch

    from .batch import Batch
    from .forward import run_forward
    from .losses import resolve_loss

    data = Batch.from_user(batch)
    names = {m: (n or ROOT) for n, m in model.named_modules()} if hasattr(model, "named_modules") else {}
    record = {"stack": [], "phase": "forward", "by_op": Counter(), "by_module": Counter(),
              "by_module_self": Counter(), "phase_total": Counter(), "syncs": []}

    def push(mod: Any, args: Any) -> None:
        record["stack"].append(names.get(mod, ROOT))
        _note_host_tensors(args, record)

    def pop(mod: Any, args: Any, out: Any) -> None:
        if record["stack"]:
            record["stack"].pop()

    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop))
        with _cpu_only_validation(record), _make_mode(record):
            out = run_forward(model, data)
            record["stack"].clear()
            if backward:
                record["phase"] = "loss"
                total, _ = resolve_loss(loss, data, out).compute(out, data, model)
                if isinstance(total, torch.Tensor) and total.requires_grad:
                    record["phase"] = "backward"
                    total.backward()
    finally:
        for h in handles:
            h.remove()
        record["stack"].clear()
    phases = record["phase_total"]
    return OpCount(total=sum(phases.values()), forward=phases["forward"],
                   backward=phases["backward"], by_op=dict(record["by_op"]),
                   by_module=dict(record["by_module"]),
                   by_module_self=dict(record["by_module_self"]), syncs=list(record["syncs"]))
