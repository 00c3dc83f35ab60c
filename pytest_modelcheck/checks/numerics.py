"""Numerics: output_range here; device_portable, dtype_stable and activations_healthy in their
own modules, re-exported here (their old import path).

* ``device_portable`` (``portability``): after ``model.to(other)`` every parameter, buffer and
  tensor made in forward follows (found on a CPU-only runner with the ``meta`` device, and for
  real on CUDA).
* ``dtype_stable`` (``precision``): activations keep the parameters' dtype (no float64 creeping
  in), and the model runs under ``torch.autocast`` with finite outputs.
* ``activations_healthy`` (``activations``): per-layer activation statistics and gradient norms
  on one batch: exploding activations, vanishing gradients, dead ReLUs, saturated sigmoid/tanh.
* ``output_range``: outputs stay within declared ranges, also at other batch sizes and on
  scaled inputs.

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..core.errors import ModelError, UsageError
from ..core.result import CheckResult
from ..core.units import is_number
from .activations import (ATTENTION_MIN_KEYS, ATTENTION_SAMPLES, ATTENTION_SATURATED, RELU_LIKE,
                          SATURATING, SDPA_OPS, SOFTMAX_OPS, _sdpa_attention, _softmax_attention,
                          _std_growth, _top_probs, activations_healthy)
from .op_trace import ROOT, _flat_tensors, _ModuleStack, _op_name, _short
from .portability import DEVICE_REMEDY, device_portable, plain_tensor_attributes
from .precision import AMP_DTYPES, dtype_stable
from .registry import check
from .subject import Subject

__all__ = ["activations_healthy", "device_portable", "dtype_stable", "output_range", "head_range",
           "head_bound",
           "plain_tensor_attributes", "ATTENTION_SATURATED", "ATTENTION_MIN_KEYS",
           "ATTENTION_SAMPLES", "RELU_LIKE", "SATURATING", "SDPA_OPS", "SOFTMAX_OPS",
           "AMP_DTYPES", "DEVICE_REMEDY", "ROOT", "_ModuleStack", "_flat_tensors", "_op_name",
           "_short", "_sdpa_attention", "_softmax_attention", "_std_growth", "_top_probs"]


# -------------------------------------------------------------------------------- output_range
_INDEX_RE = re.compile(r"^\[\s*(.*?)\s*\]$")


def _parse_index(text: str, given: str) -> tuple:
    """``"[:, 0]"`` -> ``(slice(None), 0)``; ints, slices ``a:b:c`` and ``...`` only."""
    m = _INDEX_RE.match(text.strip())
    if not m:
        raise UsageError(f"ranges key {given!r}: expected an index such as '[:, 0]'")
    parts: list = []
    for raw in m.group(1).split(","):
        item = raw.strip()
        try:
            if item == "...":
                parts.append(Ellipsis)
            elif ":" in item:
                bits = [b.strip() for b in item.split(":")]
                if len(bits) > 3:
                    raise ValueError
                parts.append(slice(*[int(b) if b else None for b in bits]))
            else:
                parts.append(int(item))
        except ValueError:
            raise UsageError(f"ranges key {given!r}: expected ints, slices (a:b) or ... inside"
                             " the brackets, such as '[:, 0]'") from None
    return tuple(parts)


def _bounds(value: Any, key: str, name: str = "ranges", also: str = "") -> tuple:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(v is None or is_number(v) for v in value)):
        raise UsageError(f"{name}{key}={value!r}: expected {also}a (lo, hi) pair of numbers (None"
                         " for no bound)")
    lo = -math.inf if value[0] is None else float(value[0])
    hi = math.inf if value[1] is None else float(value[1])
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise UsageError(f"{name}{key}={value!r}: expected lo <= hi")
    return lo, hi


def _validate_range(ranges: Any, scale: Any = 10.0, batch_sizes: Any = (1, 16)) -> dict:
    specs: list = []  # (label, output key or None, index tuple or None, lo, hi)
    if isinstance(ranges, (tuple, list)):
        lo, hi = _bounds(ranges, "")
        specs.append(("output", None, None, lo, hi))
    elif isinstance(ranges, dict) and ranges:
        for k, v in ranges.items():
            lo, hi = _bounds(v, f"[{k!r}]")
            if isinstance(k, int) and not isinstance(k, bool):
                specs.append((f"output[:, {k}]", None, (slice(None), k), lo, hi))
            elif isinstance(k, str) and k.strip().startswith("["):
                specs.append((f"output{k.strip()}", None, _parse_index(k, k), lo, hi))
            elif isinstance(k, str) and k.strip():
                name, _, rest = k.strip().partition("[")
                index = _parse_index("[" + rest, k) if rest else None
                specs.append((f"output[{name.strip()!r}]" + (f"[{rest}" if rest else ""),
                              name.strip(), index, lo, hi))
            else:
                raise UsageError(f"ranges key {k!r}: expected a column index (int), an index"
                                 " such as '[:, 0]', or an output key such as 'probs'")
    else:
        raise UsageError(f"ranges={ranges!r}: expected (lo, hi) or a dict such as"
                         " {0: (0, 6.2832), '[:, 1]': (0, 3.1416)}")
    if scale is not None and (not is_number(scale) or not math.isfinite(scale)):
        raise UsageError(f"scale={scale!r}: expected a number (inputs are multiplied by it) or None")
    if not isinstance(batch_sizes, (tuple, list)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in batch_sizes):
        raise UsageError(f"batch_sizes={batch_sizes!r}: expected a list of ints >= 1, such as (1, 16)")
    return {"ranges": tuple(specs), "scale": scale, "batch_sizes": tuple(batch_sizes)}


def _select(out: Any, key: Optional[str], index: Optional[tuple], label: str) -> Any:
    import torch

    from ..core.batch import iter_tensors

    if key is not None:
        if isinstance(out, dict) and key in out:
            out = out[key]
        elif hasattr(out, key):
            out = getattr(out, key)
        else:
            have = list(out) if isinstance(out, dict) else type(out).__name__
            raise UsageError(f"ranges key {key!r}: the output has no such key (it has {have})")
    if index is not None:
        if not isinstance(out, torch.Tensor):
            raise UsageError(f"ranges key {label}: indexing needs a tensor output, got"
                             f" {type(out).__name__}")
        try:
            return [(label, out[index])]
        except IndexError as exc:
            raise UsageError(f"ranges key {label}: {exc} (output shape {list(out.shape)})") from None
    return [(label if p == "" else f"{label}{p}", t) for p, t in iter_tensors(out, "")]


def _probes(subject: Subject, scale: Any, batch_sizes: tuple) -> tuple:
    """``([(name, batch, required), ...], notes)``: the example batch, the batch resized to each
    of ``batch_sizes`` (until one cannot be) and the inputs scaled by ``scale``."""
    probes: list = [("the example batch", subject.batch_copy(), True)]
    notes: list = []
    for n in batch_sizes:
        try:
            probes.append((f"batch size {n}", subject.batch.resized(n).to(subject.device), False))
        except UsageError as exc:
            notes.append(f"batch size {n} not probed: {exc}")
            break
    if scale is not None:
        probes.append((f"inputs x{scale:g}", subject.batch_copy().map(
            lambda t: t * scale if t.is_floating_point() else t), False))
    return probes, notes


@dataclass
class _Violation:
    """Values of one selected output outside its range on one probe."""

    output: str
    probe: str
    lo: float
    hi: float
    min: float  # of the finite values (nan when none)
    max: float
    sample: int  # the first sample with a value out of range
    count: int  # values out of range (non-finite included)
    numel: int
    nonfinite: int


def _out_of_range(what: str, probe: str, t: Any, lo: float, hi: float) -> Optional[_Violation]:
    """The violation of ``lo <= t <= hi`` (non-finite values are out of range), or None."""
    import torch

    v = t.detach().double()
    bad = ~torch.isfinite(v) | (v < lo) | (v > hi)
    finite = v[torch.isfinite(v)]
    vmin = float(finite.min()) if finite.numel() else math.nan
    vmax = float(finite.max()) if finite.numel() else math.nan
    if not bool(bad.any()):
        return None
    flat = bad.reshape(v.shape[0], -1) if v.dim() >= 1 else bad.reshape(1, 1)
    sample = int(flat.any(dim=1).nonzero()[0, 0]) if v.dim() >= 1 else 0
    return _Violation(what, probe, lo, hi, vmin, vmax, sample, int(bad.sum()), v.numel(),
                      int((~torch.isfinite(v)).sum()))


def _run_probes(work: Any, probes: list, ranges: tuple, notes: list) -> tuple:
    """``(probes checked, violations)``; a probe other than the example batch whose forward
    raises is noted and skipped."""
    import torch

    from ..core.forward import run_forward

    checked: list = []
    violations: list = []
    for name, data, required in probes:
        try:
            with torch.no_grad():
                out = run_forward(work, data)
        except ModelError as exc:
            if required:
                raise
            notes.append(f"{name} not probed: the forward raised ({exc})")
            continue
        checked.append(name)
        for label, key, index, lo, hi in ranges:
            for what, t in _select(out, key, index, label):
                if t.is_complex() or t.numel() == 0:
                    continue
                found = _out_of_range(what, name, t, lo, hi)
                if found is not None:
                    violations.append(found)
    return checked, violations


@check(default=False, validate=_validate_range)
def output_range(ranges: Any, scale: Any = 10.0, batch_sizes: Any = (1, 16), *,
                 subject: Subject) -> CheckResult:
    """Outputs stay within declared ranges, also at other batch sizes and on inputs scaled by `scale`.

    ``ranges`` is ``(lo, hi)`` for every output value, or a dict whose keys pick outputs:

    * an int ``k``: column ``k`` along dimension 1 (``output[:, k]``);
    * an index string such as ``"[:, 0]"`` or ``"[..., 2]"`` (ints, slices, ``...``);
    * an output key for dict (or namedtuple) outputs, optionally indexed: ``"angles[:, 1]"``;

    and whose values are ``(lo, hi)`` pairs (``None`` for no bound). Runs the forward in eval
    mode on a copy with the example batch, with ``batch.resized(n)`` for each of
    ``batch_sizes`` (skipped when the batch cannot be resized) and with every floating input
    multiplied by ``scale`` (``None`` skips this), which exposes unbounded heads. Non-finite
    values are out of range.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Sigmoid())
    >>> output_range((0, 1), model=m, batch=torch.randn(3, 4)).passed
    True
    """
    work = subject.model_copy("eval")
    probes, notes = _probes(subject, scale, batch_sizes)
    checked, violations = _run_probes(work, probes, ranges, notes)
    details = [f"probes: {', '.join(checked)}"] + notes
    metrics = {"probes": checked, "violations": len(violations)}
    if violations:
        details.append("out of range:")
        details += [f"  {v.output:24} [{v.lo:g}, {v.hi:g}]  observed min {v.min:.4g}"
                    f" max {v.max:.4g}  {v.count}/{v.numel} values  ({v.probe})"
                    for v in violations]
        details.append("remedy: bound the head (sigmoid/tanh scaled to the range, softplus for"
                       " positive values, atan2 for angles) or clamp where the range is physical")
        v = violations[0]
        nonfin = f", {v.nonfinite} non-finite" if v.nonfinite else ""
        metrics.update({"output": v.output, "min": v.min, "max": v.max, "probe": v.probe,
                        "sample": v.sample})
        return subject.failed(f"expected {v.output} in [{v.lo:g}, {v.hi:g}], observed min"
                              f" {v.min:.4g} max {v.max:.4g}{nonfin} (sample {v.sample} of"
                              f" {v.probe})", details, metrics)
    spec_text = "; ".join(f"{label} in [{lo:g}, {hi:g}]" for label, _, _, lo, hi in ranges)
    return subject.passed(f"expected {spec_text}, observed within range on {len(checked)} probes"
                          f" ({', '.join(checked)})", details, metrics)


# -------------------------------------------------------------------------------- head_range
#: Ops whose output is bounded, with the bound (lo, hi) and a word for it; ``hardtanh`` and
#: ``clamp`` take theirs from their arguments.
BOUNDING_OPS = {
    "aten.sigmoid": (0.0, 1.0, "a sigmoid (saturating)"),
    "aten.tanh": (-1.0, 1.0, "a tanh (saturating)"),
    "aten.softmax": (0.0, 1.0, "a softmax (saturating)"),
    "aten._softmax": (0.0, 1.0, "a softmax (saturating)"),
    "aten.hardsigmoid": (0.0, 1.0, "a hardsigmoid (saturating)"),
    "aten.atan": (-math.pi / 2, math.pi / 2, "an atan (saturating)"),
    "aten.relu": (0.0, math.inf, "a ReLU"),
    "aten.softplus": (0.0, math.inf, "a softplus"),
    "aten.exp": (0.0, math.inf, "an exp"),
    "aten.abs": (0.0, math.inf, "an abs"),
    "aten.gelu": (-0.1700, math.inf, "a GELU"),
    "aten.silu": (-0.2785, math.inf, "a SiLU"),
}
#: Ops that keep the values of their first input (views, copies, selections).
VALUE_PRESERVING = frozenset(
    "aten." + n for n in ("view", "_unsafe_view", "reshape", "permute", "transpose", "t",
                          "squeeze", "unsqueeze", "expand", "clone", "contiguous", "select",
                          "slice", "_to_copy", "detach", "alias", "flatten", "index_select"))
PINNED_SHARE = 0.25  # after the overfit run, this share of outputs at one extreme is pinned
TARGET_SLACK = 1e-6  # targets within this (x max(1, |bound|)) of a bound are inside it


def _validate_head(target_range: Any = None, steps: Any = 30, lr: Any = 1e-2, seed: Any = 0) -> dict:
    from .registry import validate_seed, validate_steps

    if target_range is not None:
        target_range = _bounds(target_range, "", "target_range", "None (the batch's target) or ")
    n = validate_steps(steps)
    if n > 1000:
        raise UsageError(f"steps={steps!r}: expected at most 1000 (a short overfit run)")
    if not is_number(lr) or not math.isfinite(lr) or lr <= 0:
        raise UsageError(f"lr={lr!r}: expected a positive number")
    return {"target_range": target_range, "steps": n, "lr": float(lr), "seed": validate_seed(seed)}


def _bound_of(name: str, args: tuple, bounds: dict) -> Optional[tuple]:
    """``(lo, hi, what)`` of an op's output, from the op or from its bounded first input."""
    import torch

    if name in BOUNDING_OPS:
        return BOUNDING_OPS[name]
    nums = [a for a in args[1:] if is_number(a)]
    if name in ("aten.hardtanh", "aten.clamp", "aten.clip", "aten.clamp_min", "aten.clamp_max"):
        rest = list(args[1:3]) + [None] * 2
        lo, hi = (rest[0], rest[1]) if name not in ("aten.clamp_max",) else (None, rest[0])
        if name == "aten.hardtanh":
            lo, hi = (-1.0 if lo is None else lo), (1.0 if hi is None else hi)
        if all(v is None or is_number(v) for v in (lo, hi)):
            return (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi),
                    f"a {name[5:]}")
        return None
    first = args[0] if args else None
    entry = bounds.get(id(first)) if isinstance(first, torch.Tensor) else None
    if entry is None or entry[0] is not first:
        return None
    _, lo, hi, what, where = entry
    if name in VALUE_PRESERVING:
        return lo, hi, what, where
    if len(args) == 2 and nums and name in ("aten.mul", "aten.div", "aten.add", "aten.sub"):
        k = float(nums[0])
        if name in ("aten.add", "aten.sub"):
            k = k if name == "aten.add" else -k
            return lo + k, hi + k, what, where
        if name == "aten.div":
            if k == 0:
                return None
            k = 1 / k
        ends = sorted((lo * k if k else 0.0, hi * k if k else 0.0))
        return ends[0], ends[1], what, where
    if name == "aten.neg":
        return -hi, -lo, what, where
    return None


def head_bound(model: Any, batch: Any) -> tuple:
    """``(output, bound)``: the prediction of one no-grad forward and ``(lo, hi, what, module)``
    bounding it (the last bounding op on its values, through views and scalar affine maps), or
    None when nothing bounds it.

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    >>> head_bound(m, Batch.from_user(torch.randn(4, 3)))[1]
    (0.0, 1.0, 'a sigmoid (saturating)', '1')
    >>> head_bound(torch.nn.Linear(3, 1), Batch.from_user(torch.randn(4, 3)))[1] is None
    True
    """
    import torch

    from ..core._torch_compat import dispatch_mode_base
    from ..core.forward import run_forward
    from ..core.outputs import primary_output

    bounds: dict = {}

    with _ModuleStack(model) as mods:
        class Bounds(dispatch_mode_base()):  # type: ignore[misc]
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                                   kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                name = _op_name(func).rstrip("_")
                found = _bound_of(name, tuple(args), bounds)
                if found is not None and isinstance(out, torch.Tensor):
                    where = found[3] if len(found) > 3 else mods.current
                    bounds[id(out)] = (out, found[0], found[1], found[2], where)
                return out

        with torch.no_grad(), Bounds():
            out = primary_output(run_forward(model, batch))
    entry = bounds.get(id(out))
    if entry is None or entry[0] is not out:
        return out, None
    return out, (entry[1], entry[2], entry[3], entry[4])


def _spread(out: Any) -> dict:
    """min, max, mean, std of a prediction's finite values."""
    import torch

    v = out.detach().double().reshape(-1)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return {"min": math.nan, "max": math.nan, "mean": math.nan, "std": math.nan}
    return {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
            "std": float(v.std(unbiased=False))}


def _pinned(out: Any, lo: float, hi: float) -> Optional[tuple]:
    """``(value, share)`` when ``PINNED_SHARE`` of the outputs sit at one extreme (a hidden
    clamp or a saturated head) that the targets ``[lo, hi]`` go beyond."""
    s = _spread(out)
    v = out.detach().double().reshape(-1)
    span = max(hi - lo, 1e-12) if math.isfinite(hi - lo) else max(abs(s["max"] - s["min"]), 1.0)
    for end, beyond in ((s["max"], hi > s["max"] + 0.05 * span), (s["min"], lo < s["min"] - 0.05 * span)):
        share = float(((v - end).abs() <= 1e-4 * span).double().mean()) if v.numel() else 0.0
        if beyond and share >= PINNED_SHARE and v.numel() >= 8:
            return end, share
    return None


def _interval(lo: float, hi: float, what: str) -> str:
    opened = "saturating" in what
    return f"{'(' if opened else '['}{lo:g}, {hi:g}{')' if opened or math.isinf(hi) else ']'}"


@check(default=False, validate=_validate_head)
def head_range(target_range: Any = None, steps: Any = 30, lr: Any = 1e-2, seed: Any = 0, *,
               subject: Subject) -> CheckResult:
    """A regression head can reach its targets: no bounding final activation (sigmoid, tanh, ReLU, clamp) that the targets leave.

    ``target_range`` is the targets' ``(lo, hi)`` (``None`` for an unbounded side); by default
    the batch target's min and max. The output's bound is found op by op at initialisation (the
    last bounding op on its values, through views and scalar affine maps); its dynamic range and
    bias against the target are reported at initialisation and after ``steps`` overfit steps
    (Adam, ``lr``), which also catch outputs pinned at an untracked bound.

    >>> import torch
    >>> x = torch.randn(16, 3)
    >>> head_range(steps=5, model=torch.nn.Linear(3, 1), batch=(x, 10 * x[:, :1])).passed
    True
    """
    import torch

    from ..core.forward import run_forward
    from ..core.losses import resolve_loss
    from ..core.outputs import primary_output
    from ..core.training import train_steps

    data = subject.batch_copy()
    target = _regression_target(data, target_range)
    lo, hi = target_range or (float(target.min()), float(target.max()))
    work = subject.model_copy("eval")
    first, bound = head_bound(work, data)
    if first is None or not first.is_floating_point():
        return subject.skipped("skipped: the model's output holds no floating prediction")
    init = _spread(first)
    metrics: dict = {"target_range": [lo, hi], "init": init, "bound": list(bound[:2]) if bound else None}
    details = [f"targets span [{lo:.4g}, {hi:.4g}]" + (f", mean {float(target.mean()):.4g} std"
               f" {float(target.double().std(unbiased=False)):.4g}" if target is not None else ""),
               f"at initialisation: outputs span [{init['min']:.4g}, {init['max']:.4g}], mean"
               f" {init['mean']:.4g} std {init['std']:.4g}"]
    after = None
    if target is not None or subject.loss is not None:
        lossfn = resolve_loss(subject.loss, data, first)
        run = train_steps(work, data, lossfn, steps=steps, lr=lr, seed=seed)
        with torch.no_grad():
            after = primary_output(run_forward(work.train(), data))  # as the run fitted it
        metrics["after"] = _spread(after)
        metrics["loss"] = [run.initial, run.best]
        a = metrics["after"]
        details.append(f"after {len(run.losses)} overfit steps (adam lr={lr:g}; outputs of a"
                       f" train-mode forward, as fitted): outputs span"
                       f" [{a['min']:.4g}, {a['max']:.4g}], mean {a['mean']:.4g} std"
                       f" {a['std']:.4g}; loss {run.initial:.4g} -> {run.best:.4g}")
    return _head_verdict(subject, lo, hi, bound, after, details, metrics)


def _regression_target(data: Any, target_range: Any) -> Any:
    """The batch's first floating target tensor (None when the range is declared and the batch
    has none); a UsageError when neither says the targets' range."""
    from ..core.batch import iter_tensors

    target = next((t for _, t in iter_tensors(data.target, "")), None) if data.has_target else None
    if target is not None and not target.is_floating_point():
        if target_range is None:
            raise UsageError("head_range is for regression heads: the batch's target is"
                             f" {str(target.dtype).replace('torch.', '')} (classes); declare"
                             " target_range=(lo, hi) to check a head anyway")
        target = None
    if target is None and target_range is None:
        raise UsageError("head_range needs a floating target in the batch or"
                         " target_range=(lo, hi); got a batch without target")
    return target


def _head_verdict(subject: Subject, lo: float, hi: float, bound: Any, after: Any,
                  details: list, metrics: dict) -> CheckResult:
    expected = f"expected an output able to reach the targets' range [{lo:.4g}, {hi:.4g}]"
    if bound is not None:
        blo, bhi, what, where = bound
        slack = TARGET_SLACK * max(1.0, abs(blo) if math.isfinite(blo) else 1.0,
                                   abs(bhi) if math.isfinite(bhi) else 1.0)
        interval = _interval(blo, bhi, what)
        details.append(f"the output is bounded to {interval} by {what} in module '{where}'")
        if lo < blo - slack or hi > bhi + slack:
            sat = ""
            if after is not None:
                a = metrics["after"]
                sat = (f"; after the overfit run outputs span [{a['min']:.4g}, {a['max']:.4g}],"
                       " pressed against the bound")
            details.append("remedy: an identity final activation for an unbounded regression"
                           " target (or scale the bounded head to the targets' range)")
            metrics["bounded_by"] = what
            return subject.failed(f"{expected}, observed the output bounded to {interval} by"
                                  f" {what} in module '{where}' while targets leave that range"
                                  f"{sat}", details, metrics)
    if after is not None:
        pinned = _pinned(after, lo, hi)
        if pinned is not None:
            value, share = pinned
            metrics["pinned"] = {"value": value, "share": share}
            return subject.failed(f"{expected}, observed {share:.0%} of outputs pinned at {value:.4g}"
                                  " after the overfit run while targets go beyond it: a bounded or"
                                  " clamped head", details, metrics)
    head = "an unbounded head" if bound is None else f"a bound {_interval(*bound[:3])} holding them"
    return subject.passed(f"{expected}, observed {head}"
                          + (f"; after the overfit run outputs span [{metrics['after']['min']:.4g},"
                             f" {metrics['after']['max']:.4g}]" if after is not None else ""),
                          details, metrics)
