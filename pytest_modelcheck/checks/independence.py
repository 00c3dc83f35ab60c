"""batch_independent: the output of each sample depends on that sample's input only.

The output of sample i has a zero gradient with respect to the input of every other sample
(eval mode): wrong reshapes, batch statistics in eval, attention across the batch, means over
dim 0 all show up as a cross-sample gradient. Token inputs, which have no gradient, are changed
instead (``core/tokens.py``), and a failure names the first op that mixes samples
(``core/mixing.py``).

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

from typing import Any, Optional

from ..core.errors import UsageError
from ..core.result import CheckResult
from .naming import fmt, module_kind
from .registry import SkipCheck, check
from .subject import Subject


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


def _grad_inputs(data: Any, n: int) -> list:
    """The floating inputs of ``data`` with a batch dimension of ``n``, set to require grad."""
    found = [(p, t) for p, t in data.input_tensors()
             if t.is_floating_point() and t.dim() > 0 and t.shape[0] == n]
    for _, t in found:
        t.requires_grad_(True)
    return found


def _first_mixing_module(work: Any, data: Any, i: int, atol: float) -> str:
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
        inputs = _grad_inputs(data, n)
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


def _mixing_origin(subject: Subject, data: Any, n: int, mode: str, tokens: list) -> Any:
    """The first op (module, user source line) where samples mix, or None (see core/mixing)."""
    from ..core.errors import ModelError
    from ..core.mixing import locate_mixing

    # Token ids alone where there are some: changing a mask can change which ops run (a mask
    # of all ones is dropped by some libraries), and the comparison needs the same ops.
    ids = [t for t in tokens if t.kind == "ids"] or tokens
    work = subject.model_copy(mode)
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
        details.append(f"first module whose output mixes samples: {module_kind(model, module)}")
        return f"; first mixing in module '{module}' ({module_kind(model, module).split(' ')[0]})"
    return ""


_REMEDY_MIXING = ("remedy: look for a view/reshape that moves the batch dimension, a reduction"
                  " over dim 0, BatchNorm without running statistics in eval"
                  " (track_running_stats=False), or attention whose sequence axis is the batch")



def _floating_inputs(batch: Any) -> list:
    """The floating inputs with a batch dimension; SkipCheck for a batch without one, or a
    packed or ragged batch (a floating input whose first dimension is not the batch size)."""
    b = batch.batch_size
    if b is None:
        raise SkipCheck("the batch holds no tensor with a batch dimension")
    floating = [(p, t) for p, t in batch.input_tensors() if t.is_floating_point() and t.dim() > 0]
    packed = [(p, t) for p, t in floating if t.shape[0] != b]
    if packed:
        p, t = packed[0]
        raise SkipCheck(f"packed or ragged batch: {p} has first dimension {t.shape[0]} for"
                        f" {b} samples, so samples cannot be told apart by the first dimension")
    return floating


def _gradient_mixing(work: Any, data: Any, n: int, atol: float) -> tuple:
    """``(number of batched outputs, (sample i, other sample j, input path, max |grad|) or
    None)``: the first of samples 0 and n-1 whose output has a cross-sample gradient."""
    from ..core.forward import run_forward

    grad_data = data.clone()
    inputs = _grad_inputs(grad_data, n)
    outputs = _batched_outputs(run_forward(work, grad_data), n)
    for i in (0, n - 1) if outputs else ():
        found = _cross_gradients(outputs, inputs, i, atol)
        if found is not None:
            return len(outputs), (i, *found)
    return len(outputs), None


def _mixed(subject: Subject, headline: str, details: list, origin: Any, module: str,
           work: Any, metrics: dict) -> CheckResult:
    """The failure: ``headline`` with where samples first mix, and the remedy."""
    place = _mixing_place(origin, module, work, metrics, details)
    details.append(_REMEDY_MIXING)
    return subject.failed(f"{headline}{place}", details, metrics)


def _gradient_failure(subject: Subject, found: tuple, data: Any, n: int, mode: str,
                      atol: float, tokens: list, work: Any, metrics: dict) -> CheckResult:
    i, j, path, value = found
    metrics.update({"sample": i, "other_sample": j, "input": path, "max_cross_grad": value})
    details = [f"batch of {n} samples ({data.describe()}), {mode} mode",
               f"d(output of sample {i}) / d({path} of sample {j}): max |grad| {fmt(value)}"]
    origin = _mixing_origin(subject, data.clone(), n, mode, tokens)
    where = "" if origin is not None else _first_mixing_module(
        subject.model_copy(mode), data.clone(), i, atol)
    return _mixed(subject, f"expected output of sample {i} to depend only on input sample {i},"
                  f" observed a gradient from sample {j} ({path}, max |grad| {fmt(value)})",
                  details, origin, where, work, metrics)


def _token_failure(subject: Subject, found: tuple, data: Any, n: int, mode: str, tokens: list,
                   work: Any, metrics: dict) -> CheckResult:
    i, j, cross, own = found
    paths = ", ".join(t.path for t in tokens)
    metrics.update({"sample": i, "other_sample": j, "input": paths,
                    "max_cross_change": cross, "own_change": own})
    details = [f"batch of {n} samples ({data.describe()}), {mode} mode",
               "token inputs: " + "; ".join(t.describe() for t in tokens),
               f"changing the token inputs of the other samples moved sample {i}'s"
               f" output by up to {fmt(cross)} (its own new tokens: {fmt(own)});"
               f" sample {j} alone moves it most"]
    origin = _mixing_origin(subject, data.clone(), n, mode, tokens)
    return _mixed(subject, f"expected output of sample {i} to depend only on input sample {i},"
                  f" observed a change of {fmt(cross)} when the tokens of sample {j}"
                  f" and the others changed ({paths})", details, origin, "", work, metrics)


@check(default=True, validate=_validate_independent)
def batch_independent(atol: Any = 1e-6, mode: Any = "eval", *, subject: Subject) -> CheckResult:
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
    from ..core.tokens import token_inputs

    floating = _floating_inputs(subject.batch)
    b = subject.batch.batch_size
    n = max(3, b)
    data = (subject.batch.resized(n) if n != b else subject.batch.clone()).to(subject.device)
    work = subject.model_copy(mode)
    tokens = token_inputs(work, data, n)
    if not floating and not tokens:
        raise SkipCheck("no floating input tensor with a batch dimension to differentiate and no"
                        " token ids or attention mask to change (other integer inputs only)")
    metrics: dict = {"samples": n, "mode": mode, "inputs": len(floating),
                     "token_inputs": [t.path for t in tokens]}
    if floating:
        metrics["outputs"], found = _gradient_mixing(work, data, n, atol)
        if found is not None:
            return _gradient_failure(subject, found, data, n, mode, atol, tokens, work, metrics)
    if tokens:
        values, found = _token_cross_change(work, data, tokens, n, atol)
        metrics["outputs"] = max(metrics.get("outputs", 0), len(values))
        if found is not None:
            return _token_failure(subject, found, data, n, mode, tokens, work, metrics)
    if not metrics.get("outputs"):
        raise SkipCheck(f"no differentiable output tensor with a leading batch dimension of {n}")
    how = ("no cross-sample gradient" if not tokens else
           "no change from other samples' tokens" if not floating else
           "no cross-sample gradient and no change from other samples' tokens")
    return subject.passed(f"expected each sample's output to depend only on its own input,"
                          f" observed {how} (samples 0 and {n - 1} of {n}, {mode} mode)",
                          metrics=metrics)
