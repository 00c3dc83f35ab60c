"""The reports of a step's memory (``MemoryReport``, ``MemoryEstimate``), their constants, and
the assembly of a report from phase peaks (see docs/memory-model.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..units import format_bytes


PHASES = ("train", "inference")
FORWARD, BACKWARD, OPTIMIZER_STEP = "forward", "backward", "optimizer step"
STEP_PHASES = (FORWARD, BACKWARD, OPTIMIZER_STEP)
CATEGORIES = ("parameters", "buffers", "gradients", "optimizer_state", "activations",
              "temporaries", "other")
UNTRACKED = "untracked"
METHOD_CPU = "cpu allocator events (torch.profiler)"
METHOD_CUDA = "cuda caching allocator"
METHOD_FAKE = "fake-tensor estimate"
TOP_MODULES = 10
ROOT = "<root>"
AMP_DTYPES = ("bf16", "fp16")
# Differences smaller than this between the allocator's peak and MemTracker's are bookkeeping
# scalars (a few 8-byte tensors), not memory worth a line of its own.
_UNTRACKED_MIN = 4096


class EstimateError(RuntimeError):
    """The step cannot run on fake tensors (it needs tensor values, e.g. ``.item()``).

    >>> str(EstimateError("forward calls .item()"))
    'forward calls .item()'
    """


@dataclass
class MemoryReport:
    """Peak memory of one step, where it happened, and what held the memory at that moment.

    All fields are builtin types. ``breakdown`` maps a category (see ``CATEGORIES``, plus
    ``untracked`` when the allocator saw more than the dispatcher) to bytes at the peak;
    ``top_modules`` is ``[[module path, activation bytes], ...]``, largest first;
    ``phase_peaks`` maps each phase of the step to its own peak.

    >>> r = MemoryReport(peak_bytes=3 << 20, phase="inference", peak_phase="forward",
    ...                  device="cpu", method=METHOD_CPU, estimated=False,
    ...                  baseline_bytes=1 << 20, breakdown={"parameters": 1 << 20})
    >>> r.to_dict()["peak_bytes"]
    3145728
    >>> print(r.render().splitlines()[0])
    peak 3.00 MiB during forward of an inference step on cpu (measured: cpu allocator events (torch.profiler))
    """

    peak_bytes: int
    phase: str
    peak_phase: str
    device: str
    method: str
    estimated: bool
    baseline_bytes: int
    breakdown: dict = field(default_factory=dict)
    top_modules: list = field(default_factory=list)
    phase_peaks: dict = field(default_factory=dict)
    optimizer_state_bytes: int = 0
    peak_upper_bytes: Optional[int] = None
    kernel_workspaces: str = ""

    def to_dict(self) -> dict:
        """The report as builtin types (JSON-ready)."""
        return {
            "peak_bytes": int(self.peak_bytes),
            "phase": str(self.phase),
            "peak_phase": str(self.peak_phase),
            "device": str(self.device),
            "method": str(self.method),
            "estimated": bool(self.estimated),
            "baseline_bytes": int(self.baseline_bytes),
            "breakdown": {str(k): int(v) for k, v in self.breakdown.items()},
            "top_modules": [[str(n), int(b)] for n, b in self.top_modules],
            "phase_peaks": {str(k): int(v) for k, v in self.phase_peaks.items()},
            "optimizer_state_bytes": int(self.optimizer_state_bytes),
            "peak_upper_bytes": (None if self.peak_upper_bytes is None
                                 else int(self.peak_upper_bytes)),
            "kernel_workspaces": str(self.kernel_workspaces),
        }

    def render(self) -> str:
        """A small text table: the peak, the breakdown at the peak, phase peaks, top modules."""
        step = "a training step" if self.phase == "train" else "an inference step"
        device, _, note = self.device.partition(" (")
        how = note.rstrip(")") if note else ("estimated" if self.estimated else "measured")
        lines = [f"peak {format_bytes(self.peak_bytes)} during {self.peak_phase} of {step}"
                 f" on {device} ({how}: {self.method})"]
        if self.peak_upper_bytes is not None and self.peak_upper_bytes > self.peak_bytes:
            lines.append(f"  up to {format_bytes(self.peak_upper_bytes)} with cuDNN's largest"
                         " convolution workspaces (the estimate leaves them out: cuDNN's"
                         " heuristics pick them per shape)")
        if self.kernel_workspaces:
            lines.append(f"  {self.kernel_workspaces}")
        if self.breakdown:
            width = max(len(k) for k in self.breakdown) + 2
            lines.append(f"  {'at the peak':<{width}}{'bytes':>12}")
            for name, value in self.breakdown.items():
                if value:
                    lines.append(f"  {name:<{width}}{format_bytes(value):>12}")
            lines.append(f"  {'total':<{width}}{format_bytes(self.peak_bytes):>12}")
        lines.append(f"  alive before the step: {format_bytes(self.baseline_bytes)}"
                     " (parameters, buffers, batch)")
        if self.phase_peaks:
            lines.append("  peak by phase: " + ", ".join(
                f"{p} {format_bytes(v)}" for p, v in self.phase_peaks.items()))
        if self.top_modules:
            lines.append("  activation bytes by module (own ops, submodules excluded):")
            width = max(len(n) for n, _ in self.top_modules) + 2
            for name, value in self.top_modules:
                lines.append(f"    {name:<{width}}{format_bytes(value):>12}")
        return "\n".join(lines)


@dataclass
class MemoryEstimate:
    """What one step needs, estimated on fake tensors: its parts, its peak, and where it is.

    Byte fields: ``parameters_bytes`` (parameters and buffers), ``gradients_bytes`` (all
    gradients after backward), ``optimizer_state_bytes`` (state alive after the step, e.g.
    AdamW's two moments), ``activations_bytes`` (forward results kept for backward when
    backward starts; in an inference step, those alive at the peak), ``temporaries_bytes``
    (backward/optimizer intermediates alive at the peak) and ``peak_bytes`` with
    ``peak_phase`` ("forward", "backward" or "optimizer step"). ``breakdown`` is what held the
    memory at the peak; ``module_activations`` is ``[[module path, bytes], ...]`` of activation
    bytes each module's own code left alive (submodules excluded), largest first.
    ``per_batch_size`` holds one dict of the same figures per requested batch size.
    ``per_rank`` (only with ``world_size``/``strategy``) holds the per-rank figures of data
    parallel training (see ``distributed.per_rank``); ``to_dict`` lists it only when set.

    >>> e = MemoryEstimate(batch_size=2, phase="train", optimizer="adamw", amp=None,
    ...                    device="cpu", peak_bytes=4096, peak_phase="optimizer step")
    >>> e.to_dict()["peak_phase"]
    'optimizer step'
    >>> print(e.render().splitlines()[0])
    estimated peak 4.00 KiB during optimizer step of a training step (batch 2, adamw, fp32) on cpu
    """

    batch_size: Optional[int]
    phase: str
    optimizer: Optional[str]
    amp: Optional[str]
    device: str
    peak_bytes: int
    peak_phase: str
    parameters_bytes: int = 0
    gradients_bytes: int = 0
    optimizer_state_bytes: int = 0
    activations_bytes: int = 0
    temporaries_bytes: int = 0
    parameter_count: int = 0
    breakdown: dict = field(default_factory=dict)
    phase_peaks: dict = field(default_factory=dict)
    module_activations: list = field(default_factory=list)
    per_batch_size: list = field(default_factory=list)
    peak_upper_bytes: Optional[int] = None
    kernel_workspaces: str = ""
    per_rank: Optional[dict] = None

    _SUMMARY = ("batch_size", "peak_bytes", "peak_phase", "parameters_bytes", "gradients_bytes",
                "optimizer_state_bytes", "activations_bytes", "temporaries_bytes")

    def summary(self) -> dict:
        """The headline figures of this batch size as builtin types."""
        return {k: getattr(self, k) for k in self._SUMMARY}

    def to_dict(self) -> dict:
        """All fields as builtin types (JSON-ready)."""
        return {
            "batch_size": self.batch_size, "phase": self.phase, "optimizer": self.optimizer,
            "amp": self.amp, "device": self.device, "method": METHOD_FAKE,
            "peak_bytes": int(self.peak_bytes), "peak_phase": self.peak_phase,
            "parameters_bytes": int(self.parameters_bytes),
            "gradients_bytes": int(self.gradients_bytes),
            "optimizer_state_bytes": int(self.optimizer_state_bytes),
            "activations_bytes": int(self.activations_bytes),
            "temporaries_bytes": int(self.temporaries_bytes),
            "parameter_count": int(self.parameter_count),
            "breakdown": {str(k): int(v) for k, v in self.breakdown.items()},
            "phase_peaks": {str(k): int(v) for k, v in self.phase_peaks.items()},
            "module_activations": [[str(n), int(b)] for n, b in self.module_activations],
            "per_batch_size": [dict(row) for row in self.per_batch_size],
            "peak_upper_bytes": (None if self.peak_upper_bytes is None
                                 else int(self.peak_upper_bytes)),
            "kernel_workspaces": str(self.kernel_workspaces),
        } | ({} if self.per_rank is None else {"per_rank": dict(self.per_rank)})

    def render(self, top: int = 10) -> str:
        """A text table: peak, parts, breakdown at the peak, top modules, batch sizes."""
        step = "a training step" if self.phase == "train" else "an inference step"
        opt = f", {self.optimizer}" if self.phase == "train" else ""
        lines = [f"estimated peak {format_bytes(self.peak_bytes)} during {self.peak_phase} of"
                 f" {step} (batch {self.batch_size}{opt}, {self.amp or 'fp32'}) on {self.device}"]
        parts = [("parameters", self.parameters_bytes), ("gradients", self.gradients_bytes),
                 ("optimizer state", self.optimizer_state_bytes),
                 ("activations", self.activations_bytes),
                 ("temporaries at peak", self.temporaries_bytes)]
        for name, value in parts:
            lines.append(f"  {name:<22}{format_bytes(value):>12}")
        if self.peak_upper_bytes is not None and self.peak_upper_bytes > self.peak_bytes:
            lines.append(f"  up to {format_bytes(self.peak_upper_bytes)} with cuDNN's largest"
                         " convolution workspaces (not probed: no GPU here)")
        if self.kernel_workspaces:
            lines.append(f"  {self.kernel_workspaces}")
        if self.breakdown:
            lines.append("  at the peak: " + ", ".join(
                f"{k} {format_bytes(v)}" for k, v in self.breakdown.items() if v))
        if self.module_activations:
            lines.append("  activation bytes by module (own ops, submodules excluded):")
            for name, value in self.module_activations[:top]:
                lines.append(f"    {name:<30}{format_bytes(value):>12}")
        if len(self.per_batch_size) > 1:
            lines.append(f"  {'batch':>7}{'peak':>12}{'activations':>14}  peak phase")
            for row in self.per_batch_size:
                lines.append(f"  {row['batch_size']:>7}{format_bytes(row['peak_bytes']):>12}"
                             f"{format_bytes(row['activations_bytes']):>14}  {row['peak_phase']}")
        if self.per_rank is not None:
            from .distributed import render_per_rank

            lines.extend("  " + line for line in render_per_rank(self.per_rank))
        return "\n".join(lines)


def _report(phase_peaks: dict, peak_phase: str, phase: str, device: str, method: str,
            estimated: bool, baseline: int, tracked: Optional[tuple], opt: Any, *,
            target: Any, block: int = 1) -> MemoryReport:
    """Assemble the report; ``target`` is the device the step's tensors lived on."""
    peak = int(phase_peaks[peak_phase])
    breakdown, top = ({}, []) if tracked is None else (dict(tracked[0]), list(tracked[1]))
    if breakdown and peak - sum(breakdown.values()) >= _UNTRACKED_MIN:
        breakdown[UNTRACKED] = peak - sum(breakdown.values())
    opt_bytes = 0
    if opt is not None:
        tensors = [v for state in opt.state.values() for v in state.values()
                   if _is_tensor(v) and v.device.type == target.type]
        opt_bytes = _alive_bytes(tensors, block=block)
    return MemoryReport(
        peak_bytes=peak, phase=phase, peak_phase=peak_phase, device=device, method=method,
        estimated=estimated, baseline_bytes=int(baseline), breakdown=breakdown, top_modules=top,
        phase_peaks={k: int(v) for k, v in phase_peaks.items()},
        optimizer_state_bytes=int(opt_bytes))


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _alive_bytes(tensors: list, block: int = 1) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights counted once)."""
    storages: dict = {}  # id -> storage; the storages are held, so ids cannot be reused
    for t in tensors:
        storage = t.untyped_storage()
        storages.setdefault(id(storage), storage)
    total = 0
    for storage in storages.values():
        size = storage.nbytes()
        if block > 1 and size % block:
            size += block - size % block
        total += size
    return total
