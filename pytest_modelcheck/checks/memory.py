"""memory_under: the peak memory of one training (or inference) step stays under a limit.

The step runs on a deep copy of the model and of the batch (see ``core/memory/``): measured
from the allocator on CPU, and on CUDA when a GPU is present; estimated on fake tensors when
CUDA is requested on a machine without one, or when the model lives on the ``meta`` device.
An estimate runs in a worker process (``core/isolate.py``): if fake tensors abort the
interpreter there, the check fails with the signal named and the test session goes on. A model,
batch or loss that cannot be pickled (a lambda, a class defined inside a function) is estimated
in the test process instead, with a note in the details.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import UsageError
from ..core.result import CheckResult
from ..core.training import validate_optimizer
from ..core.units import UnitError, format_bytes, parse_bytes
from .registry import SkipCheck, check
from .subject import Subject

PHASES = ("train", "inference")
_SHORT_METHOD = {
    "cpu allocator events (torch.profiler)": "cpu allocator events",
    "cuda caching allocator": "cuda caching allocator",
    "fake-tensor estimate": "fake tensors",
}


def _validate(limit: Any, phase: Any = "train", optimizer: Any = "adam", world_size: Any = None,
              strategy: Any = None) -> dict:
    """Check the marker arguments before anything runs.

    >>> _validate("2 GiB")["limit"]
    2147483648
    >>> _validate("2 GiB", phase="eval")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: phase='eval': expected 'train' or 'inference'
    >>> _validate("2 GiB", world_size=8, strategy="fsdp")["world_size"]
    8
    """
    from ..core.memory.distributed import check_distributed

    try:
        limit_bytes = parse_bytes(limit)
    except UnitError as exc:
        raise UsageError(f"limit={limit!r}: {exc}") from None
    if limit_bytes <= 0:
        raise UsageError(f"limit={limit!r}: expected a positive size such as '512 MiB' or"
                         " '2 GiB'")
    try:  # the headline prints the limit: one too large to print is refused now, not after
        format_bytes(limit_bytes)  # the run
    except UnitError:
        raise UsageError(f"limit={_short(limit)}: expected a size such as '512 MiB' or '2 GiB',"
                         " got a number too large to be a memory size") from None
    if not isinstance(phase, str) or phase not in PHASES:
        raise UsageError(f"phase={phase!r}: expected 'train' or 'inference'")
    world_size, strategy = check_distributed(world_size, strategy)
    found = {"limit": limit_bytes, "phase": phase, "optimizer": validate_optimizer(optimizer)}
    if world_size is not None:
        found.update(world_size=world_size, strategy=strategy)
    return found


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


@check(default=False, validate=_validate, absent_device_ok=True)
def memory_under(limit: Any, phase: str = "train", optimizer: Any = "adam", *,
                 world_size: Any = None, strategy: Any = None,
                 subject: Subject) -> CheckResult:
    """Peak memory of one training step (or phase='inference') stays under `limit` (e.g. '2 GiB').

    A training step is forward, loss, backward and one optimizer step (the optimizer state
    created by the step counts); an inference step is one forward under ``no_grad`` in eval
    mode. Measured on CPU and CUDA; estimated with fake tensors for CUDA on a machine without
    it (``result.estimated``). The caller's model and batch are not changed.

    With ``world_size`` and ``strategy`` ("ddp" or "fsdp"), the limit applies to the per-rank
    peak of data-parallel training on ``world_size`` ranks, each holding the given batch (the
    batch is the per-rank batch), estimated without GPUs or process groups
    (``estimate_memory(world_size=, strategy=)``).

    >>> import torch
    >>> m = torch.nn.Linear(1024, 1024)
    >>> r = memory_under("64 MiB", model=m, batch=torch.ones(256, 1024))
    >>> r.passed, r.metrics["peak_phase"]
    (True, 'optimizer step')
    >>> memory_under("1 MiB", phase="inference", model=m, batch=torch.ones(256, 1024)).passed
    False
    """
    from ..core.isolate import IsolatedCrash
    from ..core.memory import EstimateError

    what = "a training step" if phase == "train" else "an inference step"
    if world_size is not None:
        return _per_rank_result(subject, limit, phase, optimizer, world_size, strategy, what)
    notes: list = []
    try:
        report = _step_report(subject, phase, optimizer, notes)
    except EstimateError as exc:
        raise SkipCheck(f"memory_under: cannot estimate the peak memory of {what} on"
                        f" {subject.device}: {exc}") from None
    except IsolatedCrash as exc:
        return _crashed(subject, exc, what, limit, phase)
    passed = report.peak_bytes <= limit
    verb = "estimated" if report.estimated else "observed"
    method = _SHORT_METHOD.get(report.method, report.method)
    if report.estimated:
        target = report.device.split(" (")[0]
        how = f"estimated{'' if target == 'cpu' else ' for ' + target}: {method}"
    else:
        how = f"measured: {method}"
    headline = (f"expected peak memory of {what} under {format_bytes(limit)}, {verb}"
                f" {format_bytes(report.peak_bytes)} (peak in {report.peak_phase}; {how})")
    details = [report.render()] + notes + _notes(report, passed, limit)
    return subject.result(passed, headline, details, _metrics(report, limit),
                          estimated=report.estimated)


def _step_report(subject: Subject, phase: str, optimizer: Any, notes: list) -> Any:
    """The step's ``MemoryReport``: measured, or estimated in a worker process (fake tensors
    can abort the interpreter), or in this process when the inputs cannot be pickled (a note
    is appended to ``notes`` then)."""
    from ..core.isolate import NotIsolatable, run_isolated
    from ..core.memory import isolated_estimate_step, step_is_estimated, step_memory

    model, batch, loss, device = subject.model, subject.batch, subject.loss, subject.device
    if step_is_estimated(model, device):
        try:
            return run_isolated(isolated_estimate_step, model, batch, loss, phase=phase,
                                optimizer=optimizer, device=device, what="the estimate")
        except NotIsolatable as exc:
            notes.append(f"note: the estimate ran in the test process, not in a worker"
                         f" process, because the model, batch or loss cannot be pickled"
                         f" ({exc}); define them at the top level of an importable module"
                         f" to guard the session against native crashes")
    return step_memory(model, batch, loss, phase=phase, optimizer=optimizer, device=device)


def _per_rank_result(subject: Subject, limit: int, phase: str, optimizer: Any,
                     world_size: int, strategy: str, what: str) -> CheckResult:
    """The verdict on the per-rank peak of ``strategy`` on ``world_size`` ranks (estimated)."""
    from ..core.memory import EstimateError, estimate_memory

    try:
        est = estimate_memory(subject.model, subject.batch, phase=phase, optimizer=optimizer,
                              device=subject.device, loss=subject.loss,
                              world_size=world_size, strategy=strategy)
    except EstimateError as exc:
        raise SkipCheck(f"memory_under: cannot estimate the per-rank peak memory of {what}"
                        f" with {strategy} on {world_size} ranks: {exc}") from None
    row = est.per_rank or {}
    peak = int(row["peak_bytes"])
    passed = peak <= limit
    headline = (f"expected per-rank peak memory of {what} with {strategy} on {world_size} ranks"
                f" under {format_bytes(limit)}, estimated {format_bytes(peak)}")
    details = [est.render()]
    if not passed:
        details.append(f"over the limit by {format_bytes(peak - limit)}")
    metrics = {"peak_bytes": peak, "limit_bytes": limit, "estimated": True, "phase": phase,
               "device": est.device, "single_device_peak_bytes": int(est.peak_bytes),
               "per_rank": dict(row)}
    return subject.result(passed, headline, details, metrics, estimated=True)


def _notes(report: Any, passed: bool, limit: int) -> list:
    """The lines after the report: the second step's peak, cuDNN's bound, the remedy."""
    lines = []
    if report.phase == "train" and report.optimizer_state_bytes:
        worst_fw_bw = max(v for p, v in report.phase_peaks.items() if p != "optimizer step")
        later = worst_fw_bw + report.optimizer_state_bytes
        if later > report.peak_bytes:
            lines.append(
                f"note: from the second step on, the optimizer state"
                f" ({format_bytes(report.optimizer_state_bytes)}) is alive during forward and"
                f" backward too, which puts their peak near {format_bytes(later)}")
    upper = report.peak_upper_bytes
    if passed and upper is not None and upper > limit:
        lines.append(f"warning: under the limit as estimated, but cuDNN's convolution"
                     f" workspaces (not in the estimate) could take the peak to up to"
                     f" {format_bytes(upper)}, over {format_bytes(limit)}")
    if not passed:
        lines.append(f"over the limit by {format_bytes(report.peak_bytes - limit)}")
        lines.append(_remedy(report))
    return lines


def _metrics(report: Any, limit: int) -> dict:
    return {
        "peak_bytes": report.peak_bytes,
        "limit_bytes": limit,
        "peak_phase": report.peak_phase,
        "method": report.method,
        "estimated": report.estimated,
        "device": report.device,
        "phase": report.phase,
        "baseline_bytes": report.baseline_bytes,
        "breakdown": dict(report.breakdown),
        "phase_peaks": dict(report.phase_peaks),
        "top_modules": [list(item) for item in report.top_modules],
        "peak_upper_bytes": report.peak_upper_bytes,
    }


def _crashed(subject: Subject, exc: Any, what: str, limit: int, phase: str) -> CheckResult:
    """A failed result for an estimate whose worker process died (the session goes on)."""
    cause = exc.signal_name or f"exit status {exc.returncode}"
    if exc.signal_name == "SIGKILL":
        observed = "the estimate did not finish and its worker process was killed"
    else:
        observed = f"the estimate crashed its worker process ({cause})"
    headline = (f"expected peak memory of {what} under {format_bytes(limit)}, observed"
                f" {observed}; the test session goes on")
    details = [str(exc)]
    if exc.stderr:
        details.append("last lines the worker wrote to stderr:")
        details.extend("  " + line for line in exc.stderr.splitlines())
    details.append("remedy: fake tensors or a native kernel aborted the interpreter; run the"
                   " step on a machine with the target device to measure it, or estimate on"
                   " device='cpu'")
    metrics = {"limit_bytes": limit, "phase": phase, "device": str(subject.device),
               "estimated": True, "crashed": cause, "returncode": exc.returncode}
    return subject.failed(headline, details, metrics, estimated=True)


def _remedy(report: Any) -> str:
    """What to try, starting with what holds the peak."""
    if report.peak_phase == "optimizer step":
        return ("remedy: the optimizer step holds the peak; build the optimizer with fused=True"
                " (Adam, AdamW and SGD then update in place, without parameter-sized"
                " temporaries) or, on CUDA, foreach=False (temporaries for one parameter at a"
                " time instead of all of them), or use an optimizer with less state")
    return ("remedy: activations hold the peak; use a smaller batch, activation checkpointing"
            " (torch.utils.checkpoint) on the modules with the most activation bytes, or bf16"
            " autocast (torch.autocast(device_type, dtype=torch.bfloat16))")
