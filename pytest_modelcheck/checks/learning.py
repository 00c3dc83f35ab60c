"""params_learn: one optimizer step moves every trainable parameter (all of its elements) and
leaves frozen parameters and the buffers of frozen modules alone.

A :class:`_Run` trains a copy and records what each parameter's gradient was; ``_train`` gathers
the facts (:class:`_Learned`: parameters stuck, partly stuck, reached late, unused at this input
size, frozen ones moved); the check words them.

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..core.errors import UsageError
from ..core.result import CheckResult
from .naming import and_more, matches, name_patterns, owner
from .registry import MAX_STEPS, check
from .subject import Subject


def _validate_learn(frozen: Any = (), steps: Any = 1, lr: Any = 1e-3, optimizer: Any = "adam",
                    min_fraction: Any = 0.1) -> dict:
    from ..core.training import validate_optimizer

    frozen = name_patterns("frozen", frozen, "['encoder.*', 'head.bias']")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"steps={steps!r}: expected an int >= 1 (at most {MAX_STEPS})")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise UsageError(f"lr={lr!r}: expected a learning rate > 0")
    if (isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float))
            or not 0 < min_fraction <= 1):
        raise UsageError(f"min_fraction={min_fraction!r}: expected a fraction in (0, 1], the share"
                         " of a parameter's elements that may stay unchanged before it is reported")
    return {"frozen": frozen, "steps": steps, "lr": float(lr),
            "optimizer": validate_optimizer(optimizer), "min_fraction": float(min_fraction)}


def _unchanged_mask(before: Any, after: Any) -> Any:
    import torch

    a, b = before.detach().reshape(-1), after.detach().reshape(-1)
    if a.is_floating_point() or a.is_complex():
        return (a.contiguous().view(torch.uint8).view(a.numel(), -1)
                == b.contiguous().view(torch.uint8).view(b.numel(), -1)).all(dim=1)
    return (a == b).flatten()


# extra steps given, on the copy, to parameters still unchanged: each zero-initialised part in
# series (a zero head, a zero-init residual BatchNorm, a LoRA B matrix, a diffusion zero-conv)
# holds everything upstream at exactly zero gradient for one step
_GATE_STEPS = 3
# aten ops that read rows of a tensor picked by the input (lookups): rows the batch never picks
# keep a zero gradient; they are unused at this input size, not broken
_LOOKUP_OPS = frozenset({"embedding", "embedding_bag", "_embedding_bag",
                         "_embedding_bag_forward_only", "index", "_unsafe_index", "index_select",
                         "gather", "take"})


def _torch_layer(mod: Any) -> bool:
    """Whether a module runs torch's own ``forward`` (``nn.Conv3d``, and subclasses that keep it
    such as torchvision's ``Conv3DSimple``): conv taps on padding and dead ReLU rows may stay."""
    import torch

    fwd = getattr(type(mod), "forward", None)
    return (fwd is not None and fwd is not torch.nn.Module.forward
            and str(getattr(fwd, "__module__", "")).startswith("torch."))


def _slice_length(src: Any, out: Any, args: Any, kwargs: Any, lengths: set) -> Optional[int]:
    """The length an ``aten.slice`` of ``src`` from 0 with step 1 cut it to, when shorter than
    ``src`` and one of the input's ``lengths``; else None."""
    import torch

    a = {**dict(zip(("dim", "start", "end", "step"), args[1:])), **(kwargs or {})}
    dim, start, step = a.get("dim", 0), a.get("start"), a.get("step", 1)
    d = dim % max(src.dim(), 1)
    if (start in (None, 0) and step == 1 and isinstance(out, torch.Tensor)
            and out.shape[d] < src.shape[d] and int(out.shape[d]) in lengths):
        return int(out.shape[d])
    return None


def _lookup_reads(work: Any, data: Any, names: set) -> dict:
    """``{parameter name: how one forward reads it}`` for the parameters in ``names`` that are read
    through a lookup (``aten.embedding``/``index``/``index_select``/``gather`` on the parameter) or
    sliced from 0 to the length of an input dimension (a positional table cut to the sequence);
    a slice to any other length (Fourier modes) or a matmul is not a lookup."""
    import torch

    from ..core._torch_compat import dispatch_mode_base
    from ..core.batch import iter_tensors
    from ..core.forward import run_forward

    storages: dict = {}
    for n, p in work.named_parameters(remove_duplicate=False):
        if n in names and p.numel():
            storages.setdefault(p.untyped_storage().data_ptr(), []).append(n)
    lengths = {int(s) for _, t in iter_tensors((data.args, data.kwargs)) for s in t.shape[1:]
               if int(s) > 1}
    found: dict = {}

    def parameters_of(t: Any) -> list:
        try:
            return storages.get(t.untyped_storage().data_ptr(), [])
        except (RuntimeError, NotImplementedError, AttributeError):
            return []

    base: Any = dispatch_mode_base()

    class Reads(base):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            op = func.overloadpacket.__name__
            src = args[0] if args else None
            if isinstance(src, torch.Tensor) and (op in _LOOKUP_OPS or op == "slice"):
                for n in parameters_of(src):
                    if op in _LOOKUP_OPS:
                        found[n] = f"read by aten.{op}"
                        continue
                    length = _slice_length(src, out, args, kwargs, lengths)
                    if length is not None:
                        found.setdefault(n, f"sliced to the input's length {length}")
            return out

    try:
        with torch.no_grad(), Reads():
            run_forward(work, data)
    except Exception:  # noqa: BLE001 - no lookup seen: the elements are judged as before
        return {}
    return found



def _custom_parameters(work: Any) -> set:
    """Names of the parameters of modules with a ``forward`` of their own.

    Elements of torch.nn layers may legitimately stay still (conv taps that only see padding,
    rows of ReLU units dead on this batch, embedding rows not in the batch, biases cancelled by
    a following normalization): only these parameters get the element test (a subclass such as
    torchvision's Conv3DSimple keeps nn.Conv3d's forward)."""
    return {f"{name}.{pn}" if name else pn for name, mod in work.named_modules()
            if not _torch_layer(mod) for pn, _ in mod.named_parameters(recurse=False)}


def _still(before: Any, after: Any) -> tuple:
    """(elements unchanged, number of elements, at least 1) between two values of a tensor."""
    unchanged = _unchanged_mask(before, after)
    return int(unchanged.sum()), int(unchanged.numel()), max(int(unchanged.numel()), 1)


class _Run:
    """Optimizer steps on a copy in train mode, and the gradient each parameter saw: ``none``,
    ``zero`` or ``nonzero`` (the first step with a nonzero one in ``first_grad``)."""

    def __init__(self, subject: Subject, frozen: tuple, optimizer: Any, lr: float,
                 min_fraction: float) -> None:
        import torch

        from ..core.training import make_optimizer

        self.work = subject.model_copy("train")
        self.data = subject.batch_copy()
        self.loss, self.frozen, self.min_fraction = subject.loss, frozen, min_fraction
        self.params = dict(self.work.named_parameters())
        self.buffers = dict(self.work.named_buffers())
        self.p_before = {n: p.detach().clone() for n, p in self.params.items()}
        self.b_before = {n: b.detach().clone() for n, b in self.buffers.items()
                         if matches(n, frozen)}
        self.custom = _custom_parameters(self.work)
        self.trained = [n for n, p in self.params.items()
                        if p.requires_grad and not matches(n, frozen)]
        self.order = {n: i for i, n in enumerate(self.params)}
        self.opt = make_optimizer(optimizer, self.work.parameters(), lr)
        self.lossfn: Any = None
        self.grad_state: dict = {}
        self.first_grad: dict = {}
        self.unused: dict = {}  # parameters read through a lookup: {name: how}
        torch.manual_seed(0)

    def step(self, k: int) -> None:
        from ..core.forward import run_forward
        from ..core.losses import resolve_loss

        self.opt.zero_grad(set_to_none=True)
        out = run_forward(self.work, self.data)
        if self.lossfn is None:
            self.lossfn = resolve_loss(self.loss, self.data, out)
        total, _ = self.lossfn.compute(out, self.data, self.work)
        if total.requires_grad:
            total.backward()
        for n, p in self.params.items():
            if p.requires_grad:
                seen = "none" if p.grad is None else (
                    "zero" if not bool(p.grad.detach().ne(0).any()) else "nonzero")
                if self.grad_state.get(n) != "nonzero":
                    self.grad_state[n] = seen
                    if seen == "nonzero":
                        self.first_grad[n] = k
        self.opt.step()

    def judge(self) -> tuple:
        """(dead, partial): trainable tensors unchanged or never given a nonzero gradient, and
        parameters of user modules with >= min_fraction of their elements unchanged."""
        dead, partial = [], []
        for n in self.trained:
            still, numel, size = _still(self.p_before[n], self.params[n])
            if still == numel or self.grad_state.get(n, "none") != "nonzero":
                dead.append((n, self.grad_state.get(n, "none")))
            elif n in self.custom and still / size >= self.min_fraction and n not in self.unused:
                partial.append((n, still, size))
        return (sorted(dead, key=lambda d: self.order[d[0]]),
                sorted(partial, key=lambda d: self.order[d[0]]))

    def changed_buffers(self) -> list:
        return [n for n, b in self.b_before.items()
                if not bool(_unchanged_mask(b, self.buffers[n]).all())]

    def moved_frozen(self) -> list:
        """(name, requires_grad, elements changed, size) of the frozen parameters that moved."""
        moved = []
        for n, p in self.params.items():
            if (not p.requires_grad) or matches(n, self.frozen):
                still, numel, size = _still(self.p_before[n], p)
                if still < numel:
                    moved.append((n, p.requires_grad, numel - still, size))
        return moved

    def zero_initialised(self) -> list:
        """The gates: zero-initialised trainable tensors that moved in the first step."""
        return [n for n in self.trained if self.first_grad.get(n) == 1
                and self.p_before[n].numel() and not bool(self.p_before[n].ne(0).any())]


@dataclass
class _Learned:
    """What ``steps`` steps (and ``extra`` more for zero-initialised parts) did."""

    steps: int
    extra: int
    dead: list  # (name, gradient seen)
    partial: list  # (name, elements unchanged, size)
    late: list  # names that moved only in the extra steps
    info: dict  # name -> (elements unchanged, size): rows never looked up by this batch
    moved_frozen: list  # (name, requires_grad, elements changed, size)
    changed_buffers: list  # names

    @property
    def n_steps(self) -> str:
        """``"1 step"`` or ``"N steps"``."""
        return f"{self.steps} {'step' if self.steps == 1 else 'steps'}"

    @property
    def ran(self) -> str:
        return self.n_steps + (
            f" (and {self.extra} more for zero-initialised parts to open)" if self.extra else "")

    @property
    def span(self) -> str:
        return f"within {self.steps + self.extra} steps" if self.extra else f"after {self.n_steps}"


def _train(run: _Run, steps: int) -> _Learned:
    """``steps`` steps, then up to ``_GATE_STEPS`` more while parameters are still unchanged."""
    for k in range(steps):
        run.step(k + 1)
    changed_buffers = run.changed_buffers()
    dead, partial = run.judge()
    info: dict = {}
    if partial:
        # rows the batch never looks up are unused at this input size; slices and matmuls are not
        run.unused = _lookup_reads(run.work, run.data, {n for n, _, _ in partial})
        info = {n: (st, sz) for n, st, sz in partial if n in run.unused}
        dead, partial = run.judge()
    extra = 0
    first_dead = {n for n, _ in dead} | {n for n, _, _ in partial}
    while (dead or partial) and extra < _GATE_STEPS:
        extra += 1
        run.step(steps + extra)
        dead, partial = run.judge()
    left = {n for n, _ in dead} | {n for n, _, _ in partial}
    late = sorted(first_dead - left, key=run.order.__getitem__)
    return _Learned(steps, extra, dead, partial, late, info, run.moved_frozen(), changed_buffers)


_WHY = {"none": "no gradient (not reached by the loss)",
        "zero": "gradient exactly zero (dead branch, detach, masked out)",
        "nonzero": "gradient too small to change it at this lr"}


def _problem_lines(run: _Run, f: _Learned) -> list:
    """Details: parameters that did not (fully) change, frozen ones and buffers that did."""
    work, details = run.work, []
    if f.dead:
        details.append(f"trainable parameters that did not change in {f.n_steps} nor in"
                       f" {f.extra} more given for zero-initialised parts to open:" if f.extra else
                       "trainable parameters that did not change:")
        details += [f"  {n:40} {_WHY.get(g, g)}  ({owner(work, n)})" for n, g in f.dead[:20]]
    if f.partial:
        details.append(f"trainable parameters with >= {run.min_fraction:.0%} of elements unchanged"
                       f" after {f.ran} (not read through a lookup):")
        details += [f"  {n:40} {st}/{sz} elements ({st / sz:.0%}) unchanged  ({owner(work, n)})"
                    for n, st, sz in f.partial[:20]]
    if f.moved_frozen:
        details.append("frozen parameters that changed:")
        details += [f"  {n:40} {c}/{sz} elements changed, requires_grad={rg}  ({owner(work, n)})"
                    for n, rg, c, sz in f.moved_frozen[:20]]
    if f.changed_buffers:
        details.append("buffers of frozen modules that changed (train mode updates BatchNorm"
                       " running statistics: keep frozen modules in eval, e.g. override train()):")
        details += [f"  {n}  ({owner(work, n)})" for n in f.changed_buffers[:20]]
    return details


def _healthy_lines(run: _Run, f: _Learned) -> list:
    """Details: tensors that moved once zero-initialised parts opened, rows never looked up."""
    work, details = run.work, []
    if f.late:
        zero_init = run.zero_initialised()
        gates = (f" (zero-initialised: {', '.join(zero_init[:3])}{and_more(zero_init[2:])})"
                 if zero_init else "")
        details.append(f"information: {len(f.late)} tensors stayed unchanged after {f.n_steps}"
                       f" and moved once zero-initialised parts had a step to open{gates};"
                       " healthy:")
        details += [f"  {n:40} first nonzero gradient in step {run.first_grad.get(n, '?')}"
                    f"  ({owner(work, n)})" for n in f.late[:10]]
        if len(f.late) > 10:
            details.append(f"  ... and {len(f.late) - 10} more")
    if f.info:
        details.append("information: rows never looked up by this batch, unused at this input"
                       " size (not a bug):")
        details += [f"  {n:40} {st}/{sz} elements ({st / sz:.0%}) unchanged, {run.unused[n]}"
                    f"  ({owner(work, n)})" for n, (st, sz) in list(f.info.items())[:20]]
    return details


def _verdict(subject: Subject, run: _Run, f: _Learned, details: list,
             metrics: dict) -> CheckResult:
    work = run.work
    if f.moved_frozen:
        n, rg, c, sz = f.moved_frozen[0]
        reason = (" (it requires grad: call requires_grad_(False) on it)" if rg else
                  " (requires_grad is False, yet the step changed it)")
        return subject.failed(f"expected frozen parameter '{n}' ({owner(work, n)}) unchanged"
                              f" {f.span}, observed {c}/{sz} elements changed{reason}"
                              f"{and_more(f.moved_frozen)}", details, metrics)
    if f.changed_buffers:
        n = f.changed_buffers[0]
        return subject.failed(f"expected buffers of frozen modules unchanged after {f.n_steps},"
                              f" observed '{n}' ({owner(work, n)}) changed"
                              f"{and_more(f.changed_buffers)}", details, metrics)
    if f.dead:
        n, g = f.dead[0]
        how = {"none": "no gradient", "zero": "zero gradient", "nonzero": "tiny gradient"}.get(g, g)
        return subject.failed(f"expected every trainable parameter to change {f.span},"
                              f" observed '{n}' ({owner(work, n)}) unchanged ({how})"
                              f"{and_more(f.dead)}", details, metrics)
    if f.partial:
        n, st, sz = f.partial[0]
        return subject.failed(f"expected every element of every trainable parameter to change"
                              f" {f.span}, observed {st / sz:.0%} of '{n}' ({owner(work, n)})"
                              f" unchanged ({st}/{sz} elements){and_more(f.partial)}",
                              details, metrics)
    return subject.passed(f"expected all {len(run.trained)} trainable tensors to change and frozen"
                          f" ones to stay, observed that after {f.ran}", details, metrics)


@check(default=True, validate=_validate_learn)
def params_learn(frozen: Any = (), steps: Any = 1, lr: Any = 1e-3, optimizer: Any = "adam",
                 min_fraction: Any = 0.1, *, subject: Subject) -> CheckResult:
    """One optimizer step moves every trainable parameter and leaves frozen ones alone.

    On a copy in train mode, ``steps`` steps of ``optimizer`` at ``lr``. Every parameter that
    requires grad and is not listed in ``frozen`` (names or glob patterns) must change, and must
    have had a nonzero gradient. Zero-initialised parts (a ViT head, zero-init residual
    BatchNorms, ReZero, LoRA's B matrix) hold what is upstream of them at exactly zero gradient
    for a step: parameters still unchanged get up to 3 more steps on the copy, and only those
    that never move fail. In a parameter of a module whose ``forward`` is not torch's own (conv
    taps on padding and dead ReLU rows of ``torch.nn`` layers may legitimately stay still) less
    than ``min_fraction`` of the elements may stay bitwise unchanged (weights a slicing bug never
    reaches, such as Fourier modes); rows read through a lookup (embedding, index, gather: a
    relative-position table, a positional table longer than the sequence) are reported as
    unused at this input size instead. Parameters with ``requires_grad=False`` or listed in
    ``frozen`` must not change, nor the buffers (BatchNorm running statistics) whose names match
    ``frozen``.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> params_learn(model=m, batch=torch.randn(6, 4)).passed
    True
    >>> params_learn(frozen=["0.*"], model=m, batch=torch.randn(6, 4)).headline.split(",")[0]
    "expected frozen parameter '0.weight' (Linear '0') unchanged after 1 step"
    """
    run = _Run(subject, frozen, optimizer, lr, min_fraction)
    f = _train(run, steps)
    trainable = len(run.trained)
    metrics = {"steps": steps, "optimizer": getattr(optimizer, "__name__", optimizer), "lr": lr,
               "trainable": trainable, "frozen": len(run.params) - trainable,
               "unchanged": len(f.dead), "partially_unchanged": len(f.partial),
               "frozen_moved": len(f.moved_frozen), "frozen_buffers_changed": len(f.changed_buffers),
               "gate_steps": f.extra, "reached_late": len(f.late),
               "unused_at_input_size": len(f.info),
               "loss_fn": run.lossfn.name if run.lossfn else None}
    details = _problem_lines(run, f) + _healthy_lines(run, f)
    return _verdict(subject, run, f, details, metrics)
