"""Symmetries: permutation_invariant, permutation_equivariant and padding_invariant.

Each check runs a copy of the model in eval mode without gradients on the example batch and on
a transformed copy of it, and compares the outputs (``|a - b| <= atol + rtol * |a|``):

* ``permutation_invariant(dim)``: permuting inputs along ``dim`` (the set dimension of a
  DeepSets or a transformer without positions) leaves every output unchanged;
* ``permutation_equivariant(dim)``: it permutes the outputs along ``out_dim`` the same way;
* ``padding_invariant(mask)``: appending padded elements, marked as padding in the mask,
  leaves the outputs unchanged.

Inputs are named by ``input_index``: an int is a positional argument of the model, a str a key
of the (first) dict argument, as a collate function builds it, or a keyword argument; a tuple
names several inputs transformed together (features and their mask).

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

from typing import Any, Optional

from ..core.errors import UsageError
from ..core.result import CheckResult
from ..core.units import is_int as _is_int
from ..core.units import is_number as _is_number
from .registry import check
from .subject import Subject


def _refs(value: Any, arg: str, empty_ok: bool = False) -> tuple:
    refs = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if (not refs and not empty_ok) or not all(_is_int(r) or (isinstance(r, str) and r) for r in refs):
        raise UsageError(f"{arg}={value!r}: expected a positional input index (int), an input key"
                         " (str), or a tuple of them, such as 0 or ('x', 'mask')")
    return refs


def _tolerances(atol: Any, rtol: Any) -> dict:
    for name, v in (("atol", atol), ("rtol", rtol)):
        if not _is_number(v) or not v >= 0:
            raise UsageError(f"{name}={v!r}: expected a number >= 0")
    return {"atol": float(atol), "rtol": float(rtol)}


def _ref_text(ref: Any) -> str:
    return f"input[{ref!r}]"


def _get(batch: Any, ref: Any) -> Any:
    import torch

    if _is_int(ref):
        if not -len(batch.args) <= ref < len(batch.args):
            raise UsageError(f"input_index {ref}: the model takes {len(batch.args)} positional"
                             " input(s)")
        value = batch.args[ref]
    elif batch.args and isinstance(batch.args[0], dict) and ref in batch.args[0]:
        value = batch.args[0][ref]
    elif ref in batch.kwargs:
        value = batch.kwargs[ref]
    else:
        have = list(batch.args[0]) if batch.args and isinstance(batch.args[0], dict) else \
            list(batch.kwargs)
        raise UsageError(f"input key {ref!r}: not among the model's inputs ({have})")
    if not isinstance(value, torch.Tensor):
        raise UsageError(f"{_ref_text(ref)}: expected a tensor, got {type(value).__name__}")
    return value


def _replaced(batch: Any, new: dict) -> Any:
    """A copy of ``batch`` whose inputs named by ``new``'s keys are replaced by its values."""
    from ..core.batch import Batch

    args = list(batch.args)
    kwargs = dict(batch.kwargs)
    for ref, t in new.items():
        if _is_int(ref):
            args[ref] = t
        elif args and isinstance(args[0], dict) and ref in args[0]:
            args[0] = dict(args[0], **{ref: t})
        else:
            kwargs[ref] = t
    return Batch(args=tuple(args), kwargs=kwargs, target=batch.target, has_target=batch.has_target,
                 factory=None, target_key=batch.target_key)


def _size_at(t: Any, dim: int, ref: Any) -> int:
    if not -t.dim() <= dim < t.dim():
        raise UsageError(f"dim={dim}: {_ref_text(ref)} has shape {list(t.shape)}")
    return int(t.shape[dim])


def _compare(a: Any, b: Any, atol: float, rtol: float) -> dict:
    """Max |a-b| over elements (NaN-aware), whether it is beyond tolerance, and its sample."""
    import torch

    a = a.detach().double() if not a.is_complex() else a.detach()
    b = b.detach().double() if not b.is_complex() else b.detach()
    same_nan = torch.isnan(a) & torch.isnan(b)
    diff = (a - b).abs()
    diff = torch.where(same_nan, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    bad = diff > atol + rtol * a.abs().nan_to_num(0.0)
    if diff.numel() == 0:
        return {"max": 0.0, "bad": False, "sample": 0}
    flat = int(diff.reshape(-1).argmax())
    sample = flat // max(1, diff[0].numel()) if diff.dim() >= 1 else 0
    return {"max": float(diff.max()), "bad": bool(bad.any()), "sample": sample}


def _forward(model: Any, data: Any) -> Any:
    import torch

    from ..core.forward import run_forward

    with torch.no_grad():
        return run_forward(model, data)


def _permutation(n: int, seed: int) -> Any:
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if bool((perm == torch.arange(n)).all()):
        perm = torch.roll(perm, 1)
    return perm


def _perm_text(perm: Any) -> str:
    items = perm.tolist()
    return "[" + ", ".join(str(i) for i in items[:8]) + (", ...]" if len(items) > 8 else "]")


def _validate_perm(dim: Any, input_index: Any = 0, trials: Any = 3, atol: Any = 1e-5,
                   rtol: Any = 1e-4) -> dict:
    if not _is_int(dim):
        raise UsageError(f"dim={dim!r}: expected an int, the dimension of the inputs to permute"
                         " (such as 1, the set dimension of a (batch, set, features) input)")
    if not _is_int(trials) or trials < 1:
        raise UsageError(f"trials={trials!r}: expected an int >= 1, the number of random"
                         " permutations tried")
    return {"dim": dim, "input_index": _refs(input_index, "input_index"), "trials": trials,
            **_tolerances(atol, rtol)}


def _validate_equiv(dim: Any, input_index: Any = 0, out_dim: Any = None, trials: Any = 3,
                    atol: Any = 1e-5, rtol: Any = 1e-4) -> dict:
    values = _validate_perm(dim, input_index, trials, atol, rtol)
    if out_dim is not None and not _is_int(out_dim):
        raise UsageError(f"out_dim={out_dim!r}: expected an int (the output dimension permuted"
                         " like the input) or None for the same as dim")
    values["out_dim"] = dim if out_dim is None else out_dim
    return values


def _set_size(tensors: dict, dim: int, refs: tuple) -> int:
    """The common size along ``dim`` of the inputs permuted together (at least 2)."""
    sizes = {r: _size_at(t, dim, r) for r, t in tensors.items()}
    n = sizes[refs[0]]
    if any(s != n for s in sizes.values()):
        raise UsageError(f"dim={dim}: the inputs have different sizes there ({sizes})")
    if n < 2:
        raise UsageError(f"dim={dim}: {_ref_text(refs[0])} has size {n} there; nothing to permute")
    return n


def _run_permutations(subject: Subject, dim: int, refs: tuple, trials: int, atol: float,
                      rtol: float, out_dim: Any) -> tuple:
    """``(first failure or None, size, number of outputs compared)``; ``out_dim`` None means
    invariance."""
    from ..core.batch import iter_tensors

    work = subject.model_copy("eval")
    data = subject.batch_copy()
    tensors = {r: _get(data, r) for r in refs}
    n = _set_size(tensors, dim, refs)
    base = list(iter_tensors(_forward(work, data.clone()), "output"))
    if out_dim is not None and not any(-t.dim() <= out_dim < t.dim() and t.shape[out_dim] == n
                                       for _, t in base):
        shapes = {p: list(t.shape) for p, t in base}
        raise UsageError(f"out_dim={out_dim}: no output has size {n} there to permute ({shapes})")
    for k in range(trials):
        perm = _permutation(n, k).to(tensors[refs[0]].device)
        moved = _replaced(data.clone(), {r: t.index_select(dim, perm) for r, t in tensors.items()})
        got = list(iter_tensors(_forward(work, moved), "output"))
        for (path, a), (_, b) in zip(base, got):
            if out_dim is not None and -a.dim() <= out_dim < a.dim() and a.shape[out_dim] == n:
                a = a.index_select(out_dim, perm.to(a.device))
            if a.shape != b.shape:
                return ({"output": path, "perm": perm, "trial": k, "max": float("inf"),
                         "sample": 0, "shape": f"shape {list(a.shape)} -> {list(b.shape)}"}, n,
                        len(base))
            c = _compare(a, b, atol, rtol)
            if c["bad"]:
                return dict(c, output=path, perm=perm, trial=k, shape=""), n, len(base)
    return None, n, len(base)


def _perm_result(subject: Subject, expected: str, bad: Any, n: int, outputs: int, trials: int,
                 remedy: str) -> CheckResult:
    metrics = {"size": n, "outputs": outputs, "trials": trials}
    if bad is None:
        return subject.passed(f"{expected}, observed equal outputs for {trials} random"
                              f" permutations of {n} elements", "", metrics)
    observed = bad["shape"] or f"max |diff| {bad['max']:.3g} in {bad['output']} at sample {bad['sample']}"
    metrics.update({"max_diff": bad["max"], "output": bad["output"], "sample": bad["sample"]})
    return subject.failed(f"{expected}, observed {observed} (permutation"
                          f" {_perm_text(bad['perm'])})",
                          f"permutation {bad['trial'] + 1} of {trials}: {bad['perm'].tolist()}\n{remedy}",
                          metrics)


POSITION_REMEDY = ("remedy: something in forward depends on the position along that dimension: a"
                   " learned or sinusoidal position embedding, an element special-cased by index"
                   " (x[:, 0]), a cumulative op, a convolution or a flatten over the set; pool with"
                   " a symmetric function (sum, mean, max) over per-element features")


@check(default=False, validate=_validate_perm)
def permutation_invariant(dim: Any, input_index: Any = 0, trials: Any = 3, atol: Any = 1e-5,
                          rtol: Any = 1e-4, *, subject: Subject) -> CheckResult:
    """Permuting the inputs along `dim` (a set dimension) leaves every output unchanged.

    ``input_index`` names the input(s) permuted together (int: positional, str: dict key or
    keyword; a tuple for features plus mask). ``trials`` seeded random permutations (never the
    identity) are tried; outputs must agree within ``atol + rtol * |output|``.

    >>> import torch
    >>> class SumPool(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x.sum(dim=1)
    >>> permutation_invariant(1, model=SumPool(), batch=torch.randn(2, 5, 3)).passed
    True
    """
    bad, n, outputs = _run_permutations(subject, dim, input_index, trials, atol, rtol, None)
    inputs = ", ".join(_ref_text(r) for r in input_index)
    return _perm_result(subject, f"expected outputs unchanged when {inputs} is permuted along"
                        f" dim {dim}", bad, n, outputs, trials, POSITION_REMEDY)


@check(default=False, validate=_validate_equiv)
def permutation_equivariant(dim: Any, input_index: Any = 0, out_dim: Any = None, trials: Any = 3,
                            atol: Any = 1e-5, rtol: Any = 1e-4, *, subject: Subject) -> CheckResult:
    """Permuting the inputs along `dim` permutes the outputs along `out_dim` the same way.

    ``out_dim`` defaults to ``dim``. Output tensors whose size along ``out_dim`` is the permuted
    size must come out permuted; the others (a pooled summary) must come out unchanged. Other
    arguments as for ``permutation_invariant``.

    >>> import torch
    >>> permutation_equivariant(1, model=torch.nn.Linear(3, 4), batch=torch.randn(2, 5, 3)).passed
    True
    """
    bad, n, outputs = _run_permutations(subject, dim, input_index, trials, atol, rtol, out_dim)
    inputs = ", ".join(_ref_text(r) for r in input_index)
    return _perm_result(subject, f"expected outputs permuted along dim {out_dim} when {inputs} is"
                        f" permuted along dim {dim}", bad, n, outputs, trials, POSITION_REMEDY)


def _validate_padding(mask: Any, input_index: Any = 0, dim: Any = 1, pad: Any = 3,
                      pad_flag: Any = 0, pad_value: Any = None, atol: Any = 1e-5,
                      rtol: Any = 1e-4) -> dict:
    if not (_is_int(mask) or (isinstance(mask, str) and mask)):
        raise UsageError(f"mask={mask!r}: expected the positional index (int) or key (str) of"
                         " the mask input")
    refs = _refs(input_index, "input_index", empty_ok=True)
    if mask in refs:
        raise UsageError(f"input_index={input_index!r}: names the mask {mask!r}; name the"
                         " inputs padded beside it")
    if not _is_int(dim):
        raise UsageError(f"dim={dim!r}: expected an int, the set dimension that is padded")
    if not _is_int(pad) or pad < 1:
        raise UsageError(f"pad={pad!r}: expected an int >= 1, the number of padded elements"
                         " appended")
    if not isinstance(pad_flag, (bool, int, float)):
        raise UsageError(f"pad_flag={pad_flag!r}: expected the mask value of a padded element"
                         " (0/False when the mask is 1/True for real elements, True for a"
                         " key_padding_mask)")
    if pad_value is not None and not _is_number(pad_value):
        raise UsageError(f"pad_value={pad_value!r}: expected a number, or None for random values")
    return {"mask": mask, "input_index": refs, "dim": dim, "pad": pad, "pad_flag": pad_flag,
            "pad_value": pad_value, **_tolerances(atol, rtol)}


def _padded_inputs(data: Any, mask: Any, refs: tuple, dim: int, pad: int, pad_flag: Any,
                   pad_value: Any) -> tuple:
    """``(size along dim, {input ref: padded tensor})``: ``pad`` elements appended along ``dim``
    to the mask (``pad_flag``) and to the inputs padded with it (``pad_value``; None: seeded
    random values, zeros for integer inputs)."""
    import torch

    m = _get(data, mask)
    tensors = {r: _get(data, r) for r in refs}
    n = _size_at(m, dim, mask)
    for r, t in tensors.items():
        if _size_at(t, dim, r) != n:
            raise UsageError(f"dim={dim}: {_ref_text(r)} has size {t.shape[dim]} there, the mask"
                             f" {n}")
    g = torch.Generator().manual_seed(0)

    def padded(t: Any, fill: Any) -> Any:
        shape = list(t.shape)
        shape[dim] = pad
        if fill is None and t.is_floating_point():
            extra = torch.randn(shape, generator=g, dtype=t.dtype).to(t.device)
        else:
            extra = torch.full(shape, 0 if fill is None else fill, dtype=t.dtype, device=t.device)
        return torch.cat([t, extra], dim=dim)

    new = {r: padded(t, pad_value) for r, t in tensors.items()}
    new[mask] = padded(m, pad_flag)
    return n, new


def _padding_leak(base: list, got: list, dim: int, pad: int, atol: float,
                  rtol: float) -> Optional[tuple]:
    """``(output path, shapes (a, b) or None, comparison or None)`` of the first output that
    the padding changed (outputs grown by ``pad`` along ``dim`` compared on their first
    positions), or None."""
    for (path, a), (_, b) in zip(base, got):
        if a.shape != b.shape and a.dim() == b.dim() and -a.dim() <= dim < a.dim() \
                and b.shape[dim] == a.shape[dim] + pad:
            b = b.narrow(dim, 0, a.shape[dim])
        if a.shape != b.shape:
            return path, (list(a.shape), list(b.shape)), None
        c = _compare(a, b, atol, rtol)
        if c["bad"]:
            return path, None, c
    return None


PADDING_REMEDY = ("remedy: the padded elements leak in: pool with the mask (sum(x * m) / sum(m),"
                  " masked_fill(-inf) before max/softmax), pass key_padding_mask to attention,"
                  " and check which mask value means padding (pad_flag)")


@check(default=False, validate=_validate_padding)
def padding_invariant(mask: Any, input_index: Any = 0, dim: Any = 1, pad: Any = 3,
                      pad_flag: Any = 0, pad_value: Any = None, atol: Any = 1e-5,
                      rtol: Any = 1e-4, *, subject: Subject) -> CheckResult:
    """Appending `pad` masked (padding) elements along `dim` leaves the outputs unchanged.

    ``mask`` names the mask input (int: positional, str: dict key or keyword); ``input_index``
    the input(s) padded with it (``()``: the mask only). The mask gets ``pad_flag`` at the new
    positions (0/False: the mask is 1/True for real elements; pass ``pad_flag=True`` for a
    ``key_padding_mask``). The
    padded elements are seeded random values (``pad_value=None``, zeros for integer inputs) or
    ``pad_value``: masked content must not matter. Outputs that grew along ``dim`` by ``pad``
    are compared on their first, real positions.

    >>> import torch
    >>> class MaskedMean(torch.nn.Module):
    ...     def forward(self, x, m):
    ...         return (x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
    >>> x, m = torch.randn(2, 4, 3), torch.ones(2, 4)
    >>> padding_invariant(1, model=MaskedMean(), batch=((x, m), None)).passed
    True
    """
    from ..core.batch import iter_tensors

    work = subject.model_copy("eval")
    data = subject.batch_copy()
    n, new = _padded_inputs(data, mask, input_index, dim, pad, pad_flag, pad_value)
    base = list(iter_tensors(_forward(work, data.clone()), "output"))
    got = list(iter_tensors(_forward(work, _replaced(data.clone(), new)), "output"))
    expected = (f"expected outputs unchanged when {pad} elements masked by {_ref_text(mask)} are"
                f" appended along dim {dim}")
    metrics = {"size": n, "pad": pad, "outputs": len(base)}
    leak = _padding_leak(base, got, dim, pad, atol, rtol)
    if leak is None:
        return subject.passed(f"{expected}, observed equal outputs ({len(base)} output tensors)",
                              "", metrics)
    path, shapes, c = leak
    if shapes is not None:
        return subject.failed(f"{expected}, observed {path} shape {shapes[0]} -> {shapes[1]}", "",
                              metrics)
    metrics.update({"max_diff": c["max"], "output": path, "sample": c["sample"]})
    return subject.failed(f"{expected}, observed max |diff| {c['max']:.3g} in {path} at sample"
                          f" {c['sample']}", PADDING_REMEDY, metrics)
