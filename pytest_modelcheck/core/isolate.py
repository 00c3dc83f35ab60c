"""Run a function in a guarded child process, so that a native crash fails a check, not the session.

Some work can abort the interpreter instead of raising: fake CUDA tensors on a CPU-only build
of torch, a C++ ``std::terminate`` (SIGABRT) or a segmentation fault (SIGSEGV) in a kernel.
``run_isolated(fn, *args, **kwargs)`` runs ``fn(*args, **kwargs)`` in a fresh Python process
and returns its result; a child that dies raises ``IsolatedCrash`` in the parent, which lives on.

How it works
    The child is ``python -c`` started with ``subprocess`` (never ``fork``: forking after torch
    started its OpenMP thread pool can deadlock, and unlike ``multiprocessing``'s "spawn" no
    ``__main__`` module is re-imported). It gets the parent's ``sys.path`` first, then
    ``(fn, args, kwargs)`` as a pickle on stdin, and writes ``("ok", result)`` or
    ``("error", exception)`` as a pickle to a copy of its stdout; what the child itself prints
    goes to its stderr, whose last lines end up in ``IsolatedCrash.stderr``. The child imports
    torch itself (1-3 s per call).

What can be isolated
    ``fn`` must be a top-level function of an importable module, and the arguments must pickle
    (tensors, ``nn.Module`` instances, dataclasses do). A model class defined in a test module
    is pickled by reference, ``tests.test_x.MyNet`` or ``test_x.MyNet``: the child finds it
    when that module is importable from the parent's ``sys.path`` (which the child gets); its
    import then runs again in the child. Lambdas, local classes and open files cannot be
    pickled: ``NotIsolatable`` is raised before any child starts (also when the child cannot
    unpickle), and callers run the work in-process instead.

>>> import math
>>> run_isolated(math.sqrt, 16.0)
4.0
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import traceback
from typing import Any, Callable, Optional

from .errors import ModelError, first_line

STDERR_TAIL_LINES = 20
_CHILD = "from pytest_modelcheck.core.isolate import _child_main; _child_main()"


class IsolatedCrash(ModelError):
    """The child process died without a result (a signal, a non-zero exit, or a timeout).

    ``signal_name`` is e.g. ``"SIGABRT"`` (empty for an exit status), ``returncode`` the
    child's exit status (negative for a signal), ``stderr`` the last lines it wrote.

    >>> str(IsolatedCrash("the estimate crashed the worker process (SIGABRT)"))
    'the estimate crashed the worker process (SIGABRT)'
    """

    def __init__(self, message: str, signal_name: str = "", returncode: Optional[int] = None,
                 stderr: str = ""):
        super().__init__(message)
        self.signal_name = signal_name
        self.returncode = returncode
        self.stderr = stderr


class IsolatedTimeout(IsolatedCrash):
    """The child did not finish within ``timeout`` seconds and was killed.

    >>> issubclass(IsolatedTimeout, IsolatedCrash)
    True
    """


class IsolatedError(RuntimeError):
    """A child exception that could not travel back as itself: ``"TypeName: message"``.

    >>> str(IsolatedError("KeyError: 'x'"))
    "KeyError: 'x'"
    """


class NotIsolatable(Exception):
    """``fn`` or its arguments cannot be pickled (or unpickled by the child): run in-process.

    >>> str(NotIsolatable("cannot pickle 'function' object"))
    "cannot pickle 'function' object"
    """


def run_isolated(fn: Callable, *args: Any, timeout: Optional[float] = None,
                 what: str = "the call", **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a child process; its result, or its exception, comes back.

    A child exception is raised again in the parent as the same class and message when it
    pickles (else ``IsolatedError("TypeName: first line")``); its traceback text is on the
    exception's ``isolated_traceback`` attribute. A child killed by a signal or exiting
    without a result raises ``IsolatedCrash`` ("<what> crashed the worker process
    (SIGSEGV)"); after ``timeout`` seconds the child is killed and ``IsolatedTimeout`` raised.
    If the parent is interrupted (a ``time_budget`` alarm, Ctrl-C), the child is killed too.

    >>> import operator
    >>> run_isolated(operator.add, 2, 3)
    5
    >>> try:
    ...     run_isolated(int, "x")
    ... except ValueError as exc:
    ...     print(exc)
    invalid literal for int() with base 10: 'x'
    """
    try:
        payload = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # PicklingError, TypeError, AttributeError (local objects)
        raise NotIsolatable(first_line(f"{type(exc).__name__}: {exc}")) from None
    message = pickle.dumps((list(sys.path), payload), protocol=pickle.HIGHEST_PROTOCOL)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(message, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise IsolatedTimeout(f"{what} did not finish in {timeout:g} s; the worker process was"
                              " killed", "SIGKILL", proc.returncode, _tail(err)) from None
    finally:
        if proc.poll() is None:  # interrupted in the parent: do not leave the child running
            proc.kill()
            proc.communicate()
    return _outcome(proc.returncode, out, err, what)


def _outcome(returncode: int, out: bytes, err: bytes, what: str) -> Any:
    """The child's result, or the exception its death or its error becomes in the parent."""
    stderr = _tail(err)
    reply = None
    if out:
        try:
            reply = pickle.loads(out)
        except Exception:  # a truncated reply: the child died while writing it
            reply = None
    if reply is None or returncode != 0:
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            raise IsolatedCrash(f"{what} crashed the worker process ({name})", name, returncode,
                                stderr)
        raise IsolatedCrash(f"{what} ended the worker process without a result (exit status"
                            f" {returncode})", "", returncode, stderr)
    kind, value, remote_tb = reply
    if kind == "ok":
        return value
    if kind == "unpicklable":
        raise NotIsolatable(value)
    exc = value if isinstance(value, BaseException) else IsolatedError(value)
    try:
        exc.isolated_traceback = remote_tb  # type: ignore[attr-defined]
    except Exception:
        pass
    raise exc


def _child_main() -> None:
    """The child's side: read ``(sys.path, payload)`` from stdin, reply on the original stdout."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # what fn prints must not corrupt the reply
    sys.stdout = sys.stderr
    path, payload = pickle.loads(sys.stdin.buffer.read())
    sys.path[:] = path + [p for p in sys.path if p not in path]
    try:
        fn, args, kwargs = pickle.loads(payload)
    except Exception as exc:
        _reply(reply_fd, ("unpicklable", first_line(f"the worker process cannot unpickle the"
                                                   f" call: {type(exc).__name__}: {exc}"), ""))
        return
    try:
        reply = ("ok", fn(*args, **kwargs), "")
    except BaseException as exc:  # noqa: B036 - SystemExit too must come back as an error
        remote_tb = traceback.format_exc()
        reply = ("error", exc, remote_tb)
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            reply = ("error", first_line(f"{type(exc).__name__}: {exc}"), remote_tb)
    _reply(reply_fd, reply)


def _reply(fd: int, reply: tuple) -> None:
    try:
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # the result itself does not pickle
        data = pickle.dumps(("error", first_line(f"the result cannot be sent back:"
                                                f" {type(exc).__name__}: {exc}"), ""))
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: native atexit handlers cannot crash a finished call


def _tail(err: bytes) -> str:
    lines = (err or b"").decode("utf-8", "replace").rstrip().splitlines()
    return "\n".join(lines[-STDERR_TAIL_LINES:])


