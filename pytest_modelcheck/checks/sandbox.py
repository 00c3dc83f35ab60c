"""Crash and hang isolation of one check: a segfault, ``os._exit``, an abort or a hang in the
model becomes a failed check, and the test session goes on.

``run_check_isolated(spec, values, ...)`` runs ``spec.run(...)`` (one check, exactly as the
test process would) in a child process and returns its ``CheckResult``; the parent is the
watchdog. What the child's death becomes:

- killed by a signal: "expected the check to finish, observed the process killed by SIGSEGV
  while running grads_finite"; the details hold the Python stacks at the crash (``faulthandler``);
- exited without a result (``os._exit(3)``, a native ``exit``): "... observed the process exit
  with status 3 while running grads_finite";
- still running after the time budget plus a grace of ``1 s + 10%`` (the model ignored SIGALRM or
  replaced its handler, or sat in native code): the child's ``faulthandler`` watchdog - a C
  thread, no signal - dumps every thread's stack and ends it; the parent, on its own wall clock,
  kills it two seconds later if it is still there. The failure holds the stacks.

How the child is started
    ``auto`` mode forks (Linux): the model, batch, loss and batch factories are inherited, so
    nothing needs to pickle and a fork costs milliseconds. In the forked child torch runs on one
    CPU thread (GNU OpenMP's thread pool cannot be used after a fork: the child would hang), so
    timings measured there are single-threaded.
    **GPU safety**: CUDA cannot be used in a forked child of a process that already initialised
    it. When ``torch.cuda.is_initialized()`` is true in the test process (or off Linux, or in
    ``spawn`` mode) the check runs in a fresh interpreter instead (``core.isolate.run_isolated``:
    the model, batch and arguments are pickled; CUDA tensors travel through host memory and the
    child initialises CUDA itself, 1-3 s per check). Work that does not pickle (a model class
    defined inside a function, a lambda loss) then runs in the test process, guarded by the
    in-process budget, and its result says so in a note.

The time budget inside the child is still ``time_budget`` (a failed check with the usual
message when the alarm works); the child's watchdog is the backstop when it does not.

>>> modes = ISOLATE_MODES
>>> modes
('off', 'auto', 'spawn')
"""
from __future__ import annotations

import io
import os
import pickle
import select
import signal
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Iterator, Optional

from ..core.errors import UsageError, first_line
from ..core.result import CheckResult

ISOLATE_MODES = ("off", "auto", "spawn")
BACKSTOP_S = 2.0  # the parent kills a child this long after its own watchdog should have
STACK_LINES = 40  # lines of faulthandler output kept in a failure's details
SPAWN_STARTUP_S = 60.0  # a spawned child imports torch first: its backstop allows for that
_TIMEOUT_MARK = "Timeout ("  # faulthandler.dump_traceback_later's first line


def validate_isolate(value: Any) -> str:
    """The ``--modelcheck-isolate`` / ``modelcheck_isolate`` value, checked.

    >>> validate_isolate("AUTO"), validate_isolate(""), validate_isolate(True)
    ('auto', 'off', 'auto')
    >>> validate_isolate("fork")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: got 'fork'; expected one of off, auto, spawn
    """
    if value is True:
        return "auto"
    if value in (None, False, ""):
        return "off"
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return "auto"
    if text in ("false", "no", "0"):
        return "off"
    if text not in ISOLATE_MODES:
        raise UsageError(f"got {value!r}; expected one of {', '.join(ISOLATE_MODES)}")
    return text


def grace_s(timeout: float) -> float:
    """Time a check may run past its budget before the watchdog stops it: 1 s plus 10%.

    >>> grace_s(3), grace_s(600)
    (1.3, 30.0)
    """
    return round(min(1.0 + 0.1 * timeout, 30.0), 3)


def start_method(mode: str = "auto") -> str:
    """``"fork"`` where that is safe, ``"spawn"`` otherwise: in ``spawn`` mode, off Linux, and
    whenever this process has initialised CUDA (a forked child could not use it).

    >>> start_method("spawn")
    'spawn'
    """
    if mode == "spawn" or not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return "spawn"
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return "spawn"
    except Exception:  # noqa: BLE001 - a broken CUDA install: do not fork either
        return "spawn"
    return "fork"


def run_check_isolated(spec: Any, values: dict, *, model: Any, batch: Any, loss: Any = None,
                       device: Any = None, timeout: Optional[float] = None,
                       mode: str = "auto", facts: bool = False,
                       where: str = "") -> tuple:
    """``spec.run(values, ...)`` in a child process: ``(CheckResult, facts or None)``.

    With ``facts=True`` the child also returns ``model_facts(model, batch, timeout)`` after the
    result (``None`` when it could not: the caller computes what needs no forward). A
    ``UsageError`` in the child is raised again here. ``where`` (the test id) is named in the
    failure's details.

    >>> from pytest_modelcheck.checks.registry import get_check
    >>> import torch
    >>> spec = get_check("grads_finite")
    >>> result, _ = run_check_isolated(spec, spec.bind(), model=torch.nn.Linear(4, 2),
    ...                                batch=torch.ones(3, 4), timeout=30)
    >>> result.check, result.passed
    ('grads_finite', True)
    """
    job = (spec.name, values, model, batch, loss, device, timeout, facts)
    if start_method(mode) == "fork":
        messages, status, killed, dump = _run_forked(lambda: _check_messages(spec, *job[1:]),
                                                     timeout)
        return _outcome(spec.name, messages, status, killed, dump, timeout, where, "fork")
    from ..core.isolate import IsolatedCrash, NotIsolatable, run_isolated

    backstop = timeout + grace_s(timeout) + SPAWN_STARTUP_S if timeout else None
    handle, dump_path = tempfile.mkstemp(prefix="modelcheck-stacks-", suffix=".txt")
    os.close(handle)
    try:
        messages = run_isolated(_spawned_check, *job, dump_path, timeout=backstop,
                                what=spec.name)
    except NotIsolatable as exc:
        result = spec.run(values, model=model, batch=batch, loss=loss, device=device,
                          timeout=timeout)
        result.details = (result.details + "\n" if result.details else "") + (
            f"note: ran in the test process, not isolated: the check cannot be sent to a"
            f" spawned process ({exc})")
        return result, None
    except IsolatedCrash as exc:
        status = (exc.returncode if exc.returncode is not None else 1)
        killed = type(exc).__name__ == "IsolatedTimeout"
        return _outcome(spec.name, [], _as_wait_status(status), killed,
                        _read_and_remove(dump_path) or exc.stderr, timeout, where, "spawn")
    finally:
        if os.path.exists(dump_path):
            _read_and_remove(dump_path)
    return _outcome(spec.name, messages, 0, False, "", timeout, where, "spawn")


def _read_and_remove(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8", "replace")
        os.unlink(path)
        return text
    except OSError:
        return ""


def _as_wait_status(returncode: int) -> int:
    """A ``subprocess`` return code (negative for a signal) as an ``os.waitpid`` status."""
    return -returncode & 0x7F if returncode < 0 else (returncode & 0xFF) << 8


def _check_messages(spec: Any, values: dict, model: Any, batch: Any, loss: Any, device: Any,
                    timeout: Optional[float], facts: bool) -> Iterator[tuple]:
    """What a child sends back, in order: the result (or a usage error), then the facts."""
    try:
        result = spec.run(values, model=model, batch=batch, loss=loss, device=device,
                          timeout=timeout)
    except UsageError as exc:
        yield ("usage", str(exc))
        return
    yield ("result", result.to_dict())
    if facts:
        from ..core.facts import model_facts

        yield ("facts", model_facts(model, batch, timeout=timeout))


def _spawned_check(name: str, values: dict, model: Any, batch: Any, loss: Any, device: Any,
                   timeout: Optional[float], facts: bool, dump_path: str) -> list:
    """The spawned child's side (a top-level function, so that it pickles by reference)."""
    import faulthandler

    from .registry import get_check

    dump = open(dump_path, "wb")  # noqa: SIM115 - open until the process ends
    faulthandler.enable(file=dump, all_threads=True)
    if timeout:
        faulthandler.dump_traceback_later(timeout + grace_s(timeout), exit=True, file=dump)
    return list(_check_messages(get_check(name), values, model, batch, loss, device, timeout,
                                facts))


def _run_forked(body: Any, timeout: Optional[float]) -> tuple:
    """Fork; the child sends ``body()``'s messages through a pipe and ends with ``os._exit``.

    Returns ``(messages, wait status, killed by the parent, faulthandler output)``.
    """
    dump = tempfile.TemporaryFile()
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():  # Python 3.12 warns about forking with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        _child(body, read_fd, write_fd, dump, timeout)
    os.close(write_fd)
    chunks, killed, status = [], False, None
    deadline = time.monotonic() + timeout + grace_s(timeout) + BACKSTOP_S if timeout else None
    try:
        while True:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready, _, _ = select.select([read_fd], [], [], wait)
            if not ready:  # the watchdog inside the child did not end it: the parent does
                killed = True
                break
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:  # also when the parent is interrupted (Ctrl-C, an outer alarm)
        os.close(read_fd)
        if killed or sys.exc_info()[0] is not None:
            _kill(pid)
        status = os.waitpid(pid, 0)[1]
    dump.seek(0)
    text = dump.read().decode("utf-8", "replace")
    dump.close()
    return _messages(b"".join(chunks)), status, killed, text


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _child(body: Any, read_fd: int, write_fd: int, dump: Any,
           timeout: Optional[float]) -> None:  # pragma: no cover - runs in the child
    import faulthandler

    code = 0
    out = None
    try:
        os.close(read_fd)
        faulthandler.enable(file=dump, all_threads=True)
        if timeout:
            faulthandler.dump_traceback_later(timeout + grace_s(timeout), exit=True, file=dump)
        torch = sys.modules.get("torch")
        if torch is not None and torch.get_num_threads() > 1:
            torch.set_num_threads(1)  # GNU OpenMP's pool is not usable after fork
        out = os.fdopen(write_fd, "wb")
        for message in body():
            pickle.dump(message, out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
    except BaseException as exc:  # noqa: B036 - whatever it is, it goes back as a message
        code = 70
        try:
            if out is not None:
                pickle.dump(("error", f"{type(exc).__name__}: {first_line(exc)}"[:300],
                             traceback.format_exc()[-4000:]), out)
                out.flush()
        except BaseException:  # noqa: B036
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: B036
                pass
        os._exit(code)


def _messages(data: bytes) -> list:
    """The complete pickled messages in ``data`` (a truncated last one is dropped)."""
    stream, found = io.BytesIO(data), []
    while stream.tell() < len(data):
        try:
            found.append(pickle.load(stream))
        except Exception:  # noqa: BLE001 - the child died while writing
            break
    return found


def _stacks(text: str) -> str:
    """The faulthandler dump, without the noise (extension module list), cut to STACK_LINES."""
    blocks: list = []
    for ln in text.rstrip().splitlines():
        if not ln.strip() or ln.startswith("Extension modules:"):
            continue
        if not ln.startswith(" ") or not blocks:  # a header: a thread's frames follow
            blocks.append([ln, False])
        elif not blocks[-1][1]:
            # the isolation's own frames, and the test process's below them, are not shown
            blocks[-1][1] = f"checks{os.sep}sandbox.py" in ln
            if not blocks[-1][1]:
                blocks[-1][0] += "\n" + ln
    lines = [ln for text_, _ in blocks for ln in text_.splitlines()
             if not _is_watchdog_thread(text_)]
    if len(lines) > STACK_LINES:
        lines = lines[:STACK_LINES] + [f"... ({len(lines) - STACK_LINES} more lines)"]
    return "\n".join(lines)


def _is_watchdog_thread(block: str) -> bool:
    """A thread of the budget's own watchdog (``guard.budget_watchdog``): not the model's."""
    return f"core{os.sep}guard.py" in block and " in watch" in block


def _outcome(name: str, messages: list, status: int, killed: bool, dump: str,
             timeout: Optional[float], where: str, how: str) -> tuple:
    """The child's messages and its end as ``(CheckResult, facts or None)``."""
    result = facts = None
    for message in messages:
        kind = message[0]
        if kind == "usage":
            raise UsageError(message[1])
        if kind == "result":
            result = CheckResult.from_dict(message[1])
        elif kind == "facts":
            facts = message[1]
        elif kind == "error" and result is None:
            result = CheckResult(name, False, f"expected the check to run on this model, observed"
                                 f" {message[1]} in the isolated process",
                                 details=message[2], metrics={"error": message[1].split(":")[0]})
    if result is not None:
        return result, facts
    return crash_result(name, status, killed, dump, timeout, where, how), None


def crash_result(name: str, status: int, killed: bool, dump: str, timeout: Optional[float],
                 where: str = "", how: str = "fork") -> CheckResult:
    """The failed result for a child that ended without one (``status`` as from ``waitpid``).

    >>> r = crash_result("grads_finite", signal.SIGSEGV, False, "", None, "t.py::test_a")
    >>> r.headline
    'expected the check to finish, observed the process killed by SIGSEGV while running grads_finite'
    >>> r.metrics
    {'crashed': 'SIGSEGV', 'signal': 11}
    >>> crash_result("grads_finite", 3 << 8, False, "", None).headline
    'expected the check to finish, observed the process exit with status 3 while running grads_finite'
    """
    stacks = _stacks(dump)
    hung = killed or _TIMEOUT_MARK in dump
    test = f"test: {where}\n" if where else ""
    process = "forked" if how == "fork" else "spawned"
    if hung and timeout:
        headline = (f"expected the check to finish in {timeout:g} s, observed it still running"
                    f" after {timeout + grace_s(timeout):g} s while running {name} (the time"
                    f" budget's alarm was ignored or its handler replaced, or it sat in native"
                    f" code); the process was stopped")
        metrics: dict = {"timeout_s": timeout, "hung": True}
        details = (f"{test}the check ran in a {process} process; its stacks when it was stopped"
                   f" (most recent call first):\n{stacks or '(no stacks were written)'}")
        return CheckResult(name, False, headline, details=details, metrics=metrics)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            signame = signal.Signals(number).name
        except ValueError:
            signame = f"signal {number}"
        observed = f"the process killed by {signame}"
        metrics = {"crashed": signame, "signal": number}
    else:
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
        observed = f"the process exit with status {code}"
        metrics = {"crashed": "exit", "exit_code": code}
    details = (f"{test}the check ran in a {process} process, which ended without a result"
               f" (a native crash, an abort, or os._exit/exit in the model's code); the test"
               f" session went on")
    if stacks:
        details += f"\nstacks at the crash (most recent call first):\n{stacks}"
    return CheckResult(name, False, f"expected the check to finish, observed {observed} while"
                       f" running {name}", details=details, metrics=metrics)
