"""Background CPU load like other CI jobs on a shared runner: K Python processes, each running
torch matmuls in a loop with torch's default thread count.

The load is bounded and leaves nothing behind:

* every child runs in its own session (process group) and is stopped with SIGTERM, then
  SIGKILL, to its whole group, by ``stop()``, by the context manager's exit, by an ``atexit``
  hook and by the parent's SIGINT/SIGTERM/SIGHUP handlers (installed while the load runs);
* every child has a hard deadline (``lifetime`` seconds, at most ``HARD_CAP_S``) after which it
  exits by itself;
* every child watches its parent: it asks the kernel for SIGTERM when the parent dies
  (``PR_SET_PDEATHSIG`` on Linux) and, in the loop, exits as soon as ``os.getppid()`` changes,
  so even a SIGKILLed benchmark leaves no orphan spinning for more than one matmul.

The children run with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` removed from their environment:
torch's default threads, which is what an unrelated job on the same runner does.

>>> with BackgroundLoad(0) as load:      # K = 0: no process, nothing to stop
...     load.pids
[]
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from typing import Optional

HARD_CAP_S = 6 * 3600  # no child outlives this, whatever its caller asked
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def default_thread_env(env: Optional[dict] = None) -> dict:
    """A copy of ``env`` (default ``os.environ``) without the thread-count variables, so torch
    picks its default thread count in the process that gets it.

    >>> "OMP_NUM_THREADS" in default_thread_env({"OMP_NUM_THREADS": "1", "PATH": "/bin"})
    False
    """
    env = dict(os.environ if env is None else env)
    for name in THREAD_VARIABLES:
        env.pop(name, None)
    return env


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (best effort)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def child_main(parent: int, deadline: float, size: int) -> int:
    """The load loop of one child: matmuls until the deadline passes or the parent is gone."""
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 0
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    n = 0
    while time.time() < deadline and os.getppid() == parent:
        a = torch.tanh(a @ b)  # tanh keeps the values bounded
        n += 1
    return 0


class BackgroundLoad:
    """Start ``k`` load processes; stop them all on ``stop()`` or on leaving the ``with`` block.

    ``lifetime`` bounds each child (seconds; capped at ``HARD_CAP_S``); ``size`` is the matmul
    side. ``pids`` lists the running children; ``load_averages()`` samples ``os.getloadavg``.
    """

    def __init__(self, k: int = 2, lifetime: float = 3600.0, size: int = 512,
                 python: str = sys.executable) -> None:
        if k < 0:
            raise ValueError(f"k: expected a number of processes >= 0, got {k}")
        self.k, self.size, self.python = k, size, python
        self.lifetime = min(float(lifetime), HARD_CAP_S)
        self.procs: list = []
        self.started_at: Optional[float] = None
        self._old_handlers: dict = {}
        self._atexit = False

    @property
    def pids(self) -> list:
        return [p.pid for p in self.procs if p.poll() is None]

    def start(self) -> "BackgroundLoad":
        if self.procs:
            raise RuntimeError("BackgroundLoad.start: already started")
        deadline = time.time() + self.lifetime
        env = default_thread_env()
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import background_load as b;"
                " sys.exit(b.child_main(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))")
        here = os.path.dirname(os.path.abspath(__file__))
        self._install_handlers()
        for _ in range(self.k):
            self.procs.append(subprocess.Popen(
                [self.python, "-c", code, here, str(os.getpid()), repr(deadline), str(self.size)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                start_new_session=True))
        self.started_at = time.time()
        return self

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM each child's process group, then SIGKILL what is left; reap them all."""
        procs, self.procs = self.procs, []
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        end = time.time() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.0, end - time.time()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
        self._restore_handlers()

    def load_averages(self) -> list:
        return [round(x, 2) for x in os.getloadavg()]

    # -- being stopped whatever happens to the parent -------------------------------------
    def _install_handlers(self) -> None:
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: atexit and the children's watch remain
                pass

    def _restore_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except ValueError:
                pass
        self._old_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        old = self._old_handlers.get(signum)
        self.stop(grace=1.0)
        if callable(old):
            old(signum, frame)
        elif old == signal.SIG_IGN:
            return
        else:  # default action: die of the same signal
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> "BackgroundLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the child leads its own group
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":  # python benchmarks/background_load.py K SECONDS: load the machine
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    with BackgroundLoad(k, lifetime=seconds + 5) as load:
        print(f"{k} load processes {load.pids} for {seconds:.0f} s", flush=True)
        time.sleep(seconds)
        print(f"load averages {load.load_averages()}")
