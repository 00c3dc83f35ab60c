"""Training dynamics on short seeded runs of a copy: lr schedule, gradient norms, loss terms, G/D balance."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from ..core.errors import UsageError
from ..core.result import CheckResult
from .registry import SkipCheck, check, validate_steps
from .subject import Subject

SCHEDULES = ("warmup_cosine", "cosine", "linear_warmup", "cyclic", "triangular")


def _pos(name: str, value: Any, *, integer: bool = False, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 \
        and (value < 2**1023 if isinstance(value, int) else math.isfinite(value))
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise UsageError(f"{name}={value!r}: expected {kind}" + (" or None" if allow_none else ""))
    return int(value) if integer else float(value)


def _resolved_loss(loss: Any, data: Any, model: Any, device: Any) -> Any:
    """The Loss for the user's ``loss`` on ``data``. Only an inferred one (``loss=None``) looks
    at the model's output, from a forward of a copy; a named or callable loss needs neither.

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> b = Batch.from_user((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)))
    >>> _resolved_loss(None, b, torch.nn.Linear(3, 4), None).name
    'cross_entropy'
    """
    from ..core.batch import copy_model
    from ..core.forward import run_forward
    from ..core.losses import resolve_loss

    if loss is not None:
        return resolve_loss(loss, data)
    return resolve_loss(None, data, run_forward(copy_model(model).to(device), data))


class _InferredLoss:
    """``loss=None`` for a model wholly in train mode, inferred from the first training step's
    output: a probe forward of another copy, also in train mode, would give the same structure,
    so neither the copy nor the forward is needed."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.loss: Any = None

    def compute(self, output: Any, batch: Any, model: Any = None) -> tuple:
        if self.loss is None:
            from ..core.losses import resolve_loss

            self.loss = resolve_loss(None, self.data, output)
        return self.loss.compute(output, batch, model)


def _training_loss(loss: Any, data: Any, model: Any, device: Any) -> Any:
    """The loss for ``train_steps``: ``_resolved_loss``, or inferred at the first step when the
    model (every submodule) is in train mode, as training puts it."""
    if loss is None and all(m.training for m in model.modules()):
        return _InferredLoss(data)
    return _resolved_loss(loss, data, model, device)


# ------------------------------------------------------------------------------------------
# expected schedules (torch's own formulas: LinearLR, CosineAnnealingLR, CyclicLR 'triangular')
# ------------------------------------------------------------------------------------------
def expected_lr(kind: str, params: dict, base_lr: float, steps: int) -> Callable[[int], float]:
    """The learning rate at step ``t`` of a named schedule.

    ``cosine``: ``min_lr + (base - min_lr) (1 + cos(pi t / T)) / 2`` with ``T`` (default steps).
    ``linear_warmup``: ``base (s + (1 - s) min(t, W) / W)``, ``W = warmup``, ``s = start_factor``
    (default ``1 / W``), then constant. ``warmup_cosine``: that warmup, then cosine from base to
    ``min_lr`` over the remaining ``T - W`` steps. ``cyclic``/``triangular``: CyclicLR's triangle
    between ``base_lr`` (default the optimizer's lr) and ``max_lr`` with ``step_size`` steps up.

    >>> f = expected_lr("cosine", {}, 1.0, 4)
    >>> [round(f(t), 3) for t in range(5)]
    [1.0, 0.854, 0.5, 0.146, 0.0]
    """
    total = params.get("T", steps)
    min_lr = params.get("min_lr", 0.0)
    warmup = params.get("warmup", 0)
    start = params.get("start_factor", 1.0 / warmup if warmup else 1.0)

    def warm(t: int) -> float:
        return base_lr * (start + (1 - start) * min(t, warmup) / warmup) if warmup else base_lr

    def cos(t: int, length: int) -> float:
        t = min(t, length)
        return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * t / max(length, 1))) / 2

    if kind == "cosine":
        return lambda t: cos(t, total)
    if kind == "linear_warmup":
        return warm
    if kind == "warmup_cosine":
        return lambda t: warm(t) if t < warmup else cos(t - warmup, total - warmup)
    low = params.get("base_lr", base_lr)
    high = params["max_lr"]
    size = params["step_size"]

    def tri(t: int) -> float:
        cycle = math.floor(1 + t / (2 * size))
        x = abs(t / size - 2 * cycle + 1)
        return low + (high - low) * max(0.0, 1 - x)

    return tri


def _validate_expected(expected: Any) -> Any:
    if callable(expected):
        return expected
    kind, params = expected, {}
    if isinstance(expected, dict):
        params = dict(expected)
        kind = params.pop("kind", None)
    elif isinstance(expected, (tuple, list)) and len(expected) == 2 and isinstance(expected[1], dict):
        kind, params = expected[0], dict(expected[1])
    if kind not in SCHEDULES:
        raise UsageError(f"expected={expected!r}: expected one of {', '.join(SCHEDULES)} (optionally"
                         " as (name, {params}) or {'kind': name, ...}) or a callable step -> lr")
    allowed = {"warmup", "start_factor", "min_lr", "T", "base_lr", "max_lr", "step_size"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise UsageError(f"expected={expected!r}: unknown parameter(s) {', '.join(unknown)};"
                         f" expected some of {', '.join(sorted(allowed))}")
    if kind in ("warmup_cosine", "linear_warmup"):
        params["warmup"] = _pos("expected warmup", params.get("warmup"), integer=True)
    if kind in ("cyclic", "triangular"):
        params["max_lr"] = _pos("expected max_lr", params.get("max_lr"))
        params["step_size"] = _pos("expected step_size", params.get("step_size"), integer=True)
    return (kind, params)


def _validate_lr(scheduler: Any = None, expected: Any = None, steps: Any = 20, tolerance: Any = 0.02,
                 lr: Any = 0.01, optimizer: Any = "sgd", plot: Any = None) -> dict:
    from ..core.training import validate_optimizer

    if not callable(scheduler):
        raise UsageError(f"scheduler={scheduler!r}: expected a callable factory(optimizer) returning"
                         " a torch LR scheduler, e.g. lambda opt: CosineAnnealingLR(opt, 20)")
    if plot is not None and not isinstance(plot, (str, bytes)) and not hasattr(plot, "__fspath__"):
        raise UsageError(f"plot={plot!r}: expected a file path for the PNG, or None")
    return {"scheduler": scheduler, "expected": _validate_expected(expected),
            "steps": validate_steps(steps), "tolerance": _pos("tolerance", tolerance),
            "lr": _pos("lr", lr), "optimizer": validate_optimizer(optimizer), "plot": plot}


def run_with_scheduler(model: Any, batch: Any, loss: Any, *, steps: int, optimizer: Any, lr: float,
                       scheduler: Callable, seed: int = 0) -> tuple:
    """Train ``model`` in place with ``scheduler(opt)``; returns (lrs, losses), one per step.

    The learning rate is read before each step's update; a non-finite loss skips the backward
    but the scheduler still steps, so the schedule is followed to the end.

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> from pytest_modelcheck.core.losses import resolve_loss
    >>> b = Batch.from_user((torch.ones(4, 2), torch.zeros(4, 1)))
    >>> lrs, _ = run_with_scheduler(torch.nn.Linear(2, 1), b, resolve_loss("mse", b), steps=3,
    ...     optimizer="sgd", lr=1.0, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5))
    >>> lrs
    [1.0, 0.5, 0.25]
    """
    import torch

    from ..core.forward import run_forward
    from ..core.training import make_optimizer

    torch.manual_seed(seed)
    model.train()
    opt = make_optimizer(optimizer, model.parameters(), lr)
    sched = scheduler(opt)
    lrs, losses = [], []
    for _ in range(steps):
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.zero_grad(set_to_none=True)
        out = run_forward(model, batch)
        total, _ = loss.compute(out, batch, model)
        value = float(total.detach())
        losses.append(value)
        if math.isfinite(value) and total.requires_grad:
            total.backward()
        opt.step()
        sched.step()
    return lrs, losses


def _save_plot(path: Any, lrs: list, expected: list, losses: list) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(lrs, label="observed lr", marker=".")
    ax1.plot(expected, label="expected lr", linestyle="--")
    ax1.set_ylabel("learning rate")
    ax1.legend()
    ax2.plot(losses, color="tab:red")
    ax2.set_ylabel("loss")
    ax2.set_xlabel("step")
    fig.savefig(path, format="png")


def _expected_lrs(expected: Any, lr: float, steps: int) -> tuple:
    """``(expected lr per step, schedule name)`` of a validated ``expected``."""
    if callable(expected):
        fn, name = expected, getattr(expected, "__name__", "callable")
    else:
        kind, params = expected
        fn, name = expected_lr(kind, params, lr, steps), kind
    return [float(fn(t)) for t in range(steps)], name


@check(default=False, validate=_validate_lr)
def lr_schedule(scheduler: Any = None, expected: Any = None, steps: Any = 20, tolerance: Any = 0.02,
                lr: Any = 0.01, optimizer: Any = "sgd", plot: Any = None, *,
                subject: Subject) -> CheckResult:
    """The optimizer's learning rate over ``steps`` follows the declared schedule shape.

    ``scheduler`` is ``factory(optimizer) -> LR scheduler``; ``expected`` a name from
    ``SCHEDULES`` with parameters (``("warmup_cosine", {"warmup": 5, "min_lr": 0})``) or a
    callable ``step -> lr``. Each step's lr must be within ``tolerance * lr`` (peak-relative) of
    the expected one; the failure names the first step that deviates. ``plot=path`` saves the
    schedule and the loss as a PNG. Trains a seeded copy on the batch.

    >>> import torch
    >>> m = torch.nn.Linear(2, 1)
    >>> b = (torch.ones(4, 2), torch.zeros(4, 1))
    >>> cos = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    >>> lr_schedule(cos, "cosine", steps=10, model=m, batch=b).passed
    True
    """
    work, data = subject.model_copy(), subject.batch_copy()
    lossfn = _resolved_loss(subject.loss, data, subject.model, subject.device)
    lrs, losses = run_with_scheduler(work, data, lossfn, steps=steps, optimizer=optimizer, lr=lr,
                                     scheduler=scheduler)
    want, name = _expected_lrs(expected, lr, steps)
    peak = max([abs(v) for v in want] + [lr])
    bad = [t for t in range(steps) if not abs(lrs[t] - want[t]) <= tolerance * peak]
    metrics = {"lrs": lrs, "expected_lrs": want, "losses": losses, "schedule": name,
               "max_deviation": max(abs(a - b) for a, b in zip(lrs, want)) / peak}
    if plot is not None:
        _save_plot(plot, lrs, want, losses)
        metrics["plot"] = str(plot)
    rows = [f"  step {t:3d}: lr {lrs[t]:.4g}  expected {want[t]:.4g}  loss {losses[t]:.4g}"
            + ("   <- deviates" if t in bad else "") for t in range(steps)]
    details = ["per-step learning rate:"] + rows
    if bad:
        t = bad[0]
        return subject.failed(f"expected a {name} schedule (lr {want[t]:.4g} at step {t}, tolerance"
                              f" {tolerance:g} x {peak:.3g}), observed lr {lrs[t]:.4g} at step {t}"
                              f" ({len(bad)}/{steps} steps deviate)", details, metrics)
    return subject.passed(f"expected a {name} schedule, observed it within {tolerance:g} x"
                          f" {peak:.3g} over {steps} steps", details, metrics)


# ------------------------------------------------------------------------------------------
# gradient norms
# ------------------------------------------------------------------------------------------
def _validate_grads(steps: Any = 20, max_ratio: Any = 100.0, min_norm: Any = 1e-8, lr: Any = 1e-3,
                    optimizer: Any = "adam") -> dict:
    from ..core.training import validate_optimizer

    return {"steps": validate_steps(steps), "max_ratio": _pos("max_ratio", max_ratio),
            "min_norm": _pos("min_norm", min_norm), "lr": _pos("lr", lr),
            "optimizer": validate_optimizer(optimizer)}


def _nonfinite_run(run: Any, steps: int) -> str:
    """The failure headline of a run stopped by a non-finite loss or with a non-finite gradient
    norm; '' otherwise."""
    if run.stopped:
        return (f"expected finite losses and gradients for {steps} steps, observed the"
                f" {run.stopped}")
    norms = run.grad_norms
    bad = next((i for i, v in enumerate(norms) if not math.isfinite(v)), None)
    if bad is not None:
        return f"expected finite gradient norms, observed {norms[bad]} at step {bad}"
    return ""


def _vanishing_step(norms: list, losses: list, min_norm: float) -> Optional[int]:
    """The first step before convergence whose gradient norm is below ``min_norm``.

    >>> _vanishing_step([1.0, 1e-9, 1e-9], [1.0, 0.5, 1e-7], 1e-8)
    1
    >>> _vanishing_step([1.0, 0.5, 1e-9], [1.0, 0.5, 1e-7], 1e-8) is None
    True
    """
    # a loss driven to (numerically) zero has no gradient left: that is convergence
    floor = 1e-6 * max(abs(losses[0]), 1e-30) if losses else 0.0
    converged = next((i for i, v in enumerate(losses) if abs(v) <= floor), len(norms))
    return next((i for i, v in enumerate(norms[:converged]) if v < min_norm), None)


def _exploding_step(norms: list, ratios: list, max_ratio: float) -> Optional[int]:
    """The first step above ``max_ratio`` x the reference and above the first step.

    A first step far above the later ones is a falling norm (ConvNeXt's layer scale of 1e-6
    gets a gradient of ~29 at step 0, and the batch is fitted in one step: 29, 6e-4, 1e-4...).

    >>> _exploding_step([1.0, 50.0, 500.0], [1.0, 50.0, 500.0], 100.0)
    2
    """
    return next((i for i, r in enumerate(ratios) if r > max_ratio and norms[i] > norms[0]), None)


@check(default=True, validate=_validate_grads)
def grad_norms_stable(steps: Any = 20, max_ratio: Any = 100.0, min_norm: Any = 1e-8, lr: Any = 1e-3,
                      optimizer: Any = "adam", *, subject: Subject) -> CheckResult:
    """Gradient norms over a short run neither vanish (< min_norm) nor explode (> max_ratio x start).

    Trains a seeded copy for ``steps`` steps on the batch; the reference is the median of the
    first three steps' global gradient norms, and a step explodes when its norm is above
    ``max_ratio`` x the reference and above the first step's (a norm that falls after a large
    first step is not growth). Non-finite norms or losses fail too.

    >>> import torch
    >>> m = torch.nn.Linear(4, 1)
    >>> grad_norms_stable(steps=5, model=m, batch=(torch.ones(8, 4), torch.zeros(8, 1))).passed
    True
    """
    import statistics

    from ..core.training import sparkline, train_steps

    work, data = subject.model_copy(), subject.batch_copy()
    lossfn = _training_loss(subject.loss, data, subject.model, subject.device)
    run = train_steps(work, data, lossfn, steps=steps, optimizer=optimizer, lr=lr)
    norms = run.grad_norms
    metrics = {"grad_norms": norms, "losses": run.losses, "steps_run": len(run.losses)}
    details = f"grad norm per step: {sparkline(norms)}  " + ", ".join(f"{v:.3g}" for v in norms[:40])
    nonfinite = _nonfinite_run(run, steps)
    if nonfinite:
        return subject.failed(nonfinite, details, metrics)
    if not norms:
        raise SkipCheck("no gradient was computed (the loss does not require grad)")
    reference = statistics.median(norms[:3])
    metrics["reference_norm"] = reference
    low = _vanishing_step(norms, run.losses, min_norm)
    if low is not None:
        return subject.failed(f"expected gradient norms >= {min_norm:g}, observed {norms[low]:.3g}"
                              f" at step {low} (vanishing gradients)", details +
                              "\nremedy: check saturating activations, tiny output scales and"
                              " initialisation", metrics)
    ratios = [v / reference for v in norms] if reference > 0 else [0.0] * len(norms)
    metrics["max_ratio_observed"] = max(ratios)
    high = _exploding_step(norms, ratios, max_ratio)
    if high is not None:
        return subject.failed(f"expected gradient norms within {max_ratio:g} x the first steps'"
                              f" {reference:.3g}, observed {norms[high]:.3g} at step {high}"
                              f" ({ratios[high]:.3g} x; exploding gradients)",
                              details + "\nremedy: lower the learning rate, clip gradients"
                              " (torch.nn.utils.clip_grad_norm_) or normalise the inputs", metrics)
    return subject.passed(f"expected gradient norms in [{min_norm:g}, {max_ratio:g} x start],"
                          f" observed {min(norms):.3g} to {max(norms):.3g} over {len(norms)} steps",
                          details, metrics)


# ------------------------------------------------------------------------------------------
# loss components and G/D balance
# ------------------------------------------------------------------------------------------
def _validate_components(max_ratio: Any = None, gan: Any = False, steps: Any = 20,
                         min_d_loss: Any = 1e-3, d_loss: Any = None, lr: Any = 1e-3,
                         optimizer: Any = "adam") -> dict:
    from ..core.training import validate_optimizer

    if not isinstance(gan, bool):
        raise UsageError(f"gan={gan!r}: expected True or False")
    if gan and not callable(d_loss):
        raise UsageError(f"d_loss={d_loss!r}: gan=True needs a callable d_loss(model, cond, real,"
                         " fake) returning a dict of discriminator loss terms")
    if d_loss is not None and not callable(d_loss):
        raise UsageError(f"d_loss={d_loss!r}: expected a callable d_loss(model, cond, real, fake)")
    return {"max_ratio": _pos("max_ratio", max_ratio, allow_none=True), "gan": gan,
            "steps": validate_steps(steps), "min_d_loss": _pos("min_d_loss", min_d_loss),
            "d_loss": d_loss, "lr": _pos("lr", lr), "optimizer": validate_optimizer(optimizer)}


def _sum_terms(terms: Any, what: str) -> tuple:
    if not isinstance(terms, dict) or not terms:
        raise UsageError(f"{what}: expected a dict of scalar loss terms, got {type(terms).__name__}")
    total = None
    for v in terms.values():
        total = v if total is None else total + v
    return total, terms


def run_gan(model: Any, batch: Any, g_loss: Any, d_loss: Callable, *, steps: int, optimizer: Any,
            lr: float, seed: int = 0) -> dict:
    """Alternate one discriminator and one generator step; per-step totals and terms.

    ``model.discriminator`` holds the discriminator's parameters; the generator is everything
    else. ``d_loss(model, cond, real, fake)`` gets ``cond = batch.args[0]``, ``real =
    batch.target`` and the generator's output, detached.

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> from pytest_modelcheck.core.losses import resolve_loss
    >>> class G(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gen, self.discriminator = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    ...     def forward(self, x):
    ...         return self.gen(x)
    >>> b = Batch.from_user((torch.randn(4, 2), torch.randn(4, 2)))
    >>> dl = lambda m, c, r, f: {"d": (m.discriminator(r) - 1).pow(2).mean() + m.discriminator(f).pow(2).mean()}
    >>> len(run_gan(G(), b, resolve_loss("mse", b), dl, steps=3, optimizer="adam", lr=1e-3)["d_total"])
    3
    """
    import torch

    from ..core.training import make_optimizer

    disc = getattr(model, "discriminator", None)
    if not isinstance(disc, torch.nn.Module):
        raise UsageError("gan=True: the model needs a .discriminator submodule holding the"
                         " discriminator (the generator is everything else)")
    torch.manual_seed(seed)
    model.train()
    d_ids = {id(p) for p in disc.parameters()}
    g_params = [p for p in model.parameters() if id(p) not in d_ids]
    opt_g = make_optimizer(optimizer, g_params, lr)
    opt_d = make_optimizer(optimizer, disc.parameters(), lr)
    rec: dict = {"d_total": [], "g_total": [], "terms": {}, "stopped": ""}
    cond, real = batch.args[0], batch.target
    for step in range(steps):
        if not _d_step(model, batch, d_loss, (cond, real), opt_d, rec, step) or \
                not _g_step(model, batch, g_loss, opt_g, rec, step):
            break
    return rec


def _d_step(model: Any, batch: Any, d_loss: Callable, cond_real: tuple, opt_d: Any, rec: dict,
            step: int) -> bool:
    """One discriminator step on the generator's detached output; False when its loss is not
    finite (``rec["stopped"]`` says so)."""
    import torch

    from ..core.forward import run_forward

    opt_d.zero_grad(set_to_none=True)
    with torch.no_grad():
        fake = run_forward(model, batch)
    d_total, d_terms = _sum_terms(d_loss(model, *cond_real, fake.detach()), "d_loss")
    return _record_step(rec, "D", d_total, d_terms, opt_d, step)


def _g_step(model: Any, batch: Any, g_loss: Any, opt_g: Any, rec: dict, step: int) -> bool:
    """One generator step; False when its loss is not finite (``rec["stopped"]`` says so)."""
    from ..core.forward import run_forward

    opt_g.zero_grad(set_to_none=True)
    out = run_forward(model, batch)
    g_total, g_terms = g_loss.compute(out, batch, model)
    return _record_step(rec, "G", g_total, g_terms or {"total": g_total}, opt_g, step)


def _record_step(rec: dict, side: str, total: Any, terms: dict, opt: Any, step: int) -> bool:
    """Record one side's loss and terms; step its optimizer unless the loss is not finite
    (then ``rec["stopped"]`` says which loss, and False is returned)."""
    key = "d_total" if side == "D" else "g_total"
    rec[key].append(float(total.detach()))
    for k, v in terms.items():
        rec["terms"].setdefault(f"{side}:{k}", []).append(float(v.detach()))
    if not math.isfinite(rec[key][-1]):
        who = "discriminator" if side == "D" else "generator"
        rec["stopped"] = f"{who} loss became {rec[key][-1]} at step {step}"
        return False
    total.backward()
    opt.step()
    return True


def _mean_abs(values: list) -> float:
    return sum(abs(v) for v in values) / len(values) if values else 0.0


def _gan_result(subject: Subject, rec: dict, steps: int, min_d_loss: float, max_ratio: Any,
                details: list, metrics: dict) -> CheckResult:
    """The GAN verdict: the discriminator does not collapse and, with ``max_ratio``, the G/D
    losses stay within it (means of the last 3 steps)."""
    d_tail = rec["d_total"][-3:]
    g_tail = rec["g_total"][-3:]
    d_final, g_final = sum(d_tail) / len(d_tail), sum(g_tail) / len(g_tail)
    metrics.update({"d_total": rec["d_total"], "g_total": rec["g_total"],
                    "d_final": d_final, "g_final": g_final})
    if d_final < min_d_loss:
        return subject.failed(f"expected the discriminator loss to stay above {min_d_loss:g},"
                              f" observed {d_final:.3g} over the last steps (discriminator collapse:"
                              " it wins outright and the generator gets no signal)", details,
                              metrics)
    if max_ratio is not None:
        ratio = abs(g_final) / max(abs(d_final), 1e-12)
        metrics["g_d_ratio"] = ratio
        if ratio > max_ratio or ratio < 1 / max_ratio:
            return subject.failed(f"expected the G/D loss ratio within [1/{max_ratio:g},"
                                  f" {max_ratio:g}], observed {ratio:.3g} (G {g_final:.3g}, D"
                                  f" {d_final:.3g}); rebalance loss weights or update rates",
                                  details, metrics)
    return subject.passed(f"expected a balanced GAN, observed D loss {d_final:.3g} and G loss"
                          f" {g_final:.3g} after {steps} alternating steps", details, metrics)


def _terms_result(subject: Subject, terms: dict, steps: int, max_ratio: Any, details: list,
                  metrics: dict) -> CheckResult:
    """The verdict on a dict-valued loss: with ``max_ratio``, no term's mean |value| above
    ``max_ratio`` x another's."""
    means = {k: _mean_abs(v) for k, v in terms.items()}
    metrics["mean_abs"] = means
    if max_ratio is not None and len(means) > 1:
        big = max(means, key=lambda k: means[k])
        small = min(means, key=lambda k: means[k])
        ratio = means[big] / max(means[small], 1e-30)
        metrics["max_ratio_observed"] = ratio
        if ratio > max_ratio:
            return subject.failed(f"expected no loss term above {max_ratio:g} x another, observed"
                                  f" '{big}' (mean {means[big]:.3g}) = {ratio:.3g} x '{small}' (mean"
                                  f" {means[small]:.3g})", details, metrics)
    return subject.passed(f"expected finite, balanced loss terms, observed {len(terms)} terms"
                          f" finite over {steps} steps ({', '.join(terms)})", details, metrics)


@check(default=False, validate=_validate_components)
def loss_components(max_ratio: Any = None, gan: Any = False, steps: Any = 20, min_d_loss: Any = 1e-3,
                    d_loss: Any = None, lr: Any = 1e-3, optimizer: Any = "adam", *,
                    subject: Subject) -> CheckResult:
    """Each term of a dict-valued loss stays finite and none dominates; GANs keep G/D balanced.

    Trains a seeded copy for ``steps`` steps and tracks every term. With ``max_ratio``, the
    largest term's mean |value| may be at most ``max_ratio`` times the smallest's. With
    ``gan=True`` (``model.discriminator`` and ``d_loss=callable(model, cond, real, fake) ->
    dict``), D and G steps alternate; the discriminator loss (mean of the last 3 steps) must
    stay above ``min_d_loss`` and, with ``max_ratio``, G/D total loss within ``max_ratio``.

    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> lf = lambda out, y: {"mse": (out - y).pow(2).mean(), "l1": (out - y).abs().mean()}
    >>> b = (torch.randn(4, 2), torch.randn(4, 2))
    >>> loss_components(max_ratio=10, steps=3, model=m, batch=b, loss=lf).passed
    True
    """
    from ..core.training import sparkline, train_steps

    work, data = subject.model_copy(), subject.batch_copy()
    lossfn = _resolved_loss(subject.loss, data, subject.model, subject.device)
    rec: dict = {}
    if gan:
        rec = run_gan(work, data, lossfn, d_loss, steps=steps, optimizer=optimizer, lr=lr)
        terms, stopped = rec["terms"], rec["stopped"]
    else:
        run = train_steps(work, data, lossfn, steps=steps, optimizer=optimizer, lr=lr)
        terms, stopped = run.terms, run.stopped
        if not terms:
            raise SkipCheck(f"the loss {lossfn.name} returns one value, not a dict of terms;"
                            " nothing to decompose")
    metrics: dict = {"terms": terms}
    details = ["per-term values (first ... last):"] + [
        f"  {k:28} {sparkline(v)}  {v[0]:.4g} ... {v[-1]:.4g}" for k, v in terms.items() if v]
    bad = next(((k, i, x) for k, v in terms.items() for i, x in enumerate(v)
                if not math.isfinite(x)), None)
    if bad or stopped:
        what = f"term '{bad[0]}' = {bad[2]} at step {bad[1]}" if bad else stopped
        return subject.failed(f"expected every loss term finite, observed {what}", details,
                              metrics)
    if gan:
        return _gan_result(subject, rec, steps, min_d_loss, max_ratio, details, metrics)
    return _terms_result(subject, terms, steps, max_ratio, details, metrics)
