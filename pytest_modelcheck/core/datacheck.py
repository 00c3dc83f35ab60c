"""Data sanity: value checks on a batch against an optional spec, and on a loader's first batches.

A spec is a dict mapping a selector to what must hold for that tensor. Selectors: an ``int``
(positional model input), a ``str`` (key of the input dict or keyword input, or a path such as
``"input[0]"``) or ``"target"``. Per tensor (all keys optional)::

    {"shape": ("B", 4), "dtype": "float32", "range": (0, 1),
     "mean": 0.0, "std": 1.0, "tol": 0.1,                       # normalization statistics
     "features": {"time": (0, 1), 1: (-3, 3)},                  # per-column ranges
     "feature_names": ["time", "charge", "sensor_id", "aux"], "feature_dim": -1,
     "classes": [0, 1, 2], "min_classes": 2, "max_class_fraction": 0.8,  # integer labels
     "finite": True}

The top-level key ``"constant_channels": False`` turns the spec-free constant-channel check off,
``"label_shift": False`` the check that a language model's target is not its token input
unshifted (``label_shift_problems``, run by ``data_sane``).
Nothing here imports pytest.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Iterable, Optional

from .batch import Batch, iter_tensors
from .errors import UsageError
from .result import CheckResult
from .shapes import match_shape, validate_spec

FIELD_KEYS = ("shape", "dtype", "range", "mean", "std", "tol", "features", "feature_names",
              "feature_dim", "classes", "min_classes", "max_class_fraction", "finite")
TOP_KEYS = ("constant_channels", "label_shift")
#: The constant-channel check needs at least this many samples (fewer agree by chance too often).
MIN_SAMPLES_FOR_CONSTANT = 4
#: ... and, for a (B, N) input (features or a mask, one value per sample), this many: a rare
#: binary feature or an all-ones mask is constant over a small batch by chance.
MIN_SAMPLES_FOR_CONSTANT_FEATURE = 32
#: The label-shift check compares at least this many (non-ignored) tokens: fewer agree by chance.
MIN_TOKENS_FOR_SHIFT = 8
IGNORE_INDEX = -100


def _pair(name: str, value: Any) -> tuple:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
          and value[0] <= value[1])
    if not ok:
        raise UsageError(f"{name}={value!r}: expected a (lo, hi) pair of numbers with lo <= hi")
    return (float(value[0]), float(value[1]))


def _num(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi):
        raise UsageError(f"{name}={value!r}: expected a number in [{lo:g}, {hi:g}]")
    return float(value)


def validate_data_spec(spec: Any) -> Optional[dict]:
    """Check a data spec (see the module doc); returns it normalized, raises UsageError otherwise.

    >>> validate_data_spec({0: {"range": [0, 1]}})[0]["range"]
    (0.0, 1.0)
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise UsageError(f"spec={spec!r}: expected a dict mapping an input index, an input key or"
                         " 'target' to {'shape': ..., 'range': (lo, hi), ...}")
    out: dict = {}
    for sel, field in spec.items():
        if sel in TOP_KEYS:
            out[sel] = bool(field)
            continue
        if not isinstance(sel, (int, str)) or isinstance(sel, bool):
            raise UsageError(f"spec key {sel!r}: expected an input index, an input key or 'target'")
        name = f"spec[{sel!r}]"
        if not isinstance(field, dict):
            raise UsageError(f"{name}={field!r}: expected a dict such as {{'range': (0, 1)}}")
        unknown = sorted(str(k) for k in field if k not in FIELD_KEYS)
        if unknown:
            raise UsageError(f"{name}: unknown key(s) {', '.join(unknown)}; expected some of"
                             f" {', '.join(FIELD_KEYS)}")
        f = dict(field)
        if "shape" in f:
            f["shape"] = validate_spec(f["shape"], f"{name}['shape']")
        if "dtype" in f:
            f["dtype"] = _dtype_name(f["dtype"], f"{name}['dtype']")
        if "range" in f:
            f["range"] = _pair(f"{name}['range']", f["range"])
        for key in ("mean", "std"):
            if key in f:
                f[key] = _num(f"{name}[{key!r}]", f[key], 0 if key == "std" else -math.inf)
        f["tol"] = _num(f"{name}['tol']", f.get("tol", 0.1), 0)
        names = f.get("feature_names")
        if names is not None and not (isinstance(names, (list, tuple))
                                      and all(isinstance(n, str) for n in names)):
            raise UsageError(f"{name}['feature_names']={names!r}: expected a list of column names")
        if "features" in f:
            feats = f["features"]
            if not isinstance(feats, dict) or not feats:
                raise UsageError(f"{name}['features']={feats!r}: expected a dict mapping a column"
                                 " index or name to (lo, hi)")
            checked = {}
            for col, rng in feats.items():
                if isinstance(col, str) and (names is None or col not in names):
                    raise UsageError(f"{name}['features']: column {col!r} is not in feature_names"
                                     f" {list(names or [])}; name the columns with feature_names=[...]")
                if not isinstance(col, (int, str)) or isinstance(col, bool):
                    raise UsageError(f"{name}['features']: column {col!r} is not an index or a name")
                checked[col] = _pair(f"{name}['features'][{col!r}]", rng)
            f["features"] = checked
        fdim = f.get("feature_dim", -1)
        if not isinstance(fdim, int) or isinstance(fdim, bool):
            raise UsageError(f"{name}['feature_dim']={fdim!r}: expected a dimension index")
        if "classes" in f:
            cls = f["classes"]
            if isinstance(cls, int) and not isinstance(cls, bool) and cls > 0:
                cls = list(range(cls))
            if not (isinstance(cls, (list, tuple, set)) and cls
                    and all(isinstance(c, int) and not isinstance(c, bool) for c in cls)):
                raise UsageError(f"{name}['classes']={field['classes']!r}: expected a number of"
                                 " classes or a list of allowed integer labels")
            f["classes"] = sorted(cls)
        if "min_classes" in f:
            f["min_classes"] = int(_num(f"{name}['min_classes']", f["min_classes"], 1))
        if "max_class_fraction" in f:
            f["max_class_fraction"] = _num(f"{name}['max_class_fraction']",
                                           f["max_class_fraction"], 0, 1)
        out[sel] = f
    return out


def _dtype_name(value: Any, name: str) -> str:
    import torch

    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, str) and isinstance(getattr(torch, value.replace("torch.", ""), None),
                                             torch.dtype):
        return str(getattr(torch, value.replace("torch.", ""))).replace("torch.", "")
    raise UsageError(f"{name}={value!r}: expected a torch dtype or its name such as 'float32'")


def _select(batch: Batch, sel: Any) -> list:
    """(label, tensor) pairs the selector names."""
    if sel == "target":
        return [(p, t) for p, t in iter_tensors(batch.target, "target")]
    if isinstance(sel, int):
        if sel < len(batch.args):
            return list(iter_tensors(batch.args[sel], f"input[{sel}]"))
        return []
    found = []
    if sel in batch.kwargs:
        found += list(iter_tensors(batch.kwargs[sel], f"input[{sel!r}]"))
    if batch.args and isinstance(batch.args[0], dict) and sel in batch.args[0]:
        found += list(iter_tensors(batch.args[0][sel], f"input[{sel!r}]"))
    if not found:
        found = [(p, t) for p, t in batch.input_tensors() if p == sel]
    return found


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _check_tensor(label: str, t: Any, f: dict, env: dict) -> list:
    import torch

    problems = []
    if "shape" in f:
        msg = match_shape(tuple(t.shape), f["shape"], env)
        if msg:
            problems.append((f"{label} of shape {f['shape']}", f"shape {tuple(t.shape)}: {msg}"))
    dtype = str(t.dtype).replace("torch.", "")
    if "dtype" in f and dtype != f["dtype"]:
        problems.append((f"{label} of dtype {f['dtype']}", f"dtype {dtype}"))
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                 torch.uint8, torch.bool)):
        return problems
    v = t.detach().double() if t.dtype != torch.bool else t.detach().to(torch.float64)
    if t.is_floating_point() and f.get("finite", True) and not bool(torch.isfinite(v).all()):
        n = int((~torch.isfinite(v)).sum())
        first = tuple(int(i) for i in (~torch.isfinite(v)).nonzero()[0].tolist())
        problems.append((f"finite values in {label}",
                         f"{n}/{v.numel()} non-finite values (first at index {first})"))
        v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    if v.numel() == 0:
        return problems
    if "range" in f:
        lo, hi = f["range"]
        vmin, vmax = float(v.min()), float(v.max())
        if vmin < lo or vmax > hi:
            problems.append((f"{label} within [{_fmt(lo)}, {_fmt(hi)}]",
                             f"range [{_fmt(vmin)}, {_fmt(vmax)}]"))
    if "mean" in f:
        mean = float(v.mean())
        if abs(mean - f["mean"]) > f["tol"]:
            problems.append((f"{label} mean {_fmt(f['mean'])} +/- {_fmt(f['tol'])}",
                             f"mean {_fmt(mean)}"))
    if "std" in f:
        std = float(v.std()) if v.numel() > 1 else 0.0
        if abs(std - f["std"]) > f["tol"] * max(f["std"], 1e-12) and abs(std - f["std"]) > 1e-12:
            problems.append((f"{label} std {_fmt(f['std'])} +/- {_fmt(f['tol'] * 100)}%",
                             f"std {_fmt(std)}"))
    if "features" in f:
        dim = f.get("feature_dim", -1)
        names = list(f.get("feature_names") or [])
        if v.dim() == 0:
            problems.append((f"{label} with a feature dimension", "a 0-d tensor"))
        else:
            cols = v.movedim(dim, -1).reshape(-1, v.shape[dim])
            for col, (lo, hi) in f["features"].items():
                idx = names.index(col) if isinstance(col, str) else col
                if not -cols.shape[1] <= idx < cols.shape[1]:
                    problems.append((f"{label} column {col!r}", f"only {cols.shape[1]} columns"))
                    continue
                c = cols[:, idx]
                cmin, cmax = float(c.min()), float(c.max())
                if cmin < lo or cmax > hi:
                    fname = f"feature {col!r}" if isinstance(col, str) else f"feature {idx}"
                    if isinstance(col, str):
                        fname += f" (column {idx})"
                    elif idx < len(names):
                        fname += f" ({names[idx]!r})"
                    problems.append((f"{fname} of {label} within [{_fmt(lo)}, {_fmt(hi)}]",
                                     f"range [{_fmt(cmin)}, {_fmt(cmax)}]"))
    if any(k in f for k in ("classes", "min_classes", "max_class_fraction")):
        if t.is_floating_point():
            problems.append((f"{label} holding integer class labels", f"dtype {dtype}"))
        else:
            values, counts = torch.unique(t.detach().reshape(-1), return_counts=True)
            present = [int(x) for x in values.tolist()]
            if "classes" in f:
                extra = [c for c in present if c not in f["classes"]]
                if extra:
                    problems.append((f"{label} labels in {f['classes']}",
                                     f"unexpected label(s) {extra[:10]}"))
            if "min_classes" in f and len(present) < f["min_classes"]:
                problems.append((f"at least {f['min_classes']} classes in {label}",
                                 f"{len(present)} ({present})"))
            if "max_class_fraction" in f:
                frac = float(counts.max()) / float(counts.sum())
                top = present[int(counts.argmax())]
                if frac > f["max_class_fraction"]:
                    problems.append((f"no class above {f['max_class_fraction']:.0%} of {label}",
                                     f"class {top} is {frac:.0%}"))
    return problems


def _padding_masks(data: Batch) -> list:
    """(B, N) inputs holding two values (0/1 or bool): ``[(tensor, bool mask, padding value), ...]``.

    The padding value is the minority value (the real elements outnumber the padded ones in a
    padded batch), so both conventions work: 1 = real (``mask``) and True = padded
    (``key_padding_mask``).
    """
    import torch

    out = []
    for _, t in data.input_tensors():
        if t.dim() != 2 or t.shape[0] != data.batch_size or t.is_complex():
            continue
        values = torch.unique(t.detach())
        if values.numel() != 2 or not bool(((values == 0) | (values == 1)).all()):
            continue
        ones = int((t != 0).sum())
        out.append((t, t != 0, ones * 2 < t.numel()))
    return out


def _constant_channels(batch: Batch) -> list:
    """Floating inputs (B, C, ...) with B >= 4 (B >= 32 for a 2-D (B, N) input) whose channel c
    is one value over the whole batch.

    Positions of a ``(B, N, ...)`` set or sequence that a ``(B, N)`` mask input marks as
    padding in every sample are exempt (a batch padded to a fixed length has them), and so are
    the mask's own columns.
    """
    import torch

    problems: list = []
    size = batch.batch_size or 0
    if size < MIN_SAMPLES_FOR_CONSTANT:
        return problems
    masks = _padding_masks(batch)
    skip = batch.target_path
    for path, t in batch.input_tensors():
        if not t.is_floating_point() or t.dim() < 2 or t.shape[0] != size or path == skip or any(
                t is m for m, _, _ in masks):
            continue
        if t.dim() == 2 and size < MIN_SAMPLES_FOR_CONSTANT_FEATURE:
            continue
        flat = t.detach().movedim(1, 0).reshape(t.shape[1], -1)
        if flat.shape[1] < 2:
            continue
        const = (flat == flat[:, :1]).all(dim=1) & torch.isfinite(flat).all(dim=1)
        for _, mask, pad in masks:
            if t.dim() >= 3 and mask.shape == t.shape[:2]:
                const &= ~(mask == pad).all(dim=0)  # padded in every sample: constant by design
        for c in const.nonzero().flatten().tolist()[:1]:
            problems.append((f"channel {c} of {path} to vary across the {size} samples",
                             f"the constant {_fmt(float(flat[c, 0]))} (a dead sensor, a fill value"
                             " or a broken normalization; if intended, pass"
                             " spec={'constant_channels': False})"))
    return problems


def _token_tensor(t: Any) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() \
        and t.dtype != torch.bool


def label_shift_problems(batch: Batch) -> list:
    """A ``(B, T)`` integer target that equals a token input of the same shape, or lags it by one
    (``target[:, t] == input[:, t]`` or ``input[:, t-1]`` at every compared position): a language
    model trained without the label shift learns to copy, not to predict the next token. The
    correct shift (``target[:, t] == input[:, t+1]``) passes; ``-100`` targets are ignored; float
    inputs (an autoencoder reconstructing its input) are not compared. ``data_sane`` skips this
    when the model computes its own loss from ``labels`` (Hugging Face causal LMs shift inside).

    >>> import torch
    >>> ids = torch.arange(24).reshape(2, 12) % 7
    >>> len(label_shift_problems(Batch.from_user((ids, ids.clone()))))
    1
    >>> label_shift_problems(Batch.from_user((ids[:, :-1], ids[:, 1:])))
    []
    """
    target = batch.target
    if not _token_tensor(target) or target.dim() != 2 or target.shape[1] < 2:
        return []
    tgt = target.detach()
    keep = tgt != IGNORE_INDEX

    def agree(a: Any, b: Any, m: Any) -> Optional[int]:
        n = int(m.sum())
        return n if n >= MIN_TOKENS_FOR_SHIFT and bool((a == b)[m].all()) else None

    problems = []
    for path, x in batch.input_tensors():
        if path == batch.target_path or not _token_tensor(x) \
                or x.shape != tgt.shape:
            continue
        x = x.detach().to(tgt.device)
        if agree(tgt[:, :-1], x[:, 1:], keep[:, :-1]) is not None:
            continue  # shifted correctly (or a constant sequence: nothing to tell)
        same = agree(tgt, x, keep)
        lag = None if same is not None else agree(tgt[:, 1:], x[:, :-1], keep[:, 1:])
        if same is None and lag is None:
            continue
        how = (f"target[:, t] == {path}[:, t] at all {same} positions (the model is taught to"
               " copy the token it is given)" if same is not None else
               f"target[:, t] == {path}[:, t-1] at all {lag} positions (shifted the wrong way:"
               " the model is taught the previous token)")
        problems.append((f"a target that is the next token of {path} (target[:, t] =="
                         f" {path}[:, t+1]: labels shifted left by one)",
                         how + "; if the model should copy its input, pass"
                         " spec={'label_shift': False}"))
    return problems


def batch_problems(batch: Batch, spec: Optional[dict]) -> list:
    """``[(expected, observed), ...]`` for one batch: spec-free checks plus the spec's.

    >>> import torch
    >>> b = Batch.from_user((torch.tensor([[0.5], [2.0]]), torch.zeros(2)))
    >>> batch_problems(b, {0: {"range": (0, 1)}})
    [('input[0] within [0, 1]', 'range [0.5, 2]')]
    """
    spec = spec or {}
    problems = []
    declared = {sel for sel in spec if sel not in TOP_KEYS}
    for path, t in batch.input_tensors() + list(iter_tensors(batch.target, "target")):
        if t.is_floating_point():  # finite values everywhere, declared or not
            problems += _check_tensor(path, t, {}, {})
    env: dict = {}
    for sel in declared:
        tensors = _select(batch, sel)
        if not tensors:
            problems.append((f"a tensor named {sel!r} in the batch",
                             f"none (the batch holds {batch.describe()})"))
            continue
        for label, t in tensors:
            problems += [p for p in _check_tensor(label, t, spec[sel], env)
                         if not p[0].startswith("finite values")]
    if spec.get("constant_channels", True):
        problems += _constant_channels(batch)
    return problems


def sample_hashes(batch: Batch) -> list:
    """One hash per sample of the inputs whose first dimension is the batch size ([] if none).

    >>> import torch
    >>> h = sample_hashes(Batch.from_user((torch.tensor([[1.0], [1.0], [2.0]]), torch.zeros(3))))
    >>> h[0] == h[1] != h[2]
    True
    """
    size = batch.batch_size
    skip = batch.target_path
    parts = [t.detach().cpu().contiguous() for p, t in batch.input_tensors()
             if size and t.dim() > 0 and t.shape[0] == size and p != skip]
    if not parts or not size:
        return []
    out = []
    for i in range(size):
        h = hashlib.sha1()
        for t in parts:
            h.update(str(t.dtype).encode())
            h.update(t[i].numpy().tobytes())
        out.append(h.hexdigest())
    return out


def _batches(source: Any, max_batches: int) -> Iterable:
    if callable(source) and not hasattr(source, "__iter__"):
        source = source()
    for i, b in enumerate(source):
        if i >= max_batches:
            break
        yield Batch.from_user(b, name=f"batch {i}")


def check_data(loader_or_batches: Any, spec: Any = None, *, max_batches: int = 5,
               val: Any = None) -> CheckResult:
    """Check a DataLoader's (or any iterable of batches') first batches, and train/val overlap.

    Every batch gets the spec-free checks (finite values, no constant channel) and the ``spec``
    (see the module doc). With ``val=`` (another loader), the samples of its first
    ``max_batches`` batches are hashed and compared with the training samples seen.

    >>> import torch
    >>> x = torch.arange(16.0).reshape(8, 2)
    >>> train = [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(4))]
    >>> r = check_data(train, {0: {"range": (0, 15)}}, val=[(x[2:6], torch.zeros(4))])
    >>> r.passed, r.metrics["duplicated_samples"]
    (False, 4)
    """
    spec = validate_data_spec(spec)
    if not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1:
        raise UsageError(f"max_batches={max_batches!r}: expected a positive integer")
    if isinstance(loader_or_batches, (str, bytes)) or not (
            hasattr(loader_or_batches, "__iter__") or callable(loader_or_batches)):
        raise UsageError(f"loader_or_batches={loader_or_batches!r}: expected a DataLoader or an"
                         " iterable of batches")
    problems: list = []
    seen: dict = {}
    samples = n_batches = 0
    for bi, b in enumerate(_batches(loader_or_batches, max_batches)):
        n_batches += 1
        for exp, obs in batch_problems(b, spec):
            problems.append((exp, f"{obs} in batch {bi}"))
        for si, h in enumerate(sample_hashes(b)):
            seen.setdefault(h, samples + si)
        samples += b.batch_size or 0
    metrics: dict = {"batches": n_batches, "samples": samples, "problems": len(problems)}
    dup, example = 0, (0, 0)
    if val is not None:
        vsamples = 0
        for b in _batches(val, max_batches):
            for si, h in enumerate(sample_hashes(b)):
                if h in seen:
                    dup += 1
                    if dup == 1:
                        example = (vsamples + si, seen[h])
            vsamples += b.batch_size or 0
        metrics.update({"val_samples": vsamples, "duplicated_samples": dup})
        if dup:
            metrics["duplicate_example"] = list(example)
            problems.insert(0, ("no validation sample among the training samples",
                                f"{dup} duplicated samples (e.g. validation sample {example[0]}"
                                f" equals training sample {example[1]})"))
    details = "\n".join(f"expected {e}, observed {o}" for e, o in problems[:20])
    if problems:
        exp, obs = problems[0]
        extra = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return CheckResult("check_data", False, f"expected {exp}, observed {obs}{extra}",
                           details, metrics)
    return CheckResult("check_data", True,
                       f"expected sane data, observed {samples} samples in {n_batches} batches"
                       " passing every check", details, metrics)
