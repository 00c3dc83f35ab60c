"""Find the op (and the user's source line) where samples of a batch first get mixed.

A dispatch mode (``_torch_compat.dispatch_mode_base()``) records every op's output in a forward on the batch, then in one
forward per sample ``k`` with only sample ``k``'s inputs changed. An output element that
changes when sample ``k`` changes depends on sample ``k``. An op keeps samples apart when each
of its output elements depends on at most one sample and some axis of the output says which
(element ``[.., r, ..]`` along that axis belongs to one sample only: ``(B, T, F)``, its
transpose ``(T, B, F)``, ``flatten(0, 1)`` to ``(B*T, F)`` all qualify). The first op that does
not is where mixing starts: a reduction or normalisation over the batch, attention across it,
or a ``view``/``reshape`` that interleaves samples (``x.view(T, B, F)`` of a ``(B, T, F)``
tensor: each of its rows holds pieces of several samples).

Changes are detected by perturbation, so an op whose output does not move when a sample's input
moves (an ``argmax`` that keeps its answer) is not seen; bool and integer one-element results
(``mask.all()`` read by ``if``) are ignored. Only used to diagnose a failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

MAX_OPS = 4000
MAX_BYTES = 128 << 20  # op outputs kept from the first run (their labels take as much again)


@dataclass
class MixingOrigin:
    """The first op whose output mixes samples."""

    op: str
    module: str = ""       # module path, "<root>" for the model's own forward code
    module_type: str = ""
    source: str = ""       # "file:line in function" of the user's code
    reason: str = ""

    def describe(self) -> str:
        where = f" in module '{self.module}' ({self.module_type})" if self.module else ""
        src = f" at {self.source}" if self.source else ""
        return f"{self.op}{where}{src}"


def _tensors(out: Any) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


def _changed(a: Any, b: Any) -> Any:
    import torch

    if a.is_floating_point() or a.is_complex():
        both_nan = torch.isnan(a) & torch.isnan(b)
        return (a != b) & ~both_nan
    return a != b


def _violation(labels: Any, n: int) -> str:
    """'' when an axis of the labelled output holds one sample per index, else why not.

    An axis that does so only because samples were interleaved into the features (the last
    axis of a 2-D or larger output, longer than the batch: ``(B, F)`` reshaped after a
    transpose) does not count: the next layer sums over that axis.
    """
    import torch

    if bool((labels == -2).any()):
        return "elements depend on several samples"
    owned = labels[labels >= 0]
    if owned.numel() == 0 or bool((owned == owned[0]).all()):
        return ""
    axes = []
    for d in range(labels.dim()):
        rows = labels.movedim(d, 0).reshape(labels.shape[d], -1)
        high = rows.max(dim=1).values
        low = torch.where(rows >= 0, rows, torch.full_like(rows, 1 << 30)).min(dim=1).values
        if bool(((high < 0) | (low == high)).all()):
            axes.append(d)
    last = labels.dim() - 1
    if axes == [last] and last >= 1 and labels.shape[last] != n:
        return "samples interleaved along the last (feature) axis"
    return "" if axes else "no axis holds one sample per index (samples interleaved)"


def locate_mixing(model: Any, batch: Any, perturb: Callable[[Any, int], Any],
                  n: int) -> Optional[MixingOrigin]:
    """The first op of ``model``'s forward on ``batch`` that mixes samples, or None.

    ``perturb(batch, k)`` returns a batch with only sample ``k``'s inputs changed. ``model``
    is run ``n + 1`` times under ``no_grad`` with the same RNG seed (pass a copy; its buffers
    are restored after each run).

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):              # x: (B, T, F)
    ...         b, t, f = x.shape
    ...         return x.view(t, b, f).sum(0)  # interleaves samples, then sums them
    >>> def perturb(batch, k):
    ...     x = batch.args[0].clone(); x[k] += 1
    ...     return Batch(args=(x,))
    >>> origin = locate_mixing(Net(), Batch(args=(torch.randn(3, 2, 4),)), perturb, 3)
    >>> origin.op, origin.module
    ('aten.view', '<root>')
    """
    import torch

    from .forward import run_forward

    rec = _Record({m: (name or "<root>") for name, m in model.named_modules()})
    recorder = _recorder_class(rec)

    def push(mod: Any, args: Any) -> None:
        rec.stack.append(rec.names.get(mod, "<root>"))

    def pop(mod: Any, args: Any, out: Any) -> None:
        if rec.stack:
            rec.stack.pop()

    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    handles = []
    try:
        for m in rec.names:
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop))
        for k in [None] + list(range(n)):
            rec.mode = "base" if k is None else k
            rec.i = 0
            data = batch if k is None else perturb(batch, k)
            with torch.random.fork_rng(devices=[]), torch.no_grad(), recorder():
                torch.manual_seed(0)
                run_forward(model, data)
            rec.stack.clear()
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
    finally:
        for h in handles:
            h.remove()
    return _first_mixing(rec, n)


@dataclass
class _Record:
    """What :func:`locate_mixing`'s dispatch mode has seen: the ops of the first run and, per op
    output, an int32 label per element (-1: no sample moves it, k: sample k only, -2: several)."""

    names: dict                      # module -> path
    stack: list = field(default_factory=list)
    mode: Union[str, int] = "base"   # "base" for the first run, else the perturbed sample
    i: int = 0
    bytes: int = 0
    stop: int = MAX_OPS
    base: list = field(default_factory=list)    # (op, module, source, [outputs])
    labels: list = field(default_factory=list)  # per op, per output: int32 label tensors


def _recorder_class(rec: _Record) -> Any:
    """A dispatch mode class that hands every op's output to :func:`_observe`."""
    from ._torch_compat import dispatch_mode_base

    class Recorder(dispatch_mode_base()):  # type: ignore[misc]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            if rec.stack and rec.i < rec.stop:
                _observe(rec, func, out)
            return out

    return Recorder


def _observe(rec: _Record, func: Any, out: Any) -> None:
    """Record op number ``rec.i``'s outputs (first run) or label what changed (a later run)."""
    import torch

    from .dispatch import user_source

    i = rec.i
    rec.i = i + 1
    outs = [t.detach() for t in _tensors(out)]
    name = f"aten.{getattr(getattr(func, 'overloadpacket', None), '__name__', func)}"
    k = rec.mode
    if isinstance(k, str):  # "base"
        size = sum(t.numel() * t.element_size() for t in outs)
        if rec.bytes + size > MAX_BYTES:
            rec.stop = i
            return
        rec.bytes += size
        rec.base.append((name, rec.stack[-1], user_source(), [t.clone() for t in outs]))
        rec.labels.append([torch.full(t.shape, -1, dtype=torch.int32, device=t.device)
                           for t in outs])
        return
    ref = rec.base[i]
    if ref[0] != name or len(ref[3]) != len(outs) or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(ref[3], outs)):
        rec.stop = i  # the op sequence changed: compare only what came before
        return
    for lab, a, b in zip(rec.labels[i], ref[3], outs):
        hit = _changed(a, b)
        lab.copy_(torch.where(hit, torch.where(lab == -1, torch.full_like(lab, k),
                                               torch.where(lab == k, lab,
                                                           torch.full_like(lab, -2))),
                              lab))


def _first_mixing(rec: _Record, n: int) -> Optional[MixingOrigin]:
    """The first recorded op with an output that mixes samples (see :func:`_violation`)."""
    types = {name: type(m).__name__ for m, name in rec.names.items()}
    for i in range(min(rec.stop, len(rec.base))):
        op, module, source, outs = rec.base[i]
        for lab, t in zip(rec.labels[i], outs):
            if t.numel() <= 1 and not (t.is_floating_point() or t.is_complex()):
                continue  # a flag read by the host (``if mask.all():``), not data
            why = _violation(lab, n)
            if why:
                return MixingOrigin(op, module, types.get(module, ""), source, why)
    return None
