"""Resource guards around a check: a wall-clock budget and out-of-memory recovery.

A check that overruns its budget or exhausts device memory becomes a failed result with a
clear headline; the session goes on. Nothing here imports torch at module level.
"""
from __future__ import annotations

import contextlib
import gc
import signal
import threading
import time
from typing import Any, Iterator, Optional


class CheckTimeout(BaseException):
    """Raised inside a check when its time budget is spent (a BaseException, so the model-error
    handling inside checks does not swallow it)."""


@contextlib.contextmanager
def time_budget(seconds: Optional[float]) -> Iterator[None]:
    """Raise CheckTimeout in the body after ``seconds`` (main thread, POSIX timers).

    Without a budget, off the main thread or where ``setitimer`` is missing, the body runs
    unguarded. The previous handler and timer are restored. An outer alarm that was already
    armed (``signal.alarm``, ``setitimer``, pytest-timeout's signal method) keeps its deadline:
    when it falls inside the body its own handler runs then, otherwise it is re-armed with the
    time it has left.

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
        with budget_watchdog(seconds):  # no alarm here: the watchdog thread alone
            yield
        return

    # An outer SIGALRM deadline (pytest-timeout's signal method, a user's signal.alarm or
    # setitimer) shares the one ITIMER_REAL: it is never pushed back. The timer is armed for
    # whichever comes first; the outer one is handed to its own handler when due, during the
    # body, and re-armed afterwards with what is left of it.
    start = time.monotonic()
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    deadline = start + seconds
    outer = {"due": start + old_delay if old_delay > 0 else None}

    def arm() -> None:
        due = deadline if outer["due"] is None else min(deadline, outer["due"])
        signal.setitimer(signal.ITIMER_REAL, max(due - time.monotonic(), _MIN_DELAY))

    def on_alarm(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if outer["due"] is not None and now >= outer["due"] - _EARLY:
            outer["due"] = outer["due"] + old_interval if old_interval > 0 else None
            arm()
            _deliver(previous, signum, frame)  # may raise (pytest-timeout fails the test)
            return
        if now < deadline - _EARLY:  # woken early (clock granularity): wait for the rest
            arm()
            return
        raise CheckTimeout(f"exceeded its time budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    if outer["due"] is not None and outer["due"] < deadline:
        arm()
    try:
        with budget_watchdog(seconds):  # the backstop when the model defeats the alarm
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        if outer["due"] is not None:  # what is left of it; one already due fires at once
            signal.setitimer(signal.ITIMER_REAL,
                             max(outer["due"] - time.monotonic(), _MIN_DELAY), old_interval)


_MIN_DELAY = 1e-6  # setitimer(0) would disarm: a due alarm is armed this close instead
_EARLY = 1e-3  # an alarm this close to a due time counts as due


def _deliver(handler: Any, signum: int, frame: Any) -> None:
    """Hand a due outer SIGALRM to the handler that was in place before the budget."""
    import os

    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:  # the default action ends the process, as it would have
        signal.signal(signum, signal.SIG_DFL)
        signal.setitimer(signal.ITIMER_REAL, 0)
        os.kill(os.getpid(), signum)
    # SIG_IGN, or a handler not installed from Python (None): nothing to run


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


class BudgetOverrun(CheckTimeout):
    """The time budget was overrun although its alarm was due: the body ignored SIGALRM or
    replaced its handler. Raised by ``budget_watchdog``'s thread (as an asynchronous exception,
    hence no arguments) or when the body returns late.

    >>> str(BudgetOverrun())
    'ran past its time budget: SIGALRM was ignored or its handler replaced (stopped by the watchdog thread)'
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*(args or ("ran past its time budget: SIGALRM was ignored or its handler"
                                    " replaced (stopped by the watchdog thread)",)))


def watchdog_grace(seconds: float) -> float:
    """How long past its budget a body may run before the watchdog thread acts: 1 s + 10%.

    >>> watchdog_grace(3)
    1.3
    """
    return round(min(1.0 + 0.1 * seconds, 30.0), 3)


@contextlib.contextmanager
def budget_watchdog(seconds: Optional[float], grace: Optional[float] = None) -> Iterator[None]:
    """The time budget's backstop, which no signal handler can switch off: a thread.

    When the body is still running ``seconds + grace`` after it started (the SIGALRM that
    ``time_budget`` arms was ignored, its handler replaced by the model, or the body is off the
    main thread), the thread raises ``BudgetOverrun`` in the body's thread: an asynchronous
    exception, seen at the next Python bytecode (a busy loop, a Python signal handler woken by a
    SIGALRM the thread sends when one is installed). A body blocked in native code with SIGALRM
    ignored cannot be interrupted in-process; when it returns late, ``BudgetOverrun`` is raised
    on exit, so the overrun still fails the check (crash isolation, ``--modelcheck-isolate``,
    also stops it). Nothing is left pending after the block.

    >>> import time
    >>> try:
    ...     with budget_watchdog(0.05, grace=0.05):
    ...         while True:  # a busy loop no alarm interrupts
    ...             pass
    ... except BudgetOverrun:
    ...     print("stopped")
    stopped
    """
    if not seconds:
        yield
        return
    import ctypes

    limit = seconds + (watchdog_grace(seconds) if grace is None else grace)
    target = threading.get_ident()
    on_main = threading.current_thread() is threading.main_thread()
    lock = threading.Lock()
    state = {"running": True, "fired": False}
    done = threading.Event()
    start = time.monotonic()

    def set_async(exc: Any) -> None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target),
                                                   ctypes.py_object(exc) if exc else None)

    def watch() -> None:
        if done.wait(limit):
            return
        with lock:
            if not state["running"]:
                return
            state["fired"] = True
            set_async(BudgetOverrun)
            # a Python-level SIGALRM handler (the model's own) runs bytecode, so the pending
            # exception is raised in it and a sleep is cut short; never poke SIG_DFL/SIG_IGN
            if on_main and callable(signal.getsignal(signal.SIGALRM)) \
                    and hasattr(signal, "pthread_kill"):
                try:
                    signal.pthread_kill(target, signal.SIGALRM)
                except (OSError, ValueError):
                    pass

    thread = threading.Thread(target=watch, name="modelcheck-budget-watchdog", daemon=True)
    thread.start()
    returned = False
    try:
        yield
        returned = True
    finally:
        with lock:
            state["running"] = False
            if state["fired"]:
                set_async(None)  # clear one not yet raised: it must not land in our caller
        done.set()
        thread.join()
    if returned and time.monotonic() - start > limit:
        raise BudgetOverrun(f"ran for {time.monotonic() - start:.1f} s, past its time budget:"
                            f" SIGALRM was ignored or its handler replaced (seen when it returned)")
