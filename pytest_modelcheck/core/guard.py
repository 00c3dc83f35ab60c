"""Resource guards around a check: a wall-clock budget and out-of-memory recovery.

A check that overruns its budget or exhausts device memory becomes a failed result with a
clear headline; the session goes on. Nothing here imports torch at module level.
"""
from __future__ import annotations

import contextlib
import gc
import signal
import threading
from typing import Any, Iterator, Optional


class CheckTimeout(BaseException):
    """Raised inside a check when its time budget is spent (a BaseException, so the model-error
    handling inside checks does not swallow it)."""


@contextlib.contextmanager
def time_budget(seconds: Optional[float]) -> Iterator[None]:
    """Raise CheckTimeout in the body after ``seconds`` (main thread, POSIX timers).

    Without a budget, off the main thread or where ``setitimer`` is missing, the body runs
    unguarded. The previous handler and timer are restored.

    >>> import time
    >>> try:
    ...     with time_budget(0.05):
    ...         time.sleep(1)
    ... except CheckTimeout:
    ...     print("stopped")
    stopped
    """
    if not seconds or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise CheckTimeout(f"exceeded its time budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    old_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_timer[0]:
            signal.setitimer(signal.ITIMER_REAL, *old_timer)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch.cuda.OutOfMemoryError and allocator 'out of memory' RuntimeErrors.

    >>> is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    True
    >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"
    ...                               " to allocate 8000000000 bytes"))
    True
    """
    import sys

    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text
        or isinstance(exc, MemoryError))


def release_memory() -> Optional[int]:
    """Free what can be freed after an out-of-memory error; returns the CUDA peak (bytes) or
    None on a machine without CUDA."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = int(torch.cuda.max_memory_allocated())
        torch.cuda.empty_cache()
        return peak
    return None
