"""shapes_consistent: outputs follow a symbolic spec across batch sizes and declared input sizes."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import ModelError, UsageError
from ..core.result import CheckResult
from .registry import check
from .subject import Subject


def _validate(out: Any = None, batch_sizes: Any = (1, 2, 3), inputs: Any = None,
              sizes: Any = None) -> dict:
    from ..core.shapes import validate_spec

    if out is not None:
        out = validate_spec(out, "out")
    if isinstance(batch_sizes, int) and not isinstance(batch_sizes, bool) and batch_sizes >= 1:
        # a bare int is ambiguous (one batch size? sizes 1..n?) and, read as (n,), checks less
        # than the default (1, 2, 3) without saying so: ask for the tuple
        raise UsageError(f"batch_sizes={batch_sizes!r}: expected a tuple of positive ints such as"
                         f" (1, 2, 3); for the one batch size {batch_sizes} write ({batch_sizes},)")
    if (not isinstance(batch_sizes, (list, tuple)) or not batch_sizes
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes)):
        raise UsageError(f"batch_sizes={batch_sizes!r}: expected a tuple of positive ints such as (1, 2, 3)")
    if inputs is not None:
        inputs = validate_spec(inputs, "inputs")
    if sizes is not None:
        if inputs is None:
            raise UsageError(f"sizes={sizes!r}: needs inputs=... naming where each symbol sits,"
                             " e.g. inputs=('B', 1, 'H', 'W'), sizes={'H': [32, 48]}")
        if not isinstance(sizes, dict) or not all(
                isinstance(k, str) and isinstance(v, (list, tuple)) and v
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)
                for k, v in sizes.items()):
            raise UsageError(f"sizes={sizes!r}: expected a dict of symbol -> list of sizes such as"
                             " {'H': [32, 48], 'W': [32, 64]}")
        if "B" in sizes:
            raise UsageError("sizes: 'B' is the batch size; use batch_sizes=(...) instead")
        named = _symbols(inputs)
        unknown = sorted(set(sizes) - named)
        if unknown:
            raise UsageError(f"sizes={sizes!r}: {', '.join(map(repr, unknown))} does not appear in"
                             f" inputs={inputs!r}; expected symbols among {sorted(named - {'B'})}")
    return {"out": out, "batch_sizes": tuple(batch_sizes), "inputs": inputs,
            "sizes": {k: tuple(v) for k, v in (sizes or {}).items()}}


def _symbols(spec: Any) -> set:
    """Every symbol (str dim) in a spec nest."""
    from ..core.shapes import is_tensor_spec

    if is_tensor_spec(spec):
        return {d for d in spec if isinstance(d, str)}
    values = spec.values() if isinstance(spec, dict) else spec
    return set().union(*(_symbols(v) for v in values))


def _input_env(batch: Any, inputs: Any) -> tuple:
    """Bind the symbols of the inputs spec on the example batch (shape mismatch = usage error)."""
    from ..core.shapes import match_structure

    env: dict = {}
    spec = inputs
    args = batch.args
    if len(args) == 1 and not (isinstance(spec, tuple) and not _is_tensor_spec(spec)
                               and len(spec) == 1):
        obj = args[0]
    else:
        obj = args
    env["B"] = batch.batch_size
    errs = match_structure(obj, spec, env, "input")
    if errs:
        raise UsageError(f"inputs={inputs!r}: the example batch does not match it: {errs[0]}")
    return obj, env


def _is_tensor_spec(spec: Any) -> bool:
    from ..core.shapes import is_tensor_spec

    return is_tensor_spec(spec)


def _build_inputs(obj: Any, spec: Any, env: dict) -> Any:
    from ..core.shapes import is_tensor_spec, resize_to

    if is_tensor_spec(spec):
        target = []
        ell = spec.index(Ellipsis) if Ellipsis in spec else None
        if ell is None:
            dims = list(spec)
        else:
            extra = obj.dim() - (len(spec) - 1)
            dims = list(spec[:ell]) + [None] * extra + list(spec[ell + 1:])
        for size, d in zip(obj.shape, dims):
            target.append(env[d] if isinstance(d, str) and d in env else size)
        return resize_to(obj, tuple(target))
    if isinstance(spec, dict):
        return {k: (_build_inputs(v, spec[k], env) if k in spec else v) for k, v in obj.items()}
    return type(obj)(_build_inputs(o, s, env) for o, s in zip(obj, spec))


@dataclass
class _Inputs:
    """The example batch and, with an ``inputs`` spec, its object and symbols bound on it."""

    base: Any
    spec: Any = None
    obj: Any = None
    env: dict = field(default_factory=dict)

    def batch(self, combo: dict, bsz: int) -> tuple:
        """``(env, batch)`` of one case: batch size ``bsz`` and the declared sizes ``combo``."""
        from ..core.batch import Batch

        if self.spec is None:
            return {"B": bsz}, self.base.resized(bsz)
        env = dict(self.env, **combo, B=bsz)
        built = _build_inputs(self.obj, self.spec, env)
        args = (built,) if self.obj is not self.base.args else tuple(built)
        return env, Batch(args=args, kwargs=self.base.kwargs)


def _batch_dim_errors(output: Any, bsz: int, fixed_env: dict) -> list:
    """Without an ``out`` spec: each output tensor (but the model's own loss) leads with the batch
    size and keeps its other dims (recorded in ``fixed_env``) across batch sizes."""
    from ..core.batch import iter_tensors
    from ..core.outputs import model_loss

    errs = []
    own_loss = model_loss(output)  # the loss a model computed itself is a scalar
    for path, t in iter_tensors(output, "output"):
        if t is own_loss:
            continue
        if t.dim() == 0 or t.shape[0] != bsz:
            errs.append(f"{path} {tuple(t.shape)}: first dim is "
                        f"{t.shape[0] if t.dim() else 'absent'}, expected B={bsz}")
        else:
            key = f"{path}.shape[1:]"
            if key in fixed_env and fixed_env[key] != tuple(t.shape[1:]):
                errs.append(f"{path} {tuple(t.shape)}: trailing dims changed from "
                            f"{fixed_env[key]} with the batch size")
            fixed_env.setdefault(key, tuple(t.shape[1:]))
    return errs


def _run_combo(work: Any, inputs: _Inputs, combo: dict, batch_sizes: tuple, out: Any,
               runs: list, failures: list) -> None:
    """Run every batch size at the declared sizes ``combo``; append to ``runs`` (``{"case",
    "outputs"}``) and ``failures`` (``(label, message, batch)``)."""
    import torch

    from ..core.batch import iter_tensors
    from ..core.forward import run_forward
    from ..core.shapes import match_structure

    # symbols seen only in the outputs (or trailing output dims) must stay constant across
    # batch sizes; they may follow the declared input sizes, so they are re-bound per combo
    fixed_env: dict = {}
    for bsz in batch_sizes:
        env, run_batch = inputs.batch(combo, bsz)
        pristine = run_batch.clone()
        label = ", ".join(f"{k}={v}" for k, v in env.items() if k == "B" or k in combo)
        try:
            with torch.no_grad():
                output = run_forward(work, run_batch)
        except ModelError as exc:
            failures.append((label, str(exc), pristine))
            continue
        mutated = run_batch.differs_from(pristine)
        if mutated:
            failures.append((label, f"the model changed its input {mutated[0]} in place", pristine))
            continue
        env_out = dict(env, **{k: v for k, v in fixed_env.items() if k not in env})
        if out is not None:
            errs = match_structure(output, out, env_out)
            for k, v in env_out.items():
                if k not in env:
                    fixed_env.setdefault(k, v)
        else:
            errs = _batch_dim_errors(output, bsz, fixed_env)
        shapes = [f"{p} {tuple(t.shape)}" for p, t in iter_tensors(output, "output")]
        runs.append({"case": label, "outputs": shapes})
        if errs:
            failures.append((label, errs[0], run_batch))


@check(default=True, validate=_validate)
def shapes_consistent(out: Any = None, batch_sizes: Any = (1, 2, 3), inputs: Any = None,
                      sizes: Any = None, *, subject: Subject) -> CheckResult:
    """Outputs follow `out` (e.g. ('B', 10)) for every batch size and declared input size; inputs untouched.

    Without ``out``, every output tensor must keep the batch size as its first dimension and
    the same other dimensions across batch sizes. ``inputs`` is a spec for the model inputs
    and ``sizes`` gives values to try for its symbols, e.g. ``inputs=('B', 1, 'H', 'W'),
    sizes={'H': [32, 48], 'W': [32, 64]}``. The model runs in eval mode on a copy.

    >>> import torch
    >>> m = torch.nn.Linear(4, 10)
    >>> shapes_consistent(("B", 10), model=m, batch=torch.zeros(2, 4)).passed
    True
    """
    from ..core.trace import trace_batch

    work, base = subject.model_copy("eval"), subject.batch_copy()
    given = _Inputs(base)
    if inputs is not None:
        in_obj, in_env = _input_env(base, inputs)
        given = _Inputs(base, inputs, in_obj, in_env)
    symbols = sorted(sizes)
    combos = [dict(zip(symbols, vals)) for vals in itertools.product(*(sizes[s] for s in symbols))] or [{}]
    runs: list = []
    failures: list = []
    for combo in combos:
        _run_combo(work, given, combo, batch_sizes, out, runs, failures)
    metrics = {"cases": len(runs) + len(failures), "failed_cases": len(failures),
               "runs": runs[:20]}
    expect = f"outputs {out!r}" if out is not None else "outputs with leading dim B"
    cases = f"batch sizes {list(batch_sizes)}" + (f" and {dict(sizes)}" if sizes else "")
    if failures:
        label, msg, failed_batch = failures[0]
        trace = trace_batch(subject.model_copy("eval"), failed_batch.clone())
        details = [f"case {label}: {msg}"]
        details += [f"case {lb}: {m}" for lb, m, _ in failures[1:6]]
        details += ["", f"forward data flow for case {label} (* = shape changes):", trace.render()]
        return subject.failed(f"expected {expect} for {cases}, observed at {label}: {msg}", details,
                              metrics)
    return subject.passed(f"expected {expect} for {cases}, observed consistent shapes in"
                          f" {len(runs)} cases", "", metrics)
