"""Short, seeded training runs on a copy of the model (overfit one batch, one step for memory).

The caller's model is never touched: ``train_steps`` trains whatever module it is given, and
checks give it a copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .batch import Batch
from .errors import UsageError
from .forward import run_forward
from .losses import Loss

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


def validate_optimizer(optimizer: Any) -> Any:
    """Accept a name from OPTIMIZERS or a callable ``factory(params, lr) -> Optimizer``."""
    if callable(optimizer):
        return optimizer
    if isinstance(optimizer, str) and optimizer.lower() in OPTIMIZERS:
        return optimizer.lower()
    raise UsageError(f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZERS)} or a"
                     " callable factory(params, lr) returning a torch optimizer")


def make_optimizer(optimizer: Any, params: Any, lr: float) -> Any:
    """Build a torch optimizer from a name or a factory.

    >>> import torch
    >>> type(make_optimizer("adamw", torch.nn.Linear(2, 2).parameters(), 1e-3)).__name__
    'AdamW'
    """
    import torch

    params = [p for p in params if p.requires_grad]
    if not params:
        from .errors import ModelError

        raise ModelError("the model has no trainable parameters (none, or all with"
                         " requires_grad=False): there is nothing to train")
    if callable(optimizer):
        return optimizer(params, lr)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
           "rmsprop": torch.optim.RMSprop}[optimizer]
    kwargs = {"momentum": 0.9} if optimizer == "sgd" else {}
    return cls(params, lr=lr, **kwargs)


def make_step(model: Any, batch: Batch, phase: str, loss: Any, optimizer: Any = "adam",
              lr: float = 1e-6) -> Callable[[], Any]:
    """A zero-argument callable doing one forward of ``model`` on ``batch`` under ``no_grad``
    (``phase="inference"``, model in eval mode; returns the output) or one training step
    (forward, loss, backward, optimizer step; model in train mode; returns the loss).

    >>> import torch
    >>> step = make_step(torch.nn.Linear(4, 2), Batch.from_user(torch.zeros(3, 4)), "inference", None)
    >>> tuple(step().shape)
    (3, 2)
    """
    import torch

    if phase == "inference":
        model.eval()

        def infer() -> Any:
            with torch.no_grad():
                return run_forward(model, batch)

        return infer

    from .losses import resolve_loss

    model.train()
    with torch.no_grad():
        resolved = resolve_loss(loss, batch, run_forward(model, batch))
    opt = make_optimizer(optimizer, model.parameters(), lr)

    def train() -> Any:
        opt.zero_grad(set_to_none=True)
        total, _ = resolved.compute(run_forward(model, batch), batch, model)
        total.backward()
        opt.step()
        return total

    return train


def grad_norm_tensor(model: Any) -> Any:
    """Global L2 norm of all gradients as a 0-d float64 tensor, without a host sync (None when
    there is no gradient): one fused ``_torch_compat.foreach_norm`` per device, half-precision
    gradients accumulated in float32 as ``grad_norm`` does.

    >>> import torch
    >>> m = torch.nn.Linear(2, 1, bias=False)
    >>> m.weight.grad = torch.tensor([[3.0, 4.0]])
    >>> grad_norm_tensor(m)
    tensor(5., dtype=torch.float64)
    """
    import torch

    from ._torch_compat import foreach_norm

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    with torch.no_grad():
        if ({g.dtype for g in grads} <= {torch.float32, torch.float64}
                and len({g.device for g in grads}) == 1
                and {g.layout for g in grads} == {torch.strided}):  # the common case: one op
            return torch.linalg.vector_norm(torch.stack(foreach_norm(grads, 2)),
                                            dtype=torch.float64)
        by_device: dict = {}
        for g in grads:
            if g.is_sparse:
                g = g.coalesce().values()
            if g.is_complex():
                g = g.real  # as grad_norm's .float() reads a complex gradient
            if g.dtype in (torch.float16, torch.bfloat16):
                g = g.float()
            by_device.setdefault(g.device, []).append(g)
        parts = [torch.linalg.vector_norm(torch.stack(foreach_norm(group, 2)),
                                          dtype=torch.float64)  # stack promotes mixed dtypes
                 for group in by_device.values()]
        first = parts[0].device
        return torch.linalg.vector_norm(torch.stack([t.to(first) for t in parts]))


def grad_norm(model: Any) -> float:
    """Global L2 norm of all gradients (0.0 when there are none).

    >>> import torch
    >>> m = torch.nn.Linear(2, 1, bias=False)
    >>> grad_norm(m)
    0.0
    >>> m.weight.grad = torch.tensor([[3.0, 4.0]])
    >>> grad_norm(m)
    5.0
    """
    norm = grad_norm_tensor(model)
    return 0.0 if norm is None else float(norm)


@dataclass
class TrainingRun:
    """Per-step numbers of a short run; ``losses[i]`` is the loss before step ``i``'s update."""

    losses: list = field(default_factory=list)
    terms: dict = field(default_factory=dict)
    grad_norms: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    stopped: str = ""

    @property
    def initial(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def best(self) -> float:
        finite = [v for v in self.losses if math.isfinite(v)]
        return min(finite) if finite else math.nan

    @property
    def final(self) -> float:
        return self.losses[-1] if self.losses else math.nan


def read_back(scalars: list, *, stacked: Optional[bool] = None) -> list:
    """Python floats of 0-d tensors: one ``torch.stack(...).tolist()`` (a single wait for the
    device), or, on the CPU where a read waits for nothing, ``float()`` of each (no op at all).
    ``stacked`` forces one way.

    >>> import torch
    >>> read_back([torch.tensor(0.5), torch.tensor(2.0, dtype=torch.float64)], stacked=True)
    [0.5, 2.0]
    """
    import torch

    if not scalars:
        return []
    device = scalars[0].device
    if stacked is None:
        stacked = not (device.type == "cpu" and all(t.device == device for t in scalars))
    if not stacked:
        return [float(t) for t in scalars]
    return torch.stack([t.to(device=device, dtype=torch.float64) for t in scalars]).tolist()


#: Steps between two reads of the losses and gradient norms back from an accelerator (one
#: ``.tolist()`` for all of them): the training loop itself never waits for the device. On the
#: CPU a read waits for nothing, and each step is read as it ends.
SYNC_EVERY = 8


def train_steps(model: Any, batch: Batch, loss: Loss, *, steps: int, optimizer: Any = "adam",
                lr: float = 1e-3, seed: int = 0,
                on_step: Optional[Callable[[int, float], None]] = None,
                stop: Optional[Callable[[list], bool]] = None,
                sync_every: Optional[int] = None) -> TrainingRun:
    """Train ``model`` in place for ``steps`` steps on one batch; stops early on a non-finite loss
    or when ``stop(losses)`` returns True after a step.

    The loss, its terms and the global gradient norm of each step stay on the device; they are
    read back together after the first step and then every ``sync_every`` steps (default
    ``SYNC_EVERY``, 8, on an accelerator and 1 on the CPU), and ``stop`` and ``on_step`` are
    called then, step by step, in order. The returned run is the one a step-by-step loop gives:
    it ends at the first non-finite loss (recorded, no gradient norm for it) or at the first
    step where ``stop`` holds, and the records after it are dropped. The model itself may have
    taken up to ``sync_every - 1`` more updates than the run records.

    >>> import torch
    >>> from pytest_modelcheck.core.losses import resolve_loss
    >>> m = torch.nn.Linear(4, 1)
    >>> _ = torch.nn.init.constant_(m.weight, 0.5)   # output 2 + bias, far from the target 0
    >>> b = Batch.from_user((torch.ones(8, 4), torch.zeros(8, 1)))
    >>> run = train_steps(m, b, resolve_loss("mse", b), steps=20, lr=0.05)
    >>> run.best < run.initial
    True
    >>> short = train_steps(torch.nn.Linear(4, 1), b, resolve_loss("mse", b), steps=20,
    ...                     stop=lambda losses: len(losses) == 3)
    >>> len(short.losses), len(short.grad_norms)
    (3, 3)
    """
    import torch

    if sync_every is not None and not (isinstance(sync_every, int) and sync_every >= 1
                                       and not isinstance(sync_every, bool)):
        raise UsageError(f"sync_every={sync_every!r}: expected a positive integer or None")
    torch.manual_seed(seed)
    model.train()
    opt = make_optimizer(optimizer, model.parameters(), lr)
    run = TrainingRun()
    # (step, loss, {term: value}, lr, grad norm or None, update done): device tensors, unread
    pending: list = []
    error = every = None

    def flush() -> bool:
        return _flush(pending, run, on_step, stop)

    for step in range(steps):
        entry = None
        try:
            opt.zero_grad(set_to_none=True)
            out = run_forward(model, batch)
            total, terms = loss.compute(out, batch, model)
            if every is None:
                every = sync_every or (1 if total.device.type == "cpu" else SYNC_EVERY)
            entry = (step, total.detach(), {k: v.detach() for k, v in terms.items()},
                     float(opt.param_groups[0]["lr"]), None, False)
            if not total.requires_grad:
                pending.append(entry)
                if flush():  # a non-finite loss ends the run before its missing gradient matters
                    return run
                error = _detached_loss_error()
                break
            total.backward()
            norm = grad_norm_tensor(model)
            opt.step()
            pending.append(entry[:4] + (norm, True))
        except Exception:
            # An error in a step after an unread non-finite loss or stop, or in the backward of
            # a non-finite loss, comes from work the step-by-step loop never did: not the run's.
            if entry is not None and (not pending or pending[-1][0] != step):
                pending.append(entry)
            if flush():
                return run
            raise
        if (step == 0 or len(pending) >= every) and flush():
            return run
    if error is not None:
        raise error
    flush()
    return run


def _flush(pending: list, run: TrainingRun, on_step: Optional[Callable[[int, float], None]],
           stop: Optional[Callable[[list], bool]]) -> bool:
    """Read :func:`train_steps`' pending steps back and record them in ``run`` (``pending`` is
    emptied); True when the run ends at one of them."""
    if not pending:
        return False
    scalars = []
    for _, total, terms, _, norm, _ in pending:
        scalars.append(total.reshape(()))
        scalars += [v.reshape(()) for v in terms.values()]
        if norm is not None:
            scalars.append(norm)
    values = iter(read_back(scalars))
    steps_read, pending[:] = list(pending), []
    for step, _, terms, step_lr, norm, updated in steps_read:
        value = next(values)
        run.losses.append(value)
        for k in terms:
            run.terms.setdefault(k, []).append(next(values))
        run.lrs.append(step_lr)
        if not math.isfinite(value):
            run.stopped = f"loss became {value} at step {step}"
            return True
        if not updated:  # the step failed after a finite loss: its error is the run's
            return False
        run.grad_norms.append(0.0 if norm is None else next(values))
        if on_step is not None:
            on_step(step, value)
        if stop is not None and stop(run.losses):
            return True
    return False


def _detached_loss_error() -> Exception:
    from .errors import ModelError

    return ModelError("the loss does not require grad: the forward detaches its"
                      " output (.detach(), torch.no_grad(), set_grad_enabled(False))"
                      " or no trainable parameter reaches it")


def sparkline(values: list, width: int = 24) -> str:
    """A compact text curve of ``values`` (min at the bottom, max at the top).

    >>> sparkline([4, 3, 2, 1])
    '█▆▃▁'
    """
    bars = "▁▂▃▄▅▆▇█"
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [values[int(i * step)] for i in range(width - 1)] + [values[-1]]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(bars[int(round((v - lo) / span * (len(bars) - 1)))] if math.isfinite(v) else "×"
                   for v in values)
