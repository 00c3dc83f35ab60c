"""eval_deterministic: two eval forwards on identical inputs under different RNG seeds agree
bitwise (dropout or noise left on in eval).

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

from typing import Any

from ..core.result import CheckResult
from .compare import identical, max_diff
from .naming import fmt, module_kind
from .registry import check
from .subject import Subject


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


def _seed_everything(seed: int) -> None:
    """Seed torch, ``random`` and (when installed) numpy."""
    import random

    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is optional
        pass


def _first_differing_module(rec1: list, rec2: list) -> str:
    """The first module (in order of completion) whose outputs differ between two traced runs."""
    for (name, ta), (_, tb) in zip(rec1, rec2):
        if len(ta) != len(tb) or any(not identical(a, b) for a, b in zip(ta, tb)):
            return name
    return ""


@check(default=True)
def eval_deterministic(*, subject: Subject) -> CheckResult:
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
    from ..core.batch import iter_tensors

    work = subject.model_copy("eval")
    runs = []
    for seed in (1, 2):
        _seed_everything(seed)
        runs.append(_traced_forward(work, subject.batch_copy()))
    (out1, rec1), (out2, rec2) = runs
    outs1, outs2 = list(iter_tensors(out1, "output")), list(iter_tensors(out2, "output"))
    metrics: dict = {"outputs": len(outs1)}
    differing = [(p, max_diff(a, b)) for (p, a), (_, b) in zip(outs1, outs2)
                 if not identical(a, b)]
    if not differing and len(outs1) == len(outs2):
        return subject.passed(f"expected identical eval outputs under different seeds, observed"
                              f" {len(outs1)} output tensor(s) bitwise identical", metrics=metrics)
    module = _first_differing_module(rec1, rec2)
    path, diff = differing[0] if differing else ("output structure", float("inf"))
    metrics.update({"output": path, "max_abs_diff": diff, "module": module})
    details = [f"{p}: max |difference| {fmt(d)}" for p, d in differing[:10]]
    place = ""
    if module:
        kind = "root" if module == "<root>" else module_kind(work, module)
        details.append(f"first module whose output differs between the runs: {kind}")
        if module != "<root>":
            place = f"; first differing module '{module}' ({type(work.get_submodule(module)).__name__})"
    details.append("remedy: pass training=self.training to F.dropout, use nn.Dropout, and guard"
                   " sampling/noise with `if self.training:`")
    return subject.failed(f"expected identical eval outputs under different seeds, observed {path}"
                          f" differs by up to {fmt(diff)}{place}", details, metrics)
