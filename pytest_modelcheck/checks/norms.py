"""norm_stats: BatchNorm and InstanceNorm layers behave as configured.

On a copy of the model: a few training steps (``model.train()``, forward, loss, backward, an
optimizer step) and one eval forward, with hooks on every layer with running statistics. Per
layer, the check wants:

* in the training forward: the layer in train mode and, when it tracks running statistics,
  those statistics moving (a BatchNorm left in eval mode by a ``train()`` override or a
  ``.eval()`` in ``forward`` never updates them and normalises with its initial statistics);
* in the eval forward: the layer in eval mode and its statistics fixed;
* running-statistic buffers present exactly when ``track_running_stats`` is set;
* affine ``weight`` and ``bias`` present when ``affine=True`` (and, with the check's
  ``affine=True``, every layer affine);
* no collapse: no input channel that is constant (a variance ~0 beside the layer's other
  channels, ``core.norms.COLLAPSE_RELATIVE``), and finite running statistics.

Frozen layers: a layer in eval mode during training whose affine parameters all have
``requires_grad=False`` is taken as deliberately frozen (the detection-backbone pattern) and
passes; so does a layer named by ``frozen`` (``fnmatch`` patterns of module names such as
``"backbone.*"``), which must then really stay frozen (its statistics must not move in
training). ``FrozenBatchNorm2d`` is not a torch norm layer and is only listed. Layers the
forward does not reach are listed as not reached, never as collapsed.

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import UsageError
from ..core.result import CheckResult
from .registry import check, validate_seed, validate_steps
from .subject import Subject

__all__ = ["norm_stats", "layer_problems"]

def _validate(frozen: Any = (), affine: Any = None, steps: Any = 2, seed: Any = 0) -> dict:
    if isinstance(frozen, str):
        frozen = (frozen,)
    if not isinstance(frozen, (tuple, list)) or not all(
            isinstance(p, str) and p.strip() for p in frozen):
        raise UsageError(f"frozen={frozen!r}: expected module-name patterns such as"
                         " ('backbone.*', 'stem.bn')")
    if affine is not None and not isinstance(affine, bool):
        raise UsageError(f"affine={affine!r}: expected True (every norm layer has a learnable"
                         " weight and bias), False or None (no expectation)")
    return {"frozen": tuple(p.strip() for p in frozen), "affine": affine,
            "steps": validate_steps(steps),
            "seed": validate_seed(seed)}


def _deliberately_frozen(layer: Any, frozen: tuple) -> str:
    """Why a layer counts as frozen ("" when it does not)."""
    from ..core.norms import matches

    if matches(layer.name, frozen):
        return "declared frozen"
    if (layer.has_weight or layer.has_bias) and not layer.trainable:
        return "frozen: weight and bias have requires_grad=False"
    return ""


def layer_problems(layer: Any, frozen: tuple = (), affine: Any = None) -> list:
    """What is wrong with one watched layer (``core.norms.NormLayer``), as short texts.

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> from pytest_modelcheck.core.norms import run_phases
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, momentum=0.0))
    >>> layer_problems(run_phases(m, Batch.from_user(torch.randn(8, 3))).layers["1"])
    ['in train mode but its running statistics never moved (momentum=0.0)']
    """
    problems = _config_problems(layer, affine)
    train, evals = layer.phase("train"), layer.phase("eval")
    if not train and not evals:
        return problems  # not reached: nothing to judge about its statistics
    why_frozen = _deliberately_frozen(layer, frozen)
    in_eval = [c for c in train if not c.training]
    if in_eval and not why_frozen:
        stats = ("its running statistics never move and it normalises with its initial"
                 " statistics" if layer.has_stats else "it normalises with batch statistics")
        problems.append(f"in eval mode during the training forward ({len(in_eval)} of"
                        f" {len(train)} calls): {stats} (a BatchNorm left in eval mode by a"
                        " train() override or an .eval() in forward)")
    elif why_frozen == "declared frozen" and any(c.moved for c in train):
        problems.append("declared frozen, but its running statistics moved in training (it runs"
                        " in train mode: call .eval() on it after model.train())")
    elif layer.tracked and layer.has_stats and train and all(c.training for c in train) \
            and not any(c.moved for c in train):
        problems.append(f"in train mode but its running statistics never moved"
                        f" (momentum={layer.momentum})")
    if not layer.tracked and layer.has_stats and train and not in_eval:
        problems.append("track_running_stats=False yet running statistics present: training"
                        " never updates them and eval mode normalises with them")
    if any(c.training for c in evals):
        problems.append("in train mode during the eval forward: inference uses batch statistics"
                        + (" and updates the running statistics" if layer.has_stats else ""))
    elif any(c.moved for c in evals):
        problems.append("running statistics moved during the eval forward")
    problems += _collapse_problems(layer, [c for c in train if c.training], train + evals)
    return problems


def _config_problems(layer: Any, affine: Any) -> list:
    out = []
    if layer.tracked and not layer.has_stats:
        out.append("track_running_stats=True but running_mean/running_var are None: eval mode"
                   " normalises with batch statistics")
    if layer.affine and not (layer.has_weight and layer.has_bias):
        out.append("affine=True but its weight or bias is None")
    if affine is True and not layer.affine:
        out.append("affine=False: no learnable weight and bias (expected affine=True)")
    elif affine is False and layer.affine:
        out.append("affine=True (expected affine=False)")
    return out


def _collapse_problems(layer: Any, batch_stats: list, calls: list) -> list:
    """Collapse where the layer normalises with the input's own statistics (train mode; in eval
    mode it divides by its running variance); non-finite statistics after any call."""
    out = []
    worst = max(batch_stats, key=lambda c: c.collapsed, default=None)
    if worst is not None and worst.collapsed:
        out.append(f"collapsed: {worst.collapsed} of {worst.channels} input channels are"
                   f" constant (variance ~0, min {worst.min_var:.3g}): the layer divides their"
                   f" zero deviation by sqrt(eps={layer.eps:g}) and passes on only its bias")
    if any(c.nonfinite_stats for c in calls):
        out.append("running statistics became non-finite")
    return out


def _line(layer: Any, problems: list, frozen: tuple) -> str:
    train, evals = layer.phase("train"), layer.phase("eval")
    conf = ", ".join([layer.kind, "affine" if layer.affine else "no affine",
                      "tracked" if layer.tracked else "untracked"])
    if not train and not evals:
        state = "not reached by the forward"
    else:
        moved = "moved" if any(c.moved for c in train) else "fixed"
        mode = "train" if all(c.training for c in train) else "EVAL"
        var = min((c.min_var for c in train if c.min_var == c.min_var), default=float("nan"))
        state = f"train forward: {mode} mode, stats {moved}; min channel var {var:.3g}"
        why = _deliberately_frozen(layer, frozen)
        if why and not problems:
            state += f" ({why})"
    verdict = "; ".join(problems) if problems else "ok"
    return f"  {layer.name} ({conf}): {state} -> {verdict}"


@check(default=False, validate=_validate)
def norm_stats(frozen: Any = (), affine: Any = None, steps: Any = 2, seed: Any = 0, *,
               subject: Subject) -> CheckResult:
    """BatchNorm/InstanceNorm layers behave as configured: statistics move in train mode, stay fixed in eval, nothing collapses.

    ``frozen``: module-name patterns (``"backbone.*"``) of layers kept frozen on purpose; a layer
    in eval mode during training whose weight and bias have ``requires_grad=False`` counts as
    frozen too. ``affine=True`` wants a learnable weight and bias in every layer. Runs
    ``steps`` training steps and one eval forward on a copy.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
    >>> norm_stats(model=m, batch=torch.randn(6, 4)).passed
    True
    """
    from ..core.norms import frozen_by_construction, run_phases

    work = subject.model_copy()
    watch = run_phases(work, subject.batch_copy(), subject.loss, steps=steps, seed=seed)
    layers = list(watch.layers.values())
    constructed = frozen_by_construction(work)
    if not layers:
        extra = f" ({len(constructed)} frozen by construction)" if constructed else ""
        return subject.skipped(f"skipped: no BatchNorm/InstanceNorm layer with running"
                               f" statistics in the model{extra}")
    found = {layer.name: layer_problems(layer, frozen, affine) for layer in layers}
    details = [f"{steps} training steps and one eval forward on a copy; per layer:"]
    details += [_line(layer, found[layer.name], frozen) for layer in layers]
    if constructed:
        details.append(f"frozen by construction (not checked): {', '.join(constructed[:10])}"
                       + (", ..." if len(constructed) > 10 else ""))
    from ..core.norms import matches

    unused = [p for p in frozen if not any(matches(layer.name, (p,)) for layer in layers)]
    if unused:
        details.append(f"frozen patterns matching no norm layer: {', '.join(unused)}")
    bad = [name for name, probs in found.items() if probs]
    reached = [layer.name for layer in layers if layer.phase("train") or layer.phase("eval")]
    metrics = {"layers": len(layers), "reached": len(reached), "flagged": bad,
               "problems": {name: found[name] for name in bad},
               "frozen_by_construction": len(constructed)}
    if bad:
        first = bad[0]
        layer = watch.layers[first]
        details.append("remedy: let model.train()/eval() reach every norm layer (no train()"
                       " override or .eval() in forward), or declare deliberately frozen layers"
                       " with frozen=(...) and set requires_grad=False on their weight and bias")
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return subject.failed(f"expected norm layers to behave as configured, observed {len(bad)}"
                              f" of {len(layers)} not: {first} ({layer.kind}) {found[first][0]}"
                              f"{more}", details, metrics)
    tracked = sum(1 for layer in layers if layer.tracked and layer.has_stats)
    return subject.passed(f"expected norm layers to behave as configured, observed {len(layers)}"
                          f" layers ({len(reached)} reached; {tracked} with running statistics,"
                          " which move in train mode and stay fixed in eval), none collapsed",
                          details, metrics)
