"""Kernel workspaces in an estimate: the dispatch modes that add each op's workspace (from the
rules in ``rules/``, or probed on the GPU) to the tracker's phase peaks, and give the outputs
that fake kernels leave empty their real size (docs/memory-model.md, "Kernel workspaces")."""
from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Iterator, Optional

from .._torch_compat import dispatch_mode_base
from ..cuda_probe import layout_alternatives, op_signature
from ..cuda_workspace import cudnn_workspace_bound
from ..units import format_bytes
from .report import _is_tensor
from .rules import CPU_RULES, CUDA_RULES
from .rules._common import _all_args
from .rules.loss import _HELD_LOSSES, _held_loss
from .rules.rnn import _onednn_lstm_workspace
from .step import _seam
from .tracker import _current_total


def _kernel_workspace(func: Any, args: tuple, out: Any) -> int:
    """Bytes a CPU kernel holds inside itself above what is alive after it returns: the rule
    registered for the op in ``rules.CPU_RULES``, 0 for an op without one.

    >>> import torch
    >>> _kernel_workspace(torch.ops.aten.relu.default, (torch.ones(2),), torch.ones(2))
    0
    """
    return CPU_RULES(func, args, out)


def _cuda_attention_workspace(func: Any, args: tuple, out: Any) -> int:
    """The fixed CUDA rules (``rules.CUDA_RULES``: the fused attention kernels, ``mse_loss``);
    0 for an op without one.

    >>> import torch
    >>> _cuda_attention_workspace(torch.ops.aten.relu.default, (torch.ones(2),), torch.ones(2))
    0
    """
    return CUDA_RULES(func, args, out)


@contextlib.contextmanager
def _held_workspaces() -> Iterator[None]:
    """Give the kernel outputs that fake kernels leave empty their real size: the workspace
    ``aten.mkldnn_rnn_layer`` (CPU LSTM) returns for its backward, and the full-size storage
    behind the scalar of the CPU losses in ``_HELD_LOSSES``. Entered inside the tracker, so
    the sized tensor is tracked, and below autograd, so it is what autograd keeps."""
    import torch
    TorchDispatchMode = dispatch_mode_base()

    rnn_layer = getattr(torch.ops.aten, "mkldnn_rnn_layer", None)

    class _Held(TorchDispatchMode):  # type: ignore[misc, valid-type]
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in _HELD_LOSSES:
                return _held_loss(func, args, kwargs, out)
            if rnn_layer is None or func.overloadpacket is not rnn_layer:
                return out
            try:
                size = _onednn_lstm_workspace(_all_args(func, args, kwargs))
            except Exception:  # noqa: BLE001 - an unexpected signature: not modelled
                size = None
            ws = out[3]
            if size is None or not _is_tensor(ws) or ws.numel() >= size:
                return out
            sized = torch.empty(size, dtype=torch.uint8, device=ws.device)
            return (*out[:3], sized, *out[4:])

    with _Held():
        yield


@contextlib.contextmanager
def _device_workspaces(tracker: Any, dev: Any, upper: dict,
                       kernels: Optional[list] = None) -> Iterator[None]:
    """The workspace rules of the estimate's target device, entered inside the tracker (each
    rule reads what the tracker holds after the op): CPU kernel rules and the workspaces CPU
    kernels return (``_held_workspaces``); on CUDA the attention rules, or with ``kernels`` (a
    list) a record of every op whose workspace the GPU is then asked for, and cuDNN's
    convolution workspaces as an upper bound into ``upper``."""
    with contextlib.ExitStack() as stack:
        if dev.type in ("cpu", "meta"):
            stack.enter_context(_held_workspaces())
            stack.enter_context(_workspaces(tracker, _kernel_workspace))
        elif dev.type == "cuda":
            if kernels is None:
                stack.enter_context(_workspaces(tracker, _cuda_attention_workspace))
            else:
                stack.enter_context(_kernel_records(tracker, kernels))
            stack.enter_context(_workspaces(tracker, cudnn_workspace_bound, upper))
        yield


@contextlib.contextmanager
def _kernel_records(tracker: Any, records: list) -> Iterator[None]:
    """Record each probe-able op of a CUDA estimate, to add its measured workspace afterwards
    (``core/cuda_probe.py``): ``(phase, total alive after the op, signature, fixed-rule
    workspace, is a convolution)``; the signatures are the op's own and the layouts it may
    really have had (``layout_alternatives``), the largest workspace of which counts."""
    TorchDispatchMode = dispatch_mode_base()

    class _Records(TorchDispatchMode):  # type: ignore[misc, valid-type]
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            sig = op_signature(func, args, kwargs)
            if sig is not None:
                try:
                    rule = _cuda_attention_workspace(func, _all_args(func, args, kwargs), out)
                except Exception:  # noqa: BLE001 - an unexpected signature: no rule
                    rule = 0
                records.append((tracker.phase,
                                _current_total(tracker),
                                (sig, *layout_alternatives(sig)), rule,
                                "convolution" in func.overloadpacket.__name__))
            return out

    with _Records():
        yield


def _add_kernel_workspaces(tracker: Any, records: list, dev: Any) -> tuple:
    """Fold the probed workspaces of ``records`` into the tracker's phase peaks.

    Returns (note for the report, whether every convolution was probed). Ops the probe could
    not run keep their fixed rule; with no probe at all every op does.
    """
    found = _seam("probe_workspaces")([s for r in records for s in r[2]], dev)
    probed = with_ws = 0
    unprobed_conv = found is None
    largest = (0, "")
    for phase, total, sigs, rule, conv in records:
        sig = sigs[0]
        known = [] if found is None else [found[s] for s in sigs if found.get(s) is not None]
        ws = max(known) if known else None
        if ws is None:
            unprobed_conv = unprobed_conv or conv
            ws = rule
        else:
            probed += 1
            with_ws += ws > 0
            if ws > largest[0]:
                name = json.loads(sig)[0]
                largest = (ws, name.split(".")[1] if name.count(".") == 2 else name)
        if total + ws > tracker.phase_peaks.get(phase, 0):
            tracker.phase_peaks[phase] = total + ws
    if found is None:
        return "kernel workspaces not probed (the probe process failed)", False
    note = (f"kernel workspaces probed on the GPU: {probed} of {len(records)} op calls,"
            f" {with_ws} with a workspace")
    if largest[0]:
        note += f" (largest {format_bytes(largest[0])}, {largest[1]})"
    return note, not unprobed_conv


@contextlib.contextmanager
def _workspaces(tracker: Any, rule: Callable[[Any, tuple, Any], int],
                peaks: Optional[dict] = None) -> Iterator[None]:
    """Count kernel workspaces given by ``rule(func, args, out)`` into per-phase peaks.

    After each modelled op, ``total alive + workspace`` is a candidate for the current phase's
    peak; the workspace is freed by the time the op returns, so nothing else changes. ``peaks``
    defaults to the tracker's own phase peaks (CPU rules, part of the estimate); the CUDA
    workspace bound writes into a dict of its own (an upper bound beside the estimate).
    """
    TorchDispatchMode = dispatch_mode_base()

    target = tracker.phase_peaks if peaks is None else peaks

    class _Workspaces(TorchDispatchMode):  # type: ignore[misc, valid-type]
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            try:
                extra = rule(func, _all_args(func, args, kwargs), out)
            except Exception:  # noqa: BLE001 - an unexpected signature: no workspace modelled
                extra = 0
            if extra > 0:
                total = _current_total(tracker) + extra
                if total > target.get(tracker.phase, 0):
                    target[tracker.phase] = total
            return out

    with _Workspaces():
        yield
