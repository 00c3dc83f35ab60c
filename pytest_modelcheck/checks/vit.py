"""vit_patches: the patch embedding (a convolution with kernel == stride, or a Linear on flattened
patches) tiles each declared size and the token count matches the positional embedding's length
(the parameter added to the patch tokens, found at dispatch); skipped without a patch embedding."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..core.errors import ModelError
from ..core.result import CheckResult
from ..core.units import is_int
from .registry import SkipCheck, check
from .spatial import (_input_tensor, _label, _labels, _module_stack, _resized, _storage,
                      _validate_declared)
from .subject import Subject


def _validate_vit(sizes: Any = None, input_index: Any = 0) -> dict:
    return _validate_declared(sizes, input_index, "the image sizes to try, such as sizes=[16, 32]"
                              " or sizes=[(16, 16, 16)]")


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

    from ..core._torch_compat import dispatch_mode_base
    from ..core.dispatch import user_source
    from ..core.forward import run_forward

    owned: dict[int, tuple] = {}
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

    class PosMode(dispatch_mode_base()):  # type: ignore[misc]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
            if (name in ("add", "add_") and found["ran"] and found["name"] is None
                    and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2])):
                for p, other in ((args[1], args[0]), (args[0], args[1])):
                    hit = owned.get(_storage(p))
                    n = positions(p, other, hit[1]) if hit is not None else None
                    if hit is not None and n is not None:
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


@dataclass
class _Patches:
    """The patch embedding and the positional embedding found at the example size."""

    module: Any
    patch: tuple
    example: tuple
    pos_name: Any
    pos_len: Optional[int]
    pos_how: str
    extra: Optional[int]
    found: dict  # what _pos_added saw: the example forward's error, the add's source line

    def static(self, size: tuple) -> str:
        """Why ``size`` cannot be tiled or gives another token count ("" when it fits)."""
        bad = [(n, p) for n, p in zip(size, self.patch) if n % p]
        if bad:
            n, p = bad[0]
            return f"{n} is not divisible by patch {p} of '{self.module}'"
        if self.pos_len is None or self.extra is None:
            return ""
        grid = [n // p for n, p in zip(size, self.patch)]
        tokens = math.prod(grid)
        if tokens + self.extra != self.pos_len:
            more = f" + {self.extra} extra = {tokens + self.extra}" if self.extra else ""
            return (f"{'x'.join(map(str, grid))} = {tokens} patch tokens{more}, but"
                    f" '{self.pos_name}' has {self.pos_len} positions")
        return ""


def _find_patches(work: Any, base: Any, x: Any) -> _Patches:
    """The patch embedding (a convolution, else a Linear on flattened patches) and the
    positional embedding of ``work`` on the example batch; SkipCheck without a patch embedding."""
    conv_name, conv, patch = _patch_embedding(work)
    pos = _pos_added(work, base, conv_name, conv.out_channels if conv is not None else None,
                     tuple(x.shape))
    if not patch:
        conv_name, patch = pos["patch_module"], pos["patch"]
    if not patch:
        if pos["error"] is not None:
            raise pos["error"]
        raise SkipCheck("no patch embedding found: no Conv1d/2d/3d with kernel_size == stride > 1"
                        " and no padding, and no Linear run on flattened patches of the input")
    example = tuple(x.shape[-len(patch):])
    pos_name, pos_len, pos_how = pos["name"], pos["length"], "added to the patch tokens"
    if pos_name is None:
        pos_name, pos_len = _pos_embedding(work, pos["width"])
        pos_how = "found by its name"
    extra = None
    if pos_len is not None:
        extra = pos_len - math.prod(n // p for n, p in zip(example, patch))
    return _Patches(conv_name, tuple(patch), example, pos_name, pos_len, pos_how, extra, pos)


def _forward_error(work: Any, data: Any) -> Optional[ModelError]:
    """The ModelError of a forward of ``work`` on ``data`` (no gradients), or None."""
    import torch

    from ..core.forward import run_forward

    try:
        with torch.no_grad():
            run_forward(work, data)
    except ModelError as exc:
        return exc
    return None


def _judge_size(label: str, reason: str, error: Optional[ModelError]) -> tuple:
    """``(row, failure message or "", interpolated)`` of one size."""
    if reason and error is None:
        return f"{label}: {reason}; the forward ran all the same (the model adapts)", "", True
    if reason and error is not None:
        return (f"{label}: {reason}; {error}",
                f"{reason} (forward raised {type(error.original).__name__})", False)
    if error is not None:
        return f"{label}: {error}", str(error), False
    return f"{label}: fits", "", False


def _how_found(pt: _Patches) -> str:
    if pt.pos_name is None:
        return ("no positional embedding: no parameter or buffer of the tokens' trailing shape was"
                " added to them, and none is named like pos_embed/position; only the tiling is"
                " checked")
    where = pt.found["source"] if pt.pos_name == pt.found["name"] and pt.found["source"] else ""
    return (f"the positional embedding '{pt.pos_name}' was {pt.pos_how}"
            + (f" at {where}" if where else ""))


@check(default=False, validate=_validate_vit)
def vit_patches(sizes: Any = None, input_index: Any = 0, *, subject: Subject) -> CheckResult:
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
    base = subject.batch_copy()
    x = _input_tensor(base, input_index)
    pt = _find_patches(subject.model_copy("eval"), base, x)
    ndim = len(pt.patch)
    rows, failures, interpolated = [], [], []
    cases = [("the example size " + _label(pt.example), pt.example, base)]
    for size in sizes:
        dims = (size,) * ndim if is_int(size) else tuple(size)
        cases.append((f"size {_label(size)}", dims, _resized(base, input_index, dims, ndim)))
    for label, dims, data in cases:
        # the example size ran while the positional embedding was looked for
        error = pt.found["error"] if data is base else _forward_error(subject.model_copy("eval"),
                                                                      data)
        row, failure, adapted = _judge_size(label, pt.static(dims), error)
        rows.append(row)
        if failure:
            failures.append((label, failure))
        if adapted:
            interpolated.append(label)
    found = f"patch {_label(pt.patch)} of '{pt.module}'"
    found += (f", {pt.pos_len} positions in '{pt.pos_name}' ({pt.extra} extra tokens)"
              if pt.pos_len is not None else ", no positional embedding")
    metrics = {"patch": list(pt.patch), "patch_module": pt.module,
               "pos_embed": pt.pos_name, "positions": pt.pos_len, "extra_tokens": pt.extra,
               "interpolated": interpolated, "failed_sizes": [lb for lb, _ in failures]}
    expected = f"expected ViT patches to tile sizes {_labels(sizes)} and fit the positional embedding"
    details = [f"found {found}", _how_found(pt)] + rows
    if failures:
        label, msg = failures[0]
        tokens = pt.pos_len - (pt.extra or 0) if pt.pos_len is not None else None
        details.append(f"remedy: use sizes that are multiples of the patch {tuple(pt.patch)} giving"
                       f" {tokens if tokens is not None else 'the configured number of'}"
                       " patch tokens, or interpolate the positional embedding to the grid")
        return subject.failed(f"{expected}, observed at {label}: {msg}", details, metrics)
    return subject.passed(f"{expected}, observed {found} fitting all {len(cases)} sizes", details,
                          metrics)
