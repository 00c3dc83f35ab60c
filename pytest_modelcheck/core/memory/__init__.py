"""Peak memory of one training (or inference) step: measured for real, or estimated on fake tensors.

A *training step* is, on a deep copy of the model placed on the step's device, forward (the loss
included), backward and one step of a fresh optimizer (phases "forward", "backward", "optimizer
step"); an *inference step* is one forward under ``torch.no_grad()`` in eval mode. The peak
counts everything alive at the worst moment on the step's device: parameters, buffers, the
batch, gradients, optimizer state, activations and temporaries.

Methods (``MemoryReport.method``): CPU allocator events from ``torch.profiler`` (a CPU step),
the CUDA caching allocator's statistics (a CUDA step), or a fake-tensor estimate (a model on
the ``meta`` device, CUDA without the GPU, other devices) with kernel workspaces added from
per-op rules (``rules/``) or, where the GPU is, probed on it. The memory model, what is
measured and what is estimated, and the derivation of every workspace rule are in
``docs/memory-model.md``.

The package: ``report`` (report types, constants), ``step`` (the step), ``measure`` (CPU and
CUDA measurement), ``fake`` (fake-tensor set-up and patches), ``tracker`` (MemTracker),
``estimate`` (the estimate), ``workspaces`` (kernel workspaces in an estimate), ``rules/``
(workspace rules per kernel family, registered per aten op).
"""
from __future__ import annotations

from typing import Any, Optional

from ..batch import Batch, copy_model
from ..cuda_probe import probe_workspaces
from ..cuda_workspace import CUDA_BLOCK_BYTES
from ..errors import UsageError
from .distributed import STRATEGIES, check_distributed, per_rank
from .estimate import _estimate, _to_estimate
from .fake import _fake_device, _mha_fastpath, _probe_kernels
from .measure import _cuda_api, _measure_cpu, _measure_cuda, _tracked_run, allocation_profiler
from .report import (AMP_DTYPES, BACKWARD, CATEGORIES, FORWARD, METHOD_CPU, METHOD_CUDA,
                     METHOD_FAKE, OPTIMIZER_STEP, PHASES, ROOT, STEP_PHASES, TOP_MODULES,
                     UNTRACKED, EstimateError, MemoryEstimate, MemoryReport)
from .rules.attention import _attention_workspace
from .rules.convolution import _conv_backward_workspace, _conv_forward_workspace
from .rules.onednn import _conv_backend, _cpu_isa, _deconv_strided_scratchpad, _onednn_isa
from .rules.rnn import _onednn_lstm_workspace
from .rules._common import _all_args
from .step import _check_phase, _has_meta, _prepare, _run_step, _target_device
from .workspaces import _add_kernel_workspaces, _cuda_attention_workspace, _kernel_workspace

__all__ = ["AMP_DTYPES", "BACKWARD", "CATEGORIES", "CRASH_SEAM_ENV", "CUDA_BLOCK_BYTES", "FORWARD",
           "METHOD_CPU", "METHOD_CUDA", "METHOD_FAKE", "OPTIMIZER_STEP", "PHASES", "ROOT",
           "STEP_PHASES", "STRATEGIES", "TOP_MODULES", "UNTRACKED", "EstimateError", "MemoryEstimate",
           "MemoryReport", "allocation_profiler", "estimate_memory", "estimate_step_memory",
           "isolated_estimate_step", "measure_step_memory", "step_is_estimated", "step_memory"]

# Private names other modules, tests and benchmarks reach here (re-exported; the test seams
# ``_cuda_api``, ``_probe_kernels``, ``_fake_device``, ``probe_workspaces`` and
# ``_add_kernel_workspaces`` are looked up here at call time: see ``step._seam``).
_REEXPORTED = (Batch, copy_model, probe_workspaces, _fake_device, _mha_fastpath, _probe_kernels,
               _attention_workspace, _conv_backward_workspace, _conv_forward_workspace,
               _conv_backend, _cpu_isa, _deconv_strided_scratchpad, _onednn_isa,
               _onednn_lstm_workspace, _all_args, _prepare, _run_step, _add_kernel_workspaces,
               _cuda_attention_workspace, _kernel_workspace)


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

    from ..state import preserved_globals

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
    from ..state import preserved_globals

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


def estimate_memory(model_or_factory: Any, batch: Any, *, phase: str = "train",
                    optimizer: Any = "adamw", amp: Optional[str] = None,
                    batch_sizes: Any = None, device: Any = None, loss: Any = None,
                    lr: float = 1e-3, world_size: Optional[int] = None,
                    strategy: Optional[str] = None) -> MemoryEstimate:
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

    ``world_size`` and ``strategy`` ("ddp" or "fsdp", FSDP2 ``fully_shard`` with FULL_SHARD)
    add ``per_rank``: the per-rank figures when the model trains data-parallel on
    ``world_size`` ranks, each holding the given batch (the batch is the *per-rank* batch):
    parameters, gradients, optimizer state, activations, communication buffers and the peak
    (model: ``distributed.py`` and docs/memory-model.md). The other fields stay single-device.

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
    >>> f = estimate_memory(build, torch.empty(8, 1024, device="meta"), world_size=4,
    ...                     strategy="fsdp")
    >>> f.per_rank["parameters_bytes"] == -(-f.parameters_bytes // 4)
    True
    """
    import torch

    from ..state import preserved_globals

    phase = _check_phase(phase)
    world_size, strategy = check_distributed(world_size, strategy)
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
        sizes: list = [data.batch_size]
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
    if world_size is not None and strategy is not None:
        first.per_rank = per_rank(first, model, world_size, strategy)
    return first
