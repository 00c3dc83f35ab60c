"""Peak memory of one training (or inference) step: measured for real, or estimated on fake tensors.

A *training step* is, on a deep copy of the model placed on the step's device::

    model.train(); model.zero_grad(set_to_none=True)     # before measuring: no gradients alive
    output = model(*inputs); loss = loss_fn(output, target)  # phase "forward" (the loss included)
    loss.backward()                                      # phase "backward"
    optimizer.step()                                     # phase "optimizer step"

with a fresh optimizer, so the optimizer state (Adam's ``exp_avg``/``exp_avg_sq``, SGD's
momentum) is created inside the step and counts, as do the optimizer's temporaries. An
*inference step* is one forward under ``torch.no_grad()`` in eval mode (phase "forward").
The output and the loss stay alive until the step ends, as they do in a training loop.

What the peak counts
    Everything alive at the worst moment of the step on the step's device: the parameters and
    buffers of the copy, the batch (inputs and target, which the breakdown reports as
    ``other``), gradients, optimizer state, activations saved for backward and temporaries.
    ``baseline_bytes`` is the part alive before the step starts: parameters + buffers + batch
    tensors (+ optimizer state, when an optimizer factory creates it eagerly), each storage
    counted once. Tensors the model keeps as plain attributes (not registered as parameters or
    buffers) are not counted, and neither is memory outside PyTorch's allocator.

Methods (``MemoryReport.method``)
    ``"cpu allocator events (torch.profiler)"``
        A CPU step runs under ``torch.profiler.profile(profile_memory=True)``; every CPU
        allocation and free appears as a ``[memory]`` event with a signed size. The running sum
        of those events in time order, at its maximum, plus ``baseline_bytes`` is the peak. It
        sees allocations made below the dispatcher too (convolution workspaces, oneDNN
        buffers), so it is the ground truth the estimate is checked against.
    ``"cuda caching allocator"``
        A CUDA step: the process's library workspaces created and the allocator's free cached
        blocks released first (``_CudaApi``), then ``torch.cuda.reset_peak_memory_stats`` at
        each phase start, ``torch.cuda.max_memory_allocated`` at each phase end (after
        ``synchronize``). The
        allocations that existed before the model copy was placed on the device (other tensors
        of the process, the caller's own model if it lives there) are subtracted; everything of
        the step, parameters included, is reported.
    ``"fake-tensor estimate"``
        The same step on ``FakeTensorMode`` tensors, which carry shapes, dtypes and strides but
        no storage, so nothing is allocated: a model on the ``meta`` device with 4 GiB of
        weights is estimated without those 4 GiB ever existing. Every storage created is
        tracked by ``MemTracker`` at the dispatcher. For ``device="cuda"`` every allocation
        is rounded up to the CUDA caching allocator's 512-byte block size (what
        ``max_memory_allocated`` counts) and named optimizers use ``foreach=True`` as they
        default to on CUDA. Where that GPU is present, the fake tensors are CUDA tensors (so
        the step takes CUDA's kernels, memory layouts and autocast lists, still allocating
        nothing) and every kernel's workspace is measured by running each distinct op once
        on the GPU in a probe process (``core/cuda_probe.py``); the device reads ``"cuda
        (estimated with the GPU's kernels)"``. Without the GPU, fake tensors are CPU tensors,
        the step runs CPU kernels, the device reads ``"cuda (estimated on CPU)"``, and
        CUDA-only workspaces are left out (cuDNN's are bounded in ``peak_upper_bytes``).
        The fused ``TransformerEncoderLayer``/``MultiheadAttention`` inference fast path runs
        in CPU estimates as in the real step, with its internal buffers modelled (see
        ``_attention_workspace``; ``_mha_fastpath``); a ``TransformerEncoder`` given a padding
        mask runs it on the padded batch, where the real step packs the real tokens into a
        nested tensor (``_no_nested_tensors``), so that estimate errs high by the padding.

Breakdown
    ``MemTracker`` (``torch.distributed._tools.mem_tracker``) runs an identical step on its
    own copy just before the measured one (its module hooks can keep tensors alive a little
    longer, so it never runs inside the measurement), and attributes the bytes alive at its
    peak to ``parameters``, ``buffers``, ``gradients``, ``optimizer_state`` (everything
    allocated inside ``optimizer.step()``, its temporaries included), ``activations``
    (allocated in forward), ``temporaries`` (allocated in backward, gradients of activations
    included) and ``other`` (the batch). When the measured peak is above what the dispatcher
    saw, the difference is reported as ``untracked``. ``top_modules`` lists the modules whose
    own forward code (submodules excluded) leaves the most activation bytes alive. The model's
    own forward code is listed as ``<root> (ClassName) own ops, largest aten.<op> at
    file:line in forward`` with the larger of the bytes it leaves alive and its largest single
    allocation, freed or not (a broadcast intermediate made in the root's ``forward`` is freed
    before the forward ends, yet it can be the peak); measured runs only, an estimate lists
    the bytes the root's code leaves alive.

Limitations
    Ops that need tensor values (``.item()``, ``nonzero``, data-dependent control flow) cannot
    run on fake tensors: ``estimate_step_memory`` raises ``EstimateError`` for them. The
    estimate sees what passes the dispatcher, not what a kernel allocates inside itself; for
    CPU estimates the known in-kernel buffers (oneDNN's blocked copies of convolution inputs,
    weights and outputs; the im2col column buffers of the convolutions torch picks for one
    sample; pocketfft's copies in ``_fft_c2r``) are added from per-op rules (see "CPU kernel
    workspaces" below), which brought a 3D UNet from 87% to 99-100% of the measured peak (and
    at batch size 1 from 14-32% to 99-100%) and an FNO from 82-92% to 99-100%. Not modelled:
    oneDNN's per-thread weight-gradient scratch for convolutions with fewer than 16 input
    channels (its size depends on the thread count; a small 3D UNet ending in a 12 -> 1
    channel convolution was estimated at 91%), depthwise convolutions, copies a kernel
    makes of other non-contiguous inputs (``mm`` of an expanded gradient), and kernels that
    keep a larger storage than their result (CPU ``mse_loss``). CUDA estimates made where
    the GPU is take every kernel's workspace from the probe; made elsewhere they add none
    but the fused attention rules. Transformers, MLPs and DiT/ViT-style models matched to
    within 3%.
    The peak is that of the first step; from the second step on the optimizer state is alive
    during forward and backward as well (``optimizer_state_bytes`` says how much).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from .batch import Batch, copy_model, iter_tensors
from .errors import ModelError, UsageError
from .forward import model_device, run_forward
from .cuda_probe import layout_alternatives, op_signature, probe_workspaces
from .cuda_workspace import CUDA_BLOCK_BYTES, cudnn_workspace_bound
from .native_stderr import filtered_stderr
from .losses import resolve_loss
from .training import make_optimizer
from .units import format_bytes

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

# MemTracker's reference types (_MemRefType member names) -> breakdown categories.
_REFTYPE_CATEGORY = {"PARAM": "parameters", "BUFFER": "buffers", "GRAD": "gradients",
                     "OPT": "optimizer_state", "ACT": "activations", "TEMP": "temporaries",
                     "OTH": "other"}
# Differences smaller than this between the allocator's peak and MemTracker's are bookkeeping
# scalars (a few 8-byte tensors), not memory worth a line of its own.
_UNTRACKED_MIN = 4096
_RANGE_PREFIX = "modelcheck::"
# Messages MemTracker/ModTracker may warn with when a module dies or is re-entered.
_TRACKER_WARNINGS = ("Module is None", "The module hierarchy tracking")


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


# --- public entry points ------------------------------------------------------------------------

def measure_step_memory(model: Any, batch: Any, loss: Any = None, *, phase: str = "train",
                        optimizer: Any = "adam", lr: float = 1e-3,
                        device: Any = None) -> MemoryReport:
    """Run one real step on a deep copy of ``model`` and report its measured peak memory.

    CPU steps are measured from the profiler's allocator events, CUDA steps with the caching
    allocator's statistics. The breakdown comes from ``MemTracker`` in an identical step run
    just before (on a fresh copy), so that its hooks cannot change what is measured. The
    caller's model (values, ``.grad``, training flags) and batch are left untouched, and the
    RNG states are restored. ``loss`` is anything ``resolve_loss`` accepts.

    >>> import torch
    >>> m = torch.nn.Linear(1024, 1024)
    >>> r = measure_step_memory(m, torch.ones(256, 1024), phase="inference")
    >>> # weight 4 MiB + bias 4 KiB + input 1 MiB + output 1 MiB
    >>> r.peak_bytes == 4 * 2**20 + 4096 + 2**20 + 2**20, r.peak_phase
    (True, 'forward')
    """
    import torch

    from .state import preserved_globals

    phase = _check_phase(phase)
    dev = _target_device(model, device)
    if _has_meta(model) or dev.type == "meta":
        raise UsageError("model: it is on the meta device, so a step cannot run for real; use"
                         " estimate_step_memory (fake tensors) instead")
    data = Batch.from_user(batch, model=model)
    with preserved_globals():
        if dev.type == "cuda":
            if not _cuda_api.is_available():
                raise UsageError(f"device={str(dev)!r}: CUDA is not available on this machine;"
                                 " use estimate_step_memory for an estimate")
            place = _cuda_api.placement(dev)
            tracked = _tracked_run(model, data, loss, phase, optimizer, lr, place)
            return _measure_cuda(model, data, loss, phase, optimizer, lr, dev, tracked)
        if dev.type != "cpu":
            raise UsageError(f"device={str(dev)!r}: peak memory can be measured on 'cpu' and"
                             " 'cuda'; use estimate_step_memory for other devices")
        tracked = _tracked_run(model, data, loss, phase, optimizer, lr, torch.device("cpu"))
        return _measure_cpu(model, data, loss, phase, optimizer, lr, tracked)


def estimate_step_memory(model: Any, batch: Any, loss: Any = None, *, phase: str = "train",
                         optimizer: Any = "adam", lr: float = 1e-3,
                         device: Any = None) -> MemoryReport:
    """Estimate the peak memory of one step without allocating it (fake tensors + MemTracker).

    Works for models on the ``meta`` device (no weight is ever materialized). For
    ``device="cuda"`` without CUDA, the CPU kernels run on fake CPU tensors and every
    allocation is rounded up to 512 bytes, as the CUDA caching allocator does.

    >>> import torch
    >>> with torch.device("meta"):
    ...     big = torch.nn.Linear(32768, 32768)   # 4 GiB of float32 weights, never allocated
    >>> r = estimate_step_memory(big, torch.ones(2, 32768), phase="inference")
    >>> r.estimated, r.breakdown["parameters"] >= 4 * 2**30
    (True, True)
    """
    from .state import preserved_globals

    phase = _check_phase(phase)
    dev = _target_device(model, device)
    data = Batch.from_user(batch, model=model)
    with preserved_globals():
        return _estimate(model, data, loss, phase, optimizer, lr, dev)


def step_memory(model: Any, batch: Any, loss: Any = None, *, phase: str = "train",
                optimizer: Any = "adam", lr: float = 1e-3, device: Any = None) -> MemoryReport:
    """Measure where possible, estimate otherwise.

    Measured: a CPU step, or a CUDA step when CUDA is available. Estimated: a model on the
    ``meta`` device, CUDA requested on a machine without it, any other device.

    >>> import torch
    >>> step_memory(torch.nn.Linear(8, 8), torch.ones(4, 8), device="cuda").estimated \\
    ...     or torch.cuda.is_available()
    True
    """
    dev = _target_device(model, device)
    measurable = dev.type == "cpu" or (dev.type == "cuda" and _cuda_api.is_available())
    if measurable and not _has_meta(model):
        return measure_step_memory(model, batch, loss, phase=phase, optimizer=optimizer, lr=lr,
                                   device=dev)
    return estimate_step_memory(model, batch, loss, phase=phase, optimizer=optimizer, lr=lr,
                                device=dev)


def step_is_estimated(model: Any, device: Any = None) -> bool:
    """True when ``step_memory`` would estimate (fake tensors) rather than measure.

    That is: a model on the ``meta`` device, CUDA requested where it is not available, or a
    device other than CPU and CUDA.

    >>> import torch
    >>> step_is_estimated(torch.nn.Linear(2, 2), "cpu")
    False
    >>> step_is_estimated(torch.nn.Linear(2, 2), "meta")
    True
    """
    dev = _target_device(model, device)
    measurable = dev.type == "cpu" or (dev.type == "cuda" and _cuda_api.is_available())
    return not measurable or _has_meta(model)


# Test seam: the estimate runs in a spawned worker process (``core/isolate.py``), where a
# test's monkeypatching is not visible. With this variable set to "abort" (SIGABRT) or
# "segfault" (SIGSEGV), ``isolated_estimate_step`` crashes the worker that way before it
# estimates, so tests can check that a crash becomes a failed check. Never set it otherwise.
CRASH_SEAM_ENV = "MODELCHECK_TEST_CRASH_ESTIMATE"


def isolated_estimate_step(model: Any, batch: Any, loss: Any = None, *, phase: str = "train",
                           optimizer: Any = "adam", lr: float = 1e-3,
                           device: Any = None) -> MemoryReport:
    """``estimate_step_memory``, as run inside a worker process by ``run_isolated``.

    Fake tensors standing in for CUDA tensors on a CPU-only build can abort the interpreter
    instead of raising; in a worker, that abort becomes ``IsolatedCrash`` in the parent.
    Reads the ``MODELCHECK_TEST_CRASH_ESTIMATE`` test seam (see ``CRASH_SEAM_ENV``).

    >>> import torch
    >>> from pytest_modelcheck.core.isolate import run_isolated
    >>> r = run_isolated(isolated_estimate_step, torch.nn.Linear(8, 8), torch.ones(4, 8),
    ...                  phase="inference", device="cuda")
    >>> r.estimated or torch.cuda.is_available()
    True
    """
    import os

    crash = os.environ.get(CRASH_SEAM_ENV, "")
    if crash == "abort":
        os.abort()
    if crash == "segfault":
        import ctypes

        ctypes.string_at(0)
    return estimate_step_memory(model, batch, loss, phase=phase, optimizer=optimizer, lr=lr,
                                device=device)


# --- estimate_memory: a whole-step estimate with its parts, across batch sizes --------------------

AMP_DTYPES = ("bf16", "fp16")


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
        }

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
        return "\n".join(lines)


def estimate_memory(model_or_factory: Any, batch: Any, *, phase: str = "train",
                    optimizer: Any = "adamw", amp: Optional[str] = None,
                    batch_sizes: Any = None, device: Any = None, loss: Any = None,
                    lr: float = 1e-3) -> MemoryEstimate:
    """Estimate a step's memory, part by part, without allocating any tensor.

    ``model_or_factory`` is a module (real or on the ``meta`` device) or a zero-argument
    callable returning one, which is called under ``torch.device("meta")`` so its weights are
    never allocated. ``batch`` is anything ``Batch.from_user`` accepts (meta tensors too) or a
    ``make_batch(batch_size)`` factory, which ``batch_sizes`` needs unless the batch's tensors
    can be resized. ``amp`` ("bf16", "fp16" or None) runs forward and loss under
    ``torch.autocast("cpu", dtype=...)``, so matmul activations are stored in half precision
    (and the half-precision copies of the weights that autocast caches count too). The
    step, its phases and the breakdown are those of ``estimate_step_memory``; the figures of
    the first batch size are the result's own, and ``per_batch_size`` lists every size.

    >>> import torch
    >>> def build():
    ...     return torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
    ...                                torch.nn.Linear(1024, 10))
    >>> e = estimate_memory(build, lambda n: (torch.empty(n, 1024, device="meta"),
    ...                     torch.empty(n, dtype=torch.long, device="meta")),
    ...                     batch_sizes=[1, 64])
    >>> e.parameter_count, e.parameters_bytes == 4 * e.parameter_count
    (1059850, True)
    >>> e.optimizer_state_bytes >= 2 * 4 * 1059850   # AdamW: exp_avg + exp_avg_sq (+ steps)
    True
    >>> [row["batch_size"] for row in e.per_batch_size]
    [1, 64]
    """
    import torch

    from .state import preserved_globals

    phase = _check_phase(phase)
    if amp not in (None,) + AMP_DTYPES:
        raise UsageError(f"amp={amp!r}: expected 'bf16', 'fp16' or None")
    amp_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if isinstance(model_or_factory, torch.nn.Module):
        model = model_or_factory
    elif callable(model_or_factory):
        with torch.device("meta"):
            model = model_or_factory()
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"model_or_factory: the factory returned {type(model).__name__},"
                             " expected a torch.nn.Module")
    else:
        raise UsageError(f"model_or_factory: expected a torch.nn.Module or a zero-argument"
                         f" callable returning one, got {type(model_or_factory).__name__}")
    data = Batch.from_user(batch, model=model)
    if batch_sizes is None:
        sizes = [data.batch_size]
    else:
        try:
            sizes = [int(n) for n in batch_sizes]
        except (TypeError, ValueError):
            raise UsageError(f"batch_sizes={batch_sizes!r}: expected a list of positive"
                             " integers") from None
        if not sizes or any(n < 1 for n in sizes) or any(
                isinstance(n, bool) for n in batch_sizes):
            raise UsageError(f"batch_sizes={batch_sizes!r}: expected a list of positive"
                             " integers")
    dev = _target_device(model, device)
    opt_name = (optimizer if isinstance(optimizer, str) else
                getattr(optimizer, "__name__", type(optimizer).__name__))
    results = []
    with preserved_globals():
        for n in sizes:
            step_data = data if n is None or n == data.batch_size else data.resized(n)
            held: list = []
            report = _estimate(model, step_data, loss, phase, optimizer, lr, dev,
                               amp=amp_dtype, keep_tracker=held)
            results.append(_to_estimate(report, held, n, phase, opt_name, amp, model))
            del held
    first = results[0]
    first.per_batch_size = [r.summary() for r in results]
    return first


def _to_estimate(report: MemoryReport, held: list, n: Optional[int], phase: str,
                 opt_name: Any, amp: Optional[str], model: Any) -> MemoryEstimate:
    tracker, work, opt = held
    block = CUDA_BLOCK_BYTES if report.device.startswith("cuda") else 1
    params = _alive_bytes(list(work.parameters()) + list(work.buffers()), block=block)
    grads = _alive_bytes([p.grad for p in work.parameters() if p.grad is not None], block=block)
    if phase == "train" and BACKWARD in tracker.phase_starts:
        activations = tracker.phase_starts[BACKWARD]["activations"]
    else:
        activations = report.breakdown.get("activations", 0)
    return MemoryEstimate(
        batch_size=n, phase=phase, optimizer=opt_name if phase == "train" else None, amp=amp,
        device=report.device, peak_bytes=report.peak_bytes, peak_phase=report.peak_phase,
        parameters_bytes=params, gradients_bytes=grads,
        optimizer_state_bytes=report.optimizer_state_bytes, activations_bytes=int(activations),
        temporaries_bytes=int(report.breakdown.get("temporaries", 0)),
        parameter_count=sum(p.numel() for p in model.parameters()),
        breakdown=dict(report.breakdown), phase_peaks=dict(report.phase_peaks),
        module_activations=_top_modules(tracker, work, limit=None),
        peak_upper_bytes=report.peak_upper_bytes, kernel_workspaces=report.kernel_workspaces)


# --- the CUDA seam (replaced by a fake in tests) ------------------------------------------------

class _CudaApi:
    """The few ``torch.cuda`` calls the CUDA measurement makes, in one replaceable object."""

    def is_available(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def placement(self, device: Any) -> Any:
        """Where the step's tensors go (the device itself)."""
        return device

    def synchronize(self, device: Any) -> None:
        import torch

        torch.cuda.synchronize(device)

    def warm_up_libraries(self, device: Any) -> None:
        """Create the process-wide cuBLAS and cuBLASLt handles and workspaces now.

        The first matrix product of a thread allocates a workspace that stays for the life of
        the process (on an H200 with torch 2.11: 33 MiB for the main thread, 33 MiB more for
        the autograd engine's device thread at the first backward); without this, the step
        measured first in a process would count it and the same step measured later would
        not.
        """
        import torch

        a = torch.ones(8, 8, device=device, requires_grad=True)
        y = torch.nn.functional.linear(a, a, a[0])   # cuBLASLt (matmul with bias)
        y.sum().backward()                           # the autograd thread's own handle
        torch.mm(a.detach(), a.detach())             # cuBLAS
        del a, y

    def release_cached_blocks(self, device: Any) -> None:
        """Return the caching allocator's free cached blocks to the driver.

        ``max_memory_allocated`` counts whole blocks, and a free block cached by earlier work
        that is too small to split is handed out whole: on an H200 a UNet's batch-1 step
        measured 9.37/6.28 MB (train/inference) on its own and 10.29/7.20 MB after a ResNet had
        run in the same process. Measured from an empty cache, a step reads the same whatever
        ran before it. Nothing in use is touched.
        """
        import torch

        torch.cuda.empty_cache()

    def reset_peak_memory_stats(self, device: Any) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats(device)

    def memory_allocated(self, device: Any) -> int:
        import torch

        return int(torch.cuda.memory_allocated(device))

    def max_memory_allocated(self, device: Any) -> int:
        import torch

        return int(torch.cuda.max_memory_allocated(device))


_cuda_api: Any = _CudaApi()


# --- the step -------------------------------------------------------------------------------

PhaseContext = Callable[[str], Any]


def _run_step(work: Any, data: Batch, loss: Any, phase: str, opt: Any,
              phase_context: PhaseContext, amp: Any = None, amp_device: str = "cpu") -> list:
    """One step; returns the tensors that must outlive it (output, loss) to the caller.

    ``amp`` (a torch dtype or None) runs the forward and the loss under
    ``torch.autocast(amp_device, dtype=amp)``; backward and the optimizer step run outside it, as
    in an ordinary mixed-precision training loop.
    """
    import torch

    def autocast() -> Any:
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(amp_device, dtype=amp)

    if phase == "inference":
        with torch.no_grad(), phase_context(FORWARD), autocast():
            out = run_forward(work, data)
        return [out]
    with phase_context(FORWARD):
        with autocast():
            out = run_forward(work, data)
            total, _terms = resolve_loss(loss, data, out).compute(out, data, work)
    if not isinstance(total, torch.Tensor) or not total.requires_grad:
        raise UsageError("loss: it does not depend on any trainable parameter, so there is no"
                         " backward to measure; use phase='inference' for a forward-only step")
    with phase_context(BACKWARD):
        total.backward()
    with phase_context(OPTIMIZER_STEP):
        opt.step()
    return [out, total]


def _prepare(work: Any, phase: str, optimizer: Any, lr: float) -> Any:
    """Put the copy in the step's mode, drop its gradients, build the optimizer."""
    if phase == "inference":
        work.eval()
        return None
    work.train()
    work.zero_grad(set_to_none=True)
    if not any(p.requires_grad for p in work.parameters()):
        raise UsageError("model: no parameter requires grad, so a training step has no backward"
                         " to measure; use phase='inference' for a forward-only step")
    return make_optimizer(optimizer, work.parameters(), lr)


# --- CPU: profiler allocator events -----------------------------------------------------------

def _measure_cpu(model: Any, batch: Batch, loss: Any, phase: str, optimizer: Any,
                 lr: float, tracked: Optional[tuple]) -> MemoryReport:
    import torch
    from torch.profiler import record_function

    work = copy_model(model).to("cpu")
    data = batch.clone().to("cpu")
    opt = _prepare(work, phase, optimizer, lr)
    baseline = _alive_bytes(_step_tensors(work, data, opt))

    def phase_context(name: str) -> Any:
        return record_function(_RANGE_PREFIX + name)

    gc.collect()  # garbage of earlier work would otherwise be freed inside the profiled step
    with allocation_profiler() as prof:
        keep = _run_step(work, data, loss, phase, opt, phase_context)
    events = list(prof.profiler.kineto_results.events())
    ranges = {}
    for ev in events:
        name = ev.name()
        if name.startswith(_RANGE_PREFIX):
            ranges[name[len(_RANGE_PREFIX):]] = (ev.start_ns(), ev.start_ns() + ev.duration_ns())
    order = [p for p in STEP_PHASES if p in ranges]
    # Allocator events in time order, with each phase's start as a zero-byte event so that a
    # phase's peak starts from what was alive when it began.
    stream = sorted([(ev.start_ns(), 1, ev.nbytes()) for ev in events
                     if ev.name() == "[memory]" and _is_cpu_event(ev)]
                    + [(ranges[p][0], 0, 0) for p in order])
    starts = [(ranges[p][0], p) for p in order]
    running, peaks = 0, {}
    for when, _kind, nbytes in stream:
        where = _phase_at(when, starts) or (order[0] if order else FORWARD)
        running += nbytes
        peaks[where] = max(peaks.get(where, running), running)
    phase_peaks = {p: baseline + peaks.get(p, 0) for p in order}
    peak_phase = max(order, key=lambda p: (phase_peaks[p], -order.index(p)))
    del keep
    return _report(phase_peaks, peak_phase, phase, "cpu", METHOD_CPU, False, baseline,
                   tracked, opt, target=torch.device("cpu"))


@contextlib.contextmanager
def allocation_profiler() -> Iterator[Any]:
    """``torch.profiler.profile`` recording CPU allocator events, for one profiling cycle.

    ``acc_events=True`` (where torch has it) keeps some releases from warning that events of
    earlier cycles are dropped, which fails a test run under ``-W error``; kineto's status lines
    are kept out of stderr (``native_stderr``).

    >>> import torch
    >>> with allocation_profiler() as prof:
    ...     _ = torch.ones(1024)
    >>> sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.nbytes() > 0) >= 4096
    True
    """
    from torch.profiler import ProfilerActivity, profile

    extra = {"acc_events": True} if "acc_events" in inspect.signature(profile).parameters else {}
    with filtered_stderr(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True, **extra) as prof:
        yield prof


def _is_cpu_event(ev: Any) -> bool:
    try:
        return str(ev.device_type()).endswith("CPU")
    except Exception:  # noqa: BLE001 - an older event API: every event is a CPU event here
        return True


def _phase_at(when: int, starts: list) -> Optional[str]:
    """The phase whose range started last at or before ``when``."""
    found = None
    for start, name in starts:
        if start <= when:
            found = name
    return found


# --- CUDA: caching allocator statistics -------------------------------------------------------

def _measure_cuda(model: Any, batch: Batch, loss: Any, phase: str, optimizer: Any, lr: float,
                  dev: Any, tracked: Optional[tuple]) -> MemoryReport:
    import torch

    api = _cuda_api
    place = api.placement(dev)
    gc.collect()
    api.warm_up_libraries(place)  # library workspaces of the process: not the step's
    api.synchronize(dev)
    api.release_cached_blocks(dev)  # blocks cached by earlier work: not handed out whole
    before = api.memory_allocated(dev)  # other allocations of the process: not the step's
    work = copy_model(model).to(place)
    data = batch.clone().to(place)
    opt = _prepare(work, phase, optimizer, lr)
    api.synchronize(dev)
    baseline = api.memory_allocated(dev) - before
    phase_peaks: dict = {}

    @contextlib.contextmanager
    def phase_context(name: str) -> Iterator[None]:
        api.synchronize(dev)
        api.reset_peak_memory_stats(dev)
        yield
        api.synchronize(dev)
        phase_peaks[name] = api.max_memory_allocated(dev) - before

    keep = _run_step(work, data, loss, phase, opt, phase_context)
    order = [p for p in STEP_PHASES if p in phase_peaks]
    peak_phase = max(order, key=lambda p: (phase_peaks[p], -order.index(p)))
    del keep
    return _report(phase_peaks, peak_phase, phase, str(dev), METHOD_CUDA, False, baseline,
                   tracked, opt, target=torch.device(place), block=CUDA_BLOCK_BYTES)


def _tracked_run(model: Any, batch: Batch, loss: Any, phase: str, optimizer: Any, lr: float,
                 place: Any) -> Optional[tuple]:
    """The step under MemTracker on a fresh copy: (categories at its peak, top modules).

    None when MemTracker is unavailable (no torch.distributed) or refuses the step.
    """
    import torch

    try:
        tracker = _new_tracker(target=torch.device(place))
    except ImportError:
        return None
    work = copy_model(model).to(place)
    data = batch.clone().to(place)
    opt = _prepare(work, phase, optimizer, lr)
    tracker.track_external(work, *(t for _, t in _batch_tensors(data)),
                           *([opt] if opt is not None else []))
    try:
        with _tracking(tracker), _root_own_ops(work, tracker):
            keep = _run_step(work, data, loss, phase, opt, _tracker_phases(tracker, _no_phase))
    except Exception as exc:  # noqa: BLE001 - the model's own errors propagate
        if _tracker_limitation(exc):
            return None
        raise
    result = (_categories(tracker), _top_modules(tracker, work))
    del keep, work, data, opt, tracker
    return result


@contextlib.contextmanager
def _no_phase(name: str) -> Iterator[None]:
    yield


# --- fake tensors ---------------------------------------------------------------------------

def _estimate(model: Any, batch: Batch, loss: Any, phase: str, optimizer: Any, lr: float,
              dev: Any, amp: Any = None, keep_tracker: Optional[list] = None) -> MemoryReport:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    cuda_like = dev.type == "cuda" or dev.type not in ("cpu", "meta")
    on_gpu = _probe_kernels(dev)
    place = _fake_device(dev) if on_gpu else torch.device("cpu")
    label = (f"{dev} (estimated with the GPU's kernels)" if on_gpu else
             f"{dev} (estimated on CPU)" if cuda_like else "cpu")
    block = CUDA_BLOCK_BYTES if dev.type == "cuda" else 1
    try:
        tracker = _new_tracker(target=place, block=block)
    except ImportError as exc:
        raise EstimateError(f"estimating memory needs torch.distributed ({exc})") from None
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    work = _fake_model_copy(model, fake_mode, place)
    data = batch.map(lambda t: _fake_like(t, fake_mode, place))
    try:
        with fake_mode:
            opt = _prepare(work, phase, optimizer, lr)
            if opt is not None and dev.type == "cuda" and isinstance(optimizer, str):
                for group in opt.param_groups:  # CUDA's default: multi-tensor (foreach) kernels
                    if group.get("foreach", False) is None:
                        group["foreach"] = True
            tracker.track_external(work, *(t for _, t in _batch_tensors(data)),
                                   *([opt] if opt is not None else []))
            baseline = _tracker_total(tracker.get_tracker_snapshot("current"), tracker.target)
            tracker.phase_peaks.clear()
            upper: dict = {}
            kernels: Optional[list] = [] if on_gpu else None
            fused = dev.type in ("cpu", "cuda")
            _no_nested_tensors(work)
            with _tracking(tracker), _device_workspaces(tracker, dev, upper, kernels), \
                    _linear_bias_in_place(), _mha_fastpath(fused), _quiet_fake_tensor_log(), \
                    _causal_masks_by_origin():
                keep = _run_step(work, data, loss, phase, opt,
                                 _tracker_phases(tracker, _no_phase), amp=amp,
                                 amp_device=place.type)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised unless fake tensors are the cause
        cause = exc.original if isinstance(exc, ModelError) else exc
        if _is_fake_limitation(cause):
            raise EstimateError(_fake_limitation_message(cause)) from exc
        if _tracker_limitation(exc):
            raise EstimateError(f"the step calls the whole model more than once, which the"
                                f" memory tracker does not support ({_first_line(cause)})") from exc
        raise
    note, all_convs = "", False
    if kernels is not None:
        note, all_convs = _add_kernel_workspaces(tracker, kernels, dev)
    phase_peaks = {p: max(v, baseline) for p, v in tracker.phase_peaks.items()}
    order = [p for p in STEP_PHASES if p in phase_peaks]
    peak_phase = max(order, key=lambda p: (phase_peaks[p], -order.index(p)))
    del keep
    tracked = (_categories(tracker), _top_modules(tracker, work))
    if keep_tracker is not None:
        keep_tracker.extend([tracker, work, opt])
    report = _report(phase_peaks, peak_phase, phase, label, METHOD_FAKE, True, baseline,
                     tracked, opt, target=place, block=block)
    if dev.type == "cuda":
        report.peak_upper_bytes = max([report.peak_bytes, *(() if all_convs else upper.values())])
        report.kernel_workspaces = note
    return report


def _fake_device(dev: Any) -> Any:
    """Where a CUDA estimate's fake tensors live when the GPU is here: on it (fake CUDA tensors
    take CUDA's kernels, memory layouts and autocast lists; they allocate nothing)."""
    import torch

    return torch.device(dev.type, dev.index if dev.index is not None
                        else torch.cuda.current_device())


def _probe_kernels(dev: Any) -> bool:
    """Whether a CUDA estimate runs on fake CUDA tensors and asks the GPU for its kernels'
    workspaces: the target is a CUDA device present here (an index this machine has), and
    ``MODELCHECK_CUDA_PROBE`` is not ``0``."""
    import torch

    return (dev.type == "cuda" and os.environ.get("MODELCHECK_CUDA_PROBE", "1") != "0"
            and torch.cuda.is_available()
            and (dev.index is None or dev.index < torch.cuda.device_count()))


@contextlib.contextmanager
def _linear_bias_in_place() -> Iterator[None]:
    """Add a linear layer's bias in place, as the real kernel does, when the input is not
    contiguous.

    ``at::linear`` on a 3-D input that is not contiguous (a transposed sequence, a GRU with
    ``batch_first``) computes ``matmul(input, weight.t())`` and then ``output.add_(bias)``,
    unless a tensor subclass or any dispatch mode is involved, when it adds out of place for
    composite compliance. Fake tensors and the tracker are both, so the estimate would hold
    one more output while the bias is added (seen: a GRU's inference 1.15-1.19, a transposed
    Linear 1.29 of the measured peak). This mode, entered inside the tracker, turns the
    ``add`` that follows ``mm``/``bmm`` and the ``_unsafe_view`` of their result into the real
    in-place add (the result an alias of the product, as in the kernel). An ``add`` written
    as ``+`` in Python is left alone: there the out-of-place add is real. Not told apart:
    ``torch.add(a @ w.t(), b)`` on a non-contiguous ``a``, a function call like the kernel's.
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    products = (aten.mm.default, aten.bmm.default)

    class _InPlaceBias(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.previous: Any = None
            self.product: Any = None

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if getattr(func, "namespace", "") == "prim":
                return func(*args, **kwargs)
            product = self.product() if self.product is not None else None
            self.product = None
            if func is aten.add.Tensor and product is not None and len(args) == 2 \
                    and args[0] is product and kwargs.get("alpha", 1) == 1 \
                    and _is_bias_of(args[1], product) and not _called_as_operator():
                self.previous = func
                aten.add_.Tensor(product, args[1])
                return aten.alias.default(product)
            out = func(*args, **kwargs)
            if func is aten._unsafe_view.default and self.previous in products:
                self.product = weakref.ref(out)
            self.previous = func
            return out

    with _InPlaceBias():
        yield


@contextlib.contextmanager
def _causal_masks_by_origin() -> Iterator[None]:
    """Let ``nn.Transformer``/``TransformerEncoder``/``TransformerDecoder`` with an attention
    mask run on fake tensors.

    Their forward asks ``_detect_is_causal_mask`` whether the mask equals a causal one by
    comparing values, which fake tensors do not have (the estimate failed with "the step needs
    tensor values"). For the estimate, a mask is causal when it came from torch's own
    ``generate_square_subsequent_mask`` (the helper is wrapped to remember its results) or the
    caller said so with ``is_causal``; any other mask is not, and the layers use it as given
    (at most the mask's own bytes more than the causal path). Both helpers are put back after.
    """
    import weakref

    try:
        from torch.nn.modules import transformer
    except ImportError:  # pragma: no cover - every supported torch has it
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensor

    detect = getattr(transformer, "_detect_is_causal_mask", None)
    generate = getattr(transformer, "_generate_square_subsequent_mask", None)
    if detect is None or generate is None:
        yield
        return
    causal: dict = {}  # id -> weak reference (tensors compare by value, not in a WeakSet)

    def generated(*args: Any, **kwargs: Any) -> Any:
        mask = generate(*args, **kwargs)
        if isinstance(mask, FakeTensor):
            causal[id(mask)] = weakref.ref(mask)
        return mask

    def detected(mask: Any, is_causal: Any = None, size: Any = None) -> bool:
        if isinstance(mask, FakeTensor) and is_causal is None:
            n = size if size is not None else mask.size(-2)
            ref = causal.get(id(mask))
            return ref is not None and ref() is mask and tuple(mask.shape[-2:]) == (n, n)
        return detect(mask, is_causal, size)

    transformer._detect_is_causal_mask = detected
    transformer._generate_square_subsequent_mask = generated
    try:
        yield
    finally:
        transformer._detect_is_causal_mask = detect
        transformer._generate_square_subsequent_mask = generate


def _is_bias_of(bias: Any, product: Any) -> bool:
    return (_is_tensor(bias) and bias.dim() == 1 and product.dim() >= 2
            and bias.shape[0] == product.shape[-1] and bias.dtype == product.dtype)


# Files of torch's own wrappers between an op's Python caller and a dispatch mode.
_DISPATCH_WRAPPERS = ("torch/_compile.py", "torch/_tensor.py", "torch/overrides.py",
                      "torch/utils/_python_dispatch.py", "torch/_dynamo/eval_frame.py")


def _called_as_operator() -> bool:
    """Whether the op being dispatched was called by a Python operator (``a + b``) rather than
    by a function (``F.linear``, ``_VF.gru``): the caller's current instruction."""
    import dis
    import os
    import sys

    try:
        frame = sys._getframe(2)  # above this function and __torch_dispatch__
    except ValueError:
        return False
    while frame is not None and frame.f_code.co_filename.replace(os.sep, "/").endswith(
            _DISPATCH_WRAPPERS):
        frame = frame.f_back
    if frame is None:
        return False
    code = frame.f_code.co_code
    if not 0 <= frame.f_lasti < len(code):
        return False
    return dis.opname[code[frame.f_lasti]].startswith(("BINARY_", "INPLACE_"))


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Drop FakeTensorMode's log record of a failing op; the exception itself still propagates
    and is reported (e.g. as a shape mismatch in the module that raised)."""
    import logging

    logger = logging.getLogger("torch._subclasses.fake_tensor")

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("failed while attempting to run meta")

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    """Switch the fused attention/encoder-layer inference path (restored on exit).

    The fused ``_transformer_encoder_layer_fwd`` and ``_native_multi_head_attention`` allocate
    their intermediates inside one kernel, where no dispatcher-level tracker sees them. CPU
    estimates run them, as the real step does, and add those intermediates from the kernels'
    shapes (``_attention_workspace``). Elsewhere the estimate runs the unfused path, which
    allocates the same kinds of intermediates as visible ops (observed: equal, or up to 17%
    above the fused path's peak).
    """
    import torch

    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "get_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _no_nested_tensors(model: Any) -> None:
    """Turn off the packing of padded batches into nested tensors in the estimate's own copy.

    A ``TransformerEncoder`` (``enable_nested_tensor=True``, the default) given a
    ``src_key_padding_mask`` on the inference fast path packs the batch into a nested tensor,
    which needs the mask's values: fake tensors cannot. Without the packing its layers run the
    same fused kernel on the padded batch, with the mask, so the estimate errs high by the
    padding. Without a padding mask nothing changes: the fast path runs as in the real step
    (before, any such encoder was estimated on the unfused path, 0.69 of the peak of a default
    encoder at width 256, sequence 256, batch 8).
    """
    for m in model.modules():
        if getattr(m, "use_nested_tensor", False):
            m.use_nested_tensor = False


def _fake_like(t: Any, fake_mode: Any, device: Any = "cpu") -> Any:
    """A fake tensor on ``device`` with ``t``'s shape, strides, dtype and requires_grad; no
    storage."""
    import torch

    with fake_mode:
        fake = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype,
                                   device=device)
    if t.requires_grad and (fake.is_floating_point() or fake.is_complex()):
        fake.requires_grad_(True)
    return fake


def _fake_model_copy(model: Any, fake_mode: Any, device: Any = "cpu") -> Any:
    """A deep copy whose parameters and buffers are fake tensors on ``device`` (tied weights
    stay tied).

    The copy is made with a ``deepcopy`` memo that already maps every parameter and buffer to
    its fake twin, so no real or meta storage of the model is copied.
    """
    import torch

    memo: dict = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(_fake_like(p.detach(), fake_mode, device),
                                             requires_grad=p.requires_grad)
    for b in model.buffers():
        if id(b) not in memo:
            memo[id(b)] = _fake_like(b, fake_mode, device)
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - any failure to copy is a usage problem
        raise UsageError(f"model: cannot be deep-copied ({type(exc).__name__}: {exc}); checks"
                         " work on a copy so the original is never changed") from exc


def _is_fake_limitation(exc: Any) -> bool:
    if exc is None:
        return False
    from torch._subclasses import fake_tensor as ft

    kinds = tuple(getattr(ft, n) for n in (
        "DataDependentOutputException", "DynamicOutputShapeException",
        "UnsupportedOperatorException", "UnsupportedFakeTensorException") if hasattr(ft, n))
    if isinstance(exc, kinds):
        return True
    name = type(exc).__name__
    return "DataDependent" in name or "GuardOnDataDependent" in name


def _fake_limitation_message(exc: Any) -> str:
    return (f"the step needs tensor values, which fake tensors do not have"
            f" ({type(exc).__name__}: {_first_line(exc)}); measure it on a real device instead")


def _tracker_limitation(exc: Any) -> bool:
    """MemTracker's refusal of a second call of the root module within one step."""
    cause = exc.original if isinstance(exc, ModelError) else exc
    return isinstance(cause, NotImplementedError) and "MemTracker" in str(cause)


from .errors import first_line as _first_line


# --- MemTracker -------------------------------------------------------------------------------

_TRACKER_CLASS: Any = None


class _NoHook:
    """Stands in for a gradient-hook handle on a frozen parameter."""

    def remove(self) -> None:
        pass


def _new_tracker(*, target: Any, block: int = 1) -> Any:
    """A MemTracker that also records the largest total per step phase on ``target``'s type.

    ``block`` > 1 rounds every storage up to a multiple of ``block`` bytes (the CUDA caching
    allocator's granularity) whatever the tensor's device.
    """
    global _TRACKER_CLASS
    if _TRACKER_CLASS is None:
        from torch.distributed._tools.mem_tracker import MemTracker, _ModState

        class _StepTracker(MemTracker):
            def __init__(self, target: Any, block: int) -> None:
                super().__init__()
                self.target = target
                self.block = block
                self.phase = FORWARD
                self.phase_peaks: dict = {}
                self.phase_starts: dict = {}

            def _update_snap(self, u_type: Any, winfo: Any, old_mem_consumed: Any = None,
                             old_reftype: Any = None) -> None:
                if self.block > 1 and winfo.mem_consumed % self.block:
                    winfo.mem_consumed += self.block - winfo.mem_consumed % self.block
                super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
                total = _tracker_total(self._curr_mem_snap, self.target)
                if total > self.phase_peaks.get(self.phase, 0):
                    self.phase_peaks[self.phase] = total

            def _track_module_params_and_buffers(self, module: Any,
                                                 install_grad_hooks: bool = True) -> Any:
                # MemTracker hooks every parameter's gradient; frozen parameters cannot take a
                # hook, so they get a placeholder handle and are tracked as parameters only.
                if install_grad_hooks:
                    for param in module.parameters():
                        if not param.requires_grad and \
                                self._param_to_grad_hook_handles.get(param, None) is None:
                            self._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
                return super()._track_module_params_and_buffers(module, install_grad_hooks)

            def _pre_fw_hook(self, module: Any, inputs: Any) -> None:
                try:
                    super()._pre_fw_hook(module, inputs)
                except NotImplementedError:
                    # A module called again from the top level of the same step (a GAN loss
                    # scoring fake and real with the discriminator, a loss calling the model):
                    # MemTracker takes it for the next iteration. Record it as a repeated call,
                    # as MemTracker does for a submodule used twice.
                    if module not in self.memory_tracking:
                        raise
                    stats = self.memory_tracking[module]
                    stats.input_mem = self._track_inputs_or_outputs(inputs)
                    snapshot = self.get_tracker_snapshot()
                    stats.local_peak = {dev: snap["Total"] for dev, snap in snapshot.items()}
                    stats.snapshots.setdefault(_ModState.PEAK_FW, []).append(snapshot)
                    stats.snapshots.setdefault(_ModState.PRE_FW, []).append(
                        copy.deepcopy(snapshot))

        _TRACKER_CLASS = _StepTracker
    return _TRACKER_CLASS(target, block)


def _tracker_total(snapshot: dict, target: Any) -> int:
    return sum(int(snap.get("Total", 0)) for dev, snap in snapshot.items()
               if dev.type == target.type)


@contextlib.contextmanager
def _tracking(tracker: Any) -> Iterator[None]:
    """Enter ``tracker`` (if any); its hooks, its patch of ``resize_`` and warnings restored."""
    if tracker is None:
        yield
        return
    saved_format = warnings.formatwarning  # ModTracker replaces it when it warns
    with warnings.catch_warnings():
        for message in _TRACKER_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        try:
            with tracker:
                yield
        finally:
            warnings.formatwarning = saved_format


@contextlib.contextmanager
def _root_own_ops(model: Any, tracker: Any) -> Iterator[None]:
    """Record the allocations of the root module's own forward code (ops run while no
    submodule is on the call stack): the broadcast intermediate a model builds in its own
    ``forward`` is freed before the forward ends, so the tracker's bytes alive after the
    forward miss it. The largest allocation, its op and the user's source line are left on
    ``tracker.modelcheck_root_ops`` for ``_top_modules``; no tensor is kept. Entered last
    (its mode runs first), so the user's line is the next frame out.

    Measured runs only: in the fake-tensor estimate one more dispatch mode changes what is
    estimated (the in-place bias add reads its caller's frame, and torch's fused attention and
    nested-tensor fast paths are emulated on the assumption of the estimate's own modes), so
    there the root row holds the bytes its code leaves alive, as for every other module."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .dispatch import user_source

    if tracker is None:
        yield
        return
    stack: list = []
    record = {"largest": 0, "op": "", "source": "", "total": 0}

    class RootOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            if len(stack) != 1:
                return out
            returns = func._schema.returns
            if any(r.alias_info is not None for r in returns):
                return out  # a view or an in-place op allocates nothing
            size = 0
            for t in out if isinstance(out, (tuple, list)) else (out,):
                try:
                    size += int(t.untyped_storage().nbytes())
                except (AttributeError, RuntimeError, NotImplementedError):
                    pass
            record["total"] += size
            if size > record["largest"]:
                record.update(largest=size, source=user_source(),
                              op=f"aten.{func.overloadpacket.__name__}")
            return out

    def push(mod: Any, args: Any) -> None:
        stack.append(mod)

    def pop(mod: Any, args: Any, out: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop))
        with RootOps():
            yield
    finally:
        for h in handles:
            h.remove()
        tracker.modelcheck_root_ops = record


def _tracker_phases(tracker: Any, inner: PhaseContext) -> PhaseContext:
    """Wrap ``inner`` so the tracker knows which phase its allocations belong to."""
    if tracker is None:
        return inner

    @contextlib.contextmanager
    def both(name: str) -> Iterator[None]:
        tracker.phase = name
        tracker.phase_starts[name] = _snapshot_categories(tracker._curr_mem_snap,
                                                          tracker.target)
        current = _tracker_total(tracker._curr_mem_snap, tracker.target)
        tracker.phase_peaks[name] = max(tracker.phase_peaks.get(name, 0), current)
        with inner(name):
            yield

    return both


def _categories(tracker: Any) -> dict:
    """Bytes per category in MemTracker's peak snapshot, on the tracker's device type."""
    return _snapshot_categories(tracker.get_tracker_snapshot("peak"), tracker.target)


def _snapshot_categories(snapshot: dict, target: Any) -> dict:
    """Bytes per category in one MemTracker snapshot, on ``target``'s device type."""
    out = dict.fromkeys(CATEGORIES, 0)
    for dev, values in snapshot.items():
        if dev.type != target.type:
            continue
        for key, value in values.items():
            category = _REFTYPE_CATEGORY.get(getattr(key, "name", ""))
            if category is not None:
                out[category] += int(value)
    return out


def _top_modules(tracker: Any, model: Any, limit: Optional[int] = TOP_MODULES) -> list:
    """Activation bytes left alive by each module's own forward code (children excluded)."""
    if tracker is None:
        return []
    names = {}
    for name, mod in model.named_modules():
        names.setdefault(id(mod), name or ROOT)
    children = {id(m): [id(c) for c in m.children()] for m in model.modules()}
    inclusive: dict = {}
    for mod, stats in tracker.memory_tracking.items():
        pre, post = _snapshots(stats, "PRE_FW"), _snapshots(stats, "POST_FW")
        total = 0
        for before, after in zip(pre, post):
            total += _act(after, tracker.target) - _act(before, tracker.target)
        inclusive[id(mod)] = total
    def called_below(key: int) -> list:
        # The nearest descendants that ran a forward (a ModuleList is never called itself).
        found = []
        for c in children.get(key, []):
            found.extend([c] if c in inclusive else called_below(c))
        return found

    own = []
    for key, total in inclusive.items():
        if key not in names:
            continue
        value = total - sum(inclusive[c] for c in called_below(key))
        if value > 0:
            own.append([names[key], int(value)])
    # The root's own forward code: its largest allocation counts even when it was freed before
    # the forward ended (a broadcast intermediate), and its line is named.
    root = getattr(tracker, "modelcheck_root_ops", None) or {}
    if root.get("largest", 0) > 0:
        alive = next((v for n, v in own if n == ROOT), 0)
        own = [item for item in own if item[0] != ROOT]
        at = f" at {root['source']}" if root.get("source") else ""
        own.append([f"{ROOT} ({type(model).__name__}) own ops, largest {root['op']}{at}",
                    int(max(alive, root["largest"]))])
    own.sort(key=lambda item: (-item[1], item[0]))
    return own if limit is None else own[:limit]


def _snapshots(stats: Any, state: str) -> list:
    """``stats.snapshots`` for the module state named ``state`` (a ``_ModState`` member)."""
    for key, value in stats.snapshots.items():
        if getattr(key, "name", None) == state:
            return value
    return []


def _act(snapshot: dict, target: Any) -> int:
    return sum(int(v) for dev, values in snapshot.items() if dev.type == target.type
               for k, v in values.items() if getattr(k, "name", "") == "ACT")


# --- CPU kernel workspaces -------------------------------------------------------------------
#
# Buffers that CPU kernels allocate inside themselves, below the dispatcher, so that MemTracker
# never sees them. Each rule gives, from the op's shapes and dtype alone, how far the kernel's
# own peak rises above what is alive once the op has returned (its outputs included). They
# were read off the profiler's allocator events inside each op (torch 2.x, float32, x86 with
# AVX-512, and with oneDNN capped at AVX2) and apply to CPU estimates only: CUDA kernels have
# other workspaces (cuDNN, cuFFT), which are not modelled.
#
# oneDNN convolution (``_select_conv_backend`` says Mkldnn, groups == 1). oneDNN's kernels depend
# on the instruction set it runs with (``_onednn_isa``: the CPU's, capped by ONEDNN_MAX_CPU_ISA):
# its AVX-512 kernels block channels by B = 16, its AVX2 ones by B = 8 (checked on an AVX-512
# CPU with ONEDNN_MAX_CPU_ISA=AVX2, against ONEDNN_VERBOSE's kernel names and the allocator).
# Below AVX2 (SSE4.1, other architectures) no oneDNN workspace is added. P(c) is c rounded up
# to a multiple of B; S_in/S_out the spatial sizes, K the kernel volume, b the element size.
#   forward: the result is computed in a blocked copy dst_b = N*P(Cout)*S_out*b, then reordered
#     into the output and freed. With Cin >= B, or a 1x1 kernel (jit_*_1x1, any Cin), the input
#     is first reordered too, src_b = N*P(Cin)*S_in*b, with a blocked weight
#     w_b = P(Cout)*P(Cin)*K*b (otherwise, Cin < B: the input is read as it is,
#     w_b = P(Cout)*Cin*K*b). A strided or padded 1x1 adds its reduce-to-unit-stride buffer,
#     T*P(Cin)*S_out*b + 128, alive with them. With a bias and Cout % B, the scratchpad
#     holds the bias padded to P(Cout) (plus 128), alive with them: bias_p. Peak above the
#     output: max(bias_p + src_b + w_b + dst_b - out, dst_b).
#   backward, input gradient: blocked grad_output gout_b = N*P(Cout)*S_out*b, blocked weight
#     P(Cout)*P(Cin)*K*b and blocked grad_input gin_b = N*P(Cin)*S_in*b (any Cin), alive
#     together; then the plain grad_input (gin) beside gin_b.
#   backward, weight gradient (gin alive). The kernel follows oneDNN's dispatch for plain f32
#     data (``_weight_grad_kernel``): the first kernel whose checks pass, AVX-512, AVX2, else
#     GEMM. Each books a scratchpad, allocated through torch's allocator for the call, whose
#     size depends on T = torch.get_num_threads(). Every scratchpad entry is padded by its
#     alignment (128 bytes; 4096 for page-aligned ones) and a barrier entry takes 8192 bytes
#     for one barrier (src/common/memory_tracking.hpp; the barrier size was read off the
#     allocator). With G the bias-gradient bytes:
#     - with AVX-512 only: Cin >= 16, or Cin <= 3 (a "first convolution": the input is read as
#       it is), when its padding checks pass (e.g. not a 3x3x3 kernel over a 1x1x1 input), the
#       AVX-512 kernel (src/cpu/x64/jit_avx512_common_conv_kernel.cpp): gout_b, src_b
#       (Cin >= 16) and the blocked weight gradient, plus G and its scratchpad: with nthr_mb
#       threads splitting the minibatch (its ``balance()``), (nthr_mb - 1) partial
#       weight+bias gradients and a barrier; a padded bias gradient when Cout % 16; the bias
#       reducer (cpu_reducer.cpp, ``reduce_balancer_t``): the partial bias sums of all but one
#       thread of each group.
#     - otherwise the AVX2 kernel when its padding checks pass (no depth padding in 3D, kernel
#       width < 14, ...; jit_avx2_conv_kernel_f32.cpp): 8-channel blocks,
#       n*P8(Cout)*S_out*b + n*P8(Cin)*S_in*b + P8(Cout)*P8(Cin)*K*b (Cin == 3 is read as it
#       is: n*P8(Cout)*S_out*b + P8(Cout)*3*K*b), plus G and a scratchpad of a padded bias
#       gradient (Cout % 8) and two reducers (bias; weight, K*8*8 floats a job, K*3*8 for
#       Cin == 3).
#     - otherwise im2col + GEMM (src/cpu/gemm_convolution_utils.cpp, init_conf, ncsp
#       backward_weights), which reads the plain tensors; its scratchpad: nthr * W * 4 bytes
#       (per-thread partial weight gradients; W = the weight's bytes, booked as that many
#       floats) and nthr * Cin*K*OS * b (per-thread im2col columns; OS = out_h * out_w, the depth
#       is looped over; none for a 1x1 stride-1 kernel that keeps the size), nthr = T when
#       OS / T < 256 and N > 1, else 1. Peak: the outputs beside the scratchpad.
#     (For UNet3d's 12 -> 1 output convolution on 2 threads: GEMM, 383872 bytes.)
#   channels-last input (e.g. tokens of a Swin block viewed back as an image): oneDNN works
#     in that layout, so only the weight is copied (its bytes) and reordered,
#     P(Cout)*Cin*K*b (twice in backward); a non-contiguous grad_output is first copied.
#   depthwise (groups == Cin == Cout, 2D; oneDNN's jit_uni_dw kernels): the same stages, with
#     the input always blocked and weights (and weight gradients) of P(C)*K*b; the weight
#     gradient's scratchpad (jit_uni_dw_conv_bwd_weights_kernel: balance, init_scratchpad)
#     holds, with nthr_g = min(P(C)/B, T) and nthr_mb = min(T // nthr_g, N) > 1,
#     (nthr_mb - 1) partial weight gradients P(C)*K*4 and bias gradients P(C)*4, each entry
#     padded by 128. Other grouped convolutions are not modelled.
#   transposed (``MkldnnTranspose``; value 9 of ConvBackend, unnamed by torch's binding in
#     2.13): forward, a channels-last copy of the input and the weight P(Cout)*Cin*K*b beside
#     the output, then two more output-sized tensors (peak above the output:
#     max(in + w_b + scratch, 2*out)). scratch: a strided deconvolution runs as the
#     backward-by-data of the convolution from its output to its input (brg_deconv +
#     brgconv_strided, with AVX-512 and AVX2 alike), whose scratchpad is nested in the
#     deconvolution's (128 more; jit_brgemm_deconv.cpp) and holds, for each of the
#     T = torch.get_num_threads() threads oneDNN sizes it for (jit_brgemm_conv_bwd_utils.cpp,
#     init_conf and init_scratchpad; f32, exec_base, no accumulation buffer): the brgemm
#     batch, rnd_up(gbs*40, 4096) bytes rounded to whole 40-byte elements (gbs <= K; 4120 for
#     K <= 102), the input buffer rnd_up(Cin * prod(S_in + ovf), 4096) floats (oc_block = Cin,
#     one block; per dim ovf = (k-1-p)//s + (k-1-(p-op))//s, each term >= 0), and its mask,
#     one page while the blocks are fewer than 4096; three page-aligned entries, 3*4096.
#     scratch = 3*4096 + 128 + T*(batch + in_buf + 4096), e.g. 12416 + T*106520 for
#     ConvTranspose2d(24->12, k2, s2) on 4x24x32x32. Not modelled (scratch = 0): an output
#     width that is not a multiple of the stride (exec_trans; measured: the same per-thread
#     part plus an output-sized buffer), stride 1 (oneDNN's forward brgemm convolution),
#     dilation, other dtypes. Backward: that of the convolution from grad_output to the input:
#     its forward rule above (grad_output as the source) for gin, then its weight-gradient
#     rule (the input as its grad_output; the scratchpad nested, 128 more), the bias gradient
#     reduced from grad_output, and last the plain weight gradient made beside the blocked.
# im2col convolution (``_select_conv_backend`` says Slow2d/Slow3d, chosen for tiny batches, e.g.
# one sample): a column buffer cols = N*Cin*K*S_out*b, skipped when the kernel, stride and
# dilation are all 1 and there is no padding. forward: cols beside the output. backward: the
# input gradient is made beside an N*Cin*K*S_out*b buffer (3D: even for a 1x1x1 kernel), the
# weight gradient beside cols again, with the input, weight and bias gradients alive.
# SlowTranspose2d/3d: one sample at a time through cols_t = Cout*K*S_in*b (plus, with a bias,
# an S_out*b vector of ones) in forward; cols_t beside the gradients in backward.
# Other CPU convolution backends (grouped, ...) are not modelled.
#
# Fused attention (CPU, the inference fast path; aten/src/ATen/native/transformers/attention.cpp
# native_multi_head_attention_cpu and transformer.cpp transformer_encoder_layer_forward), for
# self-attention (query, key and value one tensor) on a padded (not nested) batch. X = B*T*D*b
# (the input), S = B*H*T*T*b (attention scores), F = B*T*FF*b, R = B*T*4 (layer norm's mean or
# rstd), Mb = the mask's element count when it is not bool (copied to bool), W = B*T*T*b.
#   attention, above what was alive before: qkv 3X, then q|k|v 3X (6X); then q|k|v, the scores
#   S and, with a mask, the mask copy and the masked softmax's new S (3X + 2S + Mb; without a
#   mask the softmax is in place, 3X + S); the context goes into q's storage; then the
#   transposed context X and the projection X (5X, plus S while the weights are kept); with
#   averaged weights, their sum W beside q|k|v, the scores freed. It leaves the projection (and
#   the weights).
#   encoder layer, norm_first: the normed input X (+ 2R while made), the attention on it, then
#   the attention output and the second normed input (2X + 2R), the feed-forward's hidden F and
#   its output (3X + F). Otherwise: the attention on the input, the output normed (2X + 2R), the
#   feed-forward (2X + F), the second norm (3X + 2R). It leaves X.
# pocketfft: ``_fft_c2r`` over more than one dimension copies its input twice (the input is
# destroyed by the transform, and an intermediate complex buffer), over one dimension once;
# ``_fft_r2c``/``_fft_c2c`` of a non-contiguous input make a contiguous copy first.

_CONV_BLOCK = 16  # the channel block of oneDNN's AVX-512 kernels


def _pad16(c: int) -> int:
    return -(-int(c) // _CONV_BLOCK) * _CONV_BLOCK


# oneDNN's channel block for f32 convolutions per instruction set: 16 floats in an AVX-512
# register, 8 in an AVX2 one.
_ISA_BLOCK = {"avx512": 16, "avx2": 8}


_CPU_ISA: list = []  # the hardware's, found once


def _cpu_isa() -> str:
    """The widest instruction set among those oneDNN's f32 convolutions are modelled for that
    this CPU has: "avx512" (oneDNN's avx512_core: AVX-512 F/BW/VL/DQ), "avx2", or "".

    Read from the hardware (cpuinfo, through torch.cpu), not from
    torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY lowers without
    changing what oneDNN runs."""
    import torch

    if not _CPU_ISA:
        try:
            isa = "avx512" if torch.cpu._is_avx512_supported() else \
                "avx2" if torch.cpu._is_avx2_supported() else ""
        except Exception:  # noqa: BLE001 - an older torch: ATen's capability (env can lower it)
            capability = str(torch.backends.cpu.get_cpu_capability()).upper()
            isa = "avx512" if capability.startswith("AVX512") else \
                "avx2" if capability == "AVX2" else ""
        _CPU_ISA.append(isa)
    return _CPU_ISA[0]


def _onednn_isa() -> str:
    """The instruction set oneDNN's f32 convolution kernels use here: "avx512", "avx2", or ""
    (an older x86 CPU, another architecture, or a limit below AVX2: not modelled).

    oneDNN takes the widest the CPU has, capped by ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA;
    src/cpu/x64/cpu_isa_traits.cpp, get_max_cpu_isa), which it reads once, at its first use:
    this assumes the variable has not been changed in this process since. A value it does not
    know leaves the CPU's own."""
    import os

    isa = _cpu_isa()
    limit = ""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if os.environ.get(name):
            limit = os.environ[name].strip().upper()
            break
    if not isa or limit in ("", "ALL", "DEFAULT") or limit.startswith(("AVX512", "AVX10")):
        return isa
    if limit.startswith("AVX2"):  # AVX2, AVX2_VNNI, AVX2_VNNI_2
        return "avx2"
    if limit in ("SSE41", "AVX"):
        return ""
    return isa


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _channels_last(t: Any) -> bool:
    """Laid out channels-last (NHWC/NDHWC) rather than contiguous: oneDNN then computes in
    that layout directly, with no blocked copies of the activations."""
    import torch

    if t.is_contiguous():
        return False
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt)


def _conv_backend(inp: Any, weight: Any, bias: Any, stride: Any, padding: Any,
                  dilation: Any, transposed: bool, output_padding: Any, groups: int) -> str:
    import torch

    try:
        backend = torch._C._select_conv_backend(inp, weight, bias, list(stride), list(padding),
                                                list(dilation), bool(transposed),
                                                list(output_padding), int(groups), None)
    except Exception:  # noqa: BLE001 - an older torch without it: no workspace is modelled
        return ""
    name = str(backend).rpartition(".")[2]
    if name == "???":
        # a value the Python binding does not name: MkldnnTranspose is not bound in some
        # releases (2.13 among them) and prints as ``???``; ConvUtils.h's ConvBackend puts it
        # between Mkldnn and MkldnnEmpty
        members = torch._C._ConvBackend.__members__
        mkldnn, empty = members.get("Mkldnn"), members.get("MkldnnEmpty")
        if mkldnn is not None and empty is not None \
                and int(backend) == int(mkldnn) + 1 == int(empty) - 1:
            return "MkldnnTranspose"
    return name


def _onednn_depthwise(inp: Any, weight: Any, groups: int, transposed: bool) -> bool:
    """A 2D depthwise convolution (groups == Cin == Cout, plain layout): oneDNN's jit_uni_dw
    kernels take it."""
    return (int(groups) > 1 and not transposed and inp.dim() == 4 and not _channels_last(inp)
            and int(inp.shape[1]) == int(groups) == int(weight.shape[0])
            and int(weight.shape[1]) == 1)


def _conv_forward_workspace(args: tuple, out: Any) -> int:
    inp, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    depthwise = _onednn_depthwise(inp, weight, groups, transposed) or (
        # a 1D depthwise convolution runs as a 2D one of height 1 (same buffers)
        not transposed and inp.dim() == 3 and int(groups) > 1
        and int(groups) == int(inp.shape[1]) == int(weight.shape[0]))
    if (groups != 1 and not depthwise) or inp.dim() < 3 or not inp.is_floating_point():
        return 0
    backend = _conv_backend(inp, weight, bias, stride, padding, dilation, transposed,
                            output_padding, groups)
    b, n = inp.element_size(), int(inp.shape[0])
    s_in, s_out, k = _numel(inp.shape[2:]), _numel(out.shape[2:]), _numel(weight.shape[2:])
    out_bytes = out.numel() * out.element_size()
    block = _ISA_BLOCK.get(_onednn_isa(), 0)
    if backend in ("Mkldnn", "MkldnnTranspose") and not block:
        return 0  # oneDNN's kernels below AVX2 (or off x86) are not modelled

    def pad(c: int) -> int:
        return _cdiv(c, block) * block

    if depthwise:
        if backend != "Mkldnn":
            return 0
        # jit_uni_dw: the input always blocked, the weight P(C)*K
        c = int(inp.shape[1])
        src_b, w_b, dst_b = n * pad(c) * s_in * b, pad(c) * k * b, n * pad(c) * s_out * b
        bias_p = pad(c) * b + _SCRATCHPAD_PAD if bias is not None and c % block else 0
        return max(bias_p + src_b + w_b + dst_b - out_bytes, dst_b)
    if backend == "Mkldnn" and _channels_last(inp):
        cin, cout = int(inp.shape[1]), int(weight.shape[0])
        return weight.numel() * b + pad(cout) * cin * k * b
    if backend == "Mkldnn" and inp.dim() == 3 and int(inp.shape[1]) == 1 and n > 1 and b == 4 \
            and (int(padding[-1]) >= k or int(padding[-1]) > 28):
        # a one-channel 1D convolution padded beyond what the blocked kernels take (a raw
        # audio front end): oneDNN's gemm convolution, per-thread columns K*OS (one channel),
        # or a copy of the output when that is larger
        return max(_threads() * k * s_out * b + _SCRATCHPAD_PAD, out_bytes)
    if backend == "Mkldnn":
        cin, cout = int(inp.shape[1]), int(weight.shape[0])
        # the 1x1 kernels (jit_*_1x1) block the input for any Cin
        blocked = cin >= block or k == 1
        src_b = n * pad(cin) * s_in * b if blocked else 0
        w_b = pad(cout) * (pad(cin) if blocked else cin) * k * b
        dst_b = n * pad(cout) * s_out * b
        # a bias zero-padded to the block, booked in the kernel's scratchpad
        bias_p = pad(cout) * b + _SCRATCHPAD_PAD if bias is not None and cout % block else 0
        if k == 1 and (any(int(v) != 1 for v in stride) or any(int(v) for v in padding)):
            # a strided (or padded) 1x1: the reduce-to-unit-stride copy of the input, per
            # thread P(Cin)*S_out (rtus_prepare_space_info: nb_reduce*ic_block*is)
            bias_p += _threads() * pad(cin) * s_out * b + _SCRATCHPAD_PAD
        return max(bias_p + src_b + w_b + dst_b - out_bytes, dst_b)
    if backend == "MkldnnTranspose":
        # a channels-last copy of the input and the weight in blocks of output channels beside
        # the output and the brgemm scratchpad, then two more output-sized tensors (the
        # result's reorder and copy).
        cout = int(out.shape[1])
        w_b = pad(cout) * int(inp.shape[1]) * k * b
        scratch = _deconv_strided_scratchpad(inp, weight, out, stride, padding, dilation,
                                             output_padding)
        return max(inp.numel() * b + w_b + scratch, 2 * out_bytes)
    if backend in ("Slow2d", "Slow3d"):
        plain = _im2col_free(weight, stride, padding, dilation)
        return 0 if plain else n * int(inp.shape[1]) * k * s_out * b
    if backend in ("SlowTranspose2d", "SlowTranspose3d"):
        cols_t = int(out.shape[1]) * k * s_in * b
        return cols_t + (s_out * b if bias is not None else 0)
    return 0


_BRGEMM_BATCH_ELEMENT = 40  # sizeof(brgemm_batch_element_t) on x86-64


def _deconv_strided_scratchpad(inp: Any, weight: Any, out: Any, stride: Any, padding: Any,
                               dilation: Any, output_padding: Any) -> int:
    """The scratchpad of oneDNN's strided f32 deconvolution (brg_deconv over
    brgconv_strided; see the rules above), or 0 where it is not modelled."""
    stride, padding = [int(v) for v in stride], [int(v) for v in padding]
    dilation, output_padding = [int(v) for v in dilation], [int(v) for v in output_padding]
    ks = [int(v) for v in weight.shape[2:]]
    if (inp.element_size() != 4 or all(s == 1 for s in stride) or any(d != 1 for d in dilation)
            or int(out.shape[-1]) % stride[-1]):
        return 0
    # brgemm_convolution_bwd_utils::init_conf: the input buffer covers the deconvolution's
    # input plus the rows the kernel overflows into (l_ovf/r_ovf and their h, d kin), Cin
    # channels in one block
    spatial = 1
    for i, k, s, p, op in zip(inp.shape[2:], ks, stride, padding, output_padding):
        lo = max(0, k - 1 - p) // s
        hi = max(0, k - 1 - (p - op)) // s
        spatial *= int(i) + lo + hi
    in_buf = _cdiv(spatial * int(inp.shape[1]), _PAGE) * _PAGE * 4
    gbs = _numel(ks)  # jcp.gemm_batch_size <= the kernel volume (exact while <= 102)
    batch = _cdiv(_cdiv(gbs * _BRGEMM_BATCH_ELEMENT, _PAGE) * _PAGE,
                  _BRGEMM_BATCH_ELEMENT) * _BRGEMM_BATCH_ELEMENT
    mask = _PAGE  # rnd_up(nb_id*nb_ih*nb_iw, 4096) bytes: one page below 4096 blocks
    return 3 * _PAGE + _SCRATCHPAD_PAD + _threads() * (batch + in_buf + mask)


def _im2col_free(weight: Any, stride: Any, padding: Any, dilation: Any) -> bool:
    """A 1x1 kernel, stride 1, no padding or dilation: slow_conv2d/3d skip the column buffer."""
    return all(int(v) == 1 for v in list(weight.shape[2:]) + list(stride) + list(dilation)) \
        and all(int(v) == 0 for v in padding)


def _conv_backward_workspace(args: tuple, outs: Any) -> int:
    gout, inp, weight = args[:3]
    stride, padding, dilation, transposed, output_padding, groups, mask = args[4:11]
    depthwise = _onednn_depthwise(inp, weight, groups, transposed)
    if (groups != 1 and not depthwise) or inp.dim() < 3 or not inp.is_floating_point():
        return 0
    backend = _conv_backend(inp, weight, None, stride, padding, dilation, transposed,
                            output_padding, groups)
    b, n = inp.element_size(), int(inp.shape[0])
    s_in, s_out, k = _numel(inp.shape[2:]), _numel(gout.shape[2:]), _numel(weight.shape[2:])
    cin, cout = int(inp.shape[1]), int(gout.shape[1])
    done = sum(t.numel() * t.element_size() for t in outs if _is_tensor(t))
    gin = inp.numel() * b if mask[0] else 0
    block = _ISA_BLOCK.get(_onednn_isa(), 0)
    if backend in ("Mkldnn", "MkldnnTranspose") and not block:
        return 0  # oneDNN's kernels below AVX2 (or off x86) are not modelled

    def pad(c: int) -> int:
        return _cdiv(c, block) * block

    gin_b = n * pad(cin) * s_in * b
    blocked = cin >= block
    src_b = n * pad(cin) * s_in * b if blocked else 0
    if depthwise:
        if backend != "Mkldnn":
            return 0
        # jit_uni_dw: the same stages as a dense convolution, with the input always blocked,
        # P(C)*K weights (and weight gradients), and its own minibatch-reduction scratchpad
        gout_b, w_b = n * pad(cout) * s_out * b, pad(cin) * k * b
        stage1 = max(gout_b + w_b + gin_b, gin_b + gin) if mask[0] else 0
        stage2 = gin + gout_b + gin_b + w_b + _dw_weight_grad_scratchpad(
            n, cin, k, block, bool(mask[2])) + (cout * b if mask[2] else 0) if mask[1] else 0
        if not gout.is_contiguous():
            stage1, stage2 = (x + gout.numel() * b if x else 0 for x in (stage1, stage2))
        return max(stage1, stage2) - done
    if backend == "Mkldnn" and _channels_last(inp):
        return weight.numel() * b + 2 * pad(cout) * cin * k * b
    if backend == "Mkldnn":
        gout_b = n * pad(cout) * s_out * b
        stage1 = max(gout_b + pad(cout) * pad(cin) * k * b + gin_b, gin_b + gin) \
            if mask[0] else 0
        if mask[0] and any(int(st) > 1 for st in stride):
            # a strided input gradient is made in two unblocked input-sized buffers before
            # the plain one (measured alike on AVX-512 and AVX2, any channel count)
            stage1 = max(stage1, 3 * gin)
        gw_b = pad(cout) * (pad(cin) if blocked else cin) * k * b
        stage2 = gin + gout_b + src_b + gw_b if mask[1] else 0
        kernel = _weight_grad_kernel(inp, weight, gout, stride, padding, dilation) \
            if mask[1] and b == 4 else ""
        if kernel == "avx2":  # 8-channel blocks; the input copied too, unless Cin == 3 (flat)
            flat = cin == 3
            stage2 = gin + (n * _pad8(cout) * s_out + (0 if flat else n * _pad8(cin) * s_in)
                            + _pad8(cout) * (cin if flat else _pad8(cin)) * k) * b
        if kernel in ("avx512", "avx2") and k == 1 and n > 1 and cin <= 8 \
                and _onednn_isa() == "avx512" and all(int(st) == 1 for st in stride) \
                and not any(int(p) for p in padding):
            # a pointwise convolution from few channels where oneDNN runs AVX-512: the input
            # is copied once more, Cin padded to 16 (Cin <= 3) or 8, for a batch of more than
            # one sample (measured at 1, 2 and 4 threads, not read off oneDNN's source; absent
            # with oneDNN capped at AVX2)
            stage2 += n * (_CONV_BLOCK if kernel == "avx512" else 8) * s_in * b
        if kernel:
            scratch = _weight_grad_scratchpad(kernel, inp, weight, gout, stride, padding,
                                              bool(mask[2]))
            # the bias gradient is made while the scratchpad is alive
            stage2 = done + scratch if kernel == "gemm" else \
                stage2 + scratch + (cout * b if mask[2] else 0)
        if not gout.is_contiguous():  # a contiguous copy of grad_output is made first
            stage1, stage2 = (x + gout.numel() * b if x else 0 for x in (stage1, stage2))
    elif backend == "MkldnnTranspose":
        # oneDNN runs the backward of the convolution from grad_output to the input: its forward
        # (grad_output as the source, Cout channels, blocked when Cout >= B; the weight in
        # blocks; a blocked grad_input) for the input gradient, and its weight gradient (the
        # input as grad_output) for the weight, whose scratchpad is nested in the
        # deconvolution's (one more alignment, 128 bytes); the bias gradient is reduced from
        # grad_output. Last, the plain weight gradient is made beside the blocked one.
        src_c = n * pad(cout) * s_out * b if cout >= block else 0
        w_c = pad(cin) * (pad(cout) if cout >= block else cout) * k * b
        stage1 = max(src_c + w_c + gin_b, gin_b + gin) if mask[0] else 0
        stage2 = 0
        if mask[1] and _is_tensor(outs[1]):
            gw = outs[1].numel() * outs[1].element_size()
            conv = (inp, gout, weight, None, stride, padding, dilation, False,
                    [0] * (inp.dim() - 2), groups, [False, True, False])
            kernel = _weight_grad_kernel(gout, weight, inp, stride, padding, dilation) \
                if b == 4 else ""
            nested = _SCRATCHPAD_PAD if kernel and _weight_grad_scratchpad(
                kernel, gout, weight, inp, stride, padding, False) else 0
            gb = cout * b if mask[2] else 0
            stage2 = gin + gw + _conv_backward_workspace(conv, (None, outs[1], None)) \
                + nested + gb
            if kernel in ("avx512", "avx2"):  # blocked as the weight-gradient kernel blocks
                kb = 16 if kernel == "avx512" else 8
                flat = cout < 16 if kernel == "avx512" else cout == 3
                gw_b = _cdiv(cin, kb) * kb * (cout if flat else _cdiv(cout, kb) * kb) * k * b
                stage2 = max(stage2, gin + gw_b + gw + 2 * gb)
    elif backend in ("Slow2d", "Slow3d"):
        cols = n * cin * k * s_out * b
        plain = _im2col_free(weight, stride, padding, dilation)
        stage1 = gin + (0 if plain and backend == "Slow2d" else cols) if mask[0] else 0
        stage2 = done + (0 if plain else cols) if mask[1] else 0
    elif backend in ("SlowTranspose2d", "SlowTranspose3d"):
        cols_t = cout * k * s_in * b
        stage1 = gin + cols_t if mask[0] else 0
        stage2 = done + cols_t if mask[1] else 0
    else:
        return 0
    return max(stage1, stage2) - done


_SCRATCHPAD_PAD = 128  # oneDNN pads each scratchpad entry by its alignment (at least 128)
_PAGE = 4096


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


def _dw_weight_grad_scratchpad(n: int, c: int, k: int, block: int, bias: bool) -> int:
    """The scratchpad of oneDNN's f32 depthwise weight-gradient kernel
    (jit_uni_dw_conv_bwd_weights_kernel: balance() and init_scratchpad()). The channel blocks
    nb_ch = P(C)/B go to nthr_g = min(nb_ch, T) threads, the minibatch to
    nthr_mb = min(max(1, T // nthr_g), N); with nthr_mb > 1, the partial weight gradients of
    all but one minibatch thread, (nthr_mb - 1)*P(C)*K floats, and the partial bias gradients,
    (nthr_mb - 1)*P(C) floats (the kernel pads its group count to the block). Each entry
    takes its alignment (128 bytes) more."""
    import torch

    threads = max(1, torch.get_num_threads())
    nb_ch = _cdiv(c, block)
    nthr_mb = min(max(1, threads // min(nb_ch, threads)), int(n))
    if nthr_mb == 1:
        return 0
    total = (nthr_mb - 1) * nb_ch * block * k * 4 + _SCRATCHPAD_PAD
    if bias:
        total += (nthr_mb - 1) * nb_ch * block * 4 + _SCRATCHPAD_PAD
    return total


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _pad8(c: int) -> int:
    return _cdiv(c, 8) * 8


def _conv_geometry(inp: Any, weight: Any, gout: Any, stride: Any, padding: Any) -> dict:
    """oneDNN's view of a 1D/2D/3D convolution: depth/height are 1 where absent."""
    def three(v: Any, fill: int) -> list:
        v = [int(x) for x in v]
        return [fill] * (3 - len(v)) + v

    ins, outs, ks = three(inp.shape[2:], 1), three(gout.shape[2:], 1), three(weight.shape[2:], 1)
    strides, pads = three(stride, 1), three(padding, 0)
    ends = [(o - 1) * s + k - i - p for o, s, k, i, p in zip(outs, strides, ks, ins, pads)]
    return {"dims": inp.dim() - 2, "in": ins, "out": outs, "k": ks, "stride": strides,
            "pad": pads, "end": ends}


def _weight_grad_kernel(inp: Any, weight: Any, gout: Any, stride: Any, padding: Any,
                        dilation: Any) -> str:
    """The oneDNN kernel that computes a plain f32 weight gradient (groups 1), the first whose
    checks pass: "avx512" (jit_avx512_common_conv_bwd_weights_kernel_f32::init_conf: Cin >= 16,
    or Cin <= 3 as a first convolution; its padding checks), "avx2"
    (jit_avx2_conv_bwd_weights_kernel_f32::init_conf: its padding checks, no depth padding),
    else "gemm" (gemm_convolution_bwd_weights_t); "" where unsure (dilation)."""
    cin = int(inp.shape[1])
    isa = _onednn_isa()
    if any(int(d) != 1 for d in dilation) or not isa:
        return ""
    g = _conv_geometry(inp, weight, gout, stride, padding)
    (kd, kh, kw), (pd, ph, pw) = g["k"], g["pad"]
    id_, ih = g["in"][0], g["in"][1]
    ed, eh, ew = (max(0, e) for e in g["end"])
    avx512 = (kw <= 14 and pw < kw and ew < kw and pw <= 28 and ew <= 28
              and ph <= kh // 2 and eh <= kh // 2 and pd < kd and ed < kd
              and (pd == 0 or kd < id_ + pd))
    if avx512 and (cin >= _CONV_BLOCK or cin <= 3) and isa == "avx512":
        return "avx512"
    avx2 = (kw < 14 and pw < kw and ew < kw and ph < kh and eh < kh and kh <= ph + ih
            and kh <= ih and pd == 0 and ed == 0 and kd <= id_)
    return "avx2" if avx2 else "gemm"


def _barriers(n: int) -> int:
    """A scratchpad entry of ``n`` simple_barrier contexts: observed 8192 bytes for one (one
    page plus its page alignment)."""
    return n * _PAGE + _PAGE


def _reduce_balance(nthr: int, job: int, njobs: int, red: int, max_buf: int) -> tuple:
    """reduce_balancer_t::balance() (src/cpu/x64/cpu_reducer.cpp), lock-free:
    (groups, threads per group, jobs per group)."""
    min_per = max(1, njobs // nthr)
    max_per = max(1, max_buf // (nthr * job))
    groups = min(njobs // min_per, nthr)
    per = min(nthr // groups, red)
    ub = _cdiv(njobs, groups)
    best = njobs * job * red
    for c in range(min_per, njobs):
        cg = min(njobs // c, nthr)
        cp = min(nthr // cg, red)
        cub = _cdiv(njobs, cg)
        if cp > 1 and cub > max_per:
            continue
        cost = job * cub * (_cdiv(red, cp) + (cp != 1))
        if cost < best:
            groups, per, ub, best = cg, cp, cub, cost
    return groups, per, ub


def _reducer_scratchpad(nthr: int, job: int, njobs: int, red: int, max_buf: int) -> int:
    """cpu_reducer_t::conf_t::init_scratchpad: partial sums of all but each group's first
    thread (page-aligned), and one barrier per group."""
    groups, per, ub = _reduce_balance(nthr, job, njobs, red, max_buf)
    if per == 1:
        return 0
    return groups * (per - 1) * ub * job * 4 + _PAGE + _barriers(groups)


def _avx512_balance(g: dict, mb: int, nb_ic: int, ic_block: int, nb_oc: int,
                    nthreads: int) -> tuple:
    """jit_avx512_common_conv_bwd_weights_kernel_f32::balance (groups 1): (nthr, nthr_mb)."""
    (id_, ih, iw), (od, oh, ow), (kd, kh, kw) = g["in"], g["out"], g["k"]
    sd, sh, sw = g["stride"]
    two_d = g["dims"] == 2 and oh > 9  # harness_2d_reduction (min_oh_reduce = 9)
    ih_r, oh_r = (ih, oh) if two_d else (1, 1)
    ih_n, oh_n = (1, 1) if two_d else (ih, oh)
    nthr_oh_reduce = max(1, oh_r // 9)

    def mem(n_mb: int, n_oc: int, n_ic: int) -> int:
        return (_cdiv(mb * ih_r, n_mb) * _cdiv(nb_ic, n_ic) * ic_block * ih_n * iw * id_
                // sd // sh // sw
                + _cdiv(mb * oh_r, n_mb) * _cdiv(nb_oc, n_oc) * 16 * oh_n * ow * od
                + 8 * _cdiv(nb_oc, n_oc) * _cdiv(nb_ic, n_ic) * kh * kw * kd * ic_block * 16)

    def comp(n_mb: int, n_oc: int, n_ic: int) -> int:
        return _cdiv(mb * oh_r, n_mb) * _cdiv(nb_oc, n_oc) * _cdiv(nb_ic, n_ic)

    mb_max = min(nthreads, mb * od * nthr_oh_reduce)
    grid = []
    for n_mb in range(1, mb_max + 1):
        par = nthreads // n_mb
        for n_oc in range(1, min(par, nb_oc) + 1):
            grid.append((n_mb, n_oc, min(par // n_oc, nb_ic)))
    best = (1, 1, 1)
    best_mem = mem(*best)
    for cfg in grid:
        if mem(*cfg) <= best_mem:
            best, best_mem = cfg, mem(*cfg)
    best_comp = comp(*best)
    for cfg in grid:
        c = comp(*cfg)
        if (c <= best_comp and mem(*cfg) < 1.1 * best_mem) or 4 * c <= 3 * best_comp:
            best, best_comp = cfg, c
    n_mb, n_oc, n_ic = best
    if nthreads // 2 < n_mb < nthreads:
        n_mb = min(mb * od * nthr_oh_reduce, nthreads)
    return n_mb * n_oc * n_ic, n_mb


def _weight_grad_scratchpad(kernel: str, inp: Any, weight: Any, gout: Any, stride: Any,
                            padding: Any, bias: bool) -> int:
    """Bytes of the scratchpad of oneDNN's f32 weight-gradient kernel (see the rules above)."""
    import torch

    threads = max(1, torch.get_num_threads())
    g = _conv_geometry(inp, weight, gout, stride, padding)
    n, cin, cout = int(inp.shape[0]), int(inp.shape[1]), int(gout.shape[1])
    ks = _numel(weight.shape[2:])
    if kernel == "gemm":
        return _gemm_weight_grad_scratchpad(inp, weight, gout, stride, threads)
    if kernel == "avx2":
        # Cin == 3 is read flat: one block of 3 input channels
        ic_block, nb_ic = (3, 1) if cin == 3 else (8, _pad8(cin) // 8)
        nb_oc = _pad8(cout) // 8
        total = _pad8(cout) * 4 + _SCRATCHPAD_PAD if bias and cout % 8 else 0
        if bias:
            total += _reducer_scratchpad(threads, 8, nb_oc, n, 1 << 21)
        return total + _reducer_scratchpad(threads, ks * ic_block * 8, nb_ic * nb_oc,
                                           n * g["out"][0], 1 << 21)
    first = cin < _CONV_BLOCK
    ic_block = cin if first else _CONV_BLOCK
    nb_ic = 1 if first else _pad16(cin) // _CONV_BLOCK
    nb_oc = _pad16(cout) // _CONV_BLOCK
    nthr, nthr_mb = _avx512_balance(g, n, nb_ic, ic_block, nb_oc, threads)
    total = 0
    if nthr_mb > 1:  # partial weight and bias gradients of all but the first minibatch thread
        wei = _pad16(cout) * nb_ic * ic_block * ks + _pad16(cout)
        total += (nthr_mb - 1) * wei * 4 + _SCRATCHPAD_PAD + _barriers(1)
    if bias and cout % _CONV_BLOCK:
        total += _pad16(cout) * 4 + _SCRATCHPAD_PAD
    if bias:
        total += _reducer_scratchpad(nthr, _CONV_BLOCK, nb_oc, n, nthr * 3 * 5 * 5 * 16 * 16)
    return total


def _gemm_weight_grad_scratchpad(inp: Any, weight: Any, gout: Any, stride: Any,
                                 threads: int) -> int:
    """gemm_convolution_utils.cpp, init_conf, the ``!jcp.is_nspc && is_bwd_w`` branch (f32)."""
    n, cin = int(inp.shape[0]), int(inp.shape[1])
    outs = [int(d) for d in gout.shape[2:]]
    os_ = outs[-1] * (outs[-2] if len(outs) >= 2 else 1)
    ks = _numel(weight.shape[2:])
    w_bytes = weight.numel() * 4
    same = list(inp.shape[2:]) == list(gout.shape[2:]) and ks == 1 \
        and all(int(s) == 1 for s in stride)
    im2col = 0 if same else cin * ks * os_
    limit = min(1 << 30, 15 * threads * (inp.numel() * 4 + w_bytes + gout.numel() * 4))
    mem_ok = 4 * threads * w_bytes + 4 * threads * cin * ks * 16 < limit
    nthr = threads if mem_ok and os_ // threads < 256 and n != 1 else 1
    reduction = nthr * w_bytes * 4  # booked as nthr * weights_d.size() floats
    cols = nthr * im2col
    available = limit - (reduction + _SCRATCHPAD_PAD)
    if im2col and available < cols * 4:  # too big: the columns are made os_block at a time
        max_os_block = available // (4 * nthr * (im2col // os_))
        os_block = max(16, int(max_os_block * 0.05))
        cols = nthr * cin * ks * os_block
    return reduction + _SCRATCHPAD_PAD + (cols * 4 + _SCRATCHPAD_PAD if cols else 0)


def _attention_peak(x: Any, heads: int, mask: Any, need_weights: bool = False,
                    average: bool = True) -> tuple:
    """Peak of native_multi_head_attention_cpu above what was alive before it, and the bytes it
    leaves (see the rules above): (peak, left)."""
    b = x.element_size()
    n, t = int(x.shape[0]), int(x.shape[1])
    xb = x.numel() * b
    scores = n * heads * t * t * b
    if mask is not None:
        copy = mask.numel() if mask.dtype != _bool_dtype() else 0
        softmax = 3 * xb + 2 * scores + copy
    else:
        softmax = 3 * xb + scores
    kept = scores if need_weights else 0
    peak = max(6 * xb, softmax, 5 * xb + kept)
    if need_weights and average:
        weights = n * t * t * b
        peak = max(peak, 4 * xb + scores + weights)
        return peak, xb + weights
    return peak, xb + kept


def _bool_dtype() -> Any:
    import torch

    return torch.bool


def _attention_workspace(name: str, args: tuple) -> int:
    """Bytes the fused CPU attention kernels hold above what is alive after they return."""
    if name == "_native_multi_head_attention":
        query, key, value, _embed, heads = args[:5]
        mask, need_weights, average = args[9], bool(args[10]), bool(args[11])
        if not (query is key is value) or query.dim() != 3 or query.is_nested:
            return 0
        peak, left = _attention_peak(query, int(heads), mask, need_weights, average)
        return peak - left
    # _transformer_encoder_layer_fwd
    src, heads, norm_first, mask = args[0], int(args[2]), bool(args[8]), args[18]
    if src.dim() != 3 or src.is_nested:
        return 0
    b = src.element_size()
    xb = src.numel() * b
    n, t = int(src.shape[0]), int(src.shape[1])
    rstd = n * t * 4
    hidden = n * t * int(args[14].shape[0]) * b
    attn, _left = _attention_peak(src, heads, mask)
    if norm_first:
        peak = max(xb + 2 * rstd, xb + attn, 2 * xb + 2 * rstd, 3 * xb + hidden)
    else:
        peak = max(attn, 2 * xb + 2 * rstd, 2 * xb + hidden, 3 * xb + 2 * rstd)
    return peak - xb


def _fft_workspace(name: str, args: tuple) -> int:
    inp, dim = args[0], args[1]
    size = inp.numel() * inp.element_size()
    if name == "_fft_c2r":
        return size * (2 if len(dim) > 1 else 1)
    return 0 if inp.is_contiguous() else size


def _kernel_workspace(func: Any, args: tuple, out: Any) -> int:
    """Bytes a CPU kernel holds inside itself above what is alive after it returns."""
    name = func.overloadpacket.__name__
    if name == "convolution":
        return _conv_forward_workspace(args, out)
    if name == "convolution_backward":
        return _conv_backward_workspace(args, out)
    if name in ("_fft_r2c", "_fft_c2r", "_fft_c2c"):
        return _fft_workspace(name, args)
    if name in ("_native_multi_head_attention", "_transformer_encoder_layer_fwd"):
        return _attention_workspace(name, args)
    if name in ("mkldnn_rnn_layer", "mkldnn_rnn_layer_backward"):
        return _onednn_lstm_scratch(name, args)
    if name == "native_batch_norm_backward":
        return _batch_norm_backward_workspace(args)
    if name in ("mse_loss", "smooth_l1_loss", "huber_loss"):
        return _loss_temporary(args)
    if name == "binary_cross_entropy_with_logits":
        return 2 * _loss_temporary(args[:2] + args[4:5])
    return 0


def _loss_temporary(args: tuple) -> int:
    """CPU ``mse_loss``/``smooth_l1_loss``: one more elementwise loss while reducing, above
    the full-size storage the result keeps (``_held_loss``); ``huber_loss`` the same, keeping
    nothing; ``(input, target, reduction)``.
    ``binary_cross_entropy_with_logits`` holds two (its ``log_sigmoid`` and ``1 - target``)
    before reducing. Measured, torch 2.13."""
    import torch

    if len(args) > 2 and args[2] == 0:
        return 0
    shape = torch.broadcast_shapes(tuple(args[0].shape), tuple(args[1].shape))
    return _numel(shape) * args[0].element_size()


def _batch_norm_backward_workspace(args: tuple) -> int:
    """The CPU batch-norm backward makes its input gradient twice when the input and the
    output gradient are contiguous in one memory format (``empty_like``, then again in its
    all-contiguous branch): one input-sized buffer more, for a moment. It is the peak in
    channels-last networks, whose convolutions make no blocked copies."""
    import torch

    gout, inp, mask = args[0], args[1], args[9]
    if not mask or not mask[0] or inp.dim() < 2 or inp.device.type not in ("cpu", "meta"):
        return 0
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        try:
            if inp.is_contiguous(memory_format=fmt) and gout.is_contiguous(memory_format=fmt):
                return inp.numel() * inp.element_size()
        except RuntimeError:  # a format for another rank
            continue
    return 0


def _onednn_lstm_scratch(name: str, args: tuple) -> int:
    """What one oneDNN LSTM layer holds while it runs, above its outputs: the weights reordered
    to its layout (I and H rows of ld(4H) floats), the gates of every step, T*B*ld(4H), and one
    step's hidden state, B*ld(H), plus about four pages of smaller buffers; the backward holds
    the input weights' gradient in that layout too. Fitted to within about 25 KB on 54 shapes
    (T, B in 1..20, H in 8..128, I = 4 and 200); float32 LSTMs only."""
    inp, weight = args[0], args[1]
    mode = args[9] if name == "mkldnn_rnn_layer" else args[14]
    hidden = args[10] if name == "mkldnn_rnn_layer" else args[15]
    if int(mode) != 2 or str(inp.dtype) != "torch.float32" or inp.dim() != 3:
        return 0
    # (T, B, I) whatever the batch_first flag says, as for the workspace
    t, b, h, i = int(inp.shape[0]), int(inp.shape[1]), int(hidden), int(weight.shape[1])
    gates = _good_ld(4 * h) * 4
    held = (i + h) * gates + t * b * gates + b * _good_ld(h) * 4 + 4 * _PAGE
    return held + i * gates if name == "mkldnn_rnn_layer_backward" else held


def _good_ld(d: int) -> int:
    """oneDNN's leading dimension for RNN matrices of floats: ``d`` rounded up to 16, plus 16
    where that is a multiple of 256 (no 4K aliasing)."""
    d = _cdiv(d, 16) * 16
    return d + 16 if d % 256 == 0 else d


def _all_args(func: Any, args: tuple, kwargs: Any) -> tuple:
    """The op's arguments in schema order, keyword and default ones included."""
    full = list(args)
    for arg in func._schema.arguments[len(args):]:
        if kwargs and arg.name in kwargs:
            full.append(kwargs[arg.name])
        elif arg.has_default_value():
            full.append(arg.default_value)
        else:
            full.append(None)
    return tuple(full)


def _cuda_attention_workspace(func: Any, args: tuple, out: Any) -> int:
    """The fused encoder layer and multi-head attention on CUDA: the CPU rules above.

    Both devices run the same C++ for these ops (transformer.cpp, attention.cpp) except the
    attention core, where CUDA calls its SDPA kernels instead of multiplying out the T x T
    scores; the CPU rule therefore errs high by at most the scores. Seen on an H200: an eval
    encoder (4 layers, width 256, 8 heads, batch 16, sequence 128) estimated at 1.066x the
    caching allocator's peak this way, 1.198x on the unfused path.
    """
    name = func.overloadpacket.__name__
    if name in ("_native_multi_head_attention", "_transformer_encoder_layer_fwd"):
        return _attention_workspace(name, args)
    return _mse_loss_temporary(func, args)


def _onednn_lstm_workspace(args: tuple) -> Optional[int]:
    """Bytes of the workspace ``aten.mkldnn_rnn_layer`` returns in training (one layer, one
    direction; kept for the backward), which its fake kernel returns empty; None where not
    modelled (not float32, or not an LSTM).

    oneDNN (cpu/rnn/rnn_utils) lays it out as seven page-aligned parts: the gates, T*B*ld(4H);
    the hidden states, T*B*ld(H); then (T+1)*B per part for the two layers of states the cell
    reads and writes, 2*(T+1)*B*ld(max(I, H)) for the layer states, 2*(T+1)*B*H for the cell
    states, and as much again for the gradients of both (the layer-state gradient twice);
    floats throughout, ld(d) rounds d up to 16 and adds 16 where that is a multiple of 256.
    Checked byte for byte on 240 shapes (T, B, H in 1..128, I = 4 and 200).
    """
    inp, hidden, mode, train = args[0], args[10], args[9], args[15]
    if not train or int(mode) != 2 or str(inp.dtype) != "torch.float32" or inp.dim() != 3:
        return None
    # the input arrives as (T, B, I) whatever its batch_first flag says (torch transposes first)
    t, b, h, i = int(inp.shape[0]), int(inp.shape[1]), int(hidden), int(inp.shape[2])
    ld = _good_ld
    states = 2 * (t + 1) * b * 4
    parts = [t * b * ld(4 * h) * 4, t * b * ld(h) * 4, states * ld(max(i, h)), states * h,
             states * ld(max(i, h)), states * ld(max(i, h)), states * h]
    offset = 0
    for size in parts:
        offset = _cdiv(offset, _PAGE) * _PAGE + size
    return _cdiv(offset, _PAGE) * _PAGE


@contextlib.contextmanager
def _held_workspaces() -> Iterator[None]:
    """Give the kernel outputs that fake kernels leave empty their real size: the workspace
    ``aten.mkldnn_rnn_layer`` (CPU LSTM) returns for its backward, and the full-size storage
    behind the scalar of the CPU losses in ``_HELD_LOSSES``. Entered inside the tracker, so
    the sized tensor is tracked, and below autograd, so it is what autograd keeps."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    rnn_layer = getattr(torch.ops.aten, "mkldnn_rnn_layer", None)

    class _Held(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in _HELD_LOSSES:
                return _held_loss(func, args, kwargs, out)
            if rnn_layer is None or func.overloadpacket is not rnn_layer:
                return out
            try:
                size = _onednn_lstm_workspace(_all_args(func, args, kwargs))
            except Exception:  # noqa: BLE001 - an unexpected signature: not modelled
                size = None
            ws = out[3]
            if size is None or not _is_tensor(ws) or ws.numel() >= size:
                return out
            sized = torch.empty(size, dtype=torch.uint8, device=ws.device)
            return (*out[:3], sized, *out[4:])

    with _Held():
        yield


# CPU losses whose reduced (0-dim) result keeps the storage of the unreduced elementwise loss
# (measured, torch 2.13: ``F.mse_loss(a, b).untyped_storage().nbytes() == a.nbytes``); it is
# held as long as the loss is, through backward. ``huber_loss`` and ``l1_loss`` do not.
# Name -> position of the ``reduction`` argument.
_HELD_LOSSES = {"mse_loss": 2, "smooth_l1_loss": 2, "binary_cross_entropy": 3,
                "soft_margin_loss": 2}


def _held_loss(func: Any, args: tuple, kwargs: Any, out: Any) -> Any:
    """``out`` as a 0-dim view of a storage of the elementwise loss's size, as the CPU kernel
    returns it (``out`` itself when the loss is not reduced or the shapes are unexpected)."""
    import torch

    full = _all_args(func, args, kwargs)
    name = func.overloadpacket.__name__
    at = _HELD_LOSSES[name]
    reduction = full[at] if len(full) > at else 1
    if not _is_tensor(out) or out.dim() != 0 or reduction == 0:
        return out
    try:
        shape = torch.broadcast_shapes(tuple(full[0].shape), tuple(full[1].shape))
    except (RuntimeError, AttributeError, IndexError):
        return out
    storage = torch.empty(_numel(shape), dtype=out.dtype, device=out.device)
    return storage.as_strided((), ())


def _mse_loss_temporary(func: Any, args: tuple) -> int:
    """CUDA's ``mse_loss``: the elementwise loss, freed once reduced (seen on an H200)."""
    if func.overloadpacket.__name__ != "mse_loss":
        return 0
    size = _loss_temporary(args)
    return -(-size // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


@contextlib.contextmanager
def _device_workspaces(tracker: Any, dev: Any, upper: dict,
                       kernels: Optional[list] = None) -> Iterator[None]:
    """The workspace rules of the estimate's target device, entered inside the tracker (each
    rule reads what the tracker holds after the op): CPU kernel rules and the workspaces CPU
    kernels return (``_held_workspaces``); on CUDA the attention rules, or with ``kernels`` (a
    list) a record of every op whose workspace the GPU is then asked for, and cuDNN's
    convolution workspaces as an upper bound into ``upper``."""
    with contextlib.ExitStack() as stack:
        if dev.type in ("cpu", "meta"):
            stack.enter_context(_held_workspaces())
            stack.enter_context(_workspaces(tracker, _kernel_workspace))
        elif dev.type == "cuda":
            if kernels is None:
                stack.enter_context(_workspaces(tracker, _cuda_attention_workspace))
            else:
                stack.enter_context(_kernel_records(tracker, kernels))
            stack.enter_context(_workspaces(tracker, cudnn_workspace_bound, upper))
        yield


@contextlib.contextmanager
def _kernel_records(tracker: Any, records: list) -> Iterator[None]:
    """Record each probe-able op of a CUDA estimate, to add its measured workspace afterwards
    (``core/cuda_probe.py``): ``(phase, total alive after the op, signature, fixed-rule
    workspace, is a convolution)``; the signatures are the op's own and the layouts it may
    really have had (``layout_alternatives``), the largest workspace of which counts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Records(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            sig = op_signature(func, args, kwargs)
            if sig is not None:
                try:
                    rule = _cuda_attention_workspace(func, _all_args(func, args, kwargs), out)
                except Exception:  # noqa: BLE001 - an unexpected signature: no rule
                    rule = 0
                records.append((tracker.phase,
                                _tracker_total(tracker._curr_mem_snap, tracker.target),
                                (sig, *layout_alternatives(sig)), rule,
                                "convolution" in func.overloadpacket.__name__))
            return out

    with _Records():
        yield


def _add_kernel_workspaces(tracker: Any, records: list, dev: Any) -> tuple:
    """Fold the probed workspaces of ``records`` into the tracker's phase peaks.

    Returns (note for the report, whether every convolution was probed). Ops the probe could
    not run keep their fixed rule; with no probe at all every op does.
    """
    found = probe_workspaces([s for r in records for s in r[2]], dev)
    probed = with_ws = 0
    unprobed_conv = found is None
    largest = (0, "")
    for phase, total, sigs, rule, conv in records:
        sig = sigs[0]
        known = [] if found is None else [found[s] for s in sigs if found.get(s) is not None]
        ws = max(known) if known else None
        if ws is None:
            unprobed_conv = unprobed_conv or conv
            ws = rule
        else:
            probed += 1
            with_ws += ws > 0
            if ws > largest[0]:
                name = json.loads(sig)[0]
                largest = (ws, name.split(".")[1] if name.count(".") == 2 else name)
        if total + ws > tracker.phase_peaks.get(phase, 0):
            tracker.phase_peaks[phase] = total + ws
    if found is None:
        return "kernel workspaces not probed (the probe process failed)", False
    note = (f"kernel workspaces probed on the GPU: {probed} of {len(records)} op calls,"
            f" {with_ws} with a workspace")
    if largest[0]:
        note += f" (largest {format_bytes(largest[0])}, {largest[1]})"
    return note, not unprobed_conv


@contextlib.contextmanager
def _workspaces(tracker: Any, rule: Callable[[Any, tuple, Any], int],
                peaks: Optional[dict] = None) -> Iterator[None]:
    """Count kernel workspaces given by ``rule(func, args, out)`` into per-phase peaks.

    After each modelled op, ``total alive + workspace`` is a candidate for the current phase's
    peak; the workspace is freed by the time the op returns, so nothing else changes. ``peaks``
    defaults to the tracker's own phase peaks (CPU rules, part of the estimate); the CUDA
    workspace bound writes into a dict of its own (an upper bound beside the estimate).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    target = tracker.phase_peaks if peaks is None else peaks

    class _Workspaces(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            try:
                extra = rule(func, _all_args(func, args, kwargs), out)
            except Exception:  # noqa: BLE001 - an unexpected signature: no workspace modelled
                extra = 0
            if extra > 0:
                total = _tracker_total(tracker._curr_mem_snap, tracker.target) + extra
                if total > target.get(tracker.phase, 0):
                    target[tracker.phase] = total
            return out

    with _Workspaces():
        yield


# --- shared helpers ---------------------------------------------------------------------------

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


def _check_phase(phase: Any) -> str:
    if phase not in PHASES:
        raise UsageError(f"phase={phase!r}: expected 'train' or 'inference'")
    return phase


def _target_device(model: Any, device: Any) -> Any:
    import torch

    return torch.device(device) if device is not None else model_device(model)


def _has_meta(model: Any) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def _batch_tensors(data: Batch) -> list:
    return data.input_tensors() + list(iter_tensors(data.target, "target"))


def _step_tensors(work: Any, data: Batch, opt: Any) -> list:
    tensors = list(work.parameters()) + list(work.buffers())
    tensors += [t for _, t in _batch_tensors(data)]
    if opt is not None:
        tensors += [v for state in opt.state.values() for v in state.values() if _is_tensor(v)]
    return tensors


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
