"""ddp_consistent: DistributedDataParallel on N local processes computes what one process does.

Gathering is in ``core/distributed.py`` (``run_ddp``); this module words the verdict, cause
first: a rank that hung or crashed, parameters without a gradient on some rank, a loss that
sums instead of averaging, buffers that drift between ranks, BatchNorm on per-rank statistics,
then any other difference of the updates.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import UsageError
from ..core.result import CheckResult
from ..core.units import is_int, is_number
from .registry import SkipCheck, check
from .subject import Subject

BACKENDS = ("gloo", "nccl")
#: Largest relative difference of an update that still counts as equal (see ``ddp_consistent``).
RTOL = 1e-3


def _validate(world_size: Any = 2, backend: Any = "gloo", steps: Any = 2, rtol: Any = RTOL,
              timeout: Any = "60s", local_batchnorm: Any = False) -> dict:
    from ..core.units import parse_duration

    if not is_int(world_size) or not 2 <= world_size <= 64:
        raise UsageError(f"world_size={world_size!r}: expected an integer from 2 to 64")
    if backend not in BACKENDS:
        raise UsageError(f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
    if not is_int(steps) or not 2 <= steps <= 100:
        raise UsageError(f"steps={steps!r}: expected an integer from 2 to 100 (DDP reports a"
                         " parameter without a gradient only at the second step)")
    if not is_number(rtol) or not 0 < rtol < 1:
        raise UsageError(f"rtol={rtol!r}: expected a relative tolerance between 0 and 1, such as"
                         " 1e-3")
    try:
        seconds = parse_duration(timeout)
    except UsageError as exc:
        raise UsageError(f"timeout={timeout!r}: {exc}") from None
    if not 0 < seconds <= 3600:
        raise UsageError(f"timeout={timeout!r}: expected a duration up to 1 hour, such as '60s'")
    if not isinstance(local_batchnorm, bool):
        raise UsageError(f"local_batchnorm={local_batchnorm!r}: expected True or False")
    return {"world_size": int(world_size), "backend": backend, "steps": int(steps),
            "rtol": float(rtol), "timeout": seconds, "local_batchnorm": local_batchnorm}


@check(default=False, validate=_validate)
def ddp_consistent(world_size: Any = 2, backend: Any = "gloo", steps: Any = 2, rtol: Any = RTOL,
                   timeout: Any = "60s", local_batchnorm: Any = False, *,
                   subject: Subject) -> CheckResult:
    """DistributedDataParallel on ``world_size`` local processes matches one process on the batch.

    The batch is split into ``world_size`` equal shards, one per rank (gloo on the CPU; nccl
    needs that many GPUs); ``steps`` SGD steps (at least 2: DDP reports a parameter without a
    gradient only at the second) must give every parameter the update one process computes on
    the whole batch, within ``rtol`` (relative to the update; DDP sums the gradients in another
    order, about 1e-6 apart in float32, and per-rank BatchNorm statistics or a summed loss move
    them by 1e-2 or more). A failure names the cause: a rank that hung (killed after
    ``timeout``) or raised, parameters without a gradient on some rank, a loss that sums over
    samples (gradients off by the world size), buffers that differ between ranks, BatchNorm
    layers that would need SyncBatchNorm (``local_batchnorm=True`` accepts per-rank statistics).
    Dropout (modules, ``F.dropout``, SDPA's ``dropout_p``) and stochastic depth are switched off
    in the copies; a parameter's update is compared net of float32 rounding of its values, with
    the model's typical update as the floor. The model and loss must pickle (a model class from
    a module, a loss by name or a top-level function).

    >>> import torch
    >>> batch = (torch.randn(8, 3), torch.randn(8, 2))
    >>> ddp_consistent(model=torch.nn.Linear(3, 2), batch=batch, loss="mse").passed
    True
    """
    from ..core.distributed import run_ddp
    from ..core.isolate import NotIsolatable

    if backend == "nccl":
        _require_gpus(world_size)
    try:
        facts = run_ddp(subject.model, subject.batch, subject.loss, world_size, backend, steps,
                        timeout)
    except NotIsolatable as exc:
        raise SkipCheck(f"the model or loss cannot be sent to the rank processes ({exc}); define"
                        " the model class in a module and give the loss by name or as a"
                        " top-level function") from None
    return verdict(subject, facts, rtol, local_batchnorm)


def _require_gpus(world_size: int) -> None:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < world_size:
        raise SkipCheck(f"backend 'nccl' needs {world_size} GPUs, this machine has {count}")


def verdict(subject: Subject, facts: Any, rtol: float, local_batchnorm: bool) -> CheckResult:
    """The result for ``facts`` (a ``DDPFacts``): the first cause that applies."""
    metrics = {"world_size": facts.world_size, "backend": facts.backend, "steps": facts.steps,
               "samples_per_rank": facts.samples_per_rank}
    for judge in (_hung_or_crashed, _raised, _summed_loss, _drifting_buffers):
        result = judge(subject, facts, metrics)
        if result is not None:
            return result
    return _updates(subject, facts, metrics, rtol, local_batchnorm)


def _unused_text(facts: Any) -> tuple:
    """(headline part, detail lines) for the parameters some shard leaves without a gradient."""
    if not facts.unused:
        return "", []
    rank, names = next(iter(sorted(facts.unused.items())))
    owner = facts.owners.get(names[0].rpartition(".")[0], "")
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    head = (f"'{names[0]}'{f' ({owner})' if owner else ''}{more} got no gradient on rank"
            f" {rank}")
    lines = [f"rank {r}: no gradient for {', '.join(ns[:10])}" for r, ns in sorted(facts.unused.items())]
    lines.append("remedy: use the parameters on every forward path, or wrap the model in"
                 " DistributedDataParallel(model, find_unused_parameters=True) (slower)")
    return head, lines


def _hung_or_crashed(subject: Subject, facts: Any, metrics: dict) -> Any:
    if not facts.timed_out and not facts.crashed:
        return None
    unused, lines = _unused_text(facts)
    if facts.timed_out:
        what = (f"rank{'s' if len(facts.timed_out) > 1 else ''}"
                f" {', '.join(map(str, facts.timed_out))} hung and were killed after the timeout")
    else:
        rank, text = next(iter(sorted(facts.crashed.items())))
        what = f"rank {rank} crashed: {text}"
    headline = f"expected DDP on {facts.world_size} ranks to finish {facts.steps} steps, observed {what}"
    if unused:
        headline += f"; cause: {unused}"
    return subject.failed(headline, lines, {**metrics, "timed_out": facts.timed_out,
                                            "unused": sum(map(len, facts.unused.values()))})


def _raised(subject: Subject, facts: Any, metrics: dict) -> Any:
    errors = facts.rank_errors
    if not errors and not facts.unused:
        return None
    unused, lines = _unused_text(facts)
    if unused:
        headline = (f"expected every trainable parameter to get a gradient on every rank,"
                    f" observed {unused}")
        if errors:
            rank, text = _root_error(errors)
            lines.insert(0, f"DDP on rank {rank}: {text[:300]}")
        return subject.failed(headline, lines, {**metrics, "unused": sum(map(len, facts.unused.values()))})
    rank, text = _root_error(errors)
    step = facts.ranks[rank].step
    at = "when wrapped in DDP" if step == -1 else f"at step {step + 1}"
    return subject.failed(f"expected DDP on {facts.world_size} ranks to train, observed rank"
                          f" {rank} raising {at}: {text[:300]}", "", {**metrics, "error_rank": rank})


def _root_error(errors: dict) -> tuple:
    """The (rank, error) that explains the others: a rank's own error before the errors of the
    ranks whose peer went away."""
    own = [(r, e) for r, e in sorted(errors.items()) if "closed by peer" not in e]
    return (own or sorted(errors.items()))[0]


def _summed_loss(subject: Subject, facts: Any, metrics: dict) -> Any:
    ratio = facts.grad_ratio()
    if ratio is None or abs(ratio * facts.world_size - 1) > 0.05:
        return None
    return subject.failed(
        f"expected DDP's gradients to equal one process's on the whole batch, observed them"
        f" x{ratio:.3g} (1/{facts.world_size}): the loss sums over samples instead of averaging,"
        f" so training on {facts.world_size} GPUs divides the step size by {facts.world_size}",
        "remedy: average the loss over the samples (reduction='mean'), or scale it by the"
        " world size", {**metrics, "grad_ratio": ratio})


def _drifting_buffers(subject: Subject, facts: Any, metrics: dict) -> Any:
    bn = tuple(f"{name}." for name in facts.batchnorm)
    drift = {n: gap for n, gap in facts.diverging_buffers().items() if not n.startswith(bn)}
    if not drift:
        return None
    name, gap = max(drift.items(), key=lambda item: item[1])
    owner = facts.owners.get(name.rpartition(".")[0], "")
    more = f" and {len(drift) - 1} more" if len(drift) > 1 else ""
    return subject.failed(
        f"expected buffers to agree between ranks after the step, observed '{name}'"
        f"{f' ({owner})' if owner else ''}{more} differing by up to {gap:.3g}",
        "each rank updates the buffer from its own shard; DDP broadcasts rank 0's buffers at the"
        " next forward, so the other ranks' updates are lost (and a checkpoint saved on another"
        " rank holds different values): reduce the statistic over ranks"
        " (torch.distributed.all_reduce) or compute it outside the forward",
        {**metrics, "diverging_buffers": len(drift)})


def _updates(subject: Subject, facts: Any, metrics: dict, rtol: float,
             local_batchnorm: bool) -> CheckResult:
    errors = facts.update_errors()
    name, worst = max(errors.items(), key=lambda item: item[1]) if errors else ("", 0.0)
    metrics = {**metrics, "max_update_rel_diff": worst, "rtol": rtol}
    if worst <= rtol:
        return subject.passed(f"expected DDP on {facts.world_size} ranks to match one process,"
                              f" observed updates within {worst:.2g} (rtol {rtol:g}) over"
                              f" {facts.steps} steps", "", metrics)
    if facts.batchnorm:
        if local_batchnorm:
            return subject.passed(
                f"expected DDP on {facts.world_size} ranks to match one process apart from"
                f" per-rank BatchNorm statistics (local_batchnorm=True), observed updates"
                f" {worst:.2g} apart, from {len(facts.batchnorm)} BatchNorm layers", "", metrics)
        more = f" and {len(facts.batchnorm) - 1} more" if len(facts.batchnorm) > 1 else ""
        return subject.failed(
            f"expected DDP on {facts.world_size} ranks to match one process, observed the update"
            f" of '{name}' {worst:.2g} apart (rtol {rtol:g}): BatchNorm '{facts.batchnorm[0]}'"
            f"{more} normalises each rank's {facts.samples_per_rank} samples with their own"
            " statistics", "remedy: torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) before"
            " wrapping in DDP, or local_batchnorm=True if per-GPU statistics are intended",
            {**metrics, "batchnorm_layers": len(facts.batchnorm)})
    return subject.failed(
        f"expected DDP on {facts.world_size} ranks to match one process, observed the update of"
        f" '{name}' {worst:.2g} apart (rtol {rtol:g})", "the forward or the loss depends on"
        " which samples share a batch (in-batch statistics, negatives or normalisation), or on"
        " the rank", metrics)
