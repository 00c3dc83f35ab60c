"""Profile a model across batch sizes: latency, throughput, memory, FLOPs, recommendations.

For each batch size, on a copy of the model in eval mode under ``torch.no_grad()``:

- latency: ``warmup`` untimed forwards, then ``runs`` timed ones (``core.timing``; CUDA runs
  are timed with CUDA events); mean, std, median, min, max and p90 in milliseconds
  (``latency_ms``), and the p50/p90/p99 percentiles (``latency_percentiles_ms``);
- throughput: ``batch_size / median latency`` in samples per second;
- peak memory of an inference step: measured where the device allows it (CPU allocator events,
  the CUDA caching allocator, ``memory.measure_step_memory``), estimated on fake tensors
  otherwise; ``memory_method`` and ``memory_estimated`` say which. ``activation_bytes`` is
  the peak minus what was alive before the step (parameters, buffers, the batch);
- FLOPs of one forward (``core.flops.count_flops``, else ``FlopCounterMode``) and the
  achieved FLOP/s (FLOPs / median latency);
- with ``memory_budget``, the estimated peak of a *training* step (gradients and optimizer
  state included, ``memory.estimate_step_memory``).

``single_input`` repeats the smallest batch size's latency, throughput and peak memory (batch
size 1 by default); ``architecture["flops"]`` is the forward FLOPs of one sample.

``progress=True`` shows a tqdm progress bar when stderr is a terminal, and one plain line per
batch size (no carriage returns, no terminal escapes) when it is not (a CI log, a file).

An out-of-memory error (``torch.cuda.OutOfMemoryError`` or a ``RuntimeError`` saying "out of
memory") stops the sweep: memory is freed and the report says at which batch size and why.

Recommendations (``recommend``)
    ``largest_fitting``: the largest batch size whose training-step peak is at most
    ``(1 - headroom) x memory_budget`` (20% headroom by default).
    ``throughput_knee``: the smallest batch size whose throughput reaches ``knee`` (90% by
    default) of the best throughput measured: beyond it, larger batches buy little speed.
"""
from __future__ import annotations

import gc
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .batch import Batch, copy_model
from .errors import ModelError, UsageError
from .forward import count_parameters, model_device
from .rates import _quantile
from .units import format_bytes, format_count, parse_bytes

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
HEADROOM = 0.2
KNEE = 0.9
_LATENCY_KEYS = ("mean", "std", "median", "min", "max", "p90")
_PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


@dataclass
class ProfileReport:
    """The profile of one model; builtin-typed fields, JSON via ``to_json``.

    >>> r = ProfileReport(config={"device": "cpu"}, architecture={"total_parameters": 8})
    >>> sorted(json.loads(r.to_json()))
    ['architecture', 'batch_profiling', 'config', 'recommendations', 'single_input', 'stopped']
    """

    config: dict = field(default_factory=dict)
    architecture: dict = field(default_factory=dict)
    single_input: dict = field(default_factory=dict)
    batch_profiling: list = field(default_factory=list)
    recommendations: list = field(default_factory=list)
    stopped: Optional[dict] = None

    def to_dict(self) -> dict:
        """All fields as builtin types."""
        return {"config": dict(self.config), "architecture": dict(self.architecture),
                "single_input": dict(self.single_input),
                "batch_profiling": [dict(r) for r in self.batch_profiling],
                "recommendations": [dict(r) for r in self.recommendations],
                "stopped": None if self.stopped is None else dict(self.stopped)}

    def to_json(self, indent: int = 2) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def render(self) -> str:
        """A text table, one row per batch size (latency mean ± std and p50/p90/p99 in ms,
        samples/s, forward FLOPs and achieved FLOP/s, peak memory), then the recommendations.

        >>> print(ProfileReport(batch_profiling=[{"batch_size": 1, "latency_ms": {"mean": 2.0,
        ...     "std": 0.5}, "latency_percentiles_ms": {"p50": 1.9, "p90": 2.5, "p99": 3.0},
        ...     "throughput": 500.0, "flops": 2_000_000, "achieved_flops_per_s": 1e9,
        ...     "peak_memory_bytes": 1024, "memory_estimated": False}]).render())
         batch  latency ms (mean ± std)     p50     p90     p99   samples/s    FLOPs   FLOP/s  peak memory
             1            2.00 ±   0.50    1.90    2.50    3.00       500.0    2.00M    1.00G     1.00 KiB
        """
        lines = [f"{'batch':>6} {'latency ms (mean ± std)':>24} {'p50':>7} {'p90':>7} {'p99':>7}"
                 f" {'samples/s':>11} {'FLOPs':>8} {'FLOP/s':>8} {'peak memory':>12}"]
        for r in self.batch_profiling:
            lat = r["latency_ms"]
            pct = r.get("latency_percentiles_ms") or {"p50": lat.get("median"),
                                                       "p90": lat.get("p90"), "p99": None}
            mem = format_bytes(r["peak_memory_bytes"]) + (" (est.)" if r["memory_estimated"]
                                                          else "")
            cells = " ".join(f"{'-' if pct.get(k) is None else format(pct[k], '.2f'):>7}"
                             for k in ("p50", "p90", "p99"))
            flops, rate = r.get("flops"), r.get("achieved_flops_per_s")
            lines.append(f"{r['batch_size']:>6} {lat['mean']:>15.2f} ± {lat['std']:>6.2f} {cells}"
                         f" {r['throughput']:>11.1f} {_count(flops):>8} {_count(rate):>8}"
                         f" {mem:>12}")
        if self.stopped:
            lines.append(f"stopped at batch {self.stopped['batch_size']}:"
                         f" {self.stopped['reason']}")
        for rec in self.recommendations:
            lines.append(f"{rec['kind']}: {rec['batch_size']} ({rec['reason']})")
        return "\n".join(lines)


def _count(value: Any) -> str:
    return "-" if value is None else format_count(value)


def recommend(rows: list, memory_budget: Optional[int] = None, *, headroom: float = HEADROOM,
              knee: float = KNEE) -> list:
    """Recommendations from profiled rows (dicts with ``batch_size``, ``throughput`` and, for
    the budget, ``train_peak_bytes``).

    >>> rows = [{"batch_size": b, "throughput": t, "train_peak_bytes": m}
    ...         for b, t, m in [(1, 100.0, 100), (2, 180.0, 200), (4, 190.0, 400)]]
    >>> [(r["kind"], r["batch_size"]) for r in recommend(rows, memory_budget=300)]
    [('largest_fitting', 2), ('throughput_knee', 2)]
    """
    out = []
    if memory_budget is not None:
        limit = (1 - headroom) * memory_budget
        fits = [r for r in rows if r.get("train_peak_bytes") is not None
                and r["train_peak_bytes"] <= limit]
        if fits:
            best = max(fits, key=lambda r: r["batch_size"])
            out.append({"kind": "largest_fitting", "batch_size": best["batch_size"],
                        "reason": f"a training step needs {format_bytes(best['train_peak_bytes'])}"
                                  f" (gradients and optimizer state included), within"
                                  f" {format_bytes(limit)} = {1 - headroom:.0%} of the"
                                  f" {format_bytes(memory_budget)} budget"})
        else:
            out.append({"kind": "largest_fitting", "batch_size": None,
                        "reason": f"no profiled batch size trains within {format_bytes(limit)}"
                                  f" = {1 - headroom:.0%} of the {format_bytes(memory_budget)}"
                                  " budget"})
    timed = [r for r in rows if r.get("throughput")]
    if timed:
        top = max(r["throughput"] for r in timed)
        knee_row = min((r for r in timed if r["throughput"] >= knee * top),
                       key=lambda r: r["batch_size"])
        out.append({"kind": "throughput_knee", "batch_size": knee_row["batch_size"],
                    "reason": f"the smallest batch size reaching {knee:.0%} of the best"
                              f" throughput ({knee_row['throughput']:.4g} of {top:.4g}"
                              " samples/s)"})
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is an out-of-memory error.

    >>> is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    True
    >>> is_out_of_memory(ValueError("shape mismatch"))
    False
    """
    seen = set()
    cur: Any = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if type(cur).__name__ == "OutOfMemoryError":
            return True
        if isinstance(cur, RuntimeError) and "out of memory" in str(cur).lower():
            return True
        cur = getattr(cur, "original", None) or cur.__cause__
    return False


def profile_model(model: Any, make_batch: Any, *, batch_sizes: Any = DEFAULT_BATCH_SIZES,
                  device: Any = None, warmup: int = 10, runs: int = 50,
                  memory_budget: Any = None, progress: Any = None,
                  timer: Optional[Callable[[], float]] = None) -> ProfileReport:
    """Profile ``model`` at each batch size (see the module doc for what is measured).

    ``make_batch`` is a ``make_batch(batch_size)`` factory or a batch whose tensors are
    resized. ``memory_budget`` is bytes or a string such as ``"8 GiB"``. ``progress`` is a
    callable ``(done, total, message)`` or True for progress on stderr (a tqdm bar on a
    terminal, one plain line per batch size otherwise). ``timer`` is a clock
    in seconds (injectable for tests). The caller's model is not changed.

    >>> import itertools, torch
    >>> clock = itertools.count(0.0, 0.25).__next__     # every run takes 250 ms
    >>> r = profile_model(torch.nn.Linear(16, 4), lambda n: torch.ones(n, 16),
    ...                   batch_sizes=[1, 4], warmup=1, runs=3, timer=clock)
    >>> [(row["batch_size"], row["throughput"]) for row in r.batch_profiling]
    [(1, 4.0), (4, 16.0)]
    >>> r.architecture["total_parameters"], r.batch_profiling[1]["flops"]  # 2*4*16*4 = 512
    (68, 512)
    """
    import torch

    sizes = _check_sizes(batch_sizes)
    for name, value, low in (("warmup", warmup, 0), ("runs", runs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name}={value!r}: expected an integer >= {low}")
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    report_progress = _progress(progress)
    dev = torch.device(device) if device is not None else model_device(model)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={str(dev)!r}: CUDA is not available on this machine;"
                         " profile on 'cpu'")
    if dev.type == "meta" or any(t.is_meta for t in model.parameters()):
        raise UsageError("model: it is on the meta device, so it cannot run; use"
                         " memory.estimate_memory for an estimate")
    base = Batch.from_user(make_batch, model=model)
    n_params = count_parameters(model)
    report = ProfileReport(
        config={"model": type(model).__name__, "device": str(dev), "batch_sizes": sizes,
                "warmup": warmup, "runs": runs, "memory_budget_bytes": budget,
                "headroom": HEADROOM, "knee": KNEE},
        architecture={"total_parameters": n_params,
                      "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                  if p.requires_grad),
                      "model_size_bytes": sum(p.numel() * p.element_size()
                                              for p in model.parameters())})
    try:
        _sweep(report, model, base, sizes, dev, warmup, runs, budget, timer, report_progress)
    finally:
        getattr(report_progress, "close", lambda: None)()
    if report.batch_profiling:
        first = report.batch_profiling[0]
        report.single_input = {"batch_size": first["batch_size"],
                               "input_shape": first["input_shape"],
                               "latency_ms": dict(first["latency_ms"]),
                               "throughput": first["throughput"],
                               "peak_memory_bytes": first["peak_memory_bytes"]}
        report.architecture["flops"] = first["flops"] // max(first["batch_size"], 1)
    report.recommendations = recommend(report.batch_profiling, budget)
    return report


def _sweep(report: ProfileReport, model: Any, base: Batch, sizes: list, dev: Any, warmup: int,
           runs: int, budget: Optional[int], timer: Any, report_progress: Any) -> None:
    """Profile each size in turn into ``report``; out of memory stops the sweep."""
    from .timing import measure_throughput

    total = len(sizes)
    for done, n in enumerate(sizes):
        report_progress(done, total, f"batch size {n}")
        try:
            row = _profile_size(model, base, n, dev, warmup, runs, budget, timer,
                                measure_throughput)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is absorbed
            if not is_out_of_memory(exc):
                raise
            _free_memory(dev)
            cause = exc.original if isinstance(exc, ModelError) and exc.original else exc
            last = report.batch_profiling[-1]["batch_size"] if report.batch_profiling else None
            report.stopped = {"batch_size": n, "last_fitting_batch_size": last,
                              "reason": f"out of memory at batch size {n}"
                                        f" ({type(cause).__name__}: {_first_line(cause)})"}
            report_progress(done + 1, total, f"stopped: out of memory at batch size {n}")
            break
        report.batch_profiling.append(row)
        report_progress(done + 1, total, f"batch size {n}: {row['throughput']:.4g} samples/s")


def _profile_size(model: Any, base: Batch, n: int, dev: Any, warmup: int, runs: int,
                  budget: Optional[int], timer: Any, measure_throughput: Any) -> dict:
    import torch

    from .forward import run_forward
    from .memory import estimate_step_memory, step_memory

    data = base.resized(n).to(dev)
    work = copy_model(model).to(dev).eval()

    def step() -> None:
        with torch.no_grad():
            run_forward(work, data)

    measured = measure_throughput(step, n, warmup=warmup, min_runs=runs, max_runs=runs,
                                  timer=timer, device=str(dev))
    stats = measured.stats
    ordered = sorted(stats.times)
    flops = _count_flops(work, data)
    mem = step_memory(model, data, phase="inference", device=dev)
    row = {
        "batch_size": n,
        "input_shape": [list(t.shape) for _, t in data.input_tensors()],
        "latency_ms": {k: 1000.0 * float(getattr(stats, k)) for k in _LATENCY_KEYS},
        "latency_percentiles_ms": {k: 1000.0 * float(_quantile(ordered, q))
                                   for k, q in _PERCENTILES},
        "runs": measured.runs,
        "throughput": float(measured.samples_per_s),
        "peak_memory_bytes": int(mem.peak_bytes),
        "activation_bytes": int(mem.peak_bytes - mem.baseline_bytes),
        "memory_method": mem.method,
        "memory_estimated": bool(mem.estimated),
        "flops": int(flops),
        "achieved_flops_per_s": float(flops / stats.median) if stats.median > 0 else 0.0,
        "train_peak_bytes": None,
    }
    if budget is not None:
        row["train_peak_bytes"] = int(estimate_step_memory(model, data, phase="train",
                                                           device=dev).peak_bytes)
    return row


def _count_flops(work: Any, data: Batch) -> int:
    import torch

    try:
        from .flops import count_flops
    except ImportError:
        count_flops = None  # type: ignore[assignment]
    if count_flops is not None:
        return int(count_flops(work, *data.args, **data.kwargs).flops)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        data.call(work)
    return int(counter.get_total_flops())


def _free_memory(dev: Any) -> None:
    gc.collect()
    if dev.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def _progress(progress: Any) -> Callable[[int, int, str], None]:
    if progress is None or progress is False:
        return lambda done, total, message: None
    if progress is True:
        return _StderrProgress()
    if callable(progress):
        return progress
    raise UsageError(f"progress={progress!r}: expected a callable(done, total, message),"
                     " True or None")


class _StderrProgress:
    """``progress=True``: a tqdm bar when stderr is a terminal; otherwise one plain line per
    finished batch size (``[2/5] batch size 2: 812 samples/s``), nothing that rewrites a line,
    so a CI log or a redirected file stays readable."""

    def __init__(self) -> None:
        self.stream = sys.stderr
        self.bar: Any = None
        self.last = 0
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False

    def __call__(self, done: int, total: int, message: str) -> None:
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs shipped

                self.bar = tqdm(total=total, desc="profile", unit="size", file=self.stream,
                                dynamic_ncols=True, leave=True)
            self.bar.set_postfix_str(message, refresh=False)
            self.bar.update(done - self.bar.n)
        elif done > self.last:  # the line of a finished (or failed) batch size
            self.last = done
            self.stream.write(f"[{done}/{total}] {message}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _check_sizes(batch_sizes: Any) -> list:
    try:
        sizes = list(batch_sizes)
    except TypeError:
        sizes = None
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise UsageError(f"batch_sizes={batch_sizes!r}: expected a non-empty list of positive"
                         " integers")
    return sorted(set(sizes))


from .errors import first_line as _first_line
