"""Numerics: device_portable, dtype_stable, activations_healthy and output_range.

* ``device_portable``: after ``model.to(other)`` every parameter, buffer and tensor made in
  forward follows (found on a CPU-only runner with the ``meta`` device, and for real on CUDA).
* ``dtype_stable``: activations keep the parameters' dtype (no float64 creeping in), and the
  model runs under ``torch.autocast`` with finite outputs.
* ``activations_healthy``: per-layer activation statistics and gradient norms on one batch:
  exploding activations, vanishing gradients, dead ReLUs, saturated sigmoid/tanh.
* ``output_range``: outputs stay within declared ranges, also at other batch sizes and on
  scaled inputs.

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Optional

from ..core.errors import ModelError, UsageError
from ..core.result import CheckResult
from .registry import SkipCheck, check

ROOT = "<root>"


from ..core.errors import describe_error as _one_line


def _short(source: str) -> str:
    return os.path.basename(source) if source else "an unknown line"


from ..core.units import is_number as _is_number


class _ModuleStack:
    """Forward pre/post hooks that keep the path of the module now running (``current``).

    Hooks are removed on exit, even when the model raises.
    """

    def __init__(self, model: Any) -> None:
        self.names = {m: (n or ROOT) for n, m in model.named_modules()}
        self.types = {(n or ROOT): type(m).__name__ for n, m in model.named_modules()}
        self.stack: list = []
        self.handles: list = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ROOT

    def describe(self, path: str) -> str:
        return f"module '{path}' ({self.types.get(path, '?')})"

    def __enter__(self) -> "_ModuleStack":
        def push(mod: Any, args: Any) -> None:
            self.stack.append(self.names.get(mod, ROOT))

        def pop(mod: Any, args: Any, out: Any) -> None:
            if self.stack:
                self.stack.pop()

        for m in self.names:
            self.handles.append(m.register_forward_pre_hook(push))
            self.handles.append(m.register_forward_hook(pop))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.stack.clear()


def _op_name(func: Any) -> str:
    packet = getattr(func, "overloadpacket", None)
    return "aten." + (getattr(packet, "__name__", None) or str(func).split(".")[1])


def _flat_tensors(obj: Any) -> list:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


# ----------------------------------------------------------------------------- device_portable
def plain_tensor_attributes(model: Any) -> list:
    """``[(path, type name), ...]`` of tensors stored as plain module attributes.

    Such tensors are neither parameters nor registered buffers, so ``model.to(device)``,
    ``state_dict()`` and ``copy.deepcopy`` bookkeeping leave them behind.

    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> m.scale = torch.ones(2)
    >>> plain_tensor_attributes(m)
    [('scale', 'Linear')]
    """
    import torch

    from ..core.state import hook_managed_attributes

    found = []
    for name, mod in model.named_modules():
        managed = hook_managed_attributes(mod)
        for key, value in vars(mod).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) \
                    and key not in managed:
                found.append((f"{name}.{key}" if name else key, type(mod).__name__))
    return found


def _device_probe(model: Any, batch: Any, device: Any) -> dict:
    """Run a copy of ``model`` moved to ``device`` on ``batch`` moved there; record every op that
    mixes ``device`` with real CPU tensors or makes a CPU tensor (0-d CPU scalars mix freely)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..core.batch import copy_model
    from ..core.dispatch import user_source

    target = torch.device(device)
    work = copy_model(model).to(target).eval()
    data = batch.clone().to(target)
    found: list = []

    def strays(tensors: list) -> list:
        return [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]

    with _ModuleStack(work) as mods:
        class Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                kwargs = kwargs or {}
                ins = _flat_tensors((args, kwargs))
                on_target = any(t.device.type == target.type for t in ins)
                if on_target and strays(ins) and len(found) < 20:
                    t = strays(ins)[0]
                    found.append({"kind": "mix", "op": _op_name(func), "module": mods.current,
                                  "source": user_source(), "shape": tuple(t.shape)})
                out = func(*args, **kwargs)
                if not ins or not strays(ins):
                    made = strays(_flat_tensors(out))
                    if made and len(found) < 20:
                        found.append({"kind": "made", "op": _op_name(func), "module": mods.current,
                                      "source": user_source(), "shape": tuple(made[0].shape)})
                return out

        error = None
        try:
            with torch.no_grad(), Recorder():
                data.call(work)
        except Exception as exc:  # noqa: BLE001 - reported below
            error = exc
        where = mods.describe(mods.current) if error is not None else ""
    return {"found": found, "error": error, "raised_in": where, "types": mods.types}


def _describe_stray(f: dict, types: dict, target: str) -> str:
    mod = "" if f["module"] == ROOT else f" in module '{f['module']}' ({types.get(f['module'], '?')})"
    src = _short(f["source"])
    if f["kind"] == "made":
        return (f"{f['op']} at {src}{mod} created a cpu tensor of shape {list(f['shape'])} while the"
                f" model is on {target}")
    return (f"{f['op']} at {src}{mod} mixed a {target} tensor with a cpu tensor of shape"
            f" {list(f['shape'])}")


DEVICE_REMEDY = ("remedy: register constant tensors with self.register_buffer(name, t)"
                 " (persistent=False if they should stay out of the state_dict), and create tensors"
                 " in forward with device=x.device (torch.zeros(n, device=x.device),"
                 " x.new_zeros(n), torch.arange(n, device=x.device))")


def _validate_device_portable() -> dict:
    return {}


@check(default=True, validate=_validate_device_portable)
def device_portable(*, model: Any, batch: Any, loss: Any = None, device: Any = None) -> CheckResult:
    """After model.to(other device), every parameter, buffer and tensor made in forward follows.

    Moves a copy of the model and the batch to the ``meta`` device (and, when CUDA is
    available, to ``cuda``) and runs forward under a dispatch mode that records any op mixing
    the new device with a CPU tensor and any op creating a CPU tensor (``torch.zeros(n)``,
    ``torch.arange(n)``, ``torch.tensor([...])`` without ``device=``). Tensors kept as plain
    module attributes (not registered buffers) are reported directly. A forward that needs
    tensor values (``.item()``, ``nonzero``) cannot run on ``meta``: then the check is skipped,
    unless a plain tensor attribute was already found. 0-d CPU tensors mix with any device and
    are not reported.

    >>> import torch
    >>> device_portable(model=torch.nn.Linear(4, 3), batch=torch.randn(2, 4)).passed
    True
    """
    import torch

    from ..core.batch import copy_model
    from ..core.forward import run_forward

    attrs = plain_tensor_attributes(model)
    targets = ["meta"] + (["cuda"] if torch.cuda.is_available() and (
        device is None or torch.device(device).type != "cuda") else [])
    probes = {t: _device_probe(model, batch, t) for t in targets}
    metrics: dict = {"plain_tensor_attributes": [a for a, _ in attrs],
                     "devices": targets}
    details: list = []
    if attrs:
        details.append("tensors kept as plain attributes (model.to() does not move them):")
        details += [f"  {a} ({t})" for a, t in attrs]
    strays = []
    for t, p in probes.items():
        metrics[f"{t}_strays"] = len(p["found"])
        if p["found"]:
            details.append(f"ops that left a tensor behind on {t}:")
            details += ["  " + _describe_stray(f, p["types"], t)
                        + (f"  [{f['source']}]" if f["source"] else "") for f in p["found"]]
            strays.append((t, p["found"][0], p["types"]))
    expected = "expected every tensor to follow model.to(other device)"
    if attrs or strays:
        details.append(DEVICE_REMEDY)
        if attrs:
            a, typ = attrs[0]
            observed = f"tensor attribute '{a}' ({typ}) is not a registered buffer"
            more = len(attrs) - 1
            if more:
                observed += f", and {more} more"
            if strays:
                observed += "; " + _describe_stray(strays[0][1], strays[0][2], strays[0][0])
        else:
            observed = _describe_stray(strays[0][1], strays[0][2], strays[0][0])
        return CheckResult("device_portable", False, f"{expected}, observed {observed}",
                           "\n".join(details), metrics)
    for t, p in probes.items():
        if p["error"] is not None:
            # the same forward on the model's own device tells a model bug from a device limit
            with torch.no_grad():
                run_forward(copy_model(model).to(device).eval(), batch.clone().to(device))
            raise SkipCheck(f"the forward cannot run on {t} ({_one_line(p['error'])} in"
                            f" {p['raised_in']}); on meta, forwards that read tensor values"
                            " (.item(), nonzero, boolean masks) cannot be checked")
    return CheckResult("device_portable", True,
                       f"{expected}, observed every op's tensors on the model's device"
                       f" ({', '.join(targets)})", "\n".join(details), metrics)


# -------------------------------------------------------------------------------- dtype_stable
AMP_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}


def _validate_dtype(amp: Any = "bf16") -> dict:
    if amp is not None and (not isinstance(amp, str) or amp.lower() not in AMP_DTYPES):
        raise UsageError(f"amp={amp!r}: expected 'bf16', 'fp16' or None (no autocast run)")
    return {"amp": amp.lower() if isinstance(amp, str) else None}


def _width(dtype: Any) -> int:
    """Bytes of one real component: float32 and complex64 are both 4."""
    size = dtype.itemsize
    return size // 2 if dtype.is_complex else size


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


@check(default=True, validate=_validate_dtype)
def dtype_stable(amp: Any = "bf16", *, model: Any, batch: Any, loss: Any = None,
                 device: Any = None) -> CheckResult:
    """Activations keep the parameters' dtype (no float64 creeping in) and the model runs under autocast.

    Records every dispatched op of a forward (eval mode, on a copy) and reports the first whose
    floating output is wider than the parameters' dtype (float64 from numpy scalars,
    ``torch.tensor(np.float64(...))``, ``.double()``...), naming the module and source line.
    Then, unless ``amp=None``, runs the forward under ``torch.autocast(device, dtype=bfloat16)``
    (``amp='fp16'``: float16) and requires it to run and give finite outputs.

    >>> import torch
    >>> dtype_stable(model=torch.nn.Linear(4, 3), batch=torch.randn(2, 4)).passed
    True
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..core.batch import copy_model, iter_tensors
    from ..core.dispatch import user_source
    from ..core.forward import run_forward

    work = copy_model(model).to(device).eval()
    floats = [p.dtype for p in work.parameters() if p.is_floating_point()] or \
        [b.dtype for b in work.buffers() if b.is_floating_point()]
    param_dtype = max(floats, key=lambda d: d.itemsize) if floats else torch.get_default_dtype()
    limit = _width(param_dtype)
    data = batch.clone().to(device)
    wide: list = []
    seen = {"ops": 0}

    with _ModuleStack(work) as mods:
        class Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                seen["ops"] += 1
                if len(wide) < 20:
                    for t in _flat_tensors(out):
                        if (t.is_floating_point() or t.is_complex()) and _width(t.dtype) > limit:
                            wide.append({"op": _op_name(func), "dtype": _dtype_name(t.dtype),
                                         "module": mods.current, "source": user_source(),
                                         "shape": list(t.shape)})
                            break
                return out

        try:
            with torch.no_grad(), Recorder():
                out = data.call(work)
        except Exception as exc:  # noqa: BLE001 - replayed without the mode to tell model from mode
            with torch.no_grad():
                run_forward(copy_model(model).to(device).eval(), batch.clone().to(device))
            raise SkipCheck(f"the model cannot run under a TorchDispatchMode ({_one_line(exc)}),"
                            " which this check needs to see every op") from None
        types = mods.types

    wide_outputs = [(p, _dtype_name(t.dtype)) for p, t in iter_tensors(out, "output")
                    if (t.is_floating_point() or t.is_complex()) and _width(t.dtype) > limit]
    metrics: dict = {"param_dtype": _dtype_name(param_dtype), "ops": seen["ops"],
                     "wide_ops": len(wide), "amp": amp}
    details: list = []
    pname = _dtype_name(param_dtype)
    if wide:
        details.append(f"ops with floating outputs wider than the parameters' {pname}:")
        details += [f"  {w['op']:32} -> {w['dtype']} {w['shape']}  module '{w['module']}'"
                    f"  {w['source'] or '(no user line)'}" for w in wide]
        details.append("remedy: keep constants in Python floats or tensors made with"
                       " dtype=x.dtype / x.new_tensor(...); avoid numpy float64 scalars in"
                       " torch.tensor(...), .double(), dtype=torch.float64")
        w = wide[0]
        mod = "" if w["module"] == ROOT else f" in module '{w['module']}' ({types.get(w['module'], '?')})"
        observed = f"{w['op']} producing {w['dtype']} at {_short(w['source'])}{mod}"
        if wide_outputs:
            observed += f"; {wide_outputs[0][0]} is {wide_outputs[0][1]}"
        metrics.update({"first_wide_op": w["op"], "first_wide_module": w["module"],
                        "first_wide_source": w["source"]})
        return CheckResult("dtype_stable", False,
                           f"expected activations in the parameters' dtype {pname}, observed"
                           f" {observed}", "\n".join(details), metrics)
    if amp is None:
        return CheckResult("dtype_stable", True,
                           f"expected activations in the parameters' dtype {pname}, observed"
                           f" {seen['ops']} ops all within {pname} (autocast not run: amp=None)",
                           "", metrics)

    amp_dtype = getattr(torch, AMP_DTYPES[amp])
    dev_type = torch.device(device).type if device is not None else "cpu"
    work = copy_model(model).to(device).eval()
    data = batch.clone().to(device)
    expected = f"expected the forward to run under torch.autocast('{dev_type}', {AMP_DTYPES[amp]})" \
               " with finite outputs"
    try:
        with torch.no_grad(), torch.autocast(dev_type, dtype=amp_dtype):
            amp_out = run_forward(work, data)
    except ModelError as exc:
        # torch's fused inference path of nn.MultiheadAttention / TransformerEncoderLayer has
        # no autocast support on every device; training (with grad) never takes it
        amp_out = _without_attention_fastpath(work, data, dev_type, amp_dtype)
        if amp_out is None:
            details.append(_cause_text(exc))
            return CheckResult("dtype_stable", False, f"{expected}, observed {exc}",
                               "\n".join(details), dict(metrics, amp_raised_in=exc.module))
        details.append(f"note: the autocast forward raised on torch's fused attention inference"
                       f" path ({exc}) and ran without it; training never takes that path")
    bad = [p for p, t in iter_tensors(amp_out, "output")
           if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]
    if bad:
        origin = _first_nonfinite_op(model, batch, device, dev_type, amp_dtype)
        where = f"; first non-finite value from {origin}" if origin else ""
        return CheckResult("dtype_stable", False,
                           f"{expected}, observed non-finite values in {bad[0]}{where}",
                           "remedy: values beyond the half-precision range (65504 for float16) or"
                           " reductions that overflow; keep that op in float32 with"
                           " torch.autocast(..., enabled=False) around it", metrics)
    return CheckResult("dtype_stable", True,
                       f"expected activations in the parameters' dtype {pname} and a finite"
                       f" autocast({AMP_DTYPES[amp]}) forward, observed both ({seen['ops']} ops)",
                       "", metrics)


def _cause_text(exc: ModelError) -> str:
    import traceback

    if exc.original is None:
        return ""
    lines = traceback.format_exception(type(exc.original), exc.original, exc.original.__traceback__)
    return "\n".join("".join(lines).rstrip().splitlines()[-8:])


def _without_attention_fastpath(work: Any, data: Any, dev_type: str, amp_dtype: Any) -> Any:
    """The autocast forward with torch's fused attention path off; None when it raises too (or
    when that path was not on)."""
    import torch

    from ..core.forward import run_forward
    from ..core.memory import _mha_fastpath

    mha = getattr(torch.backends, "mha", None)
    if mha is None or not getattr(mha, "get_fastpath_enabled", lambda: False)():
        return None
    try:
        with _mha_fastpath(False), torch.no_grad(), torch.autocast(dev_type, dtype=amp_dtype):
            return run_forward(work, data)
    except ModelError:
        return None


def _first_nonfinite_op(model: Any, batch: Any, device: Any, dev_type: str, amp_dtype: Any) -> str:
    """``op at file:line in module 'x' (Type)`` of the first op under autocast whose floating
    output is not finite while its inputs are."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..core.batch import copy_model
    from ..core.dispatch import user_source

    work = copy_model(model).to(device).eval()
    data = batch.clone().to(device)
    hit: list = []

    def finite(ts: list) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in ts if t.is_floating_point() or t.is_complex())

    with _ModuleStack(work) as mods:
        class Finder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                if not hit and not finite(_flat_tensors(out)) and finite(_flat_tensors((args, kwargs))):
                    hit.append(f"{_op_name(func)} at {_short(user_source())} in"
                               f" {mods.describe(mods.current)}")
                return out

        try:
            with torch.no_grad(), torch.autocast(dev_type, dtype=amp_dtype), Finder():
                data.call(work)
        except Exception:  # noqa: BLE001 - best effort only
            pass
    return hit[0] if hit else ""


# ------------------------------------------------------------------------- activations_healthy
RELU_LIKE = ("ReLU", "ReLU6")
SATURATING = ("Sigmoid", "Tanh")
#: Attention rows that may attend to fewer keys than this are left out of the saturation measure:
#: a causal mask's first rows see one or two keys, so their largest probability is near 1 by design.
ATTENTION_MIN_KEYS = 4
#: Attention whose rows put, on average, at least this probability on their top key is saturated.
#: Measured at random init (mean over query rows of the largest probability; 1/T is uniform):
#: torch nn.MultiheadAttention and nn.TransformerEncoderLayer (d=64, 4 heads, T=16, unit-std
#: inputs) 0.14, inputs of std 3 0.71-0.73, std 4 0.86; HF BERT 0.10, GPT-2 0.14, Llama 0.14,
#: ViT 0.06, T5 (unscaled by design) 0.45; timm vit_tiny 0.07; torchvision vit_b_32 (T=5) 0.33,
#: swin_t 0.05. Scores multiplied by sqrt(d) instead of divided (one head after a LayerNorm):
#: d=64 0.91-0.97 for T=8..64, d=128 0.95-0.98, d=32 0.83-0.92, d=16 0.65-0.81.
ATTENTION_SATURATED = 0.85
#: Samples of a batch used to recompute attention probabilities (bounds the extra work).
ATTENTION_SAMPLES = 8
#: Fused attention kernels (what ``scaled_dot_product_attention`` dispatches to): their
#: probabilities are recomputed from query, key, scale and mask.
SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_fused_attention_overrideable")
SOFTMAX_OPS = ("_softmax", "_safe_softmax")


def _validate_activations(max_growth: Any = 1e4, min_grad_ratio: Any = 1e-5,
                          dead_fraction: Any = 0.9, saturated_fraction: Any = 0.9,
                          attention_max_prob: Any = ATTENTION_SATURATED) -> dict:
    if not _is_number(max_growth) or not max_growth >= 1:
        raise UsageError(f"max_growth={max_growth!r}: expected a number >= 1, the largest ratio of"
                         " a layer's activation std to that of an earlier layer")
    if not _is_number(min_grad_ratio) or not 0 <= min_grad_ratio < 1:
        raise UsageError(f"min_grad_ratio={min_grad_ratio!r}: expected a number in [0, 1), the"
                         " smallest first-layer/last-layer gradient norm ratio")
    for name, v in (("dead_fraction", dead_fraction), ("saturated_fraction", saturated_fraction)):
        if not _is_number(v) or not 0 < v <= 1:
            raise UsageError(f"{name}={v!r}: expected a fraction in (0, 1]")
    if not _is_number(attention_max_prob) or not 0 < attention_max_prob <= 1:
        raise UsageError(f"attention_max_prob={attention_max_prob!r}: expected a probability in"
                         " (0, 1], the largest mean top-key attention probability at initialisation")
    return {"max_growth": float(max_growth), "min_grad_ratio": float(min_grad_ratio),
            "dead_fraction": float(dead_fraction), "saturated_fraction": float(saturated_fraction),
            "attention_max_prob": float(attention_max_prob)}


def _std_growth(order: list, stats: dict) -> tuple:
    """``(growth, earlier layer, later layer)``: the largest ratio of a layer's activation std to
    the smallest non-zero std of a layer that ran before it (``inf`` for a non-finite std).
    Used only when the data path cannot be traced."""
    growth, low_at, top_at = 0.0, "", ""
    low = None
    for p in order:
        s = stats[p].get("std")
        if s is None:
            continue
        if not math.isfinite(s):
            return math.inf, low or p, p
        if s <= 0:
            continue
        if low is not None and s / stats[low]["std"] > growth:
            growth, low_at, top_at = s / stats[low]["std"], low, p
        if low is None or s < stats[low]["std"]:
            low = p
    return growth, low_at, top_at


def _top_probs(probs: Any, allowed: Any) -> tuple:
    """``(sum of each row's largest probability, rows)`` over rows with at least
    ``ATTENTION_MIN_KEYS`` allowed keys."""
    rows = allowed.sum(-1) >= ATTENTION_MIN_KEYS
    return float(probs.amax(-1)[rows].sum()), int(rows.sum())


def _softmax_attention(args: tuple, out: Any) -> Optional[tuple]:
    """Top-probability sums of a softmax over attention scores: the last dim of a tensor whose
    last two dims are equal (T query rows by T keys), at least 3-d; None for any other softmax."""
    import torch

    scores, dim = args[0], args[1]
    if not isinstance(scores, torch.Tensor) or scores.dim() < 3 or not scores.is_floating_point():
        return None
    if dim % scores.dim() != scores.dim() - 1 or scores.shape[-1] != scores.shape[-2] \
            or scores.shape[-1] < ATTENTION_MIN_KEYS:
        return None
    x = scores[:ATTENTION_SAMPLES].detach()
    allowed = torch.isfinite(x) & (x > torch.finfo(x.dtype).min / 2)  # additive masks use finfo.min
    return _top_probs(out[:ATTENTION_SAMPLES].detach().float(), allowed)


def _sdpa_attention(func: Any, args: tuple, kwargs: dict) -> Optional[tuple]:
    """Top-probability sums of a fused attention kernel, its probabilities recomputed from the
    query, key, scale, mask and causal flag it was given."""
    import torch

    a = dict(zip([x.name for x in func._schema.arguments], args))
    a.update(kwargs)
    q, k = a.get("query"), a.get("key")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() < 2:
        return None
    n = q.shape[0] if q.dim() > 2 else 1
    q = q[:ATTENTION_SAMPLES].detach().float() if q.dim() > 2 else q.detach().float()
    k = k[:ATTENTION_SAMPLES].detach().float() if k.dim() > 2 else k.detach().float()
    if q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3] and k.shape[-3] \
            and q.shape[-3] % k.shape[-3] == 0:  # grouped-query attention
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = a.get("scale")
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    allowed = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    mask = a.get("attn_mask", a.get("attn_bias"))
    if isinstance(mask, torch.Tensor):
        m = mask.detach()
        if m.dim() == q.dim() and m.dim() > 2 and m.shape[0] == n:
            m = m[:ATTENTION_SAMPLES]
        m = torch.broadcast_to(m, scores.shape)
        if m.dtype == torch.bool:
            allowed = m
        else:
            allowed = torch.isfinite(m) & (m > torch.finfo(m.dtype).min / 2)
            scores = scores + m.float()
    if a.get("is_causal"):
        rows, cols = scores.shape[-2:]
        allowed = allowed & torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
    return _top_probs(probs, allowed)


def _at_line(source: str) -> str:
    """``file.py:12`` of a ``path/file.py:12 in fn`` source; "an unknown line" without one."""
    if not source:
        return "an unknown line"
    where = source.split(" in ")[0]
    return os.path.basename(where)


def _rms(t: Any, cache: Any) -> float:
    seen = cache.get(t)
    if seen is not None and seen[0] == t._version:
        return seen[1]
    value = float(t.detach().float().pow(2).mean().sqrt()) if t.numel() else 0.0
    cache[t] = (t._version, value)
    return value


def _path_tracer(mods: "_ModuleStack", tags: Any, attention: dict, state: dict) -> Any:
    """A dispatch mode that carries each activation's path tag from the inputs of every op to its
    outputs, and measures the attention probabilities of softmaxes over scores and fused kernels.

    A tag is ``(std, module)``: the smallest output std of a module on the path the data took to
    this tensor. An op with several tagged inputs (a residual ``x + branch``, ``cat``, a gate)
    passes on the tag of the input that carries the magnitude (largest RMS), so a residual
    branch that is tiny by design (ConvNeXt's layer scale) is not on the main path.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.weak import WeakTensorKeyDictionary

    from ..core.dispatch import user_source

    rms_cache = WeakTensorKeyDictionary()

    class PathTracer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            if state["quiet"]:
                return func(*args, **kwargs)
            # the tag is chosen before the op runs: an in-place `x += branch` changes x
            ins = [t for t in _flat_tensors((args, kwargs)) if t.is_floating_point() and t in tags]
            src = ins[0] if len(ins) == 1 else max(ins, key=lambda t: _rms(t, rms_cache),
                                                   default=None)
            tag = tags[src] if src is not None else None
            out = func(*args, **kwargs)
            name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
            found = None
            try:
                if name in SOFTMAX_OPS:
                    found = _softmax_attention(args, out)
                elif name in SDPA_OPS:
                    found = _sdpa_attention(func, args, kwargs)
            except Exception:  # noqa: BLE001 - an attention layout this measure does not know
                found = None
            if found is not None and found[1]:
                row = attention.setdefault(mods.current, {"sum": 0.0, "rows": 0, "calls": 0,
                                                          "op": "aten." + name,
                                                          "source": user_source()})
                row["sum"] += found[0]
                row["rows"] += found[1]
                row["calls"] += 1
            if tag is not None:
                for t in _flat_tensors(out):
                    if t.is_floating_point():
                        tags[t] = tag
            return out

    return PathTracer()


def _zero_parameters(model: Any) -> list:
    """Names of parameters (more than one element) that are exactly zero: zero-initialised heads
    and gates pass no gradient upstream at the first step, by design."""
    import torch

    with torch.no_grad():
        return [n for n, p in model.named_parameters()
                if p.requires_grad and p.numel() > 1 and not bool(p.any())]


@check(default=True, validate=_validate_activations)
def activations_healthy(max_growth: Any = 1e4, min_grad_ratio: Any = 1e-5, dead_fraction: Any = 0.9,
                        saturated_fraction: Any = 0.9, attention_max_prob: Any = ATTENTION_SATURATED,
                        *, model: Any, batch: Any, loss: Any = None,
                        device: Any = None) -> CheckResult:
    """No exploding activations, vanishing gradients, dead ReLUs, saturated sigmoid/tanh or saturated attention on one batch.

    One forward and backward of the loss in train mode on a copy. For every leaf module: the
    mean and std of its (first floating) output; for ReLU/ReLU6 modules the fraction of units
    (output elements, per sample) that are zero for every sample; for Sigmoid/Tanh modules the
    fraction of outputs saturated (``|tanh| > 0.99``, sigmoid ``< 0.01`` or ``> 0.99``); for every
    module with parameters of its own, the gradient norm of those parameters; for every softmax
    over attention scores (the last dim of a tensor whose last two dims are (T, T)) and every
    ``scaled_dot_product_attention`` (probabilities recomputed from its query, key, scale and
    mask), the mean over query rows of the largest probability. Fails when

    * a layer's activation std exceeds ``max_growth`` times the smallest non-zero std of a
      layer earlier on the path its data took (exploding across depth), or is not finite. The
      path is traced op by op: where a residual ``x + branch`` meets, it follows the input that
      carries the magnitude, so a branch that is tiny by design (layer scale) is not compared
      with the main path;
    * the first parameterized layer's gradient norm is below ``min_grad_ratio`` times the last
      one's (vanishing; not judged when it is exactly zero because a parameter is initialised
      to zero, such as a zero-initialised classifier head);
    * a ReLU has ``>= dead_fraction`` of its units dead for all samples;
    * a Sigmoid/Tanh has ``>= saturated_fraction`` of its outputs saturated;
    * an attention's mean top probability is ``>= attention_max_prob`` (saturated softmax at
      initialisation: scores multiplied by sqrt(d) instead of divided, a missing scale).

    Details hold the per-layer table.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> activations_healthy(model=m, batch=(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))).passed
    True
    """
    import torch
    from torch.utils.weak import WeakTensorKeyDictionary

    from ..core.batch import copy_model
    from ..core.forward import run_forward
    from ..core.losses import resolve_loss

    names: dict = {}  # module -> path, of the copy now running
    stats: dict = {}  # path -> dict, in first-call order
    growths: list = []  # (growth, earlier path, earlier std, path, std) along traced data paths
    attention: dict = {}  # module path -> top-probability sums of its attention
    tags = WeakTensorKeyDictionary()
    state = {"quiet": False}

    def hook(mod: Any, args: Any, out: Any) -> None:
        state["quiet"] = True
        try:
            record(mod, out)
        finally:
            state["quiet"] = False

    def record(mod: Any, out: Any) -> None:
        path = names[mod]
        outs = [t for t in _flat_tensors(out) if t.is_floating_point()]
        if not outs or outs[0].numel() == 0:
            return
        t = outs[0].detach().float()
        std = float(t.std(unbiased=False)) if t.numel() > 1 else 0.0
        prior = tags.get(outs[0])
        if not math.isfinite(std):
            growths.append((math.inf, prior[1] if prior else path, prior[0] if prior else std,
                            path, std))
        elif prior is not None and std > 0:
            growths.append((std / prior[0], prior[1], prior[0], path, std))
        tag = prior if prior is not None and (std <= 0 or not math.isfinite(std) or prior[0] <= std) \
            else ((std, path) if std > 0 and math.isfinite(std) else None)
        if tag is not None:
            for o in outs:
                tags[o] = tag
        if path in stats:
            return  # a module called twice: its first call is the one in the table
        row = {"type": type(mod).__name__, "shape": list(t.shape), "numel": t.numel(),
               "mean": float(t.mean()), "std": std}
        kind = type(mod).__name__
        if kind in RELU_LIKE and t.dim() >= 1:
            per_sample = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
            row["zeros"] = float((t == 0).float().mean())
            row["dead"] = float((per_sample == 0).all(dim=0).float().mean())
        if kind == "Tanh":
            row["saturated"] = float((t.abs() > 0.99).float().mean())
        elif kind == "Sigmoid":
            row["saturated"] = float(((t < 0.01) | (t > 0.99)).float().mean())
        stats[path] = row

    def forward_and_backward(traced: bool) -> Any:
        """One forward (traced or not) and backward on a fresh copy; returns the copy."""
        work = copy_model(model).to(device).train()
        work.zero_grad(set_to_none=True)
        names.clear()
        names.update({m: (n or ROOT) for n, m in work.named_modules()})
        leaves = [m for m in names if not any(True for _ in m.children())]
        data = batch.clone().to(device)
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            if traced:
                with _ModuleStack(work) as mods, _path_tracer(mods, tags, attention, state):
                    out = data.call(work)
            else:
                out = run_forward(work, data)
            total, _ = resolve_loss(loss, data, out).compute(out, data, work)
            if isinstance(total, torch.Tensor) and total.requires_grad:
                total.backward()
        finally:
            for h in handles:
                h.remove()
        return work

    traced = True
    rng = torch.random.get_rng_state()
    try:
        work = forward_and_backward(True)
    except UsageError:
        raise
    except Exception:  # noqa: BLE001 - replayed on a fresh copy without the mode: a model error is named there
        traced = False
        stats.clear()
        growths.clear()
        attention.clear()
        torch.random.set_rng_state(rng)
        work = forward_and_backward(False)
    zero_params = _zero_parameters(work)

    grads: dict = {}
    for m, path in names.items():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if own and path in stats:
            norms = [float(p.grad.detach().float().norm()) for p in own if p.grad is not None]
            if norms:
                grads[path] = math.sqrt(sum(n * n for n in norms))
    order = [p for p in stats]
    for p, g in grads.items():
        stats[p]["grad_norm"] = g

    problems: list = []
    notes: list = []
    if traced:
        worst = max(growths, key=lambda g: g[0], default=(0.0, "", 0.0, "", 0.0))
        growth, low, low_std, top, top_std = worst
        where = "earlier on its data path"
    else:
        growth, low, top = _std_growth(order, stats)
        low_std = stats[low]["std"] if low in stats else 0.0
        top_std = stats[top]["std"] if top in stats else 0.0
        where = "of a layer that ran before it"
        notes.append("note: the forward could not run under a dispatch mode, so activation growth"
                     " is measured in call order, not along the data path, and attention is not"
                     " measured")
    if growth > max_growth:
        ratio_text = "not finite" if not math.isfinite(top_std) else f"{growth:.3g}x"
        problems.append(("exploding", top,
                         f"exploding activations at '{top}' ({stats[top]['type'] if top in stats else '?'}):"
                         f" std {top_std:.3g} is {ratio_text} the std {low_std:.3g} of '{low}'"
                         f" {where} (max_growth {max_growth:g})"))
    grad_layers = [p for p in order if p in grads]
    ratio = None
    if len(grad_layers) >= 2:
        first, last = grad_layers[0], grad_layers[-1]
        if grads[last] > 0:
            ratio = grads[first] / grads[last]
            if ratio == 0 and zero_params:
                notes.append(f"note: gradient ratio not judged: '{first}' gets exactly zero gradient"
                             f" at the first step because parameters are initialised to zero"
                             f" ({', '.join(zero_params[:3])}); params_learn follows them over steps")
            elif ratio < min_grad_ratio:
                problems.append(("vanishing", first,
                                 f"vanishing gradients at '{first}' ({stats[first]['type']}):"
                                 f" gradient norm {grads[first]:.3g} is {ratio:.3g}x that of the"
                                 f" last layer '{last}' ({grads[last]:.3g}; min_grad_ratio"
                                 f" {min_grad_ratio:g})"))
    vanishing = [pr for pr in problems if pr[0] == "vanishing"]
    problems = [pr for pr in problems if pr[0] != "vanishing"]
    for p in order:
        r = stats[p]
        if r.get("dead", 0.0) >= dead_fraction:
            problems.append(("dead", p, f"dead ReLU at '{p}' ({r['type']}): {r['dead']:.0%} of its"
                             f" units are zero for every sample (dead_fraction {dead_fraction:g})"))
        if r.get("saturated", 0.0) >= saturated_fraction:
            problems.append(("saturated", p, f"saturated {r['type']} at '{p}': {r['saturated']:.0%}"
                             f" of its outputs saturated (saturated_fraction {saturated_fraction:g})"))
    attn_rows = []
    types = {(n or ROOT): type(m).__name__ for n, m in work.named_modules()}
    for p, a in attention.items():
        mean_top = a["sum"] / a["rows"]
        attn_rows.append(f"  {p[:40]:40} {types.get(p, '?')[:22]:22} {a['op']:44}"
                         f" {mean_top:>6.3f}  {a['source'] or '(no user line)'}")
        if mean_top >= attention_max_prob:
            problems.append(("attention", p,
                             f"saturated attention in '{p}' ({types.get(p, '?')}): {a['op']} at"
                             f" {_at_line(a['source'])}"
                             f" puts a mean max probability of {mean_top:.3f} on one key per"
                             f" query at initialisation (attention_max_prob"
                             f" {attention_max_prob:g}): scores multiplied by sqrt(d) instead of"
                             f" divided, not scaled, or inputs to the query/key projections far"
                             f" from unit scale (no normalisation before attention)"))

    problems += vanishing  # dead or saturated units are the usual cause: named first
    table = [f"{'layer':32} {'type':14} {'mean':>10} {'std':>10} {'zeros':>6} {'dead':>6}"
             f" {'satur':>6} {'grad norm':>10}"]
    for p in order:
        r = stats[p]

        def pct(key: str) -> str:
            return f"{r[key]:.0%}" if key in r else "-"

        g = f"{r['grad_norm']:.3g}" if "grad_norm" in r else "-"
        table.append(f"{p[:32]:32} {r['type'][:14]:14} {r.get('mean', 0.0):>10.3g}"
                     f" {r.get('std', 0.0):>10.3g} {pct('zeros'):>6} {pct('dead'):>6}"
                     f" {pct('saturated'):>6} {g:>10}")
    if attn_rows:
        table += ["attention (mean max probability over query rows):"] + attn_rows
    table += notes
    attn_max = max((a["sum"] / a["rows"] for a in attention.values()), default=None)
    metrics = {"layers": len(order), "std_growth": growth, "grad_ratio_first_last": ratio,
               "growth_from": low, "growth_at": top, "data_path_traced": traced,
               "attention_max_prob": attn_max,
               "attention": {p: a["sum"] / a["rows"] for p, a in attention.items()},
               "problems": [f"{k}:{p}" for k, p, _ in problems]}
    expected = "expected healthy activations and gradients"
    if problems:
        observed = problems[0][2]
        if len(problems) > 1:
            observed += f", and {len(problems) - 1} more problem(s)"
        details = ["problems:"] + [f"  {text}" for _, _, text in problems] + table
        return CheckResult("activations_healthy", False, f"{expected}, observed {observed}",
                           "\n".join(details), metrics)
    ratio_text = f", first/last gradient ratio {ratio:.3g}" if ratio is not None else ""
    attn_text = (f", attention mean max probability <= {attn_max:.3g}" if attn_max is not None
                 else "")
    return CheckResult("activations_healthy", True,
                       f"{expected}, observed {len(order)} layers with std growth {growth:.3g}x"
                       f"{ratio_text}{attn_text}, no dead or saturated activations",
                       "\n".join(table), metrics)


# -------------------------------------------------------------------------------- output_range
_INDEX_RE = re.compile(r"^\[\s*(.*?)\s*\]$")


def _parse_index(text: str, given: str) -> tuple:
    """``"[:, 0]"`` -> ``(slice(None), 0)``; ints, slices ``a:b:c`` and ``...`` only."""
    m = _INDEX_RE.match(text.strip())
    if not m:
        raise UsageError(f"ranges key {given!r}: expected an index such as '[:, 0]'")
    parts = []
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
            or not all(v is None or _is_number(v) for v in value)):
        raise UsageError(f"ranges{key}={value!r}: expected a (lo, hi) pair of numbers (None for"
                         " no bound)")
    lo = -math.inf if value[0] is None else float(value[0])
    hi = math.inf if value[1] is None else float(value[1])
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise UsageError(f"ranges{key}={value!r}: expected lo <= hi")
    return lo, hi


def _validate_range(ranges: Any, scale: Any = 10.0, batch_sizes: Any = (1, 16)) -> dict:
    specs = []  # (label, output key or None, index tuple or None, lo, hi)
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
    if scale is not None and (not _is_number(scale) or not math.isfinite(scale)):
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


@check(default=False, validate=_validate_range)
def output_range(ranges: Any, scale: Any = 10.0, batch_sizes: Any = (1, 16), *, model: Any,
                 batch: Any, loss: Any = None, device: Any = None) -> CheckResult:
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
    import torch

    from ..core.batch import copy_model
    from ..core.forward import run_forward

    work = copy_model(model).to(device).eval()
    probes: list = [("the example batch", batch.clone().to(device), True)]
    notes: list = []
    for n in batch_sizes:
        try:
            probes.append((f"batch size {n}", batch.resized(n).to(device), False))
        except UsageError as exc:
            notes.append(f"batch size {n} not probed: {exc}")
            break
    if scale is not None:
        probes.append((f"inputs x{scale:g}", batch.clone().to(device).map(
            lambda t: t * scale if t.is_floating_point() else t), False))
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
                v = t.detach().double()
                bad = ~torch.isfinite(v) | (v < lo) | (v > hi)
                finite = v[torch.isfinite(v)]
                vmin = float(finite.min()) if finite.numel() else math.nan
                vmax = float(finite.max()) if finite.numel() else math.nan
                if bool(bad.any()):
                    flat = bad.reshape(v.shape[0], -1) if v.dim() >= 1 else bad.reshape(1, 1)
                    sample = int(flat.any(dim=1).nonzero()[0, 0]) if v.dim() >= 1 else 0
                    violations.append({"output": what, "probe": name, "lo": lo, "hi": hi,
                                       "min": vmin, "max": vmax, "sample": sample,
                                       "count": int(bad.sum()), "numel": v.numel(),
                                       "nonfinite": int((~torch.isfinite(v)).sum())})
    details = [f"probes: {', '.join(checked)}"] + notes
    metrics = {"probes": checked, "violations": len(violations)}
    spec_text = "; ".join(f"{label} in [{lo:g}, {hi:g}]" for label, _, _, lo, hi in ranges)
    if violations:
        details.append("out of range:")
        details += [f"  {v['output']:24} [{v['lo']:g}, {v['hi']:g}]  observed min {v['min']:.4g}"
                    f" max {v['max']:.4g}  {v['count']}/{v['numel']} values  ({v['probe']})"
                    for v in violations]
        details.append("remedy: bound the head (sigmoid/tanh scaled to the range, softplus for"
                       " positive values, atan2 for angles) or clamp where the range is physical")
        v = violations[0]
        nonfin = f", {v['nonfinite']} non-finite" if v["nonfinite"] else ""
        metrics.update({"output": v["output"], "min": v["min"], "max": v["max"],
                        "probe": v["probe"], "sample": v["sample"]})
        return CheckResult("output_range", False,
                           f"expected {v['output']} in [{v['lo']:g}, {v['hi']:g}], observed min"
                           f" {v['min']:.4g} max {v['max']:.4g}{nonfin} (sample {v['sample']} of"
                           f" {v['probe']})", "\n".join(details), metrics)
    return CheckResult("output_range", True,
                       f"expected {spec_text}, observed within range on {len(checked)} probes"
                       f" ({', '.join(checked)})", "\n".join(details), metrics)
