"""throughput_at_least: samples per second of inference (or training steps) above a floor."""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..core.errors import UsageError
from ..core.result import CheckResult
from .registry import check

# Seam for tests: a fake clock replaces time.perf_counter (never set in normal use).
TIMER: Optional[Callable[[], float]] = None


def _validate(rate: Any, phase: Any = "inference", batch_size: Any = None, warmup: Any = 3,
              min_runs: Any = 10, max_time: Any = 10.0) -> dict:
    from ..core.units import UnitError, parse_duration, parse_rate

    try:
        value = parse_rate(rate)
    except UnitError as exc:
        raise UsageError(f"rate={rate!r}: {exc}") from None
    if phase not in ("inference", "train"):
        raise UsageError(f"phase={phase!r}: expected 'inference' or 'train'")
    for name, v, low in (("batch_size", batch_size, 1), ("warmup", warmup, 0), ("min_runs", min_runs, 3)):
        if v is None and name == "batch_size":
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise UsageError(f"{name}={v!r}: expected an integer >= {low}")
    try:
        seconds = parse_duration(max_time)
    except UnitError as exc:
        raise UsageError(f"max_time={max_time!r}: {exc}") from None
    return {"rate": value, "phase": phase, "batch_size": batch_size, "warmup": warmup,
            "min_runs": min_runs, "max_time": seconds}


@check(default=False, validate=_validate)
def throughput_at_least(rate: Any, phase: Any = "inference", batch_size: Any = None, warmup: Any = 3,
                        min_runs: Any = 10, max_time: Any = 10.0, *, model: Any, batch: Any,
                        loss: Any = None, device: Any = None) -> CheckResult:
    """Median samples/s of inference (or phase='train' steps) is at least `rate` (e.g. '500 samples/s').

    Warm-up runs first; each run is synchronized with the device (CUDA events on GPU); a noisy
    measurement (IQR above 10% of the median) gets more runs before it may fail. Runs on a copy.

    >>> import torch
    >>> throughput_at_least("1 samples/s", model=torch.nn.Linear(4, 2),
    ...                     batch=torch.zeros(8, 4)).passed
    True
    """
    import torch

    from ..core.batch import copy_model
    from ..core.forward import run_forward
    from ..core.losses import resolve_loss
    from ..core.timing import measure_throughput
    from ..core.training import make_optimizer
    from ..core.units import format_rate

    work = copy_model(model).to(device)
    data = (batch.resized(batch_size) if batch_size else batch.clone()).to(device)
    n = data.batch_size or 1
    if phase == "inference":
        work.eval()

        def step() -> None:
            with torch.no_grad():
                run_forward(work, data)
    else:
        work.train()
        with torch.no_grad():
            lossfn = resolve_loss(loss, data, run_forward(work, data))
        opt = make_optimizer("adam", work.parameters(), 1e-6)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            total, _ = lossfn.compute(run_forward(work, data), data, work)
            total.backward()
            opt.step()

    m = measure_throughput(step, n, warmup=warmup, min_runs=min_runs,
                           max_runs=max(min_runs, 200), max_time=max_time, timer=TIMER,
                           device=str(device))
    from ..core.timing import calibration_times

    calibration = calibration_times(runs=20)  # this session's speed, for the baseline gate
    lo, hi = m.samples_per_s_range
    spread = f"IQR {m.spread:.0%} of the median over {m.runs} runs"
    metrics = {"samples_per_s": m.samples_per_s, "rate": rate, "batch_size": n, "phase": phase,
               "spread": m.spread, "runs": m.runs, "noisy": m.noisy, "extended": m.extended,
               "median_s": m.stats.median, "method": m.method, "times_s": m.stats.times[:200],
               "calibration_s": calibration}
    details = (f"batch size {n}, {phase}, {m.method}: median {m.stats.median * 1e3:.3f} ms per batch,"
               f" samples/s range (q3..q1 times) {format_rate(lo)} .. {format_rate(hi)};"
               f" {spread}" + ("; still noisy after extension" if m.noisy else ""))
    what = "inference" if phase == "inference" else "training"
    if m.samples_per_s >= rate:
        return CheckResult("throughput_at_least", True,
                           f"expected {what} throughput >= {format_rate(rate)}, observed"
                           f" {format_rate(m.samples_per_s)} ({spread})", details, metrics)
    hint = ("\nremedy: look for Python loops over samples and host syncs (.item(), .cpu()) in"
            " forward; larger batch sizes amortize per-call overhead")
    return CheckResult("throughput_at_least", False,
                       f"expected {what} throughput >= {format_rate(rate)}, observed"
                       f" {format_rate(m.samples_per_s)} ({spread}"
                       + (", noisy" if m.noisy else "") + ")", details + hint, metrics)
