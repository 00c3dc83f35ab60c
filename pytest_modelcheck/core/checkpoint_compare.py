"""How far weights moved between two checkpoints (paths, state dicts or modules):
:func:`compare_checkpoints` returns a :class:`DriftReport` of per-tensor and per-layer drift
(relative change, cosine similarity, max absolute difference, in float64 chunk by chunk), the
tensors that did not move, keys on one side only, shape and dtype differences.

Change is measured against a non-zero scale: ``||b-a|| / ||a||`` (relative) where the old
tensor is not all zeros, the absolute change ``||b-a||`` where it is (a zero-initialised bias,
a BatchNorm running mean), so no row reads ``inf``; each row says which (``measure``).
Integer and bool tensors (``num_batches_tracked``, index buffers, masks) are counters, not
weights: they are listed apart (:attr:`DriftReport.counters`) and never ranked.

Checkpoint files are opened as :mod:`.checkpoint` opens them (safe by default); all of these
names are also importable from :mod:`.checkpoint`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import UsageError
from .result import _builtin
from .units import dtype_name

__all__ = ["TensorDrift", "DriftReport", "compare_checkpoints"]


@dataclass
class TensorDrift:
    """How one tensor moved from checkpoint ``a`` to ``b``.

    ``relative_change`` is ||b - a|| / ||a|| (None when ``a`` is all zeros: there is no scale
    to measure against; ``absolute_change`` ||b - a|| is the measure then); ``cosine`` is None
    when either tensor is all zeros. ``change`` is the value the report ranks and gates on and
    ``measure`` says which it is (``"relative"`` or ``"absolute"``).

    >>> t = TensorDrift("w", [2], 0.5, 1.0, 0.25, 2.0, 2.5)
    >>> t.moved, t.measure, t.change
    (True, 'relative', 0.5)
    >>> TensorDrift("b", [2], None, None, 0.25, 0.0, 0.3, absolute_change=0.3).change
    0.3
    """

    name: str
    shape: list
    relative_change: Optional[float]
    cosine: Optional[float]
    max_abs_diff: float
    norm_a: float
    norm_b: float
    absolute_change: float = 0.0

    @property
    def measure(self) -> str:
        """``"relative"`` (||b-a||/||a||) or ``"absolute"`` (||b-a||, where ||a|| is zero).

        >>> TensorDrift("b", [1], None, None, 1.0, 0.0, 1.0, absolute_change=1.0).measure
        'absolute'
        """
        return "absolute" if self.relative_change is None else "relative"

    @property
    def change(self) -> float:
        """The relative change, or the absolute one where the old norm is zero.

        >>> TensorDrift("w", [2], 0.2, 1.0, 0.1, 5.0, 5.1, absolute_change=1.0).change
        0.2
        """
        return self.absolute_change if self.relative_change is None else self.relative_change

    @property
    def moved(self) -> bool:
        """False when the two tensors are exactly equal.

        >>> TensorDrift("w", [2], 0.0, 1.0, 0.0, 2.0, 2.0).moved
        False
        """
        return self.max_abs_diff != 0.0


@dataclass
class DriftReport:
    """What :func:`compare_checkpoints` found; ``tensors`` is ranked, most moved first.

    >>> import torch
    >>> r = compare_checkpoints({"w": torch.ones(4)}, {"w": torch.ones(4) * 1.5})
    >>> r.tensors[0].relative_change  # ||0.5 * 1|| / ||1|| over 4 elements = 1/2
    0.5
    """

    a: str
    b: str
    tensors: list
    layers: list
    unchanged: list
    only_in_a: list
    only_in_b: list
    shape_mismatches: list
    dtype_mismatches: list
    counters: list = field(default_factory=list)
    layers_from_zero: list = field(default_factory=list)

    @property
    def matches(self) -> bool:
        """True when both hold the same keys with the same shapes.

        >>> import torch
        >>> compare_checkpoints({"w": torch.ones(2)}, {"w": torch.ones(3)}).matches
        False
        """
        return not (self.only_in_a or self.only_in_b or self.shape_mismatches)

    def drift_over(self, threshold: float) -> list:
        """The tensors whose change (relative, or absolute where the old norm is zero) exceeds
        ``threshold``, or is not a number (non-finite weights); counters are not included.

        >>> import torch
        >>> r = compare_checkpoints({"w": torch.ones(4), "v": torch.ones(4)},
        ...                         {"w": torch.ones(4) * 1.5, "v": torch.ones(4) * 1.01})
        >>> [t.name for t in r.drift_over(0.1)]
        ['w']
        """
        return [t for t in self.tensors if math.isnan(t.change) or t.change > threshold]

    def to_dict(self) -> dict:
        """JSON-ready dictionary (non-finite floats as strings).

        >>> import torch
        >>> compare_checkpoints({"w": torch.ones(1)}, {"w": torch.ones(1)}).to_dict()["unchanged"]
        ['w']
        """
        return _builtin({k: getattr(self, k) for k in self.__dataclass_fields__ if k != "tensors"}
                        | {"tensors": [t.__dict__ | {"measure": t.measure, "change": t.change}
                                       for t in self.tensors]})

    def render(self, top: int = 10) -> str:
        """Text report: the ``top`` tensors and layers that moved most (by relative change,
        then those whose old norm is zero by absolute change), counters and integer buffers
        apart, the tensors that did not move, keys present on one side only, shape and dtype
        differences.

        >>> import torch
        >>> r = compare_checkpoints({"fc.w": torch.ones(4), "fc.b": torch.zeros(2),
        ...                          "fc.n": torch.tensor(0), "fc.s": torch.ones(1)},
        ...                         {"fc.w": torch.ones(4) * 2, "fc.b": torch.ones(2),
        ...                          "fc.n": torch.tensor(7), "fc.s": torch.ones(1)})
        >>> print(r.render())  # doctest: +NORMALIZE_WHITESPACE
        Drift from <dict> to <dict>: 3 tensors compared, 2 moved, 1 unchanged; 1 counter
        Tensors that moved most (relative change ||b-a||/||a||; absolute ||b-a|| where ||a|| is 0):
          tensor  change  measure   cosine  max |b-a|
          fc.w    1       relative  1       1
          fc.b    1.414   absolute  -       1
        Layers that moved most:
          fc  1.095  relative
        Counters and integer buffers (not ranked): fc.n: 0 -> 7
        Unchanged (frozen or dead): fc.s
        """
        moved = [t for t in self.tensors if t.moved]
        count = f"; {len(self.counters)} counter{'s' if len(self.counters) != 1 else ''}" \
            if self.counters else ""
        lines = [f"Drift from {_p(self.a)} to {_p(self.b)}: {len(self.tensors)} tensors compared, "
                 f"{len(moved)} moved, {len(self.unchanged)} unchanged{count}"]
        shown = [t for t in moved if t.measure == "relative"][:top] + \
            [t for t in moved if t.measure == "absolute"][:top]
        if shown:
            lines.append("Tensors that moved most (relative change ||b-a||/||a||; absolute"
                         " ||b-a|| where ||a|| is 0):")
            rows = [["tensor", "change", "measure", "cosine", "max |b-a|"]] + [
                [_p(t.name), f"{t.change:.4g}", t.measure,
                 "-" if t.cosine is None else f"{t.cosine:.4g}", f"{t.max_abs_diff:.4g}"]
                for t in shown]
            lines.extend(_table(rows))
        layers = [[n, v, "relative"] for n, v in self.layers if v > 0][:top] + \
            [[n, v, "absolute"] for n, v in self.layers_from_zero if v > 0][:top]
        if layers:
            lines.append("Layers that moved most:")
            lines.extend(_table([[_p(n), f"{v:.4g}", m] for n, v, m in layers]))
        if self.counters:
            lines.append("Counters and integer buffers (not ranked): "
                         + "; ".join(_counter_text(c) for c in self.counters))
        if self.unchanged:
            lines.append(f"Unchanged (frozen or dead): {', '.join(map(_p, self.unchanged))}")
        if self.only_in_a:
            lines.append(f"Only in a: {', '.join(map(_p, self.only_in_a))}")
        if self.only_in_b:
            lines.append(f"Only in b: {', '.join(map(_p, self.only_in_b))}")
        for name, sa, sb in self.shape_mismatches:
            lines.append(f"Shape differs: {_p(name)}: {tuple(sa)} vs {tuple(sb)}")
        for name, da, db in self.dtype_mismatches:
            lines.append(f"Dtype differs: {_p(name)}: {da} vs {db}")
        return "\n".join(lines)


def _table(rows: list) -> list:
    """Left-aligned columns, two spaces apart, indented by two."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(f"{c:<{w}}" for c, w in zip(r, widths)).rstrip() for r in rows]


def _counter_text(c: dict) -> str:
    name = _p(c["name"])
    if c["a"] is not None:
        return f"{name}: {c['a']} -> {c['b']}" if c["changed"] else f"{name}: {c['a']} (unchanged)"
    if not c["changed"]:
        return f"{name}: unchanged"
    return f"{name}: {c['changed']:,} of {c['numel']:,} elements changed"


def _as_state(x: Any, allow_unsafe: bool) -> tuple:
    import torch

    if isinstance(x, torch.nn.Module):
        return f"<{type(x).__name__}>", x.state_dict()
    if isinstance(x, dict):
        key, state, _ = _split(x)
        if key is None:
            raise UsageError("compare_checkpoints: expected a path, a state dict or an nn.Module, "
                             "got a dict without tensors")
        return "<dict>", state
    if isinstance(x, (str, os.PathLike)):
        try:
            return str(x), load_state_dict(x, allow_unsafe=allow_unsafe)
        except UsageError:
            if not allow_unsafe:
                raise
            obj = _checkpoint._open(x, allow_unsafe, False, need_values=True)[2]
            if not isinstance(obj, torch.nn.Module):
                raise
            return str(x), obj.state_dict()  # a whole model pickled (trusted: allow_unsafe)
    raise UsageError(f"compare_checkpoints: expected a path, a state dict or an nn.Module, got "
                     f"{type(x).__name__}")


_MAX_COMPARE_NUMEL = 1 << 24  # elements materialised for one comparison (expanded, sparse)


def _comparable(t: Any) -> Any:
    """A plain strided tensor to compare: quantized ones dequantized, sparse ones densified and
    expanded (stride-0) ones materialised when that stays under ``_MAX_COMPARE_NUMEL``
    elements; None when it cannot be compared (nested, or too large)."""
    import torch

    try:
        if t.is_nested:
            return None
        if t.is_quantized:
            t = t.dequantize()
        if t.layout != torch.strided:
            if t.numel() > _MAX_COMPARE_NUMEL:
                return None
            t = t.to_dense()
        if t.numel() * t.element_size() > t.untyped_storage().nbytes() and \
                t.numel() > _MAX_COMPARE_NUMEL:
            return None
        return t
    except (RuntimeError, NotImplementedError):
        return None


def _pair_sums(a: Any, b: Any) -> tuple:
    """(sum a^2, sum b^2, sum a*b, sum (b-a)^2, max |b-a|) in float64, chunk by chunk."""
    import torch

    a, b = (torch.view_as_real(t.detach().resolve_conj()) if t.is_complex() else t.detach()
            for t in (a, b))
    fa, fb = a.reshape(-1), b.reshape(-1)
    aa = bb = ab = dd = 0.0
    mx = 0.0
    step = _checkpoint._CHUNK  # looked up on core.checkpoint (tests patch it there)
    with torch.no_grad():
        for s in range(0, fa.numel(), step):
            ca = fa[s:s + step].to(device="cpu", dtype=torch.float64)
            cb = fb[s:s + step].to(device="cpu", dtype=torch.float64)
            d = cb - ca
            aa += float((ca * ca).sum())
            bb += float((cb * cb).sum())
            ab += float((ca * cb).sum())
            dd += float((d * d).sum())
            if d.numel():
                mx = max(mx, float(d.abs().max()))
    return aa, bb, ab, dd, mx


def compare_checkpoints(a: Any, b: Any, allow_unsafe: bool = False) -> DriftReport:
    """Per-tensor drift between two checkpoints (paths, state dicts or modules).

    For each tensor present in both with the same shape: relative change ||b-a||/||a|| (the
    absolute change ||b-a|| where ||a|| is zero), cosine similarity, max |b-a| (float64; a
    dtype difference is reported and compared anyway); "layers" aggregate the tensors of one
    module (name up to the last dot) as sqrt(sum ||b-a||^2) / sqrt(sum ||a||^2)
    (``layers_from_zero``: sqrt(sum ||b-a||^2) where that old norm is zero). Integer and bool
    tensors go to ``counters`` (elements changed; both values of a one-element counter). Complex tensors are compared as pairs of reals;
    a complex/real pair or a tensor on ``meta`` (no data) is not compared. Exactly equal tensors are listed as unchanged
    (frozen, or dead: they received no update).

    >>> import torch
    >>> r = compare_checkpoints({"x": torch.tensor([3.0, 4.0]), "old": torch.ones(1)},
    ...                         {"x": torch.tensor([3.0, 4.0]), "new": torch.ones(1)})
    >>> r.unchanged, r.only_in_a, r.only_in_b
    (['x'], ['old'], ['new'])
    """
    name_a, sa = _as_state(a, allow_unsafe)
    name_b, sb = _as_state(b, allow_unsafe)
    rows, unchanged, shapes, dtypes, counters = [], [], [], [], []
    layer_sums: dict = {}
    for name in [n for n in sa if n in sb]:
        ta, tb = sa[name], sb[name]
        if _shape(ta) != _shape(tb):
            shapes.append([name, _shape(ta), _shape(tb)])
            continue
        if ta.dtype != tb.dtype:
            dtypes.append([name, dtype_name(ta.dtype), dtype_name(tb.dtype)])
        if ta.is_complex() != tb.is_complex() or "meta" in (ta.device.type, tb.device.type):
            continue
        counter = _is_counter(ta) and _is_counter(tb)
        ta, tb = _comparable(ta), _comparable(tb)
        if ta is None or tb is None:
            continue  # nested, or too large once expanded or densified
        if counter:
            counters.append(_counter_row(name, ta, tb))
            continue
        aa, bb, ab, dd, mx = _pair_sums(ta, tb)
        na, nb, nd = math.sqrt(aa), math.sqrt(bb), math.sqrt(dd)
        rel = nd / na if na > 0 or math.isnan(na) else None
        cos = ab / (na * nb) if na > 0 and nb > 0 else None
        rows.append(TensorDrift(name, _shape(ta), rel, cos, mx, na, nb, absolute_change=nd))
        if mx == 0.0 and not math.isnan(dd):
            unchanged.append(name)
        layer = name.rpartition(".")[0] or name
        s = layer_sums.setdefault(layer, [0.0, 0.0])
        s[0] += dd
        s[1] += aa
    rows.sort(key=lambda t: (t.measure != "relative",
                             -(t.change if not math.isnan(t.change) else math.inf), t.name))
    layers, from_zero = [], []
    for layer, (dd, aa) in layer_sums.items():
        if aa > 0 or math.isnan(aa):
            layers.append([layer, math.sqrt(dd / aa)])
        else:
            from_zero.append([layer, math.sqrt(dd)])
    for entries in (layers, from_zero):
        entries.sort(key=lambda lay: (-(lay[1] if not math.isnan(lay[1]) else math.inf), lay[0]))
    return DriftReport(name_a, name_b, rows, layers, unchanged,
                       [n for n in sa if n not in sb], [n for n in sb if n not in sa],
                       shapes, dtypes, counters, from_zero)


def _is_counter(t: Any) -> bool:
    """An integer or bool tensor (a step counter, indices, a mask), not a quantized weight."""
    return not (t.is_floating_point() or t.is_complex() or t.is_quantized)


def _counter_row(name: str, a: Any, b: Any) -> dict:
    """How an integer or bool tensor changed: elements changed, and both values when it holds
    one element (``num_batches_tracked: 0 -> 10``)."""
    import torch

    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    changed = 0
    step = _checkpoint._CHUNK
    with torch.no_grad():
        for s in range(0, fa.numel(), step):
            changed += int((fa[s:s + step].cpu() != fb[s:s + step].cpu()).sum())
    scalar = fa.numel() == 1
    return {"name": name, "shape": _shape(a), "dtype": dtype_name(a.dtype), "numel": fa.numel(),
            "changed": changed, "a": fa[0].item() if scalar else None,
            "b": fb[0].item() if scalar else None}


# Imported last: checkpoint.py re-exports the names above from its bottom, so either module can
# be imported first without a cycle (nothing above needs these until it is called).
from . import checkpoint as _checkpoint  # noqa: E402
from .checkpoint import _p, _shape, _split, load_state_dict  # noqa: E402
