"""The fake-tensor estimate of one step (docs/memory-model.md, "The estimate")."""
from __future__ import annotations

from typing import Any, Optional

from ..batch import Batch
from ..cuda_workspace import CUDA_BLOCK_BYTES
from ..errors import ModelError, UsageError
from ..errors import first_line as _first_line
from .._torch_compat import fake_tensor_module
from .fake import (_causal_masks_by_origin, _fake_like, _fake_limitation_message, _fake_model_copy,
                   _is_fake_limitation, _linear_bias_in_place, _mha_fastpath, _no_nested_tensors,
                   _quiet_fake_tensor_log)
from .report import (BACKWARD, METHOD_FAKE, STEP_PHASES, EstimateError, MemoryEstimate, MemoryReport,
                     _alive_bytes, _report)
from .step import _batch_tensors, _no_phase, _prepare, _run_step, _seam
from .tracker import (_categories, _new_tracker, _top_modules, _tracker_limitation, _tracker_phases,
                      _tracker_total, _tracking)
from .workspaces import _device_workspaces


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


def _estimate(model: Any, batch: Batch, loss: Any, phase: str, optimizer: Any, lr: float,
              dev: Any, amp: Any = None, keep_tracker: Optional[list] = None) -> MemoryReport:
    import torch

    FakeTensorMode = fake_tensor_module().FakeTensorMode

    cuda_like = dev.type == "cuda" or dev.type not in ("cpu", "meta")
    on_gpu = _seam("_probe_kernels")(dev)
    place = _seam("_fake_device")(dev) if on_gpu else torch.device("cpu")
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
        note, all_convs = _seam("_add_kernel_workspaces")(tracker, kernels, dev)
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
