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


def grad_norm(model: Any) -> float:
    """Global L2 norm of all gradients (0.0 when there are none)."""
    total = 0.0
    for p in model.parameters():
        if p.grad is not None:
            total += float(p.grad.detach().float().pow(2).sum())
    return math.sqrt(total)


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


def train_steps(model: Any, batch: Batch, loss: Loss, *, steps: int, optimizer: Any = "adam",
                lr: float = 1e-3, seed: int = 0,
                on_step: Optional[Callable[[int, float], None]] = None,
                stop: Optional[Callable[[list], bool]] = None) -> TrainingRun:
    """Train ``model`` in place for ``steps`` steps on one batch; stops early on a non-finite loss
    or when ``stop(losses)`` returns True after a step.

    >>> import torch
    >>> from pytest_modelcheck.core.losses import resolve_loss
    >>> m = torch.nn.Linear(4, 1)
    >>> _ = torch.nn.init.constant_(m.weight, 0.5)   # output 2 + bias, far from the target 0
    >>> b = Batch.from_user((torch.ones(8, 4), torch.zeros(8, 1)))
    >>> run = train_steps(m, b, resolve_loss("mse", b), steps=20, lr=0.05)
    >>> run.best < run.initial
    True
    """
    import torch

    torch.manual_seed(seed)
    model.train()
    opt = make_optimizer(optimizer, model.parameters(), lr)
    run = TrainingRun()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        out = run_forward(model, batch)
        total, terms = loss.compute(out, batch, model)
        value = float(total.detach())
        run.losses.append(value)
        for k, v in terms.items():
            run.terms.setdefault(k, []).append(float(v.detach()))
        run.lrs.append(float(opt.param_groups[0]["lr"]))
        if not math.isfinite(value):
            run.stopped = f"loss became {value} at step {step}"
            break
        if not total.requires_grad:
            from .errors import ModelError

            raise ModelError("the loss does not require grad: the forward detaches its output"
                             " (.detach(), torch.no_grad(), set_grad_enabled(False)) or no"
                             " trainable parameter reaches it")
        total.backward()
        run.grad_norms.append(grad_norm(model))
        opt.step()
        if on_step is not None:
            on_step(step, value)
        if stop is not None and stop(run.losses):
            break
    return run


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
