"""Measured peaks: a CPU step from the profiler's allocator events, a CUDA step from the caching
allocator's statistics, and the MemTracker breakdown run beside them (docs/memory-model.md,
"Methods")."""
from __future__ import annotations

import contextlib
import gc
import inspect
from typing import Any, Iterator, Optional

from ..batch import Batch, copy_model
from ..cuda_workspace import CUDA_BLOCK_BYTES
from ..native_stderr import filtered_stderr
from .report import FORWARD, METHOD_CPU, METHOD_CUDA, STEP_PHASES, MemoryReport, _alive_bytes, _report
from .step import _batch_tensors, _no_phase, _prepare, _run_step, _seam, _step_tensors
from .tracker import (_categories, _new_tracker, _root_own_ops, _top_modules, _tracker_limitation,
                      _tracker_phases, _tracking)


_RANGE_PREFIX = "modelcheck::"


class _CudaApi:
    """The few ``torch.cuda`` calls the CUDA measurement makes, in one replaceable object."""

    def is_available(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def placement(self, device: Any) -> Any:
        """Where the step's tensors go (the device itself)."""
        return device

    def synchronize(self, device: Any) -> None:
        import torch

        torch.cuda.synchronize(device)

    def warm_up_libraries(self, device: Any) -> None:
        """Create the process-wide cuBLAS and cuBLASLt handles and workspaces now.

        The first matrix product of a thread allocates a workspace that stays for the life of
        the process (on an H200 with torch 2.11: 33 MiB for the main thread, 33 MiB more for
        the autograd engine's device thread at the first backward); without this, the step
        measured first in a process would count it and the same step measured later would
        not.
        """
        import torch

        a = torch.ones(8, 8, device=device, requires_grad=True)
        y = torch.nn.functional.linear(a, a, a[0])   # cuBLASLt (matmul with bias)
        y.sum().backward()                           # the autograd thread's own handle
        torch.mm(a.detach(), a.detach())             # cuBLAS
        del a, y

    def release_cached_blocks(self, device: Any) -> None:
        """Return the caching allocator's free cached blocks to the driver.

        ``max_memory_allocated`` counts whole blocks, and a free block cached by earlier work
        that is too small to split is handed out whole: on an H200 a UNet's batch-1 step
        measured 9.37/6.28 MB (train/inference) on its own and 10.29/7.20 MB after a ResNet had
        run in the same process. Measured from an empty cache, a step reads the same whatever
        ran before it. Nothing in use is touched.
        """
        import torch

        torch.cuda.empty_cache()

    def reset_peak_memory_stats(self, device: Any) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats(device)

    def memory_allocated(self, device: Any) -> int:
        import torch

        return int(torch.cuda.memory_allocated(device))

    def max_memory_allocated(self, device: Any) -> int:
        import torch

        return int(torch.cuda.max_memory_allocated(device))


_cuda_api: Any = _CudaApi()


def _measure_cpu(model: Any, batch: Batch, loss: Any, phase: str, optimizer: Any,
                 lr: float, tracked: Optional[tuple]) -> MemoryReport:
    import torch
    from torch.profiler import record_function

    work = copy_model(model).to("cpu")
    data = batch.clone().to("cpu")
    opt = _prepare(work, phase, optimizer, lr)
    baseline = _alive_bytes(_step_tensors(work, data, opt))

    def phase_context(name: str) -> Any:
        return record_function(_RANGE_PREFIX + name)

    gc.collect()  # garbage of earlier work would otherwise be freed inside the profiled step
    with allocation_profiler() as prof:
        keep = _run_step(work, data, loss, phase, opt, phase_context)
    events = list(prof.profiler.kineto_results.events())
    ranges = {}
    for ev in events:
        name = ev.name()
        if name.startswith(_RANGE_PREFIX):
            ranges[name[len(_RANGE_PREFIX):]] = (ev.start_ns(), ev.start_ns() + ev.duration_ns())
    order = [p for p in STEP_PHASES if p in ranges]
    # Allocator events in time order, with each phase's start as a zero-byte event so that a
    # phase's peak starts from what was alive when it began.
    stream = sorted([(ev.start_ns(), 1, ev.nbytes()) for ev in events
                     if ev.name() == "[memory]" and _is_cpu_event(ev)]
                    + [(ranges[p][0], 0, 0) for p in order])
    starts = [(ranges[p][0], p) for p in order]
    running = 0
    peaks: dict = {}
    for when, _kind, nbytes in stream:
        where = _phase_at(when, starts) or (order[0] if order else FORWARD)
        running += nbytes
        peaks[where] = max(peaks.get(where, running), running)
    phase_peaks = {p: baseline + peaks.get(p, 0) for p in order}
    peak_phase = max(order, key=lambda p: (phase_peaks[p], -order.index(p)))
    del keep
    return _report(phase_peaks, peak_phase, phase, "cpu", METHOD_CPU, False, baseline,
                   tracked, opt, target=torch.device("cpu"))


@contextlib.contextmanager
def allocation_profiler() -> Iterator[Any]:
    """``torch.profiler.profile`` recording CPU allocator events, for one profiling cycle.

    ``acc_events=True`` (where torch has it) keeps some releases from warning that events of
    earlier cycles are dropped, which fails a test run under ``-W error``; kineto's status lines
    are kept out of stderr (``native_stderr``).

    >>> import torch
    >>> with allocation_profiler() as prof:
    ...     _ = torch.ones(1024)
    >>> sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.nbytes() > 0) >= 4096
    True
    """
    from torch.profiler import ProfilerActivity, profile

    extra: dict[str, Any] = {"acc_events": True} if "acc_events" in inspect.signature(profile).parameters else {}
    with filtered_stderr(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True, **extra) as prof:
        yield prof


def _is_cpu_event(ev: Any) -> bool:
    try:
        return str(ev.device_type()).endswith("CPU")
    except Exception:  # noqa: BLE001 - an older event API: every event is a CPU event here
        return True


def _phase_at(when: int, starts: list) -> Optional[str]:
    """The phase whose range started last at or before ``when``."""
    found = None
    for start, name in starts:
        if start <= when:
            found = name
    return found


def _measure_cuda(model: Any, batch: Batch, loss: Any, phase: str, optimizer: Any, lr: float,
                  dev: Any, tracked: Optional[tuple]) -> MemoryReport:
    import torch

    api = _seam("_cuda_api")
    place = api.placement(dev)
    gc.collect()
    api.warm_up_libraries(place)  # library workspaces of the process: not the step's
    api.synchronize(dev)
    api.release_cached_blocks(dev)  # blocks cached by earlier work: not handed out whole
    before = api.memory_allocated(dev)  # other allocations of the process: not the step's
    work = copy_model(model).to(place)
    data = batch.clone().to(place)
    opt = _prepare(work, phase, optimizer, lr)
    api.synchronize(dev)
    baseline = api.memory_allocated(dev) - before
    phase_peaks: dict = {}

    @contextlib.contextmanager
    def phase_context(name: str) -> Iterator[None]:
        api.synchronize(dev)
        api.reset_peak_memory_stats(dev)
        yield
        api.synchronize(dev)
        phase_peaks[name] = api.max_memory_allocated(dev) - before

    keep = _run_step(work, data, loss, phase, opt, phase_context)
    order = [p for p in STEP_PHASES if p in phase_peaks]
    peak_phase = max(order, key=lambda p: (phase_peaks[p], -order.index(p)))
    del keep
    return _report(phase_peaks, peak_phase, phase, str(dev), METHOD_CUDA, False, baseline,
                   tracked, opt, target=torch.device(place), block=CUDA_BLOCK_BYTES)


def _tracked_run(model: Any, batch: Batch, loss: Any, phase: str, optimizer: Any, lr: float,
                 place: Any) -> Optional[tuple]:
    """The step under MemTracker on a fresh copy: (categories at its peak, top modules).

    None when MemTracker is unavailable (no torch.distributed) or refuses the step.
    """
    import torch

    try:
        tracker = _new_tracker(target=torch.device(place))
    except ImportError:
        return None
    work = copy_model(model).to(place)
    data = batch.clone().to(place)
    opt = _prepare(work, phase, optimizer, lr)
    tracker.track_external(work, *(t for _, t in _batch_tensors(data)),
                           *([opt] if opt is not None else []))
    try:
        with _tracking(tracker), _root_own_ops(work, tracker):
            keep = _run_step(work, data, loss, phase, opt, _tracker_phases(tracker, _no_phase))
    except Exception as exc:  # noqa: BLE001 - the model's own errors propagate
        if _tracker_limitation(exc):
            return None
        raise
    result = (_categories(tracker), _top_modules(tracker, work))
    del keep, work, data, opt, tracker
    return result
