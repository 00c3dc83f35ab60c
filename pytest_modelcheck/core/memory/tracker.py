"""MemTracker, subclassed to record per-phase peaks and the root module's own ops: the one module
of the package that touches MemTracker's private members (its snapshot through
``_torch_compat.mem_tracker_snapshot``, its class through ``mem_tracker_class``)."""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator, Optional

from .._torch_compat import (TorchFeatureMissing, dispatch_mode_base, mem_tracker_class,
                             mem_tracker_mod_state, mem_tracker_snapshot)
from ..errors import ModelError
from .report import CATEGORIES, FORWARD, ROOT, TOP_MODULES
from .step import PhaseContext


# MemTracker's reference types (_MemRefType member names) -> breakdown categories.
_REFTYPE_CATEGORY = {"PARAM": "parameters", "BUFFER": "buffers", "GRAD": "gradients",
                     "OPT": "optimizer_state", "ACT": "activations", "TEMP": "temporaries",
                     "OTH": "other"}
# Messages MemTracker/ModTracker may warn with when a module dies or is re-entered.
_TRACKER_WARNINGS = ("Module is None", "The module hierarchy tracking")


def _tracker_limitation(exc: Any) -> bool:
    """MemTracker's refusal of a second call of the root module within one step."""
    cause = exc.original if isinstance(exc, ModelError) else exc
    return isinstance(cause, NotImplementedError) and "MemTracker" in str(cause)


_TRACKER_CLASS: Any = None


class _NoHook:
    """Stands in for a gradient-hook handle on a frozen parameter."""

    def remove(self) -> None:
        pass


def _new_tracker(*, target: Any, block: int = 1) -> Any:
    """A MemTracker that also records the largest total per step phase on ``target``'s type.

    ``block`` > 1 rounds every storage up to a multiple of ``block`` bytes (the CUDA caching
    allocator's granularity) whatever the tensor's device.
    """
    global _TRACKER_CLASS
    if _TRACKER_CLASS is None:
        try:
            MemTracker: Any = mem_tracker_class()
            _ModState: Any = mem_tracker_mod_state()
        except TorchFeatureMissing as exc:  # no torch.distributed: as its ImportError was
            raise ImportError(str(exc)) from None

        class _StepTracker(MemTracker):
            def __init__(self, target: Any, block: int) -> None:
                super().__init__()
                self.target = target
                self.block = block
                self.phase = FORWARD
                self.phase_peaks: dict = {}
                self.phase_starts: dict = {}

            def _update_snap(self, u_type: Any, winfo: Any, old_mem_consumed: Any = None,
                             old_reftype: Any = None) -> None:
                if self.block > 1 and winfo.mem_consumed % self.block:
                    winfo.mem_consumed += self.block - winfo.mem_consumed % self.block
                super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
                total = _tracker_total(mem_tracker_snapshot(self), self.target)
                if total > self.phase_peaks.get(self.phase, 0):
                    self.phase_peaks[self.phase] = total

            def _track_module_params_and_buffers(self, module: Any,
                                                 install_grad_hooks: bool = True) -> Any:
                # MemTracker hooks every parameter's gradient; frozen parameters cannot take a
                # hook, so they get a placeholder handle and are tracked as parameters only.
                if install_grad_hooks:
                    for param in module.parameters():
                        if not param.requires_grad and \
                                self._param_to_grad_hook_handles.get(param, None) is None:
                            self._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
                return super()._track_module_params_and_buffers(module, install_grad_hooks)

            def _pre_fw_hook(self, module: Any, inputs: Any) -> None:
                try:
                    super()._pre_fw_hook(module, inputs)
                except NotImplementedError:
                    # A module called again from the top level of the same step (a GAN loss
                    # scoring fake and real with the discriminator, a loss calling the model):
                    # MemTracker takes it for the next iteration. Record it as a repeated call,
                    # as MemTracker does for a submodule used twice.
                    if module not in self.memory_tracking:
                        raise
                    stats = self.memory_tracking[module]
                    stats.input_mem = self._track_inputs_or_outputs(inputs)
                    snapshot = self.get_tracker_snapshot()
                    stats.local_peak = {dev: snap["Total"] for dev, snap in snapshot.items()}
                    stats.snapshots.setdefault(_ModState.PEAK_FW, []).append(snapshot)
                    stats.snapshots.setdefault(_ModState.PRE_FW, []).append(
                        copy.deepcopy(snapshot))

        _TRACKER_CLASS = _StepTracker
    return _TRACKER_CLASS(target, block)


def _tracker_total(snapshot: dict, target: Any) -> int:
    return sum(int(snap.get("Total", 0)) for dev, snap in snapshot.items()
               if dev.type == target.type)


@contextlib.contextmanager
def _tracking(tracker: Any) -> Iterator[None]:
    """Enter ``tracker`` (if any); its hooks, its patch of ``resize_`` and warnings restored."""
    if tracker is None:
        yield
        return
    saved_format = warnings.formatwarning  # ModTracker replaces it when it warns
    with warnings.catch_warnings():
        for message in _TRACKER_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        try:
            with tracker:
                yield
        finally:
            warnings.formatwarning = saved_format


@contextlib.contextmanager
def _root_own_ops(model: Any, tracker: Any) -> Iterator[None]:
    """Record the allocations of the root module's own forward code (ops run while no
    submodule is on the call stack): the broadcast intermediate a model builds in its own
    ``forward`` is freed before the forward ends, so the tracker's bytes alive after the
    forward miss it. The largest allocation, its op and the user's source line are left on
    ``tracker.modelcheck_root_ops`` for ``_top_modules``; no tensor is kept. Entered last
    (its mode runs first), so the user's line is the next frame out.

    Measured runs only: in the fake-tensor estimate one more dispatch mode changes what is
    estimated (the in-place bias add reads its caller's frame, and torch's fused attention and
    nested-tensor fast paths are emulated on the assumption of the estimate's own modes), so
    there the root row holds the bytes its code leaves alive, as for every other module."""
    TorchDispatchMode = dispatch_mode_base()

    from ..dispatch import user_source

    if tracker is None:
        yield
        return
    stack: list = []
    record: dict[str, Any] = {"largest": 0, "op": "", "source": "", "total": 0}

    class RootOps(TorchDispatchMode):  # type: ignore[misc, valid-type]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            if len(stack) != 1:
                return out
            returns = func._schema.returns
            if any(r.alias_info is not None for r in returns):
                return out  # a view or an in-place op allocates nothing
            size = 0
            for t in out if isinstance(out, (tuple, list)) else (out,):
                try:
                    size += int(t.untyped_storage().nbytes())
                except (AttributeError, RuntimeError, NotImplementedError):
                    pass
            record["total"] += size
            if size > record["largest"]:
                record.update(largest=size, source=user_source(),
                              op=f"aten.{func.overloadpacket.__name__}")
            return out

    def push(mod: Any, args: Any) -> None:
        stack.append(mod)

    def pop(mod: Any, args: Any, out: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop))
        with RootOps():
            yield
    finally:
        for h in handles:
            h.remove()
        tracker.modelcheck_root_ops = record


def _tracker_phases(tracker: Any, inner: PhaseContext) -> PhaseContext:
    """Wrap ``inner`` so the tracker knows which phase its allocations belong to."""
    if tracker is None:
        return inner

    @contextlib.contextmanager
    def both(name: str) -> Iterator[None]:
        tracker.phase = name
        tracker.phase_starts[name] = _snapshot_categories(mem_tracker_snapshot(tracker),
                                                          tracker.target)
        current = _current_total(tracker)
        tracker.phase_peaks[name] = max(tracker.phase_peaks.get(name, 0), current)
        with inner(name):
            yield

    return both


def _categories(tracker: Any) -> dict:
    """Bytes per category in MemTracker's peak snapshot, on the tracker's device type."""
    return _snapshot_categories(tracker.get_tracker_snapshot("peak"), tracker.target)


def _snapshot_categories(snapshot: dict, target: Any) -> dict:
    """Bytes per category in one MemTracker snapshot, on ``target``'s device type."""
    out = dict.fromkeys(CATEGORIES, 0)
    for dev, values in snapshot.items():
        if dev.type != target.type:
            continue
        for key, value in values.items():
            category = _REFTYPE_CATEGORY.get(getattr(key, "name", ""))
            if category is not None:
                out[category] += int(value)
    return out


def _top_modules(tracker: Any, model: Any, limit: Optional[int] = TOP_MODULES) -> list:
    """Activation bytes left alive by each module's own forward code (children excluded)."""
    if tracker is None:
        return []
    names: dict = {}
    for name, mod in model.named_modules():
        names.setdefault(id(mod), name or ROOT)
    children = {id(m): [id(c) for c in m.children()] for m in model.modules()}
    inclusive: dict = {}
    for mod, stats in tracker.memory_tracking.items():
        pre, post = _snapshots(stats, "PRE_FW"), _snapshots(stats, "POST_FW")
        total = 0
        for before, after in zip(pre, post):
            total += _act(after, tracker.target) - _act(before, tracker.target)
        inclusive[id(mod)] = total
    def called_below(key: int) -> list:
        # The nearest descendants that ran a forward (a ModuleList is never called itself).
        found: list = []
        for c in children.get(key, []):
            found.extend([c] if c in inclusive else called_below(c))
        return found

    own = []
    for key, total in inclusive.items():
        if key not in names:
            continue
        value = total - sum(inclusive[c] for c in called_below(key))
        if value > 0:
            own.append([names[key], int(value)])
    # The root's own forward code: its largest allocation counts even when it was freed before
    # the forward ended (a broadcast intermediate), and its line is named.
    root = getattr(tracker, "modelcheck_root_ops", None) or {}
    if root.get("largest", 0) > 0:
        alive = next((v for n, v in own if n == ROOT), 0)
        own = [item for item in own if item[0] != ROOT]
        at = f" at {root['source']}" if root.get("source") else ""
        own.append([f"{ROOT} ({type(model).__name__}) own ops, largest {root['op']}{at}",
                    int(max(alive, root["largest"]))])
    own.sort(key=lambda item: (-item[1], item[0]))
    return own if limit is None else own[:limit]


def _snapshots(stats: Any, state: str) -> list:
    """``stats.snapshots`` for the module state named ``state`` (a ``_ModState`` member)."""
    for key, value in stats.snapshots.items():
        if getattr(key, "name", None) == state:
            return value
    return []


def _act(snapshot: dict, target: Any) -> int:
    return sum(int(v) for dev, values in snapshot.items() if dev.type == target.type
               for k, v in values.items() if getattr(k, "name", "") == "ACT")


def _current_total(tracker: Any) -> int:
    """Bytes alive now on the tracker's device type (its current snapshot)."""
    return _tracker_total(mem_tracker_snapshot(tracker), tracker.target)
