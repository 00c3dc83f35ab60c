"""model_overfits: a seeded copy of the model trained on the one batch drives its loss down."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from ..core.errors import UsageError
from ..core.result import CheckResult
from .registry import check, validate_seed, validate_steps
from .subject import Subject

UNCONSTRAINED_HINT = ("outputs unconstrained where the loss expects a range (angles, probabilities):"
                      " add a bounded activation")
HINTS = (
    UNCONSTRAINED_HINT,
    "inputs or targets normalized wrongly (check data_sane / the forward value ranges)",
    "a .detach(), .item() or torch.no_grad() in the middle of forward cuts the graph"
    " (grads_finite names parameters that get no gradient)",
    "learning rate too small or too large for this optimizer: try lr=1e-2 and lr=1e-4",
)


def _number(name: str, value: Any, *, positive: bool = True, integer: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and positive:
        ok = value > 0
    if not ok:
        kind = "a positive integer" if integer else ("a positive number" if positive else "a number")
        raise UsageError(f"{name}={value!r}: expected {kind}")
    return int(value) if integer else float(value)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


#: With a declared chance level, an initial loss more than this many times above it fails.
INIT_OVER_CHANCE = 10.0
RETRY_LR_FACTOR = 1 / 3  # a failed fit is tried once more at this fraction of the learning rate
#: A run that hits the step cap passes as a slow fit when its loss has come down to this
#: fraction of the initial one and still falls steadily over the last fifth of the run.
SLOW_FIT_RATIO = 0.6
#: A run stops as soon as the goal is met, but not before this many steps: the verdict is then
#: settled (the best loss only falls), and the steps up to here still let a fit that diverges
#: right after dipping below the goal (a step size at the edge of stability, a division that
#: fitting drives to zero) show its non-finite loss, which fails the check. Ten small steps
#: are a fraction of the default 100. (On an accelerator the losses are read back every
#: ``core.training.SYNC_EVERY`` steps, so the copy may take up to 7 unrecorded updates past the
#: stop; on the CPU every step is read as it ends.)
MIN_STEPS = 10


def _slow_but_learning(losses: list, cap: int, initial: float) -> bool:
    """The run used every step it was allowed, its best loss is at most ``SLOW_FIT_RATIO`` x
    the initial one, and each of the last two tenths of the run set a new low by a clear
    margin (a memorising fit of noise targets is slow but steady; a stuck model plateaus)."""
    n = len(losses)
    if n < cap or n < 20 or not initial > 0 or min(losses) > SLOW_FIT_RATIO * initial:
        return False
    tenth = n // 10
    before = min(losses[:n - 2 * tenth])
    mid = min(losses[n - 2 * tenth:n - tenth])
    last = min(losses[n - tenth:])
    return mid < before - 0.01 * abs(before) and last < mid - 0.01 * abs(mid)


def _validate(steps: Any = 100, lr: Any = 3e-3, optimizer: Any = "adam", target_ratio: Any = 0.3,
              target: Any = None, chance_level: Any = None, seed: Any = 0) -> dict:
    from ..core.training import validate_optimizer

    out = {"steps": validate_steps(steps), "lr": _number("lr", lr),
           "optimizer": validate_optimizer(optimizer),
           "target_ratio": _number("target_ratio", target_ratio),
           "target": None if target is None else _number("target", target, positive=False),
           "chance_level": None if chance_level is None else _number("chance_level", chance_level,
                                                                     positive=False),
           "seed": validate_seed(seed)}
    if out["target_ratio"] >= 1:
        raise UsageError(f"target_ratio={target_ratio!r}: expected a fraction of the initial loss"
                         " below 1, such as 0.3")
    return out


#: Rows along the class dimension whose sums stay within this of 1 (and no value below 0) are
#: probabilities: a softmax already applied to what the loss takes as logits.
ROW_SUM_TOLERANCE = 1e-3
PROBABILITIES_CAUSE = ("outputs are already probabilities (rows sum to 1): cross_entropy applies"
                       " log_softmax itself; return logits")


def _classes_dim(out: Any, target: Any) -> Any:
    """The class (channel) dimension of a prediction: where integer targets say it is, else dim 1
    of an image-like output, else the last."""
    import torch

    from ..core.losses import class_dim

    if isinstance(target, torch.Tensor) and not target.is_floating_point():
        dim = class_dim(out, target)
        if dim is not None:
            return dim
    return out.dim() - 1 if out.dim() <= 3 else 1


def output_diagnosis(initial_out: Any, trained_out: Any, target: Any = None,
                     loss_name: str = "") -> tuple:
    """``(cause, hints, metrics)``: what in the outputs blocks fitting, if anything.

    * rows that sum to 1 with no negative value (``initial_out``): probabilities fed to a loss
      that expects logits;
    * class channels that are 0 for every sample while every output is >= 0 (at initialisation
      or after training): a ReLU before the output, which cannot produce the negative logits a
      fit needs and gives those channels no gradient.

    ``cause`` is a short text for the failure headline ("" when nothing is found); a prediction
    that is 0 everywhere is left to the generic hints (it is no ReLU's doing alone). Probabilities
    are not reported under a named loss that takes them (``loss_name`` 'mse', 'bce', ...).

    >>> import torch
    >>> cause, hints, _ = output_diagnosis(torch.randn(4, 3).softmax(-1), torch.randn(4, 3).softmax(-1))
    >>> cause
    'outputs are already probabilities (rows sum to 1): cross_entropy applies log_softmax itself; return logits'
    >>> relu = torch.tensor([[0.5, 0.0, 0.2], [0.1, 0.0, 0.0]])
    >>> output_diagnosis(relu, relu)[0]
    '1 of 3 output channels are 0 for every sample: a ReLU before the output'
    """
    import torch

    from ..core.outputs import primary_output

    metrics: dict = {}
    first, last = primary_output(initial_out), primary_output(trained_out)
    if not isinstance(first, torch.Tensor) or not first.is_floating_point() or first.dim() < 1             or first.numel() == 0:
        return "", [], metrics
    dim = _classes_dim(first, target)
    classes = first.shape[dim]
    if classes < 2:
        return "", [], metrics
    x = first.detach().double()
    sums = x.sum(dim)
    takes_probabilities = loss_name in ("mse", "l1", "smooth_l1", "bce", "bce_with_logits")
    if not takes_probabilities and bool((x >= 0).all()) \
            and bool(((sums - 1).abs() <= ROW_SUM_TOLERANCE).all()):
        metrics["outputs_are_probabilities"] = True
        if loss_name == "nll":
            cause = ("outputs are probabilities (rows sum to 1): nll expects log-probabilities;"
                     " return log_softmax")
            return cause, [cause + " (or logits with loss='cross_entropy')"], metrics
        return PROBABILITIES_CAUSE, [PROBABILITIES_CAUSE + " (F.cross_entropy(logits, target));"
                                     " keep the softmax for inference only"], metrics
    counts = {}
    for when, out in (("at initialisation", first), ("after training", last)):
        if not isinstance(out, torch.Tensor) or out.shape != first.shape:
            continue
        v = out.detach()
        if not bool((v >= 0).all()) or not bool((v != 0).any()):
            continue  # negative values: no ReLU on the output; all zero: not a ReLU's doing alone
        dead = (v.movedim(dim, -1).reshape(-1, classes) == 0).all(0)
        if bool(dead.any()):
            counts[when] = dead
    if not counts:
        return "", [], metrics
    when, dead = max(counts.items(), key=lambda kv: int(kv[1].sum()))
    n = int(dead.sum())
    metrics["dead_output_channels"] = [int(i) for i in dead.nonzero().flatten()]
    cause = f"{n} of {classes} output channels are 0 for every sample: a ReLU before the output"
    detail = (f"{n} of {classes} output channels ({', '.join(map(str, metrics['dead_output_channels'][:10]))}"
              f"{', ...' if n > 10 else ''}) are 0 for every sample {when}, and no output is"
              " negative: a ReLU (or clamp) before the output gives those channels no gradient and"
              " no output can go below 0; remove it (cross_entropy wants the last layer's"
              " logits)")
    if len(counts) == 2 and when == "after training":
        detail += f" ({int(counts['at initialisation'].sum())} of {classes} at initialisation)"
    if isinstance(target, torch.Tensor) and not target.is_floating_point() and \
            target.shape == first.movedim(dim, -1).shape[:-1]:
        stuck = dead.to(target.device)[target.clamp(0, classes - 1)] & (target >= 0)
        if bool(stuck.any()):
            per_sample = stuck.reshape(stuck.shape[0], -1).any(1) if stuck.dim() else stuck.reshape(1)
            detail += (f"; the targets of {int(per_sample.sum())} of {per_sample.numel()} samples"
                       " are in those channels")
    return cause, [detail], metrics


def _steps(run: Any, steps: int) -> str:
    n = len(run.losses)
    return f"{steps} steps" if n <= steps else f"{n} steps (extended from {steps}: loss still falling)"


def _goal_step(losses: list, goal: float) -> Any:
    """The first step whose loss is at or below the goal (None when none is)."""
    return next((i for i, v in enumerate(losses) if v <= goal), None)


def _met(losses: list, goal: float, steps: int) -> str:
    k = _goal_step(losses, goal)
    return f"goal met at step {k} of up to {steps}" if k < steps else f"goal met at step {k}"


@check(default=True, validate=_validate)
def model_overfits(steps: Any = 100, lr: Any = 3e-3, optimizer: Any = "adam", target_ratio: Any = 0.3,
                   target: Any = None, chance_level: Any = None, seed: Any = 0, *,
                   subject: Subject) -> CheckResult:
    """A seeded copy trained on the one batch gets its loss below target_ratio x initial (or target).

    Training stops as soon as the goal is met (after at least ``MIN_STEPS``, 10, steps); the
    headline says at which step. When the goal is not met after ``steps`` steps, training goes on (up to 3x) while the loss is
    still clearly falling, so a slow but healthy model is not flagged; a run that still falls
    short is repeated once at a third of ``lr`` (a step size too large for the architecture is
    not a bug of the model; the pass then says to lower the learning rate).

    ``chance_level`` (e.g. ``math.log(10)`` for 10-class cross-entropy, ``math.pi / 2`` for an
    angular-distance loss) lets the failure say "stuck at chance level", and fails a model whose
    initial loss is more than ``INIT_OVER_CHANCE`` (10) times above it (exploding outputs at
    initialization), even if it then fits the batch.

    >>> import torch
    >>> m = torch.nn.Linear(4, 1)
    >>> x = torch.randn(8, 4)
    >>> model_overfits(steps=60, lr=0.05, model=m, batch=(x, x.sum(1, keepdim=True))).passed
    True
    """
    import torch

    from ..core.batch import copy_model
    from ..core.forward import run_forward
    from ..core.losses import resolve_loss
    from ..core.training import sparkline, train_steps

    if not subject.batch.has_target and subject.loss is None:
        raise UsageError("model_overfits needs a target in the batch or a loss= callable;"
                         " got a batch without target")
    work = subject.model_copy()
    data = subject.batch_copy()

    with torch.no_grad():
        probe = run_forward(copy_model(work).eval(), data)
    lossfn = resolve_loss(subject.loss, data, probe)

    done = _stop_rule(steps, target, target_ratio)
    run = train_steps(work, data, lossfn, steps=3 * steps, optimizer=optimizer, lr=lr, seed=seed,
                      stop=done)
    initial, best = run.initial, run.best
    goal = target if target is not None else target_ratio * initial
    goal_text = (f"loss <= {target:.4g}" if target is not None
                 else f"loss <= {target_ratio:g} x initial {initial:.4g} = {goal:.4g}")
    curve = sparkline(run.losses)
    metrics, details = _record(run, goal, optimizer, lr, lossfn.name, chance_level)
    first = _first_run_verdict(subject, run, steps, goal, goal_text, details, metrics, chance_level,
                               target)
    if first is not None:
        return first
    # A step size too large for this architecture is not a bug of the model: before failing,
    # one more seeded run at RETRY_LR_FACTOR x lr (SqueezeNet, whose ReLU on the logits kills
    # class channels under lr 3e-3 and fits at 1e-3). Models that cannot fit fail both runs.
    retry_lr = lr * RETRY_LR_FACTOR
    retry = train_steps(subject.model_copy(), data, lossfn, steps=3 * steps,
                        optimizer=optimizer, lr=retry_lr, seed=seed, stop=done)
    retry_goal = target if target is not None else target_ratio * retry.initial
    metrics["retry"] = {"lr": retry_lr, "best_loss": retry.best, "steps_run": len(retry.losses),
                        "goal_met_at_step": _goal_step(retry.losses, retry_goal)}
    if not retry.stopped and math.isfinite(retry.best) and retry.best <= retry_goal:
        details.append(f"at lr={lr:g} the best loss was {best:.5g}; at lr={retry_lr:g}:"
                       f" {sparkline(retry.losses)} best {retry.best:.5g}")
        return subject.result(True,
                              f"expected {goal_text} within {_steps(retry, steps)}, observed"
                              f" {retry.best:.4g} at lr={retry_lr:g} ({_met(retry.losses, retry_goal, steps)};"
                              f" lr={lr:g} fell short at {best:.4g}: lower the learning rate)"
                              f" {sparkline(retry.losses)}",
                              "\n".join(details), dict(metrics, passed_at_lr=retry_lr))
    details.append(f"  a retry at lr={retry_lr:g} reached best {retry.best:.5g} too")
    observed, at_chance = _observed_failure(run, chance_level)
    with torch.no_grad():
        trained = run_forward(work.eval(), data)
    cause, specific, found = output_diagnosis(probe, trained, data.target,
                                              lossfn.name if lossfn.named else "")
    metrics.update(found)
    if cause:
        observed += f"; {cause}"
    details += _hint_lines(specific)
    metrics["stuck_at_chance"] = at_chance
    return subject.result(False,
                          f"expected {goal_text} within {_steps(run, steps)}, observed {observed}"
                          f" {curve}",
                          "\n".join(details), metrics)


def _stop_rule(steps: int, target: Any, target_ratio: float) -> Callable[[list], bool]:
    """``stop(losses)`` for :func:`train_steps`: stop once the goal is met (after MIN_STEPS);
    else run ``steps`` steps and, past them, go on (up to 3x) only while the loss is still
    clearly falling, so a slow but healthy model is not flagged."""
    def done(losses: list) -> bool:
        n = len(losses)
        goal_now = target if target is not None else target_ratio * losses[0]
        if n >= min(MIN_STEPS, steps) and min(losses) <= goal_now:
            return True
        if n < steps:
            return False
        if steps < 20:  # too few steps to judge a trend
            return True
        window = max(5, n // 5)
        before, recent = min(losses[:-window]), min(losses[-window:])
        return not (recent < before - 0.02 * abs(before))

    return done


def _record(run: Any, goal: float, optimizer: Any, lr: float, loss_name: str,
            chance_level: Any) -> tuple[dict, list]:
    """``(metrics, details)`` of the first run: its numbers and its loss curve."""
    from ..core.training import sparkline

    initial, best, final = run.initial, run.best, run.final
    metrics = {"initial_loss": initial, "best_loss": best, "final_loss": final, "goal": goal,
               "steps_run": len(run.losses), "goal_met_at_step": _goal_step(run.losses, goal),
               "optimizer": optimizer if isinstance(optimizer, str)
               else getattr(optimizer, "__name__", "custom"), "lr": lr, "loss_fn": loss_name,
               "losses": [round(v, 6) if math.isfinite(v) else str(v) for v in run.losses],
               "chance_level": chance_level}
    if run.terms:
        metrics["terms"] = {k: [round(v, 6) for v in vs] for k, vs in run.terms.items()}
    details = [f"loss curve ({len(run.losses)} steps, {optimizer} lr={lr:g}): {sparkline(run.losses)}",
               f"  initial {initial:.5g}  best {best:.5g}  final {final:.5g}"]
    for k, vs in run.terms.items():
        details.append(f"  term {k}: {vs[0]:.4g} -> {min(vs):.4g}  {sparkline(vs)}")
    return metrics, details


def _first_run_verdict(subject: Subject, run: Any, steps: int, goal: float, goal_text: str,
                       details: list, metrics: dict, chance_level: Any,
                       target: Any) -> Optional[CheckResult]:
    """The verdict the first run settles (a non-finite loss, exploding initial outputs, the goal
    met, a slow but steady fit), or None when a retry at a lower learning rate is due."""
    from ..core.training import sparkline

    initial, best = run.initial, run.best
    curve = sparkline(run.losses)
    if run.stopped:
        return subject.result(False,
                              f"expected {goal_text} within {steps} steps, observed a non-finite loss:"
                              f" {run.stopped} {curve}", "\n".join(details), metrics)
    if not math.isfinite(initial):
        return subject.result(False,
                              f"expected a finite initial loss, observed {initial}", "", metrics)
    if chance_level is not None and chance_level > 0 and initial > INIT_OVER_CHANCE * chance_level:
        return subject.result(False,
                              f"expected an initial loss near the chance level {chance_level:.4g},"
                              f" observed {initial:.4g} ({initial / chance_level:.0f}x): outputs far"
                              f" too large at initialization {curve}",
                              "\n".join(details + ["hints:", "  - weights initialised too large"
                                                    " (a gain or a scale applied twice)", "  - a"
                                                    " missing normalization or a final layer that"
                                                    " is not scaled down"]), metrics)
    if best <= goal:
        return subject.result(True,
                              f"expected {goal_text} within {_steps(run, steps)}, observed {best:.4g}"
                              f" ({_met(run.losses, goal, steps)}) {curve}",
                              "\n".join(details), metrics)
    if target is None and _slow_but_learning(run.losses, 3 * steps, initial):
        return subject.result(True,
                              f"expected {goal_text} within {_steps(run, steps)}, observed {best:.4g}"
                              f" and still falling steadily at the cap (a slow fit, not a stuck one)"
                              f" {curve}", "\n".join(details), dict(metrics, slow_fit=True))
    return None


def _observed_failure(run: Any, chance_level: Any) -> tuple[str, bool]:
    """``(observed, at_chance)``: how a run that missed its goal ended."""
    initial, best, final = run.initial, run.best, run.final
    at_chance = chance_level is not None and abs(final - chance_level) <= 0.05 * max(abs(chance_level), 1e-12)
    if at_chance:
        observed = f"stuck at chance level {chance_level:.4g} (final {final:.4g})"
    elif best >= 0.95 * initial:
        observed = f"loss flat at {best:.4g}"
    else:
        observed = f"best {best:.4g} (final {final:.4g})"
    return observed, at_chance


def _hint_lines(specific: list) -> list:
    """The failure's hint lines: the specific ones first, then the generic ones."""
    return ["hints:"] + [f"  - {h}" for h in specific + [h for h in HINTS
                                                        if not (specific and h == UNCONSTRAINED_HINT)]]
