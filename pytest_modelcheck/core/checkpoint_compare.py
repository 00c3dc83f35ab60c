"""How far weights moved between two checkpoints (paths, state dicts or modules):
:func:`compare_checkpoints` returns a :class:`DriftReport` of per-tensor and per-layer drift
(relative change, cosine similarity, max absolute difference, in float64 chunk by chunk), the
tensors that did not move, keys on one side only, shape and dtype differences.

Checkpoint files are opened as :mod:`.checkpoint` opens them (safe by default); all of these
names are also importable from :mod:`.checkpoint`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from .errors import UsageError
from .result import _builtin
from .units import dtype_name

__all__ = ["TensorDrift", "DriftReport", "compare_checkpoints"]


@dataclass
class TensorDrift:
    """How one tensor moved from checkpoint ``a`` to ``b``.

    ``relative_change`` is ||b - a|| / ||a|| (inf when ``a`` is all zeros and ``b`` is not,
    0 when both are); ``cosine`` is None when either tensor is all zeros.

    >>> TensorDrift("w", [2], 0.5, 1.0, 0.25, 2.0, 2.5).moved
    True
    """

    name: str
    shape: list
    relative_change: float
    cosine: Optional[float]
    max_abs_diff: float
    norm_a: float
    norm_b: float

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

    def to_dict(self) -> dict:
        """JSON-ready dictionary (non-finite floats as strings).

        >>> import torch
        >>> compare_checkpoints({"w": torch.ones(1)}, {"w": torch.ones(1)}).to_dict()["unchanged"]
        ['w']
        """
        return _builtin({k: getattr(self, k) for k in self.__dataclass_fields__ if k != "tensors"}
                        | {"tensors": [t.__dict__ for t in self.tensors]})

    def render(self, top: int = 10) -> str:
        """Text report: the ``top`` tensors and layers that moved most, the tensors that did not
        move, keys present on one side only, shape and dtype differences.

        >>> import torch
        >>> r = compare_checkpoints({"fc.w": torch.ones(4), "fc.b": torch.ones(1)},
        ...                         {"fc.w": torch.ones(4) * 2, "fc.b": torch.ones(1)})
        >>> print(r.render())  # doctest: +NORMALIZE_WHITESPACE
        Drift from <dict> to <dict>: 2 tensors compared, 1 moved, 1 unchanged
        Tensors that moved most (relative change ||b-a||/||a||, cosine, max |b-a|):
          fc.w  1  1  1
        Layers that moved most:
          fc  0.8944
        Unchanged (frozen or dead): fc.b
        """
        moved = [t for t in self.tensors if t.moved]
        lines = [f"Drift from {_p(self.a)} to {_p(self.b)}: {len(self.tensors)} tensors compared, "
                 f"{len(moved)} moved, {len(self.unchanged)} unchanged"]
        if moved:
            lines.append("Tensors that moved most (relative change ||b-a||/||a||, cosine, max |b-a|):")
            width = max(len(_p(t.name)) for t in moved[:top])
            for t in moved[:top]:
                cos = "-" if t.cosine is None else f"{t.cosine:.4g}"
                lines.append(f"  {_p(t.name):<{width}}  {t.relative_change:.4g}  {cos}  {t.max_abs_diff:.4g}")
            layers = [lay for lay in self.layers if lay[1] > 0][:top]
            if layers:
                lines.append("Layers that moved most:")
                width = max(len(_p(lay[0])) for lay in layers)
                for name, rel in layers:
                    lines.append(f"  {_p(name):<{width}}  {rel:.4g}")
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
        return str(x), load_state_dict(x, allow_unsafe=allow_unsafe)
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

    For each tensor present in both with the same shape: relative change ||b-a||/||a||, cosine
    similarity, max |b-a| (float64; a dtype difference is reported and compared anyway);
    "layers" aggregate the tensors of one module (name up to the last dot) as
    sqrt(sum ||b-a||^2) / sqrt(sum ||a||^2). Complex tensors are compared as pairs of reals;
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
    rows, unchanged, shapes, dtypes = [], [], [], []
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
        ta, tb = _comparable(ta), _comparable(tb)
        if ta is None or tb is None:
            continue  # nested, or too large once expanded or densified
        aa, bb, ab, dd, mx = _pair_sums(ta, tb)
        na, nb, nd = math.sqrt(aa), math.sqrt(bb), math.sqrt(dd)
        rel = nd / na if na > 0 else (0.0 if nd == 0 else math.inf)
        cos = ab / (na * nb) if na > 0 and nb > 0 else None
        rows.append(TensorDrift(name, _shape(ta), rel, cos, mx, na, nb))
        if mx == 0.0 and not math.isnan(dd):
            unchanged.append(name)
        layer = name.rpartition(".")[0] or name
        s = layer_sums.setdefault(layer, [0.0, 0.0])
        s[0] += dd
        s[1] += aa
    rows.sort(key=lambda t: (-(t.relative_change if not math.isnan(t.relative_change) else math.inf),
                             t.name))
    layers = []
    for layer, (dd, aa) in layer_sums.items():
        rel = math.sqrt(dd / aa) if aa > 0 else (0.0 if dd == 0 else math.inf)
        layers.append([layer, rel])
    layers.sort(key=lambda lay: (-lay[1], lay[0]))
    return DriftReport(name_a, name_b, rows, layers, unchanged,
                       [n for n in sa if n not in sb], [n for n in sb if n not in sa],
                       shapes, dtypes)


# Imported last: checkpoint.py re-exports the names above from its bottom, so either module can
# be imported first without a cycle (nothing above needs these until it is called).
from . import checkpoint as _checkpoint  # noqa: E402
from .checkpoint import _p, _shape, _split, load_state_dict  # noqa: E402
