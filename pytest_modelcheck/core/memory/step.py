"""The step itself (forward, loss, backward, optimizer step), shared by the measurement and the
estimate, and the small facts about a model and batch both need."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from ..batch import Batch, iter_tensors
from ..errors import UsageError
from ..forward import model_device, run_forward
from ..losses import resolve_loss
from ..training import make_optimizer
from .report import BACKWARD, FORWARD, OPTIMIZER_STEP, PHASES, _is_tensor


def _seam(name: str) -> Any:
    """The attribute ``name`` of the package ``pytest_modelcheck.core.memory``, looked up at call
    time: the test seams (``_cuda_api``, ``_probe_kernels``, ``_fake_device``,
    ``probe_workspaces``, ``_add_kernel_workspaces``) are replaced there by tests and benchmarks,
    and the replacement must reach every module of the package.

    >>> _seam("METHOD_FAKE")
    'fake-tensor estimate'
    """
    import importlib

    return getattr(importlib.import_module(__name__.rpartition(".")[0]), name)


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


@contextlib.contextmanager
def _no_phase(name: str) -> Iterator[None]:
    yield


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
