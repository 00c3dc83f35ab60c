"""Behaviour checks: samples stay independent, parameters learn, eval is deterministic and
stateless, and a saved state_dict reproduces the model.

* ``batch_independent`` -- the output of sample i has a zero gradient with respect to the input
  of every other sample (eval mode): wrong reshapes, batch statistics in eval, attention across
  the batch, means over dim 0 all show up as a cross-sample gradient.
* ``params_learn`` -- one optimizer step moves every trainable parameter (all of its elements)
  and leaves frozen parameters and the buffers of frozen modules alone.
* ``eval_deterministic`` -- two eval forwards on identical inputs under different RNG seeds agree
  bitwise (dropout or noise left on in eval).
* ``stateless_forward`` -- an eval forward changes no parameter, buffer, plain attribute or input.
* ``state_roundtrip`` -- ``state_dict`` through ``torch.save``/``torch.load(weights_only=True)``
  into a fresh instance reproduces the outputs; tensors kept as plain attributes are named.
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Optional

from ..core.errors import UsageError
from ..core.result import CheckResult
from .registry import MAX_STEPS, SkipCheck, check


def _globs(name: str, value: Any, example: str) -> tuple:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(p, str) for p in value):
        raise UsageError(f"{name}={value!r}: expected a list of names or glob patterns such as"
                         f" {example}")
    return tuple(value)


def _matches(name: str, patterns: tuple) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _kind(model: Any, path: str) -> str:
    try:
        mod = model.get_submodule(path) if path else model
    except AttributeError:
        return path
    return f"{type(mod).__name__} '{path or '<root>'}'"


def _owner(model: Any, name: str) -> str:
    return _kind(model, name.rsplit(".", 1)[0] if "." in name else "")


def _identical(a: Any, b: Any) -> bool:
    """``tensors_identical`` that also takes 0-d tensors (compared as one-element tensors)."""
    from ..core.state import tensors_identical

    if a is None or b is None or a.shape != b.shape:
        return tensors_identical(a, b)
    return tensors_identical(a.reshape(-1), b.reshape(-1))


def _more(items: list) -> str:
    return f" and {len(items) - 1} more" if len(items) > 1 else ""


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# --------------------------------------------------------------------------------------------
# batch_independent
# --------------------------------------------------------------------------------------------
def _validate_independent(atol: Any = 1e-6, mode: Any = "eval") -> dict:
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise UsageError(f"atol={atol!r}: expected a number >= 0, the largest cross-sample"
                         " gradient tolerated relative to the sample's own gradient")
    if mode not in ("eval", "train"):
        raise UsageError(f"mode={mode!r}: expected 'eval' or 'train'")
    return {"atol": float(atol), "mode": mode}


def _batched_outputs(out: Any, n: int) -> list:
    from ..core.batch import iter_tensors

    return [(p, t) for p, t in iter_tensors(out, "output")
            if t.dim() > 0 and t.shape[0] == n and (t.is_floating_point() or t.is_complex())
            and t.requires_grad]


def _weighted_sample_sum(outputs: list, i: int) -> Any:
    """Sum of sample i's outputs with fixed random weights (no cancellation such as softmax's)."""
    import torch

    total = None
    for k, (_, t) in enumerate(outputs):
        row = t[i]
        if row.is_complex():
            row = torch.view_as_real(row)
        g = torch.Generator().manual_seed(1000 + k)
        w = (torch.rand(row.shape, generator=g) + 0.5).to(device=row.device, dtype=row.dtype)
        term = (row * w).sum()
        total = term if total is None else total + term
    return total


def _cross_gradients(outputs: list, inputs: list, i: int, atol: float) -> Optional[tuple]:
    """(sample j, input path, max |grad|) of the largest cross-sample gradient above tolerance."""
    import torch

    s = _weighted_sample_sum(outputs, i)
    grads = torch.autograd.grad(s, [t for _, t in inputs], retain_graph=True, allow_unused=True)
    own = 0.0
    worst = None
    for (path, _), g in zip(inputs, grads):
        if g is None:
            continue
        g = g.detach().abs().flatten(1)
        per_sample = g.max(dim=1).values if g.shape[1] else torch.zeros(g.shape[0])
        own = max(own, float(per_sample[i]))
        per_sample[i] = 0
        j = int(per_sample.argmax())
        value = float(per_sample[j])
        if worst is None or value > worst[2]:
            worst = (j, path, value)
    if worst is None or worst[2] == 0.0 or worst[2] <= atol * own:
        return None
    return worst


def _first_mixing_module(work: Any, data: Any, inputs_of: Any, i: int, atol: float) -> str:
    """Name the first module (in order of completion) whose output already mixes samples."""
    from ..core.forward import run_forward

    n = data.batch_size
    records: list = []
    handles = []
    for name, mod in work.named_modules():
        if name:
            def hook(m: Any, args: Any, out: Any, name: str = name) -> None:
                records.append((name, out))
            handles.append(mod.register_forward_hook(hook))
    try:
        inputs = inputs_of(data)
        run_forward(work, data)
    finally:
        for h in handles:
            h.remove()
    for name, out in records[:200]:
        outs = _batched_outputs(out, n)
        if not outs:
            continue
        try:
            if _cross_gradients(outs, inputs, i, atol) is not None:
                return name
        except RuntimeError:
            continue
    return ""


def _batched_values(out: Any, n: int) -> list:
    """Floating output tensors with a leading batch dimension of ``n`` (no grad needed)."""
    from ..core.batch import iter_tensors

    return [(p, t.detach()) for p, t in iter_tensors(out, "output")
            if t.dim() > 0 and t.shape[0] == n and (t.is_floating_point() or t.is_complex())]


def _perturb_samples(data: Any, rows: list, tokens: list, seed: int, floats: bool = True) -> Any:
    """``data`` with the inputs of the samples in ``rows`` changed: floating inputs with a batch
    dimension get noise of their own spread, token ids other ids of the vocabulary, attention
    masks another number of attended tokens (at least one); targets are left alone."""
    import torch

    from ..core.tokens import is_target_path, perturb_rows
    from .stability import _replace

    gen = torch.Generator().manual_seed(seed)
    n = data.batch_size
    new = {}
    if floats:
        for i, (path, t) in enumerate(data.input_tensors()):
            if t.is_floating_point() and t.dim() > 0 and t.shape[0] == n \
                    and not is_target_path(path):
                spread = float(t.detach().double().std()) if t.numel() > 1 else 0.0
                spread = spread if spread > 0 and spread == spread else 1.0
                noise = torch.randn((len(rows),) + tuple(t.shape[1:]), generator=gen,
                                    dtype=torch.float64) * spread
                x = t.detach().clone()
                idx = torch.tensor(rows, dtype=torch.long, device=t.device)
                x[idx] = (x[idx].double() + noise.to(t.device)).to(t.dtype)
                new[i] = x
    tensors = data.input_tensors()
    for spec in tokens:
        new[spec.index] = perturb_rows(spec, tensors[spec.index][1], rows, gen)
    return _replace(data, new)


def _run_seeded(work: Any, data: Any) -> Any:
    import torch

    from ..core.forward import run_forward

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return run_forward(work, data)


def _row_change(a: list, b: list, i: int) -> float:
    """Largest change of sample i's outputs between two runs (NaN-aware: NaN vs NaN is none)."""
    import torch

    worst = 0.0
    for (_, x), (_, y) in zip(a, b):
        x, y = x[i], y[i]
        if x.is_complex():
            x, y = torch.view_as_real(x), torch.view_as_real(y)
        d = (x.double() - y.double()).abs()
        d = torch.where(torch.isnan(x) & torch.isnan(y), torch.zeros_like(d), d)
        d = torch.nan_to_num(d, nan=float("inf"))
        if d.numel():
            worst = max(worst, float(d.max()))
    return worst


def _token_cross_change(work: Any, data: Any, tokens: list, n: int, atol: float) -> tuple:
    """Perturbation test for token inputs: ``(outputs, found)`` where ``found`` is ``(sample i,
    other sample j, change of i's output when the others' tokens change, change when its own
    do)`` for the first sample whose output moves with the others' tokens, or None."""
    base = _batched_values(_run_seeded(work, data), n)
    if not base:
        return base, None
    for i in (0, n - 1):
        others = [j for j in range(n) if j != i]
        cross = _row_change(base, _batched_values(
            _run_seeded(work, _perturb_samples(data, others, tokens, 17 + i, floats=False)), n), i)
        if cross == 0.0:
            continue
        own = _row_change(base, _batched_values(
            _run_seeded(work, _perturb_samples(data, [i], tokens, 31 + i, floats=False)), n), i)
        if cross <= atol * own:
            continue
        j, worst = others[0], -1.0
        for other in others:  # the single other sample that moves sample i the most
            change = _row_change(base, _batched_values(_run_seeded(
                work, _perturb_samples(data, [other], tokens, 47 + other, floats=False)), n), i)
            if change > worst:
                j, worst = other, change
        return base, (i, j, cross, own)
    return base, None


def _mixing_origin(model: Any, data: Any, n: int, mode: str, device: Any, tokens: list) -> Any:
    """The first op (module, user source line) where samples mix, or None (see core/mixing)."""
    from ..core.batch import copy_model
    from ..core.errors import ModelError
    from ..core.mixing import locate_mixing

    # Token ids alone where there are some: changing a mask can change which ops run (a mask
    # of all ones is dropped by some libraries), and the comparison needs the same ops.
    ids = [t for t in tokens if t.kind == "ids"] or tokens
    work = copy_model(model).to(device)
    work.train(mode == "train")
    try:
        return locate_mixing(work, data, lambda d, k: _perturb_samples(d, [k], ids, 101 + k), n)
    except (ModelError, RuntimeError):
        return None


def _mixing_place(origin: Any, module: str, model: Any, metrics: dict, details: list) -> str:
    """The headline's "; first mixing in module ..." part, with the op and source line."""
    if origin is not None:
        metrics.update({"module": origin.module, "op": origin.op, "source": origin.source})
        at = f" at {origin.source}" if origin.source else ""
        details.append(f"first op whose output mixes samples: {origin.op} in module"
                       f" '{origin.module}' ({origin.module_type}){at}: {origin.reason}")
        return (f"; first mixing in module '{origin.module}' ({origin.module_type}) by"
                f" {origin.op}{at}")
    if module:
        metrics["module"] = module
        details.append(f"first module whose output mixes samples: {_kind(model, module)}")
        return f"; first mixing in module '{module}' ({_kind(model, module).split(' ')[0]})"
    return ""


_REMEDY_MIXING = ("remedy: look for a view/reshape that moves the batch dimension, a reduction"
                  " over dim 0, BatchNorm without running statistics in eval"
                  " (track_running_stats=False), or attention whose sequence axis is the batch")


@check(default=True, validate=_validate_independent)
def batch_independent(atol: Any = 1e-6, mode: Any = "eval", *, model: Any, batch: Any,
                      loss: Any = None, device: Any = None) -> CheckResult:
    """The output of each sample depends on that sample's input only (no mixing across the batch).

    In ``mode`` ('eval' by default; 'train' for models without batch statistics) on a copy, the
    floating inputs whose first dimension is the batch size require grad; the outputs of sample 0
    and of the last sample are summed (with fixed random weights) and differentiated. A gradient
    reaching another sample's input, larger than ``atol`` times the sample's own largest
    gradient, fails: a reshape that mixes samples, BatchNorm using batch statistics in eval,
    attention or a mean across dim 0. Token inputs (integer ids looked up in an embedding, 0/1
    attention masks; see ``core/tokens.py``) have no gradient: the other samples' ids are
    changed to other ids of the vocabulary and their masks to other legal masks, and a change of
    the sample's output larger than ``atol`` times the change its own new tokens cause fails.
    A failure names the first op whose output mixes samples, its module (``<root>`` for the
    model's own forward code) and the user's source line. Batches of fewer than 3 samples are
    tiled to 3. Packed or ragged batches (a floating input whose first dimension is not the
    batch size) are skipped.

    >>> import torch
    >>> batch_independent(model=torch.nn.Linear(4, 2), batch=torch.randn(3, 4)).passed
    True
    >>> class MeanOverBatch(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x - x.mean(0)
    >>> batch_independent(model=MeanOverBatch(), batch=torch.randn(3, 4)).passed
    False
    >>> lm = torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Linear(4, 20))
    >>> batch_independent(model=lm, batch=torch.randint(0, 20, (3, 5))).passed
    True
    """
    b = batch.batch_size
    if b is None:
        raise SkipCheck("the batch holds no tensor with a batch dimension")
    floating = [(p, t) for p, t in batch.input_tensors() if t.is_floating_point() and t.dim() > 0]
    packed = [(p, t) for p, t in floating if t.shape[0] != b]
    if packed:
        p, t = packed[0]
        raise SkipCheck(f"packed or ragged batch: {p} has first dimension {t.shape[0]} for"
                        f" {b} samples, so samples cannot be told apart by the first dimension")
    from ..core.batch import copy_model
    from ..core.forward import run_forward
    from ..core.tokens import token_inputs

    n = max(3, b)
    data = (batch.resized(n) if n != b else batch.clone()).to(device)
    work = copy_model(model).to(device)
    work.train(mode == "train")
    tokens = token_inputs(work, data, n)
    if not floating and not tokens:
        raise SkipCheck("no floating input tensor with a batch dimension to differentiate and no"
                        " token ids or attention mask to change (other integer inputs only)")

    def inputs_of(d: Any) -> list:
        found = [(p, t) for p, t in d.input_tensors()
                 if t.is_floating_point() and t.dim() > 0 and t.shape[0] == n]
        for _, t in found:
            t.requires_grad_(True)
        return found

    metrics: dict = {"samples": n, "mode": mode, "inputs": len(floating),
                     "token_inputs": [t.path for t in tokens]}
    outputs: list = []
    if floating:
        grad_data = data.clone()
        inputs = inputs_of(grad_data)
        out = run_forward(work, grad_data)
        outputs = _batched_outputs(out, n)
        metrics["outputs"] = len(outputs)
        for i in (0, n - 1) if outputs else ():
            found = _cross_gradients(outputs, inputs, i, atol)
            if found is None:
                continue
            j, path, value = found
            metrics.update({"sample": i, "other_sample": j, "input": path,
                            "max_cross_grad": value})
            details = [f"batch of {n} samples ({data.describe()}), {mode} mode",
                       f"d(output of sample {i}) / d({path} of sample {j}): max |grad| {_fmt(value)}"]
            origin = _mixing_origin(model, data.clone(), n, mode, device, tokens)
            where = "" if origin is not None else _first_mixing_module(
                copy_model(model).to(device).train(mode == "train"), data.clone(), inputs_of,
                i, atol)
            place = _mixing_place(origin, where, work, metrics, details)
            details.append(_REMEDY_MIXING)
            return CheckResult("batch_independent", False,
                               f"expected output of sample {i} to depend only on input sample {i},"
                               f" observed a gradient from sample {j} ({path}, max |grad|"
                               f" {_fmt(value)}){place}", "\n".join(details), metrics)
        del out
    if tokens:
        values, found = _token_cross_change(work, data, tokens, n, atol)
        metrics["outputs"] = max(metrics.get("outputs", 0), len(values))
        if found is not None:
            i, j, cross, own = found
            paths = ", ".join(t.path for t in tokens)
            metrics.update({"sample": i, "other_sample": j, "input": paths,
                            "max_cross_change": cross, "own_change": own})
            details = [f"batch of {n} samples ({data.describe()}), {mode} mode",
                       "token inputs: " + "; ".join(t.describe() for t in tokens),
                       f"changing the token inputs of the other samples moved sample {i}'s"
                       f" output by up to {_fmt(cross)} (its own new tokens: {_fmt(own)});"
                       f" sample {j} alone moves it most"]
            origin = _mixing_origin(model, data.clone(), n, mode, device, tokens)
            place = _mixing_place(origin, "", work, metrics, details)
            details.append(_REMEDY_MIXING)
            return CheckResult("batch_independent", False,
                               f"expected output of sample {i} to depend only on input sample {i},"
                               f" observed a change of {_fmt(cross)} when the tokens of sample {j}"
                               f" and the others changed ({paths}){place}",
                               "\n".join(details), metrics)
    if not outputs and not metrics.get("outputs"):
        raise SkipCheck(f"no differentiable output tensor with a leading batch dimension of {n}")
    how = ("no cross-sample gradient" if not tokens else
           "no change from other samples' tokens" if not floating else
           "no cross-sample gradient and no change from other samples' tokens")
    return CheckResult("batch_independent", True,
                       f"expected each sample's output to depend only on its own input, observed"
                       f" {how} (samples 0 and {n - 1} of {n}, {mode} mode)",
                       metrics=metrics)


# --------------------------------------------------------------------------------------------
# params_learn
# --------------------------------------------------------------------------------------------
def _validate_learn(frozen: Any = (), steps: Any = 1, lr: Any = 1e-3, optimizer: Any = "adam",
                    min_fraction: Any = 0.1) -> dict:
    from ..core.training import validate_optimizer

    frozen = _globs("frozen", frozen, "['encoder.*', 'head.bias']")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"steps={steps!r}: expected an int >= 1 (at most {MAX_STEPS})")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise UsageError(f"lr={lr!r}: expected a learning rate > 0")
    if (isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float))
            or not 0 < min_fraction <= 1):
        raise UsageError(f"min_fraction={min_fraction!r}: expected a fraction in (0, 1], the share"
                         " of a parameter's elements that may stay unchanged before it is reported")
    return {"frozen": frozen, "steps": steps, "lr": float(lr),
            "optimizer": validate_optimizer(optimizer), "min_fraction": float(min_fraction)}


def _unchanged_mask(before: Any, after: Any) -> Any:
    import torch

    a, b = before.detach().reshape(-1), after.detach().reshape(-1)
    if a.is_floating_point() or a.is_complex():
        return (a.contiguous().view(torch.uint8).view(a.numel(), -1)
                == b.contiguous().view(torch.uint8).view(b.numel(), -1)).all(dim=1)
    return (a == b).flatten()


# extra steps given, on the copy, to parameters still unchanged: each zero-initialised part in
# series (a zero head, a zero-init residual BatchNorm, a LoRA B matrix, a diffusion zero-conv)
# holds everything upstream at exactly zero gradient for one step
_GATE_STEPS = 3
# aten ops that read rows of a tensor picked by the input (lookups): rows the batch never picks
# keep a zero gradient; they are unused at this input size, not broken
_LOOKUP_OPS = frozenset({"embedding", "embedding_bag", "_embedding_bag",
                         "_embedding_bag_forward_only", "index", "_unsafe_index", "index_select",
                         "gather", "take"})


def _torch_layer(mod: Any) -> bool:
    """Whether a module runs torch's own ``forward`` (``nn.Conv3d``, and subclasses that keep it
    such as torchvision's ``Conv3DSimple``): conv taps on padding and dead ReLU rows may stay."""
    import torch

    fwd = getattr(type(mod), "forward", None)
    return (fwd is not None and fwd is not torch.nn.Module.forward
            and str(getattr(fwd, "__module__", "")).startswith("torch."))


def _lookup_reads(work: Any, data: Any, names: set) -> dict:
    """``{parameter name: how one forward reads it}`` for the parameters in ``names`` that are read
    through a lookup (``aten.embedding``/``index``/``index_select``/``gather`` on the parameter) or
    sliced from 0 to the length of an input dimension (a positional table cut to the sequence);
    a slice to any other length (Fourier modes) or a matmul is not a lookup."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..core.batch import iter_tensors
    from ..core.forward import run_forward

    storages: dict = {}
    for n, p in work.named_parameters(remove_duplicate=False):
        if n in names and p.numel():
            storages.setdefault(p.untyped_storage().data_ptr(), []).append(n)
    lengths = {int(s) for _, t in iter_tensors((data.args, data.kwargs)) for s in t.shape[1:]
               if int(s) > 1}
    found: dict = {}

    def owner(t: Any) -> list:
        try:
            return storages.get(t.untyped_storage().data_ptr(), [])
        except (RuntimeError, NotImplementedError, AttributeError):
            return []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            op = func.overloadpacket.__name__
            src = args[0] if args else None
            if isinstance(src, torch.Tensor) and (op in _LOOKUP_OPS or op == "slice"):
                for n in owner(src):
                    if op in _LOOKUP_OPS:
                        found[n] = f"read by aten.{op}"
                        continue
                    a = {**dict(zip(("dim", "start", "end", "step"), args[1:])), **(kwargs or {})}
                    dim, start, step = a.get("dim", 0), a.get("start"), a.get("step", 1)
                    d = dim % max(src.dim(), 1)
                    if (start in (None, 0) and step == 1 and isinstance(out, torch.Tensor)
                            and out.shape[d] < src.shape[d] and int(out.shape[d]) in lengths):
                        found.setdefault(n, f"sliced to the input's length {int(out.shape[d])}")
            return out

    try:
        with torch.no_grad(), Reads():
            run_forward(work, data)
    except Exception:  # noqa: BLE001 - no lookup seen: the elements are judged as before
        return {}
    return found


@check(default=True, validate=_validate_learn)
def params_learn(frozen: Any = (), steps: Any = 1, lr: Any = 1e-3, optimizer: Any = "adam",
                 min_fraction: Any = 0.1, *, model: Any, batch: Any, loss: Any = None,
                 device: Any = None) -> CheckResult:
    """One optimizer step moves every trainable parameter and leaves frozen ones alone.

    On a copy in train mode, ``steps`` steps of ``optimizer`` at ``lr``. Every parameter that
    requires grad and is not listed in ``frozen`` (names or glob patterns) must change, and must
    have had a nonzero gradient. Zero-initialised parts (a ViT head, zero-init residual
    BatchNorms, ReZero, LoRA's B matrix) hold what is upstream of them at exactly zero gradient
    for a step: parameters still unchanged get up to 3 more steps on the copy, and only those
    that never move fail. In a parameter of a module whose ``forward`` is not torch's own (conv
    taps on padding and dead ReLU rows of ``torch.nn`` layers may legitimately stay still) less
    than ``min_fraction`` of the elements may stay bitwise unchanged (weights a slicing bug never
    reaches, such as Fourier modes); rows read through a lookup (embedding, index, gather: a
    relative-position table, a positional table longer than the sequence) are reported as
    unused at this input size instead. Parameters with ``requires_grad=False`` or listed in
    ``frozen`` must not change, nor the buffers (BatchNorm running statistics) whose names match
    ``frozen``.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> params_learn(model=m, batch=torch.randn(6, 4)).passed
    True
    >>> params_learn(frozen=["0.*"], model=m, batch=torch.randn(6, 4)).headline.split(",")[0]
    "expected frozen parameter '0.weight' (Linear '0') unchanged after 1 step"
    """
    import torch

    from ..core.batch import copy_model
    from ..core.forward import run_forward
    from ..core.losses import resolve_loss
    from ..core.training import make_optimizer

    work = copy_model(model).to(device)
    data = batch.clone().to(device)
    work.train()
    params = dict(work.named_parameters())
    buffers = dict(work.named_buffers())
    p_before = {n: p.detach().clone() for n, p in params.items()}
    b_before = {n: b.detach().clone() for n, b in buffers.items() if _matches(n, frozen)}
    # elements of torch.nn layers may legitimately stay still (conv taps that only see padding,
    # rows of ReLU units dead on this batch, embedding rows not in the batch, biases cancelled by
    # a following normalization): only parameters of modules with their own forward get the
    # element test (a subclass such as torchvision's Conv3DSimple keeps nn.Conv3d's forward)
    custom = {f"{name}.{pn}" if name else pn for name, mod in work.named_modules()
              if not _torch_layer(mod) for pn, _ in mod.named_parameters(recurse=False)}
    trained = [n for n, p in params.items() if p.requires_grad and not _matches(n, frozen)]
    order = {n: i for i, n in enumerate(params)}
    opt = make_optimizer(optimizer, work.parameters(), lr)
    lossfn = None
    grad_state: dict = {}
    first_grad: dict = {}
    torch.manual_seed(0)

    def step(k: int) -> None:
        nonlocal lossfn
        opt.zero_grad(set_to_none=True)
        out = run_forward(work, data)
        if lossfn is None:
            lossfn = resolve_loss(loss, data, out)
        total, _ = lossfn.compute(out, data, work)
        if total.requires_grad:
            total.backward()
        for n, p in params.items():
            if p.requires_grad:
                seen = "none" if p.grad is None else (
                    "zero" if not bool(p.grad.detach().ne(0).any()) else "nonzero")
                if grad_state.get(n) != "nonzero":
                    grad_state[n] = seen
                    if seen == "nonzero":
                        first_grad[n] = k
        opt.step()

    def judge() -> tuple:
        """(dead, partial): trainable tensors unchanged or never given a nonzero gradient, and
        parameters of user modules with >= min_fraction of their elements unchanged."""
        dead, partial = [], []
        for n in trained:
            unchanged = _unchanged_mask(p_before[n], params[n])
            still, size = int(unchanged.sum()), max(int(unchanged.numel()), 1)
            if still == unchanged.numel() or grad_state.get(n, "none") != "nonzero":
                dead.append((n, grad_state.get(n, "none")))
            elif n in custom and still / size >= min_fraction and n not in unused:
                partial.append((n, still, size))
        return sorted(dead, key=lambda d: order[d[0]]), sorted(partial, key=lambda d: order[d[0]])

    for k in range(steps):
        step(k + 1)
    changed_buffers = [n for n, b in b_before.items()
                       if not bool(_unchanged_mask(b, buffers[n]).all())]
    unused: dict = {}
    dead, partial = judge()
    if partial:
        # rows the batch never looks up are unused at this input size; slices and matmuls are not
        unused = _lookup_reads(work, data, {n for n, _, _ in partial})
        info = {n: (st, sz) for n, st, sz in partial if n in unused}
        dead, partial = judge()
    else:
        info = {}
    extra = 0
    first_dead = {n for n, _ in dead} | {n for n, _, _ in partial}
    while (dead or partial) and extra < _GATE_STEPS:
        extra += 1
        step(steps + extra)
        dead, partial = judge()
    left = {n for n, _ in dead} | {n for n, _, _ in partial}
    late = sorted(first_dead - left, key=order.__getitem__)

    moved_frozen = []
    for n, p in params.items():
        if (not p.requires_grad) or _matches(n, frozen):
            unchanged = _unchanged_mask(p_before[n], p)
            still, size = int(unchanged.sum()), max(int(unchanged.numel()), 1)
            if still < unchanged.numel():
                moved_frozen.append((n, p.requires_grad, unchanged.numel() - still, size))

    s = "step" if steps == 1 else "steps"
    ran = f"{steps} {s}" + (f" (and {extra} more for zero-initialised parts to open)"
                            if extra else "")
    span = f"within {steps + extra} steps" if extra else f"after {steps} {s}"
    trainable = len(trained)
    metrics = {"steps": steps, "optimizer": getattr(optimizer, "__name__", optimizer), "lr": lr,
               "trainable": trainable, "frozen": len(params) - trainable, "unchanged": len(dead),
               "partially_unchanged": len(partial), "frozen_moved": len(moved_frozen),
               "frozen_buffers_changed": len(changed_buffers), "gate_steps": extra,
               "reached_late": len(late), "unused_at_input_size": len(info),
               "loss_fn": lossfn.name if lossfn else None}
    details = []
    if dead:
        details.append(f"trainable parameters that did not change in {steps} {s} nor in {extra}"
                       " more given for zero-initialised parts to open:" if extra else
                       "trainable parameters that did not change:")
        why = {"none": "no gradient (not reached by the loss)",
               "zero": "gradient exactly zero (dead branch, detach, masked out)",
               "nonzero": "gradient too small to change it at this lr"}
        details += [f"  {n:40} {why.get(g, g)}  ({_owner(work, n)})" for n, g in dead[:20]]
    if partial:
        details.append(f"trainable parameters with >= {min_fraction:.0%} of elements unchanged"
                       f" after {ran} (not read through a lookup):")
        details += [f"  {n:40} {st}/{sz} elements ({st / sz:.0%}) unchanged  ({_owner(work, n)})"
                    for n, st, sz in partial[:20]]
    if moved_frozen:
        details.append("frozen parameters that changed:")
        details += [f"  {n:40} {c}/{sz} elements changed, requires_grad={rg}  ({_owner(work, n)})"
                    for n, rg, c, sz in moved_frozen[:20]]
    if changed_buffers:
        details.append("buffers of frozen modules that changed (train mode updates BatchNorm"
                       " running statistics: keep frozen modules in eval, e.g. override train()):")
        details += [f"  {n}  ({_owner(work, n)})" for n in changed_buffers[:20]]
    if late:
        # the gates: zero-initialised tensors that moved in the first step
        zero_init = [n for n in trained if first_grad.get(n) == 1 and p_before[n].numel()
                     and not bool(p_before[n].ne(0).any())]
        gates = (f" (zero-initialised: {', '.join(zero_init[:3])}{_more(zero_init[2:])})"
                 if zero_init else "")
        details.append(f"information: {len(late)} tensors stayed unchanged after {steps} {s}"
                       f" and moved once zero-initialised parts had a step to open{gates};"
                       " healthy:")
        details += [f"  {n:40} first nonzero gradient in step {first_grad.get(n, '?')}"
                    f"  ({_owner(work, n)})" for n in late[:10]]
        if len(late) > 10:
            details.append(f"  ... and {len(late) - 10} more")
    if info:
        details.append("information: rows never looked up by this batch, unused at this input"
                       " size (not a bug):")
        details += [f"  {n:40} {st}/{sz} elements ({st / sz:.0%}) unchanged, {unused[n]}"
                    f"  ({_owner(work, n)})" for n, (st, sz) in list(info.items())[:20]]

    if moved_frozen:
        n, rg, c, sz = moved_frozen[0]
        reason = (" (it requires grad: call requires_grad_(False) on it)" if rg else
                  " (requires_grad is False, yet the step changed it)")
        return CheckResult("params_learn", False,
                           f"expected frozen parameter '{n}' ({_owner(work, n)}) unchanged"
                           f" {span}, observed {c}/{sz} elements changed{reason}"
                           f"{_more(moved_frozen)}", "\n".join(details), metrics)
    if changed_buffers:
        n = changed_buffers[0]
        return CheckResult("params_learn", False,
                           f"expected buffers of frozen modules unchanged after {steps} {s},"
                           f" observed '{n}' ({_owner(work, n)}) changed{_more(changed_buffers)}",
                           "\n".join(details), metrics)
    if dead:
        n, g = dead[0]
        how = {"none": "no gradient", "zero": "zero gradient", "nonzero": "tiny gradient"}.get(g, g)
        return CheckResult("params_learn", False,
                           f"expected every trainable parameter to change {span},"
                           f" observed '{n}' ({_owner(work, n)}) unchanged ({how})"
                           f"{_more(dead)}", "\n".join(details), metrics)
    if partial:
        n, st, sz = partial[0]
        return CheckResult("params_learn", False,
                           f"expected every element of every trainable parameter to change"
                           f" {span}, observed {st / sz:.0%} of '{n}' ({_owner(work, n)})"
                           f" unchanged ({st}/{sz} elements){_more(partial)}",
                           "\n".join(details), metrics)
    return CheckResult("params_learn", True,
                       f"expected all {trainable} trainable tensors to change and frozen ones to"
                       f" stay, observed that after {ran}", "\n".join(details), metrics)


# --------------------------------------------------------------------------------------------
# eval_deterministic
# --------------------------------------------------------------------------------------------
def _max_diff(a: Any, b: Any) -> float:
    import torch

    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        return float("inf")
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    d = (a.double() - b.double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max()) if d.numel() else 0.0


def _traced_forward(work: Any, data: Any) -> tuple:
    """(output, [(module name, [tensors]) in order of completion]) of one no-grad forward."""
    import torch

    from ..core.batch import iter_tensors
    from ..core.forward import run_forward

    records: list = []
    handles = []
    for name, mod in work.named_modules():
        def hook(m: Any, args: Any, out: Any, name: str = name or "<root>") -> None:
            records.append((name, [t.detach().clone() for _, t in iter_tensors(out)]))
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = run_forward(work, data)
    finally:
        for h in handles:
            h.remove()
    return out, records


@check(default=True)
def eval_deterministic(*, model: Any, batch: Any, loss: Any = None,
                       device: Any = None) -> CheckResult:
    """Two eval forwards on identical inputs, under different RNG seeds, agree bitwise.

    Catches dropout or sampling left on in eval (``F.dropout(x, p)`` without
    ``training=self.training``, ``torch.randn_like`` noise). Names the first module (in order of
    completion) whose output differs between the runs.

    >>> import torch
    >>> eval_deterministic(model=torch.nn.Dropout(0.5), batch=torch.ones(2, 8)).passed
    True
    >>> class Noisy(torch.nn.Module):
    ...     def forward(self, x):
    ...         return torch.nn.functional.dropout(x, 0.5)
    >>> eval_deterministic(model=Noisy(), batch=torch.ones(2, 8)).passed
    False
    """
    import random

    import torch

    from ..core.batch import copy_model, iter_tensors

    work = copy_model(model).to(device).eval()
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            import numpy as np

            np.random.seed(seed)
        except ImportError:  # pragma: no cover - numpy is optional
            pass
        runs.append(_traced_forward(work, batch.clone().to(device)))
    (out1, rec1), (out2, rec2) = runs
    outs1, outs2 = list(iter_tensors(out1, "output")), list(iter_tensors(out2, "output"))
    metrics: dict = {"outputs": len(outs1)}
    differing = [(p, _max_diff(a, b)) for (p, a), (_, b) in zip(outs1, outs2)
                 if not _identical(a, b)]
    if not differing and len(outs1) == len(outs2):
        return CheckResult("eval_deterministic", True,
                           f"expected identical eval outputs under different seeds, observed"
                           f" {len(outs1)} output tensor(s) bitwise identical", metrics=metrics)
    module = ""
    for (name, ta), (_, tb) in zip(rec1, rec2):
        if len(ta) != len(tb) or any(not _identical(a, b) for a, b in zip(ta, tb)):
            module = name
            break
    path, diff = differing[0] if differing else ("output structure", float("inf"))
    metrics.update({"output": path, "max_abs_diff": diff, "module": module})
    details = [f"{p}: max |difference| {_fmt(d)}" for p, d in differing[:10]]
    place = ""
    if module:
        kind = "root" if module == "<root>" else _kind(work, module)
        details.append(f"first module whose output differs between the runs: {kind}")
        if module != "<root>":
            place = f"; first differing module '{module}' ({type(work.get_submodule(module)).__name__})"
    details.append("remedy: pass training=self.training to F.dropout, use nn.Dropout, and guard"
                   " sampling/noise with `if self.training:`")
    return CheckResult("eval_deterministic", False,
                       f"expected identical eval outputs under different seeds, observed {path}"
                       f" differs by up to {_fmt(diff)}{place}", "\n".join(details), metrics)


# --------------------------------------------------------------------------------------------
# stateless_forward
# --------------------------------------------------------------------------------------------
def _validate_stateless(ignore: Any = ()) -> dict:
    return {"ignore": _globs("ignore", ignore, "['calls', 'encoder.cache']")}


_MODULE_INTERNALS: Optional[frozenset] = None


def _internals() -> frozenset:
    global _MODULE_INTERNALS
    if _MODULE_INTERNALS is None:
        import torch

        _MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) | {"training"}
    return _MODULE_INTERNALS


def _summary(value: Any) -> tuple:
    """A comparable (kind, value, text) summary of an attribute value."""
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", value.detach().clone(), f"tensor {tuple(value.shape)}")
    if value is None or isinstance(value, (bool, int, float, str, bytes, complex)):
        return (type(value).__name__, value, repr(value) if len(repr(value)) < 40 else type(value).__name__)
    if isinstance(value, (list, tuple, dict, set, frozenset)) or (
            hasattr(value, "__len__") and hasattr(value, "__iter__")):
        try:
            n = len(value)
        except TypeError:
            return (type(value).__name__, id(value), type(value).__name__)
        return (type(value).__name__, n, f"{type(value).__name__} length {n}")
    return (type(value).__name__, id(value), type(value).__name__)


def _same(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "tensor":
        return _identical(a[1], b[1])
    if isinstance(a[1], float) and isinstance(b[1], float) and a[1] != a[1] and b[1] != b[1]:
        return True
    return a[1] == b[1]


def _snapshot(work: Any, ignore: tuple) -> dict:
    snap = {}
    from ..core.state import hook_managed_attributes

    internals = _internals()
    for mname, mod in work.named_modules():
        managed = hook_managed_attributes(mod)
        for attr, value in vars(mod).items():
            if attr in internals or attr in managed:
                continue
            path = f"{mname}.{attr}" if mname else attr
            if not _matches(path, ignore):
                snap[("attribute", mname, attr)] = _summary(value)
    for n, p in work.named_parameters():
        snap[("parameter", n, "")] = ("tensor", p.detach().clone(), "")
    for n, b in work.named_buffers():
        snap[("buffer", n, "")] = ("tensor", b.detach().clone(), "")
    return snap


def _describe_change(key: tuple, old: Optional[tuple], new: Optional[tuple]) -> str:
    kind, name, attr = key
    if kind == "attribute":
        where = f"attribute '{attr}' of module '{name}'" if name else f"attribute '{attr}' of the model"
        if old is None:
            return f"{where} added ({new[2]})"
        if new is None:
            return f"{where} deleted"
        if old[0] == new[0] == "tensor":
            return f"{where} changed (tensor values)"
        if old[0] == new[0] and old[2].startswith(old[0] + " length"):
            return f"{where} changed ({old[0]} length {old[1]} -> {new[1]})"
        return f"{where} changed ({old[2]} -> {new[2]})"
    return f"{kind} '{name}' changed"


@check(default=True, validate=_validate_stateless)
def stateless_forward(ignore: Any = (), *, model: Any, batch: Any, loss: Any = None,
                      device: Any = None) -> CheckResult:
    """An eval forward leaves parameters, buffers, plain attributes and the inputs unchanged.

    Two no-grad eval forwards on a copy; after each, every parameter and buffer is compared
    bitwise and every plain attribute of every submodule by value (tensors, numbers, strings) or
    length (containers). A change made by every call (a counter, a growing list, a cache that
    follows the input) fails; an attribute set once from ``None`` by the first call (a lazily
    built table) does not. ``ignore`` lists attribute paths (``'calls'``, ``'encoder.cache'``,
    globs) that may change. Inputs changed in place fail too.

    >>> import torch
    >>> stateless_forward(model=torch.nn.BatchNorm1d(3), batch=torch.randn(4, 3)).passed
    True
    >>> class Counting(torch.nn.Linear):
    ...     calls = 0
    ...     def forward(self, x):
    ...         self.calls += 1
    ...         return super().forward(x)
    >>> stateless_forward(model=Counting(3, 2), batch=torch.randn(4, 3)).headline
    "expected forward to leave the model unchanged, observed attribute 'calls' of the model added (1)"
    """
    import torch

    from ..core.batch import copy_model
    from ..core.forward import run_forward

    work = copy_model(model).to(device).eval()
    snaps = [_snapshot(work, ignore)]
    changed_inputs: list = []
    for _ in range(2):
        data = batch.clone().to(device)
        reference = batch.clone().to(device)
        with torch.no_grad():
            run_forward(work, data)
        changed_inputs = changed_inputs or data.differs_from(reference)
        snaps.append(_snapshot(work, ignore))
    s0, s1, s2 = snaps

    def diff(a: dict, b: dict) -> list:
        return [k for k in list(a) + [k for k in b if k not in a]
                if (k in a) != (k in b) or not _same(a[k], b[k])]

    every_call = set(diff(s1, s2))
    first_call = diff(s0, s1)
    problems = []
    lazy = []
    for k in first_call:
        is_lazy = (k[0] == "attribute" and k not in every_call
                   and (k not in s0 or s0[k][0] == "NoneType"))
        if is_lazy:
            lazy.append(k)
        else:
            problems.append((k, s0.get(k), s1.get(k)))
    problems += [(k, s1.get(k), s2.get(k)) for k in diff(s1, s2) if k not in set(first_call)]
    metrics = {"attributes": sum(1 for k in s0 if k[0] == "attribute"),
               "changed": len(problems), "lazily_set": len(lazy),
               "inputs_changed": len(changed_inputs)}
    details = [_describe_change(k, o, n) for k, o, n in problems[:20]]
    if lazy:
        details.append("set once by the first forward (lazy initialisation, tolerated): "
                       + ", ".join(".".join(x for x in k[1:] if x) for k in lazy[:10]))
    if problems:
        k, o, n = problems[0]
        details.append("remedy: keep per-call values local, register state as buffers updated"
                       " only in training, or list intended attributes in ignore=[...]")
        return CheckResult("stateless_forward", False,
                           f"expected forward to leave the model unchanged, observed"
                           f" {_describe_change(k, o, n)}{_more(problems)}", "\n".join(details),
                           metrics)
    if changed_inputs:
        return CheckResult("stateless_forward", False,
                           f"expected forward to leave its inputs unchanged, observed"
                           f" {changed_inputs[0]} modified in place{_more(changed_inputs)}",
                           "\n".join(details), metrics)
    return CheckResult("stateless_forward", True,
                       f"expected forward to leave the model unchanged, observed all"
                       f" {len(s0)} parameters, buffers and attributes unchanged after 2 calls",
                       "\n".join(details), metrics)


# --------------------------------------------------------------------------------------------
# state_roundtrip
# --------------------------------------------------------------------------------------------
def _validate_roundtrip(factory: Any = None) -> dict:
    if factory is not None and not callable(factory):
        raise UsageError(f"factory={factory!r}: expected None or a callable returning a fresh"
                         " instance of the model, such as build_model")
    return {"factory": factory}


def _scramble(t: Any, gen: Any) -> None:
    import torch

    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype if t.is_floating_point()
                                else torch.complex64).to(device=t.device, dtype=t.dtype) * 3 + 1)
        elif t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.add_(1)


def _plain_tensor_attributes(work: Any) -> list:
    import torch

    from ..core.state import hook_managed_attributes

    internals = _internals()
    found = []
    for mname, mod in work.named_modules():
        managed = hook_managed_attributes(mod)
        for attr, value in vars(mod).items():
            if attr not in internals and attr not in managed and isinstance(value, torch.Tensor) and (
                    value.is_floating_point() or value.is_complex()) and value.numel():
                found.append((mname, attr))
    return found


def _rebuild(mod: Any) -> Any:
    """(a fresh instance of ``mod``'s class (seeded) or None, whether its arguments were
    guessed). A class whose constructor needs arguments is built with integers from the
    module's own tensor shapes (a ``Scaler(6)`` of 6 features) and flags, accepted when the result's
    state has the same names and shapes; at most three required arguments, small modules only.
    Only constant buffers (fitted statistics start as zeros or ones) of such a rebuild are
    judged by the caller."""
    import inspect
    import itertools

    import torch

    try:
        params = list(inspect.signature(type(mod)).parameters.values())
    except (TypeError, ValueError):
        return None, False
    required = [p for p in params if p.default is p.empty and p.kind in (
        p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.default is p.empty and p.kind is p.KEYWORD_ONLY for p in params) or \
            len(required) > 3:
        return None, False
    want = {k: tuple(v.shape) for k, v in mod.state_dict(keep_vars=True).items()}
    want.update({f"buffer:{k}": tuple(v.shape) for k, v in mod.named_buffers()})
    if required and sum(v.numel() for v in mod.parameters()) > 10_000_000:
        return None, False
    dims = sorted({int(d) for t in [*mod.parameters(), *mod.buffers()] for d in t.shape})[:8]
    values = [*dims, False, True]  # sizes from the shapes, and flags
    candidates = [()] if not required else itertools.islice(
        itertools.product(values, repeat=len(required)), 300)
    for args in candidates:
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(0)
                rebuilt = type(mod)(*args)
        except Exception:  # noqa: BLE001 - a class that cannot be rebuilt so is not judged
            continue
        if not required:
            return rebuilt, False
        got = {k: tuple(v.shape) for k, v in rebuilt.state_dict(keep_vars=True).items()}
        got.update({f"buffer:{k}": tuple(v.shape) for k, v in rebuilt.named_buffers()})
        if got == want:
            return rebuilt, True
    return None, False


def _lost_nonpersistent_buffers(work: Any, fresh: Any, reference: Any, forward: Any) -> list:
    """Non-persistent buffers whose value differs from a freshly constructed module's and
    changes the outputs: ``[(module name, buffer, (output path, max diff)), ...]``.

    Modules are rebuilt (a fresh instance is what a reloaded checkpoint starts from) without
    arguments, or with arguments found by ``_rebuild``; buffers computed in ``__init__``
    (positional encodings, masks) come out identical and are not reported.
    """
    import copy

    import torch

    found = []
    for mname, mod in work.named_modules():
        names = [n for n in getattr(mod, "_non_persistent_buffers_set", ())
                 if isinstance(mod._buffers.get(n), torch.Tensor)]
        if not names:
            continue
        rebuilt, guessed = _rebuild(mod)
        if rebuilt is None:
            continue
        for n in names:
            new = getattr(rebuilt, n, None)
            old = mod._buffers[n]
            if not isinstance(new, torch.Tensor) or new.shape != old.shape or new.dtype != old.dtype:
                continue
            if guessed and new.numel() > 1 and not bool((new == new.flatten()[0]).all()):
                continue  # computed from arguments that were guessed: not judged
            if _identical(new.to(old.device), old):
                continue
            trial = copy.deepcopy(fresh)
            target = trial.get_submodule(mname) if mname else trial
            with torch.no_grad():
                target._buffers[n].copy_(new.to(old.device))
            d = _same_outputs(reference, forward(trial))
            if d is not None:
                found.append((mname, n, d))
    return found


def _same_outputs(a: Any, b: Any) -> Optional[tuple]:
    """None when identical, else (path, max |difference|) of the first differing output."""
    from ..core.batch import iter_tensors

    ta, tb = list(iter_tensors(a, "output")), list(iter_tensors(b, "output"))
    if len(ta) != len(tb):
        return ("output structure", float("inf"))
    for (p, x), (_, y) in zip(ta, tb):
        if not _identical(x, y):
            return (p, _max_diff(x, y))
    return None


@check(default=True, validate=_validate_roundtrip)
def state_roundtrip(factory: Any = None, *, model: Any, batch: Any, loss: Any = None,
                    device: Any = None) -> CheckResult:
    """A saved and reloaded state_dict reproduces the outputs in a fresh instance (eval mode).

    The copy's ``state_dict`` goes through ``torch.save`` and ``torch.load(weights_only=True)``
    into a fresh instance: ``factory()`` when given, otherwise a deep copy whose parameters and
    persistent buffers are overwritten with noise. The outputs must be bitwise identical.
    Without a factory, each floating tensor kept as a plain attribute (``self.scale =
    torch.tensor(2.0)``, not a registered buffer) is also replaced by noise in turn, as a fresh
    instance would re-create it; one that changes the outputs is named. A non-persistent buffer
    is compared with the one a freshly built module holds when its class takes no required
    arguments (otherwise it is covered only with a ``factory``); one changed after
    construction that changes the outputs is named.

    >>> import torch
    >>> state_roundtrip(model=torch.nn.Linear(4, 2), batch=torch.randn(3, 4)).passed
    True
    >>> class Scaled(torch.nn.Linear):
    ...     def __init__(self):
    ...         super().__init__(4, 2)
    ...         self.scale = torch.rand(())
    ...     def forward(self, x):
    ...         return super().forward(x) * self.scale
    >>> print(state_roundtrip(model=Scaled(), batch=torch.randn(3, 4)).headline.split(", ")[1])
    observed plain tensor attribute 'scale' of the model (not in state_dict) changes them
    """
    import copy
    import io

    import torch

    from ..core.batch import copy_model
    from ..core.forward import run_forward

    work = copy_model(model).to(device).eval()

    def forward(m: Any) -> Any:
        torch.manual_seed(0)
        with torch.no_grad():
            return run_forward(m, batch.clone().to(device))

    reference = forward(work)
    try:
        buf = io.BytesIO()
        torch.save(work.state_dict(), buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is the finding
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return CheckResult("state_roundtrip", False,
                           f"expected the state_dict to survive torch.save/torch.load("
                           f"weights_only=True), observed {type(exc).__name__}: {msg}",
                           metrics={"stage": "save_load"})
    metrics: dict = {"keys": len(saved), "factory": factory is not None}
    gen = torch.Generator().manual_seed(1234)
    if factory is not None:
        torch.manual_seed(4321)
        try:
            fresh = factory()
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"factory: calling it raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(fresh, torch.nn.Module):
            raise UsageError(f"factory: expected it to return a torch.nn.Module, got"
                             f" {type(fresh).__name__}")
        fresh = fresh.to(device).eval()
    else:
        fresh = copy.deepcopy(work)
        for t in fresh.state_dict(keep_vars=True).values():
            _scramble(t.data if isinstance(t, torch.nn.Parameter) else t, gen)
    try:
        fresh.load_state_dict(saved)
    except Exception as exc:  # noqa: BLE001 - missing/unexpected keys or shape mismatches
        first = str(exc).strip().splitlines()
        text = " ".join(line.strip() for line in first[:2])[:300]
        return CheckResult("state_roundtrip", False,
                           f"expected the saved state_dict to load into a fresh instance,"
                           f" observed {type(exc).__name__}: {text}", str(exc),
                           dict(metrics, stage="load_state_dict"))
    diff = _same_outputs(reference, forward(fresh))
    if diff is not None:
        path, value = diff
        metrics.update({"stage": "outputs", "output": path, "max_abs_diff": value})
        return CheckResult("state_roundtrip", False,
                           f"expected a reloaded state_dict to reproduce the outputs, observed"
                           f" {path} differs by up to {_fmt(value)}",
                           "the fresh instance holds state that state_dict does not save: a"
                           " non-persistent buffer, a plain tensor attribute, or a Python value"
                           " set at construction", metrics)
    culprits = []
    if factory is None:
        attrs = _plain_tensor_attributes(work)
        metrics["plain_tensor_attributes"] = len(attrs)
        for mname, attr in attrs[:32]:
            trial = copy.deepcopy(fresh)
            mod = trial.get_submodule(mname) if mname else trial
            value = getattr(mod, attr).detach().clone()
            _scramble(value, gen)
            setattr(mod, attr, value)
            d = _same_outputs(reference, forward(trial))
            if d is not None:
                culprits.append((mname, attr, d))
    if factory is None and not culprits:
        lost = _lost_nonpersistent_buffers(work, fresh, reference, forward)
        metrics["nonpersistent_buffers_lost"] = len(lost)
        if lost:
            mname, attr, (path, value) = lost[0]
            where = f"'{attr}' of module '{mname}'" if mname else f"'{attr}' of the model"
            metrics.update({"stage": "nonpersistent_buffer",
                            "attribute": f"{mname}.{attr}" if mname else attr,
                            "output": path, "max_abs_diff": value})
            details = [f"non-persistent buffer {m + '.' if m else ''}{a}: as a fresh instance builds"
                       f" it, {p} differs by up to {_fmt(v)}" for m, a, (p, v) in lost]
            details.append("remedy: register it with persistent=True (the default) so that"
                           " state_dict saves the value set after construction")
            return CheckResult("state_roundtrip", False,
                               f"expected a reloaded state_dict to reproduce the outputs, observed"
                               f" non-persistent buffer {where} (not in state_dict) was changed"
                               f" after construction; a fresh instance changes {path} by up to"
                               f" {_fmt(value)}{_more(lost)}", "\n".join(details), metrics)
    if culprits:
        mname, attr, (path, value) = culprits[0]
        where = f"'{attr}' of module '{mname}'" if mname else f"'{attr}' of the model"
        metrics.update({"stage": "plain_attribute", "attribute": f"{mname}.{attr}" if mname else attr,
                        "output": path, "max_abs_diff": value})
        details = [f"plain tensor attribute {m + '.' if m else ''}{a}: re-created, {p} differs by"
                   f" up to {_fmt(v)}" for m, a, (p, v) in culprits]
        details.append("remedy: self.register_buffer(name, tensor) so that state_dict saves it"
                       " (and .to(device) moves it)")
        return CheckResult("state_roundtrip", False,
                           f"expected a reloaded state_dict to reproduce the outputs, observed"
                           f" plain tensor attribute {where} (not in state_dict) changes them,"
                           f" {path} by up to {_fmt(value)}{_more(culprits)}",
                           "\n".join(details), metrics)
    return CheckResult("state_roundtrip", True,
                       f"expected a reloaded state_dict to reproduce the outputs, observed"
                       f" identical outputs ({len(saved)} saved tensors)", metrics=metrics)
