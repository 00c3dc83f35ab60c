"""Architecture checks that need declarations: UNet skips, ViT patches, FNO modes, power spectra.

* ``unet_skips(sizes)``: every ``torch.cat`` of the forward joins tensors of matching spatial
  size at each declared input size; names the first mismatching cat (module, source line) and the
  divisibility rule the UNet's depth imposes.
* ``vit_patches(sizes)``: the patch embedding (a convolution with kernel == stride) tiles each
  declared size and the token count matches the positional embedding's length (the parameter
  added to the patch tokens, found at dispatch); skipped when the model has no patch embedding.
* ``fno_modes(grid_sizes=None)``: the Fourier modes kept by each spectral layer (found from the
  FFT ops at dispatch and the slices of their spectra) fit below the Nyquist limit of each grid,
  and its output holds no energy beyond the kept modes; skipped when no FFT truncates modes.
* ``spectrum_matches()``: the radially averaged power spectrum of the prediction follows the
  target's in every wavenumber band.

None runs by default (``default=False``): each needs the user to say what to expect.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator

from ..core.errors import ModelError, UsageError
from ..core.result import CheckResult
from .registry import SkipCheck, check


from ..core.units import is_int as _is_int


from ..core.units import is_number as _is_number


def _validate_sizes(sizes: Any, name: str) -> tuple:
    """A list of spatial sizes: ints (the same along every spatial dim) or tuples of ints."""
    example = f"{name}=[16, 24] or {name}=[(16, 16, 16), (24, 24, 24)]"
    if _is_int(sizes):
        sizes = [sizes]
    if not isinstance(sizes, (list, tuple)) or not sizes:
        raise UsageError(f"{name}={sizes!r}: expected a non-empty list of sizes such as {example}")
    out = []
    for s in sizes:
        if _is_int(s) and s >= 1:
            out.append(s)
        elif (isinstance(s, (list, tuple)) and s and all(_is_int(d) and d >= 1 for d in s)):
            out.append(tuple(s))
        else:
            raise UsageError(f"{name}={sizes!r}: size {s!r} is not a positive int or a tuple of"
                             f" positive ints; expected {example}")
    return tuple(out)


def _validate_index(input_index: Any) -> int:
    if not _is_int(input_index) or input_index < 0:
        raise UsageError(f"input_index={input_index!r}: expected an int >= 0, the position of the"
                         " image/volume among the model's inputs")
    return input_index


def _label(size: Any) -> str:
    """``20`` for a cube (or an int), ``(20, 24)`` otherwise."""
    if _is_int(size):
        return str(size)
    return str(size[0]) if len(set(size)) == 1 else str(tuple(size))


def _labels(sizes: Any) -> str:
    return ", ".join(str(s) for s in sizes)




def _input_slot(batch: Any, input_index: int) -> tuple:
    """``("args", i)`` for positional input ``input_index``, or, for a batch of keyword inputs
    only (``model(**batch)``, such as ``pixel_values``) and ``input_index=0``, ``("kwargs",
    name)`` of its first floating tensor with a batch, a channel and a spatial dim."""
    import torch

    if input_index < len(batch.args) and isinstance(batch.args[input_index], torch.Tensor):
        return "args", input_index
    if not batch.args and input_index == 0:
        for k, v in batch.kwargs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 3:
                return "kwargs", k
    raise UsageError(f"input_index={input_index}: the model's positional input {input_index}"
                     f" is not a tensor (the batch has {len(batch.args)} positional inputs)")


def _input_tensor(batch: Any, input_index: int) -> Any:
    kind, key = _input_slot(batch, input_index)
    return batch.args[key] if kind == "args" else batch.kwargs[key]


def _target_shape(x: Any, size: Any, ndim: int) -> tuple:
    """``x.shape`` with its last ``ndim`` dims (or ``len(size)`` for a tuple) set to ``size``."""
    dims = (size,) * ndim if _is_int(size) else tuple(size)
    if len(dims) > x.dim() - 1:
        raise UsageError(f"size {size!r}: {len(dims)} spatial dims, but the input of shape"
                         f" {tuple(x.shape)} has only {x.dim() - 1} dims after the batch dim")
    return tuple(x.shape[:x.dim() - len(dims)]) + dims


def _resized(batch: Any, input_index: int, size: Any, ndim: int) -> Any:
    """A copy of ``batch`` whose input ``input_index`` is tiled/cropped to spatial ``size``."""
    from ..core.batch import Batch
    from ..core.shapes import resize_to

    kind, key = _input_slot(batch, input_index)
    x = _input_tensor(batch, input_index)
    new = resize_to(x, _target_shape(x, size, ndim))
    if kind == "kwargs":
        return Batch(args=batch.args, kwargs={**batch.kwargs, key: new}, target=batch.target,
                     has_target=batch.has_target, target_key=batch.target_key)
    args = list(batch.args)
    args[key] = new
    return Batch(args=tuple(args), kwargs=batch.kwargs, target=batch.target,
                 has_target=batch.has_target)


def _root_name(model: Any) -> str:
    return type(model).__name__


@contextlib.contextmanager
def _module_stack(model: Any, on_output: Any = None) -> Iterator[list]:
    """Keep ``stack`` (yielded) equal to the module paths being run; removed in ``finally``.

    ``on_output(name, module, args, output)`` is called after each module's forward.
    """
    names = {m: n for n, m in model.named_modules()}
    stack: list = []

    def push(mod: Any, args: Any) -> None:
        stack.append(names.get(mod, ""))

    def pop(mod: Any, args: Any, out: Any) -> None:
        if stack:
            stack.pop()
        if on_output is not None:
            on_output(names.get(mod, ""), mod, args, out)

    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop))
        yield stack
    finally:
        for h in handles:
            h.remove()
        stack.clear()


# ---------------------------------------------------------------------------------- unet_skips
def _validate_unet(sizes: Any = None, input_index: Any = 0) -> dict:
    if sizes is None:
        raise UsageError("sizes=None: expected the input sizes to try, such as sizes=[16, 24]"
                         " or sizes=[(16, 16, 16), (24, 24, 24)]")
    return {"sizes": _validate_sizes(sizes, "sizes"), "input_index": _validate_index(input_index)}


def _cat_mode(record: dict, stack: list, root: str) -> Any:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..core.dispatch import user_source

    cat = torch.ops.aten.cat

    class CatMode(TorchDispatchMode):
        """Records the first ``aten.cat`` whose inputs disagree outside the cat dimension."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            if getattr(func, "overloadpacket", None) is cat and record["mismatch"] is None:
                tensors = args[0] if args else kwargs.get("tensors", ())
                dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                shapes = [tuple(t.shape) for t in tensors
                          if isinstance(t, torch.Tensor) and not (t.dim() == 1 and t.numel() == 0)]
                record["cats"] += 1
                if shapes:
                    nd = len(shapes[0])
                    d = dim % nd if nd else 0
                    for s in shapes[1:]:
                        diff = [j for j in range(min(nd, len(s))) if j != d and s[j] != shapes[0][j]]
                        if len(s) != nd or diff:
                            j = diff[0] if diff else None
                            record["mismatch"] = {
                                "module": stack[-1] if stack and stack[-1] else root,
                                "source": user_source(), "dim": j, "cat_dim": d,
                                "a": shapes[0][j] if j is not None else nd,
                                "b": s[j] if j is not None else len(s), "shapes": shapes}
                            break
            return func(*args, **kwargs)

    return CatMode()


def _stride_factor(model: Any) -> int:
    """Product of the strides of the down-sampling convolutions and pools (structural guess)."""
    import torch.nn as nn

    down = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
            nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
    factor = 1
    for m in model.modules():
        if isinstance(m, down):
            stride = m.stride if m.stride is not None else m.kernel_size
            stride = stride if isinstance(stride, (tuple, list)) else (stride,)
            factor *= max(int(s) for s in stride)
    return factor


def _run_traced(work: Any, data: Any, ndim: int) -> dict:
    """Forward under the cat-recording mode; the smallest spatial size of any module output."""
    import torch

    record = {"cats": 0, "mismatch": None, "error": None, "output": None, "smallest": None}
    in_dim = None
    for t in data.args:
        if isinstance(t, torch.Tensor):
            in_dim = t.dim()
            break

    def seen(name: str, mod: Any, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == in_dim and ndim:
            spatial = tuple(out.shape[-ndim:])
            if min(spatial) > 1:
                old = record["smallest"]
                record["smallest"] = spatial if old is None else tuple(map(min, old, spatial))

    from ..core.forward import run_forward

    with _module_stack(work, seen) as stack:
        try:
            with torch.no_grad(), _cat_mode(record, stack, _root_name(work)):
                record["output"] = run_forward(work, data)
        except ModelError as exc:
            record["error"] = exc
    return record


def _out_spatial(output: Any, ndim: int) -> Any:
    from ..core.batch import iter_tensors

    for _, t in iter_tensors(output):
        if t.dim() >= ndim + 1:
            return tuple(t.shape[-ndim:])
        return None
    return None


@check(default=False, validate=_validate_unet)
def unet_skips(sizes: Any = None, input_index: Any = 0, *, model: Any, batch: Any, loss: Any = None,
               device: Any = None) -> CheckResult:
    """Skip connections (torch.cat) join matching spatial sizes at every declared input size.

    ``sizes`` lists spatial sizes to try: ints (the same along every spatial dim) or tuples such
    as ``(16, 16, 16)``; input ``input_index`` (a ``(B, C, *spatial)`` tensor) is tiled or
    cropped to each. At each size the forward runs in eval mode without gradients on a copy,
    and every ``aten.cat`` is inspected before it runs: the first one whose inputs disagree
    outside the concatenation dim is named with its module and source line. A forward that
    raises, or an output that stops matching the input's spatial size when it matches at the
    example size (a silent crop), fails too. The headline gives the size rule: divisible by
    ``2**depth``, the depth read from the smallest feature map at the example size. A model in
    which no ``torch.cat`` runs is skipped (``passed`` is None) with the reason.

    >>> import torch
    >>> class Skip(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    ...     def forward(self, x):
    ...         return torch.cat([x, self.conv(x)], dim=1)
    >>> unet_skips([8, 12], model=Skip(), batch=torch.zeros(1, 1, 8, 8)).passed
    True
    >>> unet_skips([8, 12], model=torch.nn.Conv2d(1, 1, 3, padding=1),
    ...            batch=torch.zeros(1, 1, 8, 8)).passed is None
    True
    """
    from ..core.batch import copy_model

    work = copy_model(model).to(device).eval()
    base = batch.clone().to(device)
    x = _input_tensor(base, input_index)
    ndim = max(1, x.dim() - 2)
    given = [s for s in sizes if not _is_int(s)]
    if given:
        ndim = len(given[0])
    example = tuple(x.shape[-ndim:])

    first = _run_traced(work, base, ndim)
    factor = 1
    if first["smallest"] is not None:
        ratio = min(n / s for n, s in zip(example, first["smallest"]))
        factor = 2 ** int(math.floor(math.log2(ratio))) if ratio >= 2 else 1
    elif first["error"] is not None or first["mismatch"] is not None:
        factor = _stride_factor(work)
    depth = int(math.log2(factor)) if factor > 1 and factor & (factor - 1) == 0 else None
    rule = f"; sizes must be divisible by 2**{depth} = {factor}" if depth else ""
    keeps_size = _out_spatial(first["output"], ndim) == example if first["output"] is not None else False

    def problem(rec: dict, size: Any) -> str:
        mm = rec["mismatch"]
        if mm is not None:
            src = f" from {os.path.basename(mm['source'].split(':')[0])}:{mm['source'].split(':')[1]}" \
                if mm["source"] else ""
            what = (f"({mm['a']} vs {mm['b']} along dim {mm['dim']})" if mm["dim"] is not None
                    else f"({mm['a']} vs {mm['b']} dims)")
            return f"a mismatch in cat at module '{mm['module']}' {what}{src}"
        if rec["error"] is not None:
            return str(rec["error"])
        if keeps_size:
            got = _out_spatial(rec["output"], ndim)
            want = (size,) * ndim if _is_int(size) else tuple(size)
            if got != want:
                return (f"an output of spatial size {got} for an input of {want} (the example"
                        f" size {example} is kept: a skip or decoder crops silently)")
        return ""

    cases = [("the example size " + _label(example), first, example)]
    for size in sizes:
        fresh = copy_model(model).to(device).eval()
        cases.append((f"size {_label(size)}", _run_traced(fresh, _resized(base, input_index, size, ndim),
                                                           ndim), size))
    rows, failures = [], []
    for label, rec, size in cases:
        msg = problem(rec, size)
        rows.append(f"{label}: {rec['cats']} cats, " + (msg or "consistent"))
        if msg:
            failures.append((label, msg, rec))
    metrics = {"sizes": [_label(s) for s in sizes], "factor": factor, "depth": depth,
               "cats": first["cats"], "failed_sizes": [lb for lb, _, _ in failures]}
    expected = f"expected skip connections to match for sizes {_labels(sizes)}"
    details = rows[:]
    if failures:
        label, msg, rec = failures[0]
        mm = rec["mismatch"]
        if mm is not None:
            details.append(f"cat inputs at {label}: {mm['shapes']} (cat along dim {mm['cat_dim']})"
                           f" in module '{mm['module']}' at {mm['source'] or 'an unknown line'}")
            if rec["error"] is not None:
                details.append(f"the forward then raised: {rec['error']}")
        if rule:
            details.append(f"remedy: use input sizes divisible by {factor} (the model halves the"
                           f" size {depth} times), or pad/crop inside the model before each cat")
        return CheckResult("unet_skips", False, f"{expected}, observed at {label} {msg}{rule}",
                           "\n".join(details), metrics)
    if all(rec["cats"] == 0 for _, rec, _ in cases):
        # a declared check that finds nothing to check never passes
        raise SkipCheck(f"no skip connection found: no torch.cat ran in forward at any of"
                        f" {len(cases)} sizes (an additive skip that mismatches raises in the"
                        f" forward, which this check reports)")
    note = f" (sizes must be divisible by 2**{depth} = {factor})" if depth else ""
    return CheckResult("unet_skips", True,
                       f"{expected}, observed {first['cats']} consistent cats at each of"
                       f" {len(cases)} sizes{note}", "\n".join(details), metrics)


# ---------------------------------------------------------------------------------- vit_patches
def _validate_vit(sizes: Any = None, input_index: Any = 0) -> dict:
    if sizes is None:
        raise UsageError("sizes=None: expected the image sizes to try, such as sizes=[16, 32]"
                         " or sizes=[(16, 16, 16)]")
    return {"sizes": _validate_sizes(sizes, "sizes"), "input_index": _validate_index(input_index)}


def _patch_embedding(model: Any) -> tuple:
    """``(name, conv, patch sizes)`` of the first convolution with kernel == stride > 1."""
    import torch.nn as nn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # transposed convs are not these
            k, s = tuple(m.kernel_size), tuple(m.stride)
            pad = m.padding if isinstance(m.padding, tuple) else ((0,) if m.padding == "valid" else (1,))
            if k == s and math.prod(k) > 1 and all(p == 0 for p in pad):
                return name, m, k
    return None, None, None


def _pos_embedding(model: Any, width: Any = None) -> tuple:
    """``(name, length)`` of the first parameter/buffer named like a positional embedding whose
    last dim is the tokens' ``width`` when given (a relative-position bias table of
    ``(positions, heads)`` is not one)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        low = name.lower()
        if ("pos_emb" in low or "position" in low or "posemb" in low) and t.dim() >= 2 \
                and (width is None or t.shape[-1] == width):
            return name, int(t.shape[-2])
    return None, None


def _linear_patch(mod: Any, args: Any, image: tuple) -> Any:
    """The patch size when ``mod`` is a Linear applied to flattened patches of ``image``
    (``(B, C, *spatial)``): input ``(B, N, C * p**d)`` with ``N = prod(spatial / p)``."""
    import torch
    import torch.nn as nn

    if not isinstance(mod, nn.Linear) or not args or not isinstance(args[0], torch.Tensor) \
            or args[0].dim() != 3 or len(image) < 3:
        return None
    channels, spatial = image[1], image[2:]
    n, features = int(args[0].shape[-2]), int(args[0].shape[-1])
    if features % channels:
        return None
    p = round((features // channels) ** (1 / len(spatial)))
    for q in (p - 1, p, p + 1):
        if q > 1 and channels * q ** len(spatial) == features and all(s % q == 0 for s in spatial) \
                and math.prod(s // q for s in spatial) == n:
            return (q,) * len(spatial)
    return None


def _pos_added(work: Any, data: Any, conv_name: Any, width: Any, image: tuple) -> dict:
    """Run ``work`` on ``data`` (no gradients) and find the positional embedding structurally:
    the first parameter or buffer added (``aten.add``) after the patch embedding ``conv_name``
    ran, whose trailing shape matches the tokens': ``(L, width)`` in token layout
    (``(1, L, D)`` + ``(B, L, D)``) or ``(width, *grid)`` in grid layout. With ``conv_name``
    None, the patch embedding is the first ``nn.Linear`` run on flattened patches of the input
    of shape ``image`` (:func:`_linear_patch`). Returns ``{"name", "length", "source", "ran",
    "error", "patch_module", "patch", "width"}`` (``name`` None when no such add ran)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..core.dispatch import user_source
    from ..core.forward import run_forward

    owned = {}
    for name, t in list(work.named_parameters()) + list(work.named_buffers()):
        if t.dim() >= 2 and t.numel() > 0:
            owned.setdefault(_storage(t), (name, t))
    found = {"name": None, "length": None, "source": "", "ran": False, "error": None,
             "patch_module": conv_name, "patch": None, "width": width}

    def positions(p: Any, other: Any, full: Any) -> Any:
        d = found["width"]
        if other.dim() < 2 or p.dim() < 2:
            return None
        if p.shape[-1] == d == other.shape[-1] and p.shape[-2] == other.shape[-2] > 1:
            return int(full.shape[-2])  # token layout: (.., L, D)
        if (p.dim() == other.dim() >= 3 and p.shape[1] == d == other.shape[1]
                and tuple(p.shape[2:]) == tuple(other.shape[2:]) and math.prod(p.shape[2:]) > 1):
            return math.prod(int(n) for n in full.shape[2:])  # grid layout: (1, D, *grid)
        return None

    class PosMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
            if (name in ("add", "add_") and found["ran"] and found["name"] is None
                    and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2])):
                for p, other in ((args[1], args[0]), (args[0], args[1])):
                    hit = owned.get(_storage(p))
                    n = positions(p, other, hit[1]) if hit else None
                    if n is not None:
                        found.update(name=hit[0], length=n, source=user_source())
                        break
            return func(*args, **(kwargs or {}))

    def seen(name: str, mod: Any, args: Any, out: Any) -> None:
        if found["patch_module"] is None:
            patch = _linear_patch(mod, args, image)
            if patch is not None:
                found.update(patch_module=name, patch=patch, width=mod.out_features)
        if name == found["patch_module"]:
            found["ran"] = True

    with _module_stack(work, seen):
        try:
            with torch.no_grad(), PosMode():
                run_forward(work, data)
        except ModelError as exc:
            found["error"] = exc
    return found


@check(default=False, validate=_validate_vit)
def vit_patches(sizes: Any = None, input_index: Any = 0, *, model: Any, batch: Any, loss: Any = None,
                device: Any = None) -> CheckResult:
    """ViT patches tile every declared image size and the token count fits the positional embedding.

    The patch embedding is the first Conv1d/2d/3d with ``kernel_size == stride`` (> 1) and no
    padding, else the first ``nn.Linear`` run on flattened patches of the input (``(B, N,
    C * p**d)`` with ``N = prod(size / p)``); with neither, the check is skipped. The positional
    embedding is found at dispatch: the first parameter or buffer added to the tokens after the
    patch embedding ran whose trailing shape matches theirs (``(1, L, D)`` + ``(B, L, D)``, or
    ``(1, D, *grid)`` onto the feature map), whatever its name; failing that, one named like
    ``*pos_emb*``/``*position*`` with the tokens' width (an embedding interpolated before the
    add). Its second-to-last dim is the sequence. Extra tokens (CLS, distillation) are the
    embedding's length minus the patch count at the example size. A size that is not a multiple
    of the patch, or whose ``prod(size / patch) + extra`` differs from the embedding's length,
    fails unless the forward runs all the same (the model interpolates); the forward is
    run at every size (eval, no gradients, on a copy) to confirm.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 4, stride=4), torch.nn.Flatten())
    >>> vit_patches([8, 12], model=m, batch=torch.zeros(1, 1, 8, 8)).passed
    True
    """
    import torch

    from ..core.batch import copy_model
    from ..core.forward import run_forward

    base = batch.clone().to(device)
    x = _input_tensor(base, input_index)
    first = copy_model(model).to(device).eval()
    conv_name, conv, patch = _patch_embedding(first)
    pos = _pos_added(first, base, conv_name, conv.out_channels if conv is not None else None,
                     tuple(x.shape))
    if not patch:
        conv_name, patch = pos["patch_module"], pos["patch"]
    if not patch:
        if pos["error"] is not None:
            raise pos["error"]
        raise SkipCheck("no patch embedding found: no Conv1d/2d/3d with kernel_size == stride > 1"
                        " and no padding, and no Linear run on flattened patches of the input")
    ndim = len(patch)
    example = tuple(x.shape[-ndim:])
    pos_name, pos_len, pos_how = pos["name"], pos["length"], "added to the patch tokens"
    if pos_name is None:
        pos_name, pos_len = _pos_embedding(first, pos["width"])
        pos_how = "found by its name"
    extra = None
    if patch and pos_len is not None:
        extra = pos_len - math.prod(n // p for n, p in zip(example, patch))

    def static(size: tuple) -> str:
        bad = [(n, p) for n, p in zip(size, patch) if n % p]
        if bad:
            n, p = bad[0]
            return f"{n} is not divisible by patch {p} of '{conv_name}'"
        if pos_len is None:
            return ""
        grid = [n // p for n, p in zip(size, patch)]
        tokens = math.prod(grid)
        if tokens + extra != pos_len:
            more = f" + {extra} extra = {tokens + extra}" if extra else ""
            return (f"{'x'.join(map(str, grid))} = {tokens} patch tokens{more}, but '{pos_name}'"
                    f" has {pos_len} positions")
        return ""

    rows, failures, interpolated = [], [], []
    cases = [("the example size " + _label(example), example, base)]
    for size in sizes:
        dims = (size,) * ndim if _is_int(size) else tuple(size)
        cases.append((f"size {_label(size)}", dims, _resized(base, input_index, dims, ndim)))
    for label, dims, data in cases:
        reason = static(dims)
        error = None
        if data is base:  # the example size ran while the positional embedding was looked for
            error = pos["error"]
        else:
            work = copy_model(model).to(device).eval()
            try:
                with torch.no_grad():
                    run_forward(work, data)
            except ModelError as exc:
                error = exc
        if reason and error is None:
            interpolated.append(label)
            rows.append(f"{label}: {reason}; the forward ran all the same (the model adapts)")
        elif reason:
            failures.append((label, f"{reason} (forward raised {type(error.original).__name__})"))
            rows.append(f"{label}: {reason}; {error}")
        elif error is not None:
            failures.append((label, str(error)))
            rows.append(f"{label}: {error}")
        else:
            rows.append(f"{label}: fits")
    found = f"patch {_label(patch)} of '{conv_name}'"
    found += (f", {pos_len} positions in '{pos_name}' ({extra} extra tokens)" if pos_len is not None
              else ", no positional embedding")
    metrics = {"patch": list(patch), "patch_module": conv_name,
               "pos_embed": pos_name, "positions": pos_len, "extra_tokens": extra,
               "interpolated": interpolated, "failed_sizes": [lb for lb, _ in failures]}
    expected = f"expected ViT patches to tile sizes {_labels(sizes)} and fit the positional embedding"
    how = (f"the positional embedding '{pos_name}' was {pos_how}"
           + (f" at {pos['source']}" if pos_name == pos["name"] and pos["source"] else "")
           if pos_name is not None else
           "no positional embedding: no parameter or buffer of the tokens' trailing shape was added"
           " to them, and none is named like pos_embed/position; only the tiling is checked")
    details = [f"found {found}", how] + rows
    if failures:
        label, msg = failures[0]
        details.append(f"remedy: use sizes that are multiples of the patch {tuple(patch)} giving"
                       f" {pos_len - extra if pos_len is not None else 'the configured number of'}"
                       " patch tokens, or interpolate the positional embedding to the grid")
        return CheckResult("vit_patches", False, f"{expected}, observed at {label}: {msg}",
                           "\n".join(details), metrics)
    return CheckResult("vit_patches", True, f"{expected}, observed {found} fitting all"
                       f" {len(cases)} sizes", "\n".join(details), metrics)


# ---------------------------------------------------------------------------------- fno_modes
def _validate_fno(grid_sizes: Any = None, energy_tol: Any = 1e-4, input_index: Any = 0) -> dict:
    if grid_sizes is not None:
        grid_sizes = _validate_sizes(grid_sizes, "grid_sizes")
    if energy_tol is not None and (not _is_number(energy_tol) or not 0 <= energy_tol < 1):
        raise UsageError(f"energy_tol={energy_tol!r}: expected a fraction in [0, 1) of the spectral"
                         " layer's output energy allowed beyond its kept modes, or None to skip")
    return {"grid_sizes": grid_sizes, "energy_tol": energy_tol,
            "input_index": _validate_index(input_index)}


def _storage(t: Any) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _kept_modes(start: Any, end: Any, n: int, onesided: bool) -> Any:
    """The modes a slice ``[start:end]`` of a spectrum dim of length ``n`` keeps, or None when it
    keeps the whole dim. ``[:m]`` keeps ``m`` (even beyond ``n``: the slice clamps silently),
    ``[-m:]`` keeps the ``m`` negative frequencies, a middle slice (an fftshift-ed spectrum)
    ``ceil(width / 2)`` on each side."""
    start = 0 if start is None else int(start)
    end = n if end is None or int(end) >= 2 ** 62 else int(end)
    if start == 0:
        return None if end == n else end
    if onesided:
        return max(0, min(end, n) - (start % n if start < 0 else start))
    if start < 0:
        return -start
    if end >= n:
        return n - start
    return -(-(end - start) // 2)


def _fft_mode(record: dict, stack: list) -> Any:
    """Records forward FFTs (``aten._fft_r2c``, forward ``_fft_c2c``), the slices of their
    spectra (the kept modes) and the inverse FFTs' outputs, per innermost module."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..core.dispatch import user_source

    class FFTMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
            if name in ("_fft_r2c", "_fft_c2c", "_fft_c2r") and args \
                    and isinstance(args[0], torch.Tensor):
                x, nd = args[0], args[0].dim()
                dims = tuple(sorted(int(d) % nd - nd for d in args[1]))
                layer = stack[-1] if stack else ""
                forward = name == "_fft_r2c" or (name == "_fft_c2c" and bool(args[3]))
                if forward:
                    key = (layer, dims)
                    info = record["layers"].setdefault(key, {
                        "layer": layer, "dims": dims, "modes": {}, "grid": None,
                        "onesided": name == "_fft_r2c" and bool(args[3]), "source": user_source()})
                    if info["grid"] is None:
                        info["grid"] = tuple(int(x.shape[d]) for d in dims)
                    record["spectra"][_storage(out)] = (out, key)  # held: no address reuse
                    record["last"] = key
                elif record["last"] is not None and isinstance(out, torch.Tensor):
                    key = record["last"]
                    record["inverse"].setdefault(key, out)
            elif name in ("roll", "clone", "_to_copy") and args and isinstance(out, torch.Tensor) \
                    and isinstance(args[0], torch.Tensor) and _storage(args[0]) in record["spectra"] \
                    and out.shape == args[0].shape:  # fftshift (roll) or a copy of the spectrum
                key = record["spectra"][_storage(args[0])][1]
                record["spectra"].setdefault(_storage(out), (out, key))
            elif name == "slice" and args and isinstance(args[0], torch.Tensor) \
                    and _storage(args[0]) in record["spectra"]:
                spec, key = record["spectra"][_storage(args[0])]
                info = record["layers"][key]
                t = args[0]
                d = (int(args[1]) if len(args) > 1 else 0) % t.dim() - t.dim()
                if t.dim() == spec.dim() and d in info["dims"]:
                    onesided = info["onesided"] and d == info["dims"][-1]
                    m = _kept_modes(args[2] if len(args) > 2 else None,
                                    args[3] if len(args) > 3 else None, int(t.shape[d]), onesided)
                    if m:
                        info["modes"][d] = max(info["modes"].get(d, 0), m)
            return out

    return FFTMode()


def _run_fft(work: Any, data: Any) -> dict:
    """Forward (no gradients) under :func:`_fft_mode`; ``{"layers", "inverse", "error"}``."""
    import torch

    from ..core.forward import run_forward

    record = {"layers": {}, "spectra": {}, "inverse": {}, "last": None, "error": None}
    with _module_stack(work) as stack:
        try:
            with torch.no_grad(), _fft_mode(record, stack):
                run_forward(work, data)
        except ModelError as exc:
            record["error"] = exc
    record["spectra"].clear()
    return record


def _layer_modes(info: dict, work: Any) -> tuple:
    """The kept modes per FFT dim (None: the whole dim), filling dims no slice truncated from
    the module's ``modes1``/``modes2``/``modes3`` attributes when it has them."""
    modes = [info["modes"].get(d) for d in info["dims"]]
    mod = dict(work.named_modules()).get(info["layer"])
    attrs = [getattr(mod, f"modes{i + 1}", None) for i in range(len(modes))]
    return tuple(m if m is not None or not _is_int(a) else a for m, a in zip(modes, attrs))


def _mode_problems(modes: tuple, grid: tuple, onesided: bool = True) -> list:
    """Where ``modes`` exceed the grid: ``m <= n // 2`` (full FFT dims), ``m <= n // 2 + 1`` (the
    last dim of a one-sided rfft); ``None`` modes (the whole dim kept) cannot exceed it."""
    probs = []
    nd = len(modes)
    for i, (m, n) in enumerate(zip(modes, grid)):
        last = onesided and i == nd - 1
        limit = n // 2 + 1 if last else n // 2
        if m is not None and m > limit:
            rule = f"{n}//2+1 = {limit} along the rfft dim {i - nd}" if last else \
                f"{n}//2 = {limit} along dim {i - nd}"
            probs.append(f"modes{i + 1}={m} > {rule}")
    return probs


def _energy_beyond(y: Any, modes: tuple, onesided: bool = True) -> float:
    """Fraction of ``y``'s spectral energy outside the kept modes.

    Kept: frequencies ``-m..m`` along the full-FFT dims (``[:m]`` and ``[-m:]`` are written; a
    real output mirrors ``-m`` onto ``+m`` in the zero-frequency column) and ``[:m]`` along the
    one-sided rfft dim; a ``None`` mode keeps the whole dim.
    """
    import torch

    nd = len(modes)
    y = y.detach()
    y = (y.real if y.is_complex() else y).double()
    spec = torch.fft.rfftn(y, dim=tuple(range(-nd, 0))).abs().pow(2)
    index = []
    for i, (m, n) in enumerate(zip(modes, spec.shape[-nd:])):
        idx = torch.zeros(n, dtype=torch.bool, device=spec.device)
        if m is None:
            idx[:] = True
        elif i < nd - 1 or not onesided:  # frequencies -m..m (on the rfft of a real output: 0..m)
            idx[:m + 1] = True
            if m and i < nd - 1:
                idx[-m:] = True
        else:
            idx[:m] = True
        index.append(idx)
    keep = index[0]
    for idx in index[1:]:
        keep = keep.unsqueeze(-1) & idx
    total = float(spec.sum())
    return float(spec[..., ~keep].sum()) / total if total > 0 else 0.0


@check(default=False, validate=_validate_fno)
def fno_modes(grid_sizes: Any = None, energy_tol: Any = 1e-4, input_index: Any = 0, *, model: Any,
              batch: Any, loss: Any = None, device: Any = None) -> CheckResult:
    """FNO spectral layers keep modes within each grid's Nyquist limit and write no energy beyond them.

    Spectral layers are found at dispatch: each module (the innermost one running) that calls a
    forward FFT (``aten._fft_r2c``: ``torch.fft.rfft*``; ``aten._fft_c2c``: ``torch.fft.fft*``)
    whose spectrum it then slices; the slices give the kept modes per FFT dim (``[:m]`` and
    ``[-m:]``), whatever the layer's attributes are called (a dim no slice truncates falls back
    to a ``modes1``/``modes2``/``modes3`` attribute, else keeps everything). The last dim of a
    one-sided rfft is the rfft dim. For each grid size (default: the example batch's), the input
    is tiled/cropped to it and the forward runs (eval, no gradients, on a copy); each layer's FFT
    grid ``n`` is recorded and ``modes <= n // 2`` (``n // 2 + 1`` along the rfft dim) must hold:
    larger modes are weights that only a slicing accident reaches. With ``energy_tol``, the
    fraction of the inverse FFT's output energy outside the kept modes must not exceed it. A
    model in which no FFT runs, or whose spectra are never truncated, is skipped.

    >>> import torch
    >>> class Spectral(torch.nn.Module):
    ...     def forward(self, x):
    ...         f = torch.fft.rfft2(x)
    ...         out = torch.zeros_like(f)
    ...         out[..., :3, :3], out[..., -3:, :3] = f[..., :3, :3], f[..., -3:, :3]
    ...         return torch.fft.irfft2(out, s=x.shape[-2:])
    >>> fno_modes(model=Spectral(), batch=torch.randn(1, 1, 8, 8)).passed
    True
    """
    from ..core.batch import copy_model

    base = batch.clone().to(device)
    x = _input_tensor(base, input_index)
    given = [s for s in grid_sizes or () if not _is_int(s)]
    first_work = copy_model(model).to(device).eval()
    first = _run_fft(first_work, base)
    layers = {k: (info, _layer_modes(info, first_work)) for k, info in first["layers"].items()}
    checked = {k: v for k, v in layers.items() if any(m is not None for m in v[1])}
    if not checked:
        if first["error"] is not None and not layers:
            raise first["error"]
        why = ("no FFT op ran in forward" if not layers else
               f"the FFTs in {', '.join(repr(i['layer'] or _root_name(model)) for i, _ in layers.values())}"
               " keep every mode (no slice of their spectra truncates it)")
        raise SkipCheck(f"no spectral layer found: {why}")
    ndim = len(next(iter(checked.values()))[0]["dims"]) if not given else len(given[0])
    ndim = min(ndim, x.dim() - 1)
    example = tuple(x.shape[-ndim:])
    grids = [((g,) * ndim if _is_int(g) else tuple(g)) for g in (grid_sizes or (example,))]

    def label_of(info: dict) -> str:
        name = info["layer"] or _root_name(model)
        same = [i for i, _ in checked.values() if i["layer"] == info["layer"]]
        return name if len(same) == 1 else f"{name} (FFT dims {list(info['dims'])})"

    rows, failures, worst = [], [], 0.0
    for grid in grids:
        if grid == example:
            rec = first
        else:
            rec = _run_fft(copy_model(model).to(device).eval(), _resized(base, input_index, grid, ndim))
        error = rec["error"]
        label = f"grid {grid}"
        static, energy = [], {}
        for key, (info, modes0) in checked.items():
            now = rec["layers"].get(key)
            if now is not None:
                # modes as sliced at this grid (a model may adapt them); when the forward then
                # raised, the example's modes where larger: they explain the error
                modes = tuple(m0 if m is None else (max(m, m0 or 0) if error is not None else m)
                              for m, m0 in zip((now["modes"].get(d) for d in info["dims"]), modes0))
                n = now["grid"]
            else:  # not reached at this grid: the example's modes, its grid scaled to this one
                modes = modes0
                scale = [g / e for g, e in zip(grid[-len(info["dims"]):], example[-len(info["dims"]):])]
                n = tuple(max(1, round(g0 * s)) for g0, s in zip(info["grid"], scale)) \
                    if len(scale) == len(info["grid"]) else grid
            probs = _mode_problems(modes, n, info["onesided"])
            if probs:
                static.append(f"layer '{label_of(info)}' keeps {' and '.join(probs)}")
            elif energy_tol is not None and key in rec["inverse"]:
                energy[label_of(info)] = _energy_beyond(rec["inverse"][key], modes, info["onesided"])
        spilled = [(n, e) for n, e in energy.items() if e > energy_tol] if energy_tol is not None else []
        worst = max([worst] + list(energy.values()))
        if static:
            extra = f" (forward raised {type(error.original).__name__})" if error is not None else \
                " (the forward ran: those weights are never used as intended)"
            failures.append((label, static[0] + extra))
        elif error is not None:
            failures.append((label, str(error)))
        elif spilled:
            name, e = max(spilled, key=lambda kv: kv[1])
            failures.append((label, f"layer '{name}' puts {e:.3g} of its output energy beyond its"
                                    f" kept modes (tolerance {energy_tol:g})"))
        rows.append(f"{label}: " + "; ".join(static + ([str(error)] if error else [])
                                              + [f"'{n}' energy beyond modes {e:.3g}"
                                                 for n, e in energy.items()]) if (static or error or energy)
                    else f"{label}: fits")
    layer_text = f"{len(checked)} spectral layers with modes {next(iter(checked.values()))[1]}"
    metrics = {"layers": [label_of(i) for i, _ in checked.values()],
               "modes": [list(m) for _, m in checked.values()],
               "sources": [i["source"] for i, _ in checked.values()],
               "grids": [list(g) for g in grids], "max_energy_beyond": worst,
               "failed_grids": [lb for lb, _ in failures]}
    expected = ("expected FNO modes within the Nyquist limit for grids "
                + ", ".join(str(g) for g in grids))
    details = [f"found {layer_text}"]
    details += [f"  '{label_of(i)}': FFT over dims {list(i['dims'])}"
                f"{' (one-sided rfft)' if i['onesided'] else ''}, modes {m}, grid {i['grid']},"
                f" at {i['source'] or 'an unknown line'}" for i, m in checked.values()]
    details += rows
    if failures:
        label, msg = failures[0]
        details.append("remedy: keep modes <= n//2 along the full-FFT dims and <= n//2+1 along the"
                       " rfft dim for the smallest grid used, or lower the modes")
        return CheckResult("fno_modes", False, f"{expected}, observed at {label}: {msg}",
                           "\n".join(details), metrics)
    return CheckResult("fno_modes", True, f"{expected}, observed {layer_text} fitting every grid",
                       "\n".join(details), metrics)


# ---------------------------------------------------------------------------------- spectrum_matches
def _validate_spectrum(max_band_ratio: Any = 2.0, bands: Any = 3, plot: Any = None) -> dict:
    if not _is_number(max_band_ratio) or not max_band_ratio > 1 or not math.isfinite(max_band_ratio):
        raise UsageError(f"max_band_ratio={max_band_ratio!r}: expected a number > 1; each band's"
                         " P_pred/P_target must lie in [1/max_band_ratio, max_band_ratio]")
    if _is_int(bands):
        if bands < 1:
            raise UsageError(f"bands={bands!r}: expected an int >= 1 (equal slices of k) or a list"
                             " of (k_lo, k_hi) pairs such as [(1, 4), (5, 8)]")
    elif (isinstance(bands, (list, tuple)) and bands and all(
            isinstance(b, (list, tuple)) and len(b) == 2 and all(_is_number(v) for v in b)
            and 0 < b[0] <= b[1] for b in bands)):
        bands = tuple((float(lo), float(hi)) for lo, hi in bands)
    else:
        raise UsageError(f"bands={bands!r}: expected an int >= 1 (equal slices of k) or a list of"
                         " (k_lo, k_hi) pairs with 0 < k_lo <= k_hi, such as [(1, 4), (5, 8)]")
    if plot is not None and not isinstance(plot, (str, os.PathLike)):
        raise UsageError(f"plot={plot!r}: expected a file path for the PNG, or None")
    return {"max_band_ratio": float(max_band_ratio), "bands": bands, "plot": plot}


@check(default=False, validate=_validate_spectrum)
def spectrum_matches(max_band_ratio: Any = 2.0, bands: Any = 3, plot: Any = None, *, model: Any,
                     batch: Any, loss: Any = None, device: Any = None) -> CheckResult:
    """The prediction's radial power spectrum follows the target's in every band (within max_band_ratio).

    The model runs on the example batch (eval, no gradients, on a copy); its output (the first
    tensor of a nest) and the batch target must have the same ``(B, C, *spatial)`` shape with 1
    to 3 spatial dims. ``bands`` is a number of equal slices of the wavenumbers (3: low, mid,
    high) or ``(k_lo, k_hi)`` pairs in cycles per box. Each band's summed ``P_pred / P_target``
    must lie in ``[1/max_band_ratio, max_band_ratio]``: a blurring model loses high-k power, a
    noisy one gains it. ``plot`` saves a log-log PNG of both spectra.

    >>> import torch
    >>> x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> spectrum_matches(model=torch.nn.Identity(), batch=(x, x.clone())).passed
    True
    """
    import torch

    from ..core.batch import copy_model, iter_tensors
    from ..core.forward import run_forward
    from ..core.spectra import band_ratios, radial_power_spectrum

    work = copy_model(model).to(device).eval()
    data = batch.clone().to(device)
    with torch.no_grad():
        output = run_forward(work, data)
    out = next((t for _, t in iter_tensors(output)), None)
    target = data.target
    if out is None or not isinstance(target, torch.Tensor) or tuple(out.shape) != tuple(target.shape):
        got = tuple(out.shape) if out is not None else type(output).__name__
        want = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise SkipCheck(f"the output {got} and the target {want} are not fields of the same shape,"
                        " so their power spectra cannot be compared")
    ndim = out.dim() - 2
    if not 1 <= ndim <= 3:
        raise SkipCheck(f"the output of shape {tuple(out.shape)} is not a (B, C, *spatial) field"
                        " with 1 to 3 spatial dims")
    k, p_pred = radial_power_spectrum(out.float(), ndim)
    _, p_true = radial_power_spectrum(target.float(), ndim)
    ratios = band_ratios(k, p_pred, p_true, bands)
    lo_ok, hi_ok = 1.0 / max_band_ratio, max_band_ratio
    outside = [r for r in ratios if not lo_ok <= r[3] <= hi_ok]
    metrics = {"bands": {name: ratio for name, _, _, ratio in ratios},
               "k": [float(v) for v in k], "p_pred": [float(v) for v in p_pred],
               "p_target": [float(v) for v in p_true]}
    details = [f"{'band':>10} {'k range':>10} {'P_pred/P_target':>16}"]
    details += [f"{name:>10} {f'{lo:g}-{hi:g}':>10} {ratio:16.4g}" for name, lo, hi, ratio in ratios]
    if plot is not None:
        from ..core.plots import save_power_spectrum

        saved = save_power_spectrum(k, {"target": p_true, "prediction": p_pred}, plot,
                                    title="radially averaged power spectrum", bands=ratios)
        metrics["plot"] = saved
        if saved:
            details.append(f"plot: {saved}")
    expected = f"expected P_pred/P_target within [{lo_ok:.3g}, {hi_ok:.3g}] in every band"
    summary = ", ".join(f"{name} {ratio:.3g}" for name, _, _, ratio in ratios)
    if outside:
        name, lo, hi, ratio = max(outside, key=lambda r: abs(math.log(r[3])) if 0 < r[3] < math.inf
                                  else math.inf)
        others = ", ".join(f"{n} {r:.3g}" for n, _, _, r in ratios if n != name)
        trend = "lacks" if ratio < 1 else "has excess"
        details.append(f"the prediction {trend} power at k={lo:g}-{hi:g}" +
                       (" (smoothed or blurred output)" if ratio < 1 and name == ratios[-1][0] else ""))
        return CheckResult("spectrum_matches", False,
                           f"{expected}, observed {ratio:.3g} in the {name} band (k={lo:g}-{hi:g})"
                           + (f" ({others})" if others else ""), "\n".join(details), metrics)
    return CheckResult("spectrum_matches", True, f"{expected}, observed {summary}",
                       "\n".join(details), metrics)
