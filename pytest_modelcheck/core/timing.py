"""Throughput measurement that tolerates noise.

:func:`measure_throughput` runs a ``step`` callable a few times to warm up,
then times ``min_runs`` runs.  If the timings are noisy -- the interquartile
range is more than ``noise`` times the median -- it keeps adding runs
(doubling the sample each round) until they are quiet, ``max_runs`` is
reached or ``max_time`` seconds have been measured.  A noisy measurement is
therefore extended before a check may fail on it, and the result records
whether it is still noisy at the end.

Throughput is ``batch_size / median`` run time; the median and quartiles
are robust to the odd slow run (a garbage collection, another process).

On a shared machine the spread is not symmetric: other processes only ever
*add* time to a run, so a busy runner drags the median down while the
fastest runs still show what the model can do.  A measurement therefore
carries an interval for the sustained rate
(:attr:`ThroughputMeasurement.samples_per_s_interval`), the machine's load
and the torch thread count it was taken under, and
:meth:`ThroughputMeasurement.verdict` tells a floor that was met, missed
with confidence, or neither ("inconclusive").  Given a ``floor``,
:func:`measure_throughput` takes more runs (within ``max_runs`` and
``max_time``) while the verdict is not yet settled.

The clock is injectable (``timer``), so the logic can be tested with a
scripted sequence of readings.  On CUDA devices the default is to time with
CUDA events (:func:`cuda_event_timer`), which measure GPU time without
counting Python overhead between kernels.  ``torch`` is imported only when a
CUDA timer or synchronisation is actually needed.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Union

from .rates import (
    CONFIDENCE,
    FAST_QUANTILE,
    TimingStats,
    _binomial_cdf,  # noqa: F401  (re-exported: was defined here)
    _quantile,  # noqa: F401  (re-exported: was defined here)
    _ratio,
    fast_rank,
    median_ranks,
)
from .units import format_duration, format_rate, parse_duration

__all__ = [
    "TimingStats",
    "ThroughputMeasurement",
    "CudaEventTimer",
    "cuda_event_timer",
    "measure_throughput",
    "machine_load",
    "median_ranks",
    "fast_rank",
    "CONFIDENCE",
    "FAST_QUANTILE",
]

#: A failure whose fast-run bound (load allowance included) misses the floor by more than this
#: factor is settled without more runs: a further run twice as fast as every run so far would
#: be a different machine, not noise (a clear miss costs 10 runs, not ``max_time``).
CLEAR_MISS = 2.0


def machine_load() -> tuple[float | None, int]:
    """``(load, cores)``: the 1-minute load average (``None`` where the platform has none) and
    the number of cores this process may run on (its CPU affinity).

    >>> load, cores = machine_load()
    >>> cores >= 1 and (load is None or load >= 0)
    True
    """
    from .threads import machine_load as load_average, usable_cores

    return load_average(), usable_cores()


def _torch_threads() -> int | None:
    """torch's intra-op thread count, if torch is imported (a step that uses torch has it)."""
    torch = sys.modules.get("torch")
    get = getattr(torch, "get_num_threads", None)
    return int(get()) if callable(get) else None


@dataclass
class ThroughputMeasurement:
    """The result of :func:`measure_throughput`.

    ``samples_per_s`` is ``batch_size / stats.median``; ``spread`` is
    ``stats.iqr / stats.median``; ``noisy`` says whether ``spread`` was
    still above the ``noise`` threshold when measuring stopped, and
    ``extended`` whether runs beyond ``min_runs`` were taken because the
    first ones were noisy (or, given a ``floor``, did not settle the verdict).  ``method`` is ``"perf_counter"`` for a host clock
    (``time.perf_counter`` unless another timer was injected) or
    ``"cuda-events"``.  A median of zero (a clock too coarse for the step)
    gives an infinite rate.

    The conditions of the measurement: ``load_before`` and ``load_after`` are
    the machine's 1-minute load average just before the first and just after
    the last timed run (``None`` where the platform has none), ``cores`` the
    cores this process may use, ``threads`` torch's intra-op thread count
    (``None`` when torch was not imported).

    **The interval** (:attr:`samples_per_s_interval`, ``(lo, hi)``):

    - ``lo = batch_size / t(n+1-j)``: the lower end of a distribution-free
      confidence interval of the median rate (``confidence``, 95%), from
      order statistics (:func:`median_ranks`): the rate this run sustained,
      at worst, under the conditions it met.
    - ``hi = batch_size / t(r) * load_allowance``: the rate of the fast runs.
      Interference (other processes, the scheduler, frequency drops) only
      ever adds time to a run, so the model's own speed shows in its fastest
      runs, not in its median.  ``t(r)`` is a lower confidence bound of the
      10th percentile of run time (:func:`fast_rank`; the fastest run when
      there are fewer than 29 runs): with confidence, at least 90% of runs
      were no faster than ``t(r)``.  ``load_allowance`` is
      ``max(1, load / cores)`` for the higher of the two load readings: on an
      oversubscribed machine a runnable thread gets about ``cores / load`` of
      a core, so even the fast runs were slowed by up to that factor.

    So ``hi`` is an optimistic but honest bound: below it the model is slow
    even when judged by its best runs with the load taken out.  A floor
    above ``hi`` is missed with confidence; a floor between the median rate
    and ``hi`` cannot be told from this machine (:meth:`verdict`).
    """

    batch_size: int
    samples_per_s: float
    stats: TimingStats
    runs: int
    warmup: int
    noisy: bool
    extended: bool
    device: str
    method: str
    spread: float
    noise: float = 0.10
    load_before: float | None = None
    load_after: float | None = None
    cores: int | None = None
    threads: int | None = None
    confidence: float = CONFIDENCE
    fast_quantile: float = FAST_QUANTILE

    @property
    def load_allowance(self) -> float:
        """``max(1, load / cores)`` for the higher load reading; 1 when the load is unknown.

        >>> m = measure_throughput(lambda: None, 8, timer=iter([0.0, 0.5] * 10).__next__,
        ...                        load=lambda: (6.0, 2))
        >>> m.load_allowance
        3.0
        """
        loads = [x for x in (self.load_before, self.load_after) if x is not None]
        if not loads or not self.cores:
            return 1.0
        return max(1.0, max(loads) / self.cores)

    @property
    def fast_rank(self) -> tuple[int, float]:
        """``(r, coverage)`` of the fast-run bound ``t(r)``, see :func:`fast_rank`."""
        return fast_rank(len(self.stats.times), self.fast_quantile, self.confidence)

    @property
    def fast_samples_per_s(self) -> float:
        """``batch_size / t(r)``: the rate of the fast runs, before the load allowance."""
        ordered = sorted(self.stats.times)
        return max(_ratio(self.batch_size, ordered[self.fast_rank[0] - 1]), self.samples_per_s)

    @property
    def samples_per_s_interval(self) -> tuple[float, float]:
        """``(lo, hi)`` for the sustained rate, as the class docstring defines them.

        >>> m = measure_throughput(lambda: None, 8, timer=iter([0.0, 0.5] * 10).__next__,
        ...                        load=lambda: (1.0, 2))
        >>> m.samples_per_s_interval
        (16.0, 16.0)
        """
        ordered = sorted(self.stats.times)
        _, upper = median_ranks(len(ordered), self.confidence)
        low = min(_ratio(self.batch_size, ordered[upper - 1]), self.samples_per_s)
        return low, self.fast_samples_per_s * self.load_allowance

    def verdict(self, floor: float) -> str:
        """``"passed"`` when the median rate reaches ``floor``; ``"failed"`` when even the upper
        end of :attr:`samples_per_s_interval` is below it; ``"inconclusive"`` otherwise.

        >>> m = measure_throughput(lambda: None, 8, timer=iter([0.0, 0.5] * 10).__next__,
        ...                        load=lambda: (4.0, 2))       # 16 samples/s, allowance 2
        >>> m.verdict(16), m.verdict(20), m.verdict(40)
        ('passed', 'inconclusive', 'failed')
        """
        if self.samples_per_s >= floor:
            return "passed"
        if self.samples_per_s_interval[1] < floor:
            return "failed"
        return "inconclusive"

    @property
    def confident(self) -> bool:
        """Whether the fast-run bound holds with the nominal ``confidence`` (enough runs)."""
        return self.fast_rank[1] >= self.confidence

    @property
    def samples_per_s_range(self) -> tuple[float, float]:
        """Throughput at the slow and fast quartile: ``(batch_size / q3, batch_size / q1)``."""
        return (
            _ratio(self.batch_size, self.stats.q3),
            _ratio(self.batch_size, self.stats.q1),
        )

    def summary(self) -> str:
        """A one-line description, e.g. for a failure message.

        >>> m = measure_throughput(lambda: None, 32, timer=iter([0.0, 0.25] * 10).__next__)
        >>> m.summary()
        '128 samples/s (batch 32, median 250 ms over 10 runs, spread 0.0%, cpu, perf_counter)'
        """
        text = (
            f"{format_rate(self.samples_per_s) if math.isfinite(self.samples_per_s) else 'inf samples/s'}"
            f" (batch {self.batch_size}, median {format_duration(self.stats.median)}"
            f" over {self.runs} runs, spread {self.spread:.1%}"
        )
        if self.noisy:
            text += f" > {self.noise:.0%}, noisy"
        return f"{text}, {self.device}, {self.method})"

    def to_dict(self) -> dict[str, Any]:
        """The measurement as a dict of builtin types (infinities stay ``float('inf')``).

        >>> m = measure_throughput(lambda: None, 8, timer=iter([0.0, 0.5] * 10).__next__)
        >>> d = m.to_dict()
        >>> d["samples_per_s"], d["samples_per_s_range"], d["runs"], d["stats"]["median"]
        (16.0, [16.0, 16.0], 10, 0.5)
        """
        low, high = self.samples_per_s_range
        data: dict[str, Any] = {
            "batch_size": int(self.batch_size),
            "samples_per_s": float(self.samples_per_s),
            "samples_per_s_range": [float(low), float(high)],
            "runs": int(self.runs),
            "warmup": int(self.warmup),
            "noisy": bool(self.noisy),
            "extended": bool(self.extended),
            "device": str(self.device),
            "method": str(self.method),
            "spread": float(self.spread),
            "noise": float(self.noise),
            "stats": self.stats.to_dict(),
            "samples_per_s_interval": [float(x) for x in self.samples_per_s_interval],
            "load_allowance": float(self.load_allowance),
            "confidence": float(self.confidence),
        }
        for key in ("load_before", "load_after", "cores", "threads"):  # absent when unknown
            value = getattr(self, key)
            if value is not None:
                data[key] = float(value) if key.startswith("load") else int(value)
        return data


class CudaEventTimer:
    """Times one call of a step with a pair of CUDA events.

    Calling the timer with ``step`` synchronises the device, records a start
    event on the device's current stream, calls ``step()``, records an end
    event, synchronises again and returns the elapsed time in seconds
    (``elapsed_time`` reports milliseconds).

    ``event_factory``, ``synchronize`` and ``current_stream`` default to
    ``torch.cuda.Event``, ``torch.cuda.synchronize`` and
    ``torch.cuda.current_stream``; passing stand-ins makes the timer usable
    without a GPU, as in this example:

    >>> class FakeEvent:
    ...     clock = 0.0
    ...     def __init__(self, enable_timing=False):
    ...         self.at = None
    ...     def record(self, stream=None):
    ...         FakeEvent.clock += 2.0          # each record is 2 ms later
    ...         self.at = FakeEvent.clock
    ...     def elapsed_time(self, end):
    ...         return end.at - self.at         # milliseconds
    >>> timer = CudaEventTimer("cuda:0", event_factory=FakeEvent,
    ...                        synchronize=lambda device: None,
    ...                        current_stream=lambda device: None)
    >>> timer(lambda: None)
    0.002
    """

    method = "cuda-events"

    def __init__(
        self,
        device: Any = "cuda",
        *,
        event_factory: Callable[..., Any] | None = None,
        synchronize: Callable[[Any], Any] | None = None,
        current_stream: Callable[[Any], Any] | None = None,
    ) -> None:
        self.device = str(device)
        if event_factory is None or synchronize is None or current_stream is None:
            import torch

            if event_factory is None:
                event_factory = torch.cuda.Event
            if synchronize is None:
                synchronize = torch.cuda.synchronize
            if current_stream is None:
                current_stream = torch.cuda.current_stream
        self._event_factory = event_factory
        self._synchronize = synchronize
        self._current_stream = current_stream

    def sync(self) -> None:
        """Wait for all queued work on the device."""
        self._synchronize(self.device)

    def __call__(self, step: Callable[[], Any]) -> float:
        """Run ``step()`` once and return its GPU time in seconds."""
        stream = self._current_stream(self.device)
        start = self._event_factory(enable_timing=True)
        end = self._event_factory(enable_timing=True)
        self.sync()
        start.record(stream)
        step()
        end.record(stream)
        self.sync()
        return float(start.elapsed_time(end)) / 1000.0

    def __repr__(self) -> str:
        return f"CudaEventTimer({self.device!r})"


def cuda_event_timer(
    device: Any = "cuda",
    *,
    event_factory: Callable[..., Any] | None = None,
    synchronize: Callable[[Any], Any] | None = None,
    current_stream: Callable[[Any], Any] | None = None,
) -> CudaEventTimer:
    """A :class:`CudaEventTimer` for ``device``; pass it as ``timer`` to :func:`measure_throughput`.

    The keyword arguments replace ``torch.cuda.Event``,
    ``torch.cuda.synchronize`` and ``torch.cuda.current_stream``; ``torch``
    is imported only for those left out.

    >>> timer = cuda_event_timer("cuda:1", event_factory=object,
    ...                          synchronize=print, current_stream=print)
    >>> timer
    CudaEventTimer('cuda:1')
    >>> timer.sync()
    cuda:1
    """
    return CudaEventTimer(
        device,
        event_factory=event_factory,
        synchronize=synchronize,
        current_stream=current_stream,
    )


def _no_sync() -> None:
    return None


def _cuda_synchronizer(device: str) -> Callable[[], None]:
    import torch

    def sync() -> None:
        torch.cuda.synchronize(device)

    return sync


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    number = float(value)
    if math.isnan(number) or number < 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
    return number


Timer = Union[Callable[[], float], CudaEventTimer]


def measure_throughput(
    step: Callable[[], Any], batch_size: int, *, warmup: int = 3, min_runs: int = 10,
    max_runs: int = 100, max_time: float | str = 10.0, noise: float = 0.10,
    timer: Timer | None = None, sync: Callable[[], Any] | None = None, device: Any = "cpu",
    load: Callable[[], tuple[float | None, int]] | None = None, floor: float | None = None,
    cheap_runs: int = 0, cheap_time: float = 0.5,
) -> ThroughputMeasurement:
    """Measure how many samples per second ``step()`` processes.

    ``step`` is called ``warmup`` times untimed, then ``min_runs`` times
    timed: each run is ``sync(); t0 = timer(); step(); sync(); t1 = timer()``.
    While the relative spread ``iqr / median`` exceeds ``noise``, fewer than
    ``max_runs`` runs have been taken and less than ``max_time`` seconds have
    been measured (summed run times; warm-up not included), more runs are
    added, doubling the sample each round.  ``min_runs`` runs are always
    taken.

    ``timer`` is a zero-argument clock returning seconds (default
    ``time.perf_counter``) or a :class:`CudaEventTimer`.  ``sync`` defaults
    to a no-op, or to ``torch.cuda.synchronize(device)`` when ``device``
    names a CUDA device.  When ``device`` starts with ``"cuda"`` and no
    ``timer`` is given, runs are timed with CUDA events (``method`` is
    ``"cuda-events"``), and ``sync``, if given, replaces
    ``torch.cuda.synchronize``.  ``cheap_runs`` (default 0: off) raises the
    number of runs to that many when, judged from the first ``min_runs``, they
    take at most ``cheap_time`` seconds in all.  ``max_time`` may be a duration string such
    as ``"30s"``.

    ``load`` returns ``(1-minute load average or None, cores)`` and is read
    just before the first and just after the last timed run (default
    :func:`machine_load`; a stand-in makes tests independent of the
    machine).  torch's thread count is recorded as it is while measuring.

    ``floor`` (samples/s), if given, also extends a measurement whose
    :meth:`~ThroughputMeasurement.verdict` is not settled: while it is not
    ``"passed"`` and there are fewer runs than the fast-run bound needs for
    its nominal confidence (29 at 95%), more runs are taken, within the same
    ``max_runs`` and ``max_time``.  (A noisy measurement is extended anyway,
    by the spread rule; a quiet one with enough runs would not change its
    verdict with more.)  The load allowance during that loop uses the load
    read before the first run.

    A steady fake clock that reads 0.25 s later on every call:

    >>> import itertools
    >>> clock = itertools.count(0.0, 0.25).__next__
    >>> m = measure_throughput(lambda: None, 32, timer=clock)
    >>> m.samples_per_s, m.runs, m.noisy, m.extended
    (128.0, 10, False, False)

    A noisy start (runs alternating 0.25 s and 0.5 s) is extended until the
    later, steady runs make it quiet:

    >>> durations = [0.25, 0.5] * 5 + [0.25] * 30
    >>> readings = iter([r for d in durations for r in (0.0, d)])
    >>> m = measure_throughput(lambda: None, 32, timer=readings.__next__, max_time=60)
    >>> m.runs, m.extended, m.noisy, m.samples_per_s
    (40, True, False, 128.0)

    A floor of 200 samples/s that 0.25 s runs miss (128 samples/s) on a quiet
    machine (load 1 on 2 cores): more runs until the fast-run bound is 95%
    confident, then a confident failure:

    >>> clock = itertools.count(0.0, 0.25).__next__
    >>> m = measure_throughput(lambda: None, 32, timer=clock, floor=200, load=lambda: (1.0, 2))
    >>> m.runs, m.verdict(200), m.confident, m.threads is None or m.threads >= 1
    (40, 'failed', True, True)
    """
    batch_size, warmup, min_runs, max_runs, max_time, noise, floor, read = _checked(
        step, batch_size, warmup, min_runs, max_runs, max_time, noise, floor, load)
    device = str(device)
    method, settle, run_once = _runner(step, timer, sync, device)

    for _ in range(warmup):
        step()
    settle()

    load_before, cores = _read_load(read)
    runs = _Runs(run_once, threads=_torch_threads())
    for _ in range(min_runs):
        runs.take()
    runs.add_cheap(cheap_runs, cheap_time, max_runs)

    def measurement(load_after: float | None, extended: bool) -> ThroughputMeasurement:
        stats = TimingStats.from_times(runs.times)
        return ThroughputMeasurement(
            batch_size=batch_size, samples_per_s=_ratio(batch_size, stats.median), stats=stats,
            runs=len(runs.times), warmup=warmup, noisy=stats.spread > noise, extended=extended,
            device=device, method=method, spread=stats.spread, noise=noise,
            load_before=load_before, load_after=load_after, cores=cores, threads=runs.threads,
        )

    extended = False
    while (_wants_more(measurement(None, extended), floor)
           and len(runs.times) < max_runs and runs.total < max_time):
        extended = True
        runs.double(max_runs, max_time)
    return measurement(_read_load(read)[0], extended)


def _checked(step: Any, batch_size: Any, warmup: Any, min_runs: Any, max_runs: Any,
             max_time: Any, noise: Any, floor: Any, load: Any,
             ) -> tuple[int, int, int, int, float, float, float | None,
                        Callable[[], tuple[float | None, int]]]:
    """:func:`measure_throughput`'s numeric arguments, checked and converted, and its load
    reader (:func:`machine_load` by default)."""
    if not callable(step):
        raise TypeError(f"step: expected a callable, got {step!r}")
    batch_size = _check_int("batch_size", batch_size, 1)
    warmup = _check_int("warmup", warmup, 0)
    min_runs = _check_int("min_runs", min_runs, 1)
    max_runs = _check_int("max_runs", max_runs, 1)
    if max_runs < min_runs:
        raise ValueError(f"max_runs: expected at least min_runs ({min_runs}), got {max_runs}")
    if isinstance(max_time, str):
        max_time = parse_duration(max_time)
    max_time = _check_float("max_time", max_time)
    noise = _check_float("noise", noise)
    if floor is not None:
        floor = _check_float("floor", floor)
    if load is None:
        load = machine_load
    elif not callable(load):
        raise TypeError(f"load: expected a callable returning (load average, cores), got {load!r}")
    return batch_size, warmup, min_runs, max_runs, max_time, noise, floor, load


def _runner(step: Callable[[], Any], timer: Timer | None, sync: Callable[[], Any] | None,
            device: str) -> tuple[str, Callable[[], Any], Callable[[], float]]:
    """``(method, settle, run_once)`` for :func:`measure_throughput`: the timing method's name,
    a call that waits for queued work, and a call that runs ``step`` once and returns seconds."""
    is_cuda = device.startswith("cuda")
    event_timer: CudaEventTimer | None = None
    if isinstance(timer, CudaEventTimer):
        if sync is not None:
            raise ValueError(
                "sync: cannot be combined with a CudaEventTimer; give synchronize= to cuda_event_timer() instead"
            )
        event_timer = timer
    elif timer is None and is_cuda:
        user_sync = sync
        event_timer = cuda_event_timer(
            device,
            synchronize=None if user_sync is None else (lambda _device: user_sync()),
        )
    elif timer is not None and not callable(timer):
        raise TypeError(f"timer: expected a zero-argument clock or a CudaEventTimer, got {timer!r}")

    if event_timer is not None:
        timed_step = event_timer

        def run_events() -> float:
            return timed_step(step)

        return "cuda-events", event_timer.sync, run_events

    clock: Callable[[], float] = time.perf_counter
    if timer is not None and not isinstance(timer, CudaEventTimer):
        clock = timer
    host_sync = sync if sync is not None else (_cuda_synchronizer(device) if is_cuda else _no_sync)

    def run_once() -> float:
        host_sync()
        start = clock()
        step()
        host_sync()
        return clock() - start

    return "perf_counter", host_sync, run_once


def _read_load(load: Callable[[], tuple[float | None, int]]) -> tuple[float | None, int | None]:
    value, cores = load()
    return (None if value is None else float(value)), (None if cores is None else int(cores))


class _Runs:
    """The run times taken so far (seconds, in order) and their sum."""

    def __init__(self, run_once: Callable[[], float], threads: int | None) -> None:
        self.run_once = run_once
        self.threads = threads
        self.times: list[float] = []
        self.total = 0.0

    def take(self) -> None:
        elapsed = float(self.run_once())
        if not math.isfinite(elapsed) or elapsed < 0:
            raise ValueError(
                f"timer: expected a finite, non-negative run time, got {elapsed!r} for run {len(self.times) + 1}"
                " (is the clock monotonic?)"
            )
        self.times.append(elapsed)
        self.total += elapsed

    def add_cheap(self, cheap_runs: int, cheap_time: float, max_runs: int) -> None:
        """A cheap step gets up to ``cheap_runs`` runs when they fit in ``cheap_time`` seconds:
        the baseline gate needs about 30 runs a side to establish a 25% change against its
        interval rule, and for a millisecond forward they cost nothing."""
        if cheap_runs > len(self.times) and self.total / len(self.times) * cheap_runs <= cheap_time:
            for _ in range(min(cheap_runs, max_runs) - len(self.times)):
                self.take()

    def double(self, max_runs: int, max_time: float) -> None:
        """One extension round: as many runs again, within ``max_runs`` and ``max_time``."""
        for _ in range(min(len(self.times), max_runs - len(self.times))):
            self.take()
            if self.total >= max_time:
                break


def _wants_more(so_far: ThroughputMeasurement, floor: float | None) -> bool:
    """Whether the measurement so far is noisy, or (given a floor) not settled, and not a miss
    by more than CLEAR_MISS x even by the fast runs (settled, noisy or not)."""
    unsettled = floor is not None and so_far.verdict(floor) != "passed" and not so_far.confident
    clear_miss = floor is not None and so_far.samples_per_s_interval[1] * CLEAR_MISS < floor
    return (so_far.noisy or unsettled) and not clear_miss


def calibration_times(runs: int = 20, timer: Callable[[], float] | None = None) -> list:
    """Seconds per run of a fixed CPU reference workload (small matrix products and a small
    convolution, about half a millisecond): how fast this session's machine is right now.

    A shared runner's speed moves from one session to the next (other jobs, frequency, the
    scheduler) by far more than the 10% a gate must see; the same shift shows in this
    workload, so the gate compares a test's times divided by the median of the calibration
    run in the same session (:func:`pytest_modelcheck.core.baseline.compare`).

    >>> times = calibration_times(runs=3)
    >>> len(times), all(t > 0 for t in times)
    (3, True)
    """
    import torch

    clock = timer or time.perf_counter
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(96, 96, generator=gen)
    weight = torch.randn(16, 8, 3, 3, generator=gen)
    image = torch.randn(2, 8, 24, 24, generator=gen)

    def work() -> None:
        for _ in range(6):
            (a @ a).relu_()
            torch.nn.functional.conv2d(image, weight, padding=1)

    with torch.no_grad():
        for _ in range(3):
            work()
        times = []
        for _ in range(runs):
            start = clock()
            work()
            times.append(clock() - start)
    return times
