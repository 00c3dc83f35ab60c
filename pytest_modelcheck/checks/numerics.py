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

__all__ = ["activations_healthy", "device_portable", "dtype_stable", "output_range",
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


def _bounds(value: Any, key: str) -> tuple:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(v is None or is_number(v) for v in value)):
        raise UsageError(f"ranges{key}={value!r}: expected a (lo, hi) pair of numbers (None for"
                         " no bound)")
    lo = -math.inf if value[0] is None else float(value[0])
    hi = math.inf if value[1] is None else float(value[1])
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise UsageError(f"ranges{key}={value!r}: expected lo <= hi")
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
