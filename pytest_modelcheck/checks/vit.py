"""vit_patches: the patch embedding (a convolution with kernel == stride, or a Linear on flattened
patches) tiles each declared size and the token count matches the positional embedding's length
(the parameter added to the patch tokens, found at dispatch); skipped without a patch embedding.

token_capacity: the model runs (finite outputs, loss and gradients, a stable loss) at token counts
grown up to ``max_tokens`` by growing the input, and the most tokens whose step fits a memory
budget are estimated on fake tensors."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..core.trace import module_stack
from ..core.errors import ModelError
from ..core.result import CheckResult
from ..core.units import is_int
from .registry import SkipCheck, check
from .spatial import (_input_tensor, _label, _labels, _resized, _storage,
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

    with module_stack(work, seen):
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


# ------------------------------------------------------------------------------ token_capacity
#: The most tokens the memory search tries (2**24: a 256^3 grid of patches).
TOKEN_SEARCH_CAP = 2 ** 24
#: The most estimates one memory search makes (each runs the step on fake tensors).
MAX_ESTIMATES = 14
_PHASES = ("train", "inference")


def _validate_capacity(max_tokens: Any = None, memory_budget: Any = None, phase: Any = "train",
                       max_loss_ratio: Any = 10.0, input_index: Any = 0) -> dict:
    """The marker's arguments, checked at collection.

    >>> _validate_capacity(513, "8 GiB")["memory_budget"]
    8589934592
    """
    from ..core.errors import UsageError
    from ..core.units import UnitError, is_number, parse_bytes
    from .spatial import _validate_index

    if not is_int(max_tokens) or max_tokens < 1:
        raise UsageError(f"max_tokens={max_tokens!r}: expected a positive int, the token count the"
                         " model must handle (patch tokens plus CLS and other extra tokens),"
                         " such as max_tokens=513")
    budget = None
    if memory_budget is not None:
        try:
            budget = parse_bytes(memory_budget)
        except UnitError as exc:
            raise UsageError(f"memory_budget={memory_budget!r}: {exc}") from None
        if budget <= 0:
            raise UsageError(f"memory_budget={memory_budget!r}: expected a positive size such as"
                             " '8 GiB', or None")
    if not isinstance(phase, str) or phase not in _PHASES:
        raise UsageError(f"phase={phase!r}: expected 'train' or 'inference' (the step whose"
                         " memory is estimated)")
    if max_loss_ratio is not None and (isinstance(max_loss_ratio, bool) or not is_number(
            max_loss_ratio) or not 1 < max_loss_ratio < math.inf):
        raise UsageError(f"max_loss_ratio={max_loss_ratio!r}: expected a number > 1 (the loss at"
                         " a size may be at most that many times the example size's), or None")
    return {"max_tokens": max_tokens, "memory_budget": budget, "phase": phase,
            "max_loss_ratio": None if max_loss_ratio is None else float(max_loss_ratio),
            "input_index": _validate_index(input_index)}


@dataclass
class _Growth:
    """Sizes of the input grown by ``k`` patches along every spatial dim."""

    patch: tuple
    grid: tuple  # the example's patch grid
    extra: int

    def dims(self, k: int) -> tuple:
        return tuple((g + k) * p for g, p in zip(self.grid, self.patch))

    def tokens(self, k: int) -> int:
        return math.prod(g + k for g in self.grid) + self.extra

    def steps_to(self, max_tokens: int, most: int = 4) -> list:
        """``[0, k1, ...]``: the example, then up to ``most`` sizes spread up to the first one
        with at least ``max_tokens`` tokens."""
        last = 0
        while self.tokens(last) < max_tokens:
            last += 1
        n = min(last, most)
        return [0] + sorted({math.ceil(last * i / n) for i in range(1, n + 1)}) if n else [0]


def _with_input(batch: Any, input_index: int, x: Any, ndim: int, dims: tuple, meta: bool) -> Any:
    """``batch`` with input ``input_index`` at spatial ``dims`` (tiled, or an empty meta tensor
    for an estimate); a target with the input's spatial shape (a dense prediction) follows."""
    import dataclasses

    import torch

    from ..core.shapes import resize_to
    from .spatial import _target_shape

    def sized(t: Any) -> Any:
        shape = _target_shape(t, dims, ndim)
        return torch.empty(shape, dtype=t.dtype, device="meta") if meta else resize_to(t, shape)

    data = _resized(batch, input_index, dims, ndim) if not meta else None
    if data is None:
        from .spatial import _input_slot

        kind, key = _input_slot(batch, input_index)
        if kind == "kwargs":
            data = dataclasses.replace(batch, kwargs={**batch.kwargs, key: sized(x)})
        else:
            args = list(batch.args)
            args[key] = sized(x)
            data = dataclasses.replace(batch, args=tuple(args))
    t = data.target
    if isinstance(t, torch.Tensor) and data.target_key is None and t.dim() > ndim \
            and tuple(t.shape[-ndim:]) == tuple(x.shape[-ndim:]):
        data = dataclasses.replace(data, target=sized(t))
    return data


def _run_size(subject: Subject, data: Any) -> tuple:
    """``(loss, problem)`` of one forward and backward (train mode, on a copy); ``problem`` is
    "" when outputs, loss and gradients are finite."""
    import torch

    from ..core.batch import iter_tensors
    from ..core.errors import first_line
    from ..core.forward import run_forward
    from ..core.losses import resolve_loss

    work = subject.model_copy("train")
    torch.manual_seed(0)
    try:
        out = run_forward(work, data)
        total, _ = resolve_loss(subject.loss, data, out).compute(out, data, work)
    except ModelError as exc:
        return None, str(exc)
    bad = [p for p, t in iter_tensors(out, "output")
           if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]
    if bad:
        return None, f"non-finite values in {bad[0]}"
    value = float(total.detach())
    if not math.isfinite(value):
        return value, f"loss {value}"
    if total.requires_grad:
        try:
            total.backward()
        except Exception as exc:  # noqa: BLE001 - the model's backward: named, not raised
            return value, f"backward raised {type(exc).__name__}: {first_line(exc)[:200]}"
    grads = [n for n, p in work.named_parameters()
             if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    if grads:
        return value, f"non-finite gradient of '{grads[0]}'"
    return value, ""


def _budget_search(estimate: Any, growth: _Growth, budget: int) -> tuple:
    """``(largest k that fits or None, peaks {k: (bytes or None, error)})``: ``k`` doubles the
    grid's side until the estimate passes ``budget`` (or the model fails there), then bisects."""
    peaks: dict = {}

    def fits(k: int) -> bool:
        if k not in peaks:
            peaks[k] = estimate(k)
        peak = peaks[k][0]
        return peak is not None and peak <= budget

    lo, hi, k = None, None, 0
    step = max(1, min(growth.grid))
    while len(peaks) < MAX_ESTIMATES:
        if not fits(k):
            hi = k
            break
        lo = k
        if growth.tokens(k) >= TOKEN_SEARCH_CAP:
            break
        k = 2 * k + step
    while lo is not None and hi is not None and hi - lo > max(1, lo // 60) \
            and len(peaks) < MAX_ESTIMATES:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, peaks


def _estimator(subject: Subject, base: Any, input_index: int, x: Any, growth: _Growth,
               phase: str) -> Any:
    """``estimate(k) -> (peak bytes or None, error text)`` on fake tensors (nothing allocated)."""
    from ..core.memory import EstimateError, estimate_step_memory

    ndim = len(growth.patch)

    def estimate(k: int) -> tuple:
        data = _with_input(base, input_index, x, ndim, growth.dims(k), meta=True)
        try:
            report = estimate_step_memory(subject.model, data, subject.loss, phase=phase,
                                          device=subject.device)
        except (EstimateError, ModelError) as exc:
            return None, str(exc)
        return int(report.peak_bytes), ""

    return estimate


def _capacity_runs(subject: Subject, base: Any, input_index: int, x: Any, growth: _Growth,
                   ks: list, max_loss_ratio: Optional[float]) -> tuple:
    """``(rows, losses, failure)``: one forward and backward of the first sample per size;
    ``failure`` ``(k, text)`` of the first size that fails (None when all run)."""
    first = base.resized(1) if base.batch_size not in (None, 1) else base
    x1 = _input_tensor(first, input_index)
    rows: list = []
    losses: list = []
    for k in ks:
        data = first if k == 0 else _with_input(first, input_index, x1, len(growth.patch),
                                                growth.dims(k), meta=False)
        loss, problem = _run_size(subject, data)
        label = f"size {_label(growth.dims(k))}, {growth.tokens(k)} tokens"
        if not problem and losses and max_loss_ratio is not None and losses[0] > 0 \
                and loss is not None and loss > max_loss_ratio * losses[0]:
            problem = (f"loss {loss:.4g} is {loss / losses[0]:.3g}x the example size's"
                       f" {losses[0]:.4g} (max_loss_ratio {max_loss_ratio:g})")
        rows.append(f"  {label}: " + (problem if problem else f"loss {loss:.4g}"))
        if problem:
            return rows, losses, (k, problem)
        losses.append(loss)
    return rows, losses, None


def _extra_tokens(subject: Subject, base: Any, pt: _Patches) -> int:
    """The tokens beside the patches (CLS, registers): the attention's sequence length at the
    example size minus the patch count, else the positional embedding's length minus it (when
    small: a longer table sliced to the sequence says nothing), else 0."""
    from ..core.attention import capture_attention

    patches = math.prod(n // p for n, p in zip(pt.example, pt.patch))
    try:
        maps = capture_attention(subject.model_copy("eval"), base)
    except ModelError:
        maps = []
    if maps and 0 <= maps[0].keys - patches:
        return maps[0].keys - patches
    return pt.extra if pt.extra is not None and 0 <= pt.extra <= 16 else 0


@check(default=False, validate=_validate_capacity)
def token_capacity(max_tokens: Any, memory_budget: Any = None, phase: Any = "train",
                   max_loss_ratio: Any = 10.0, input_index: Any = 0, *,
                   subject: Subject) -> CheckResult:
    """A ViT keeps finite outputs and a stable loss up to max_tokens tokens; reports the most tokens that fit memory_budget.

    The patch embedding and the extra tokens (CLS) are found as by ``vit_patches`` (skipped
    without a patch embedding). The input ``input_index`` is grown by whole patches along every
    spatial dim (tiled; a target of the input's spatial shape follows) from the example size up
    to the first size with at least ``max_tokens`` tokens, in up to 4 steps; at each size one
    forward and backward of the first sample (train mode, on a copy) must give finite outputs,
    loss and gradients, and a loss at most ``max_loss_ratio`` times the example size's (a sum
    over tokens or a broken position table grows it). The first size that fails is named with
    its token count. With ``memory_budget`` (such as '8 GiB'), the peak memory of one
    ``phase`` step on the whole batch is estimated on fake tensors (nothing is allocated or
    run for real) at growing sizes, the grid's side doubling and then bisected: the largest
    token count that fits is reported, and the check fails when it is below ``max_tokens``.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 4, stride=4), torch.nn.Flatten(2))
    >>> r = token_capacity(16, model=m, batch=torch.zeros(1, 1, 8, 8))
    >>> r.passed, r.metrics["tokens"]
    (True, [4, 9, 16])
    """
    base = subject.batch_copy()
    x = _input_tensor(base, input_index)
    pt = _find_patches(subject.model_copy("eval"), base, x)
    extra = _extra_tokens(subject, base, pt)
    growth = _Growth(pt.patch, tuple(n // p for n, p in zip(pt.example, pt.patch)), extra)
    ks = growth.steps_to(max_tokens)
    rows, losses, failure = _capacity_runs(subject, base, input_index, x, growth, ks,
                                           max_loss_ratio)
    ran = ks[:len(losses)]
    metrics: dict = {"max_tokens": max_tokens, "tokens": [growth.tokens(k) for k in ran],
                     "sizes": [list(growth.dims(k)) for k in ran], "losses": losses,
                     "extra_tokens": extra, "patch": list(pt.patch)}
    what = "tokens" if pt.pos_len is not None else "patch tokens (no positional embedding found)"
    details = [f"patch {_label(pt.patch)} of '{pt.module}', {extra} extra tokens; forward and"
               " backward of the first sample per size:"] + rows
    expected = f"expected finite outputs and a stable loss up to {max_tokens} {what}"
    if failure is not None:
        k, problem = failure
        metrics["failed_at_tokens"] = growth.tokens(k)
        return subject.failed(f"{expected}, observed at {growth.tokens(k)} tokens (size"
                              f" {_label(growth.dims(k))}): {problem}", details, metrics)
    observed = (f"{len(ran)} sizes from {metrics['tokens'][0]} to {metrics['tokens'][-1]} tokens"
                f" ran (loss {min(losses):.4g}-{max(losses):.4g})")
    if memory_budget is None:
        return subject.passed(f"{expected}, observed {observed}", details, metrics)
    return _budget_result(subject, base, input_index, x, growth, memory_budget, phase,
                          (expected, observed, details, metrics))


def _budget_result(subject: Subject, base: Any, input_index: int, x: Any, growth: _Growth,
                   budget: int, phase: str, so_far: tuple) -> CheckResult:
    """The verdict once every size ran: the largest token count whose estimated step fits."""
    from ..core.units import format_bytes

    expected, observed, details, metrics = so_far
    lo, peaks = _budget_search(_estimator(subject, base, input_index, x, growth, phase), growth,
                               budget)
    details.append(f"estimated peak memory of one {phase} step (fake tensors), budget"
                   f" {format_bytes(budget)}:")
    for k in sorted(peaks):
        peak, error = peaks[k]
        details.append(f"  size {_label(growth.dims(k))}, {growth.tokens(k)} tokens: "
                       + (format_bytes(peak) if peak is not None else f"no estimate ({error})"))
    metrics.update(memory_budget=budget, estimates={growth.tokens(k): v[0] for k, v in peaks.items()})
    max_tokens = metrics["max_tokens"]
    if lo is None:
        peak, error = peaks[0]
        if peak is None:
            details.append(f"note: the memory was not estimated: {error}")
            metrics["max_tokens_in_budget"] = None
            return subject.passed(f"{expected}, observed {observed}; memory not estimated",
                                  details, metrics)
        metrics["max_tokens_in_budget"] = 0
        return subject.failed(f"{expected} and {max_tokens} tokens to fit in"
                              f" {format_bytes(budget)}, observed even the example size's"
                              f" {growth.tokens(0)} tokens estimated at {format_bytes(peak)}",
                              details, metrics)
    most = growth.tokens(lo)
    bound = "at least " if lo == max(peaks) else ""
    metrics.update(max_tokens_in_budget=most, size_in_budget=list(growth.dims(lo)))
    fits = (f"{bound}{most} tokens (size {_label(growth.dims(lo))}) fit in"
            f" {format_bytes(budget)} (estimated {format_bytes(peaks[lo][0])})")
    if most < max_tokens:
        details.append("remedy: a smaller batch, a larger patch, memory-efficient attention or"
                       " activation checkpointing")
        return subject.failed(f"{expected} and {max_tokens} tokens to fit in"
                              f" {format_bytes(budget)}, observed only {fits}", details, metrics)
    return subject.passed(f"{expected}, observed {observed}; {fits}", details, metrics)
