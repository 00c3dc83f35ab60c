"""How many CPU threads torch uses while the checks of one model test run.

torch's default is one intra-op thread per core. On a shared, loaded CI runner (or with
pytest-xdist workers that each take every core) those OpenMP threads spin against each other
and against other jobs, and small ops, which is what most checks run (many short training steps
on small models), get slower, not faster. ``choose_threads`` picks a count from the setting
(``"auto"``, ``"keep"`` or a number), the model's size, the xdist worker count and the machine
load; ``torch_threads`` applies it and puts the process setting back afterwards.

No pytest import; torch is imported inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Union

from .errors import UsageError

#: Below this many FLOPs for one forward of the example batch a model is "small" and runs on one
#: thread. A forward of 1 GFLOP takes about 10-30 ms on one core of a CI runner and is made of
#: ops of well under a millisecond each; torch splits an op over threads only past 32768
#: elements (``at::internal::GRAIN_SIZE``), and every parallel region pays a fork/join of the
#: OpenMP team (microseconds when cores are idle, up to a scheduler time slice, milliseconds,
#: when they are busy). Below this size the join costs more than the split saves on a loaded
#: machine; above it, large matmuls and convolutions do gain from more threads.
SMALL_MODEL_FLOPS = 1e9

#: When the FLOPs of the batch are unknown (the forward could not be counted, or is not run in
#: the test process under ``--modelcheck-isolate``), a model with fewer parameters than this is
#: small. One million parameters is about 2 MFLOP per sample for a dense model, so 1 GFLOP
#: per forward only at batches of ~500 samples, far beyond an example batch. Unknown both: not
#: small (the budget decides).
SMALL_MODEL_PARAMETERS = 1_000_000

#: Upper bound of an explicit count; more is a typo.
MAX_THREADS = 4096

Setting = Union[str, int]


@dataclass
class ThreadChoice:
    """The thread count chosen for a test's checks and why.

    >>> ThreadChoice(1, "auto: small model (48 FLOP per forward)", "auto").to_dict()
    {'count': 1, 'reason': 'auto: small model (48 FLOP per forward)', 'setting': 'auto'}
    """

    count: int
    reason: str
    setting: str

    def to_dict(self) -> dict:
        return asdict(self)


def validate_threads(setting: Any) -> Setting:
    """``"auto"``, ``"keep"`` or a thread count >= 1 (an int or a digit string); anything else
    is a one-line UsageError.

    >>> validate_threads("4"), validate_threads(None), validate_threads("KEEP")
    (4, 'auto', 'keep')
    >>> validate_threads("many")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: got 'many'; expected 'auto', 'keep' or a thread count such as 1 or 4
    """
    if setting is None or setting == "":
        return "auto"
    if isinstance(setting, str):
        text = setting.strip().lower()
        if text in ("auto", "keep"):
            return text
        if text.isdigit():
            setting = int(text)
    if isinstance(setting, int) and not isinstance(setting, bool) and 1 <= setting <= MAX_THREADS:
        return setting
    raise UsageError(f"got {setting!r}; expected 'auto', 'keep' or a thread count such as 1 or 4")


def sibling_workers(environ: Optional[dict] = None) -> int:
    """The number of pytest-xdist workers sharing this machine (``PYTEST_XDIST_WORKER_COUNT``,
    which xdist sets in every worker), 1 outside xdist or when the value is not a number.

    >>> sibling_workers({"PYTEST_XDIST_WORKER_COUNT": "2"}), sibling_workers({})
    (2, 1)
    """
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    except ValueError:
        return 1


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), else ``os.cpu_count()``.

    >>> usable_cores() >= 1
    True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def machine_load() -> Optional[float]:
    """The 1-minute load average, ``None`` where the system has none.

    >>> machine_load() is None or machine_load() >= 0
    True
    """
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _flop_text(flops: float) -> str:
    for scale, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:g} FLOP"


def choose_threads(setting: Any = "auto", *, flops: Optional[float] = None,
                   parameters: Optional[int] = None, cores: Optional[int] = None,
                   workers: Optional[int] = None, load: Optional[float] = None,
                   current: Optional[int] = None,
                   origin: str = "--modelcheck-threads") -> ThreadChoice:
    """The thread count for a test's checks.

    ``setting``: ``"keep"`` keeps torch's current count; a number is used as given (``origin``
    names where it came from); ``"auto"`` starts from ``cores // workers`` (at least 1, never
    more than torch's current count) and drops to 1 thread when the model is small (forward
    FLOPs of the example batch below :data:`SMALL_MODEL_FLOPS`; with FLOPs unknown, fewer
    parameters than :data:`SMALL_MODEL_PARAMETERS`) or the machine is oversubscribed
    (1-minute load per core >= 1). ``cores``, ``workers``, ``load`` and ``current`` default to
    the affinity mask, ``PYTEST_XDIST_WORKER_COUNT``, ``os.getloadavg()`` and
    ``torch.get_num_threads()``; tests pass them in.

    >>> choose_threads(flops=3.1e6, cores=8, workers=1, load=0.0, current=8).reason
    'auto: small model (3.1 MFLOP per forward)'
    >>> choose_threads(flops=5e10, cores=2, workers=2, load=0.1, current=2).reason
    'auto: 2 xdist workers on 2 cores'
    >>> c = choose_threads(flops=5e10, cores=2, workers=1, load=3.2, current=2)
    >>> c.count, c.reason
    (1, 'auto: machine load 3.2 on 2 cores')
    >>> choose_threads(flops=5e10, cores=8, workers=2, load=1.0, current=8).count
    4
    >>> choose_threads(3, current=8).to_dict()
    {'count': 3, 'reason': 'set by --modelcheck-threads', 'setting': '3'}
    """
    setting = validate_threads(setting)
    if current is None:
        import torch

        current = torch.get_num_threads()
    current = max(1, int(current))
    if setting == "keep":
        return ThreadChoice(current, "keep: the process setting", "keep")
    if isinstance(setting, int):
        return ThreadChoice(setting, f"set by {origin}", str(setting))
    cores = usable_cores() if cores is None else max(1, int(cores))
    workers = sibling_workers() if workers is None else max(1, int(workers))
    if load is None:
        load = machine_load()
    budget = min(max(1, cores // workers), current)
    if flops is not None:
        if flops < SMALL_MODEL_FLOPS:
            return ThreadChoice(1, f"auto: small model ({_flop_text(flops)} per forward)", "auto")
    elif parameters is not None and parameters < SMALL_MODEL_PARAMETERS:
        return ThreadChoice(1, f"auto: small model ({parameters:,} parameters, FLOPs not"
                               f" counted)", "auto")
    if load is not None and load / cores >= 1:
        return ThreadChoice(1, f"auto: machine load {load:.2g} on {cores} core"
                               f"{'s' if cores > 1 else ''}", "auto")
    if workers > 1:
        return ThreadChoice(budget, f"auto: {workers} xdist workers on {cores} core"
                                    f"{'s' if cores > 1 else ''}", "auto")
    why = "torch's setting" if budget < cores else f"{cores} core{'s' if cores > 1 else ''}"
    return ThreadChoice(budget, f"auto: {why}", "auto")


@contextlib.contextmanager
def torch_threads(count: Optional[int]) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(count)``; the previous count is put back on
    exit, exception or not. ``None`` changes nothing.

    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(int(count))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def child_threads(count: Optional[int]) -> Iterator[None]:
    """Set ``OMP_NUM_THREADS`` for child interpreters started in the body (a spawned check
    reads it when torch starts), restored on exit. ``None`` changes nothing.

    >>> import os
    >>> before = os.environ.get("OMP_NUM_THREADS")
    >>> with child_threads(2):
    ...     os.environ["OMP_NUM_THREADS"]
    '2'
    >>> os.environ.get("OMP_NUM_THREADS") == before
    True
    """
    if count is None:
        yield
        return
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(int(count))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
