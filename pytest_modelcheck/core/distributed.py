"""Distributed data parallel on local processes: the facts ``ddp_consistent`` judges.

``run_ddp(model, batch, world_size=2)`` splits the batch into ``world_size`` equal shards, runs
``steps`` SGD steps of ``DistributedDataParallel`` on ``world_size`` local processes (gloo on
CPU), and the same steps in this process on the whole batch. DDP averages gradients over the
ranks, so with a loss that averages over samples the two runs compute the same updates, up to
the order of floating-point sums. What differs, and why, is what this module gathers:

* the parameters each shard's forward leaves without a gradient (DDP raises, or hangs, at the
  second step when a parameter gets no gradient);
* the BatchNorm layers that normalise each rank's shard with its own statistics;
* the buffers that differ between ranks after the last step;
* the ratio of the DDP gradient to the single-process one (``1 / world_size`` for a loss that
  sums over samples);
* the relative difference of every parameter's update.

Each rank runs in a child process started by :func:`run_isolated` (``subprocess``, never
``fork``), with a process-group timeout; a rank that outlives ``timeout`` is killed, and so is
every rank when this process is interrupted, so no process is left behind. Dropout (modules, and
dropout called as a function) is switched off in every copy (each rank draws different random numbers, which no single-process
run can match). The model, the batch and the loss must pickle: a model class importable from
a module, a loss given by name or as a top-level function.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from .errors import UsageError, describe_error

#: SGD step size of the compared runs: small, so the updates stay in the linear regime.
LR = 1e-2


@dataclass
class StepRecord:
    """One run's record: the step-1 gradients, the parameters and buffers after the last step,
    or the error a rank raised (``"TypeName: first line"``) and the step it raised at."""

    grads: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    buffers: dict = field(default_factory=dict)
    error: str = ""
    step: Optional[int] = None


@dataclass
class DDPFacts:
    """What a DDP run on ``world_size`` ranks did, beside one process on the whole batch."""

    world_size: int
    backend: str
    steps: int
    samples_per_rank: int
    initial: dict
    reference: StepRecord
    ranks: list
    timed_out: list = field(default_factory=list)
    crashed: dict = field(default_factory=dict)
    unused: dict = field(default_factory=dict)
    batchnorm: list = field(default_factory=list)
    owners: dict = field(default_factory=dict)

    @property
    def rank_errors(self) -> dict:
        return {r: rec.error for r, rec in enumerate(self.ranks) if rec is not None and rec.error}

    def update_errors(self) -> dict:
        """Parameter name -> relative difference of rank 0's update from the reference's
        (``update_difference``; the model's typical update sets the floor of each scale)."""
        import math

        rank0 = self.ranks[0]
        names = [n for n in rank0.params if n in self.reference.params]
        moved = sum(float((self.reference.params[n] - self.initial[n]).double().norm()) ** 2
                    for n in names)
        count = sum(self.initial[n].numel() for n in names)
        typical = math.sqrt(moved / count) if count else 0.0
        return {n: update_difference(self.initial[n], self.reference.params[n], rank0.params[n],
                                     typical) for n in names}

    def grad_ratio(self) -> Optional[float]:
        """Norm of rank 0's step-1 gradients over the single process's (None without both)."""
        import math

        mine, ref = self.ranks[0].grads, self.reference.grads
        names = [n for n in mine if n in ref]
        num = math.sqrt(sum(float(mine[n].double().norm()) ** 2 for n in names))
        den = math.sqrt(sum(float(ref[n].double().norm()) ** 2 for n in names))
        return num / den if names and den > 0 else None

    def diverging_buffers(self) -> dict:
        """Buffer name -> largest difference between ranks after the last step."""
        import torch

        out: dict = {}
        first = self.ranks[0].buffers
        for rec in self.ranks[1:]:
            for name, value in rec.buffers.items():
                base = first.get(name)
                if base is None or not base.is_floating_point() or base.shape != value.shape:
                    if base is not None and not torch.equal(base, value):
                        out[name] = float("inf")
                    continue
                gap = float((base.double() - value.double()).abs().max()) if base.numel() else 0.0
                if gap > 0:
                    out[name] = max(out.get(name, 0.0), gap)
        return out


#: A parameter whose update is smaller than this fraction of the model's typical update (per
#: element) is compared against that fraction instead of its own update: its gradient is a sum
#: that nearly cancels, which float32 rounding decides.
UPDATE_FLOOR = 1e-3
#: Rounding of the parameters themselves: this many units in the last place of each element
#: (norm-wise) is no difference.
ULPS = 4


def update_difference(start: Any, ref: Any, mine: Any, typical: float = 0.0) -> float:
    """How far one parameter's update ``mine - start`` is from ``ref - start``, relative:
    ``(|Δmine - Δref| - ULPS ulp(start)) / (|Δref| + UPDATE_FLOOR * typical * sqrt(numel))``,
    with ``typical`` the model's root-mean-square update per element. A parameter whose update
    is a few float32 units in the last place of its values, or far below the model's typical
    update, compares in absolute terms (ConvNeXt's layer scales, MLP-Mixer's LayerNorm weights).

    >>> import torch
    >>> start = torch.ones(4)
    >>> round(update_difference(start, start + 0.1, start + 0.12), 3)
    0.2
    >>> update_difference(start, start + 1e-7, start + 2e-7, typical=0.1)  # rounding: no difference
    0.0
    """
    import torch

    d_ref, d_mine = (ref - start).double(), (mine - start).double()
    eps = torch.finfo(start.dtype).eps if start.is_floating_point() else 0.0
    rounding = ULPS * eps * float(start.double().norm())
    gap = max(0.0, float((d_mine - d_ref).norm()) - rounding)
    scale = (float(d_ref.norm()) + UPDATE_FLOOR * typical * start.numel() ** 0.5
             + 1e-8 * (float(start.double().norm()) + 1.0))
    return gap / scale


def shard_batch(batch: Any, world_size: int) -> list:
    """``world_size`` equal shards of a Batch (the remainder of an uneven batch is dropped).

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> shards = shard_batch(Batch.from_user((torch.arange(5.0)[:, None], torch.zeros(5))), 2)
    >>> [s.args[0][:, 0].tolist() for s in shards]
    [[0.0, 1.0], [2.0, 3.0]]
    """
    size = batch.batch_size
    if size is None or size < world_size:
        raise UsageError(f"world_size={world_size}: expected a batch of at least {world_size}"
                         f" samples to split over the ranks, got {size or 'no batch dimension'}")
    per = size // world_size
    return [samples(batch, r * per, (r + 1) * per) for r in range(world_size)]


def samples(batch: Any, start: int, stop: int) -> Any:
    """The Batch of samples ``start:stop`` (tensors without the batch dimension copied whole)."""
    size = batch.batch_size

    def take(t: Any) -> Any:
        if t.dim() == 0 or t.shape[0] != size:
            return t.detach().clone()
        return t.detach()[start:stop].clone()

    part = batch.map(take)
    part.factory = None
    return part


#: Modules that drop whole samples' residual branches at random in training (stochastic depth),
#: by class name: torchvision's ``StochasticDepth`` (``p``), timm's ``DropPath``
#: (``drop_prob``), and the DropBlock variants (``drop_prob``).
RANDOM_DROP_CLASSES = ("StochasticDepth", "DropPath", "DropBlock")


def without_dropout(model: Any) -> Any:
    """The model with every dropout module's probability set to 0 (it is a copy), stochastic
    depth (``RANDOM_DROP_CLASSES``) included.

    >>> import torch
    >>> m = without_dropout(torch.nn.Sequential(torch.nn.Dropout(0.5)))
    >>> m[0].p
    0.0
    """
    import torch

    kinds = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
             torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
    for module in model.modules():
        if isinstance(module, kinds):
            module.p = 0.0
        elif any(name in type(module).__name__ for name in RANDOM_DROP_CLASSES):
            for attr in ("p", "drop_prob"):
                if isinstance(getattr(module, attr, None), float):
                    setattr(module, attr, 0.0)
    return model


@contextlib.contextmanager
def functional_dropout_off() -> Iterator[None]:
    """Dropout called as a function (``F.dropout``, ``torch.dropout``, the variants, and the
    ``dropout_p`` of ``F.scaled_dot_product_attention``) is the identity inside this block, as
    ``without_dropout`` makes the dropout modules: T5's attention, for one, calls
    ``F.dropout(weights, p=config.dropout_rate, training=self.training)`` with no module. The
    masks of a sharded and a whole batch can never agree, so dropout would read as a mismatch.

    >>> import torch
    >>> x = torch.ones(4)
    >>> with functional_dropout_off():
    ...     torch.nn.functional.dropout(x, p=0.9, training=True).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    names = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
             "feature_alpha_dropout")
    dropouts = {getattr(F, n) for n in names if hasattr(F, n)}
    dropouts |= {getattr(torch, n) for n in ("dropout", "feature_dropout", "alpha_dropout",
                                             "feature_alpha_dropout") if hasattr(torch, n)}
    sdpa = F.scaled_dot_product_attention

    class NoDropout(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in dropouts:
                x = args[0] if args else kwargs["input"]
                inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
                return x if inplace is True else x.clone()
            if func is sdpa:
                if len(args) > 4:
                    args = (*args[:4], 0.0, *args[5:])
                else:
                    kwargs["dropout_p"] = 0.0
            return func(*args, **kwargs)

    with NoDropout():
        yield


def train_record(model: Any, batch: Any, loss: Any, steps: int, lr: float = LR) -> StepRecord:
    """``steps`` SGD steps of ``model`` (maybe DDP-wrapped) on ``batch``; the step-1 gradients
    and the parameters and buffers after the last step. An exception is recorded, not raised."""
    import torch

    from .forward import run_forward
    from .losses import resolve_loss

    inner = getattr(model, "module", model)
    record = StepRecord()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    try:
        for step in range(steps):
            record.step = step
            opt.zero_grad(set_to_none=True)
            with functional_dropout_off():
                out = run_forward(model, batch)
                total, _ = resolve_loss(loss, batch, out).compute(out, batch, inner)
            total.backward()
            if step == 0:
                record.grads = {n: p.grad.detach().cpu().clone()
                                for n, p in inner.named_parameters() if p.grad is not None}
            opt.step()
    except Exception as exc:  # noqa: BLE001 - the rank's failure is a fact to report
        record.error = _error_text(exc, inner)
        return record
    record.step = None
    record.params = {n: p.detach().cpu().clone() for n, p in inner.named_parameters()}
    record.buffers = {n: b.detach().cpu().clone() for n, b in inner.named_buffers()}
    return record


def _error_text(exc: BaseException, inner: Any) -> str:
    """One line for a rank's error: a forward's error names the user's module that raised (as
    ``run_forward`` does on the unwrapped model), anything else is ``"TypeName: first line"``."""
    from .errors import ModelError, first_line
    from .state import module_where_raised

    original = getattr(exc, "original", None)
    if not isinstance(exc, ModelError) or original is None or exc.module == "loss":
        return str(exc) if isinstance(exc, ModelError) else describe_error(exc)
    where = module_where_raised(inner, original)
    module = inner.get_submodule(where) if where and where != type(inner).__name__ else inner
    place = f" in module '{where}' ({type(module).__name__})" if where else ""
    return f"forward raised {type(original).__name__}{place}: {first_line(original)}"


_KEEP_ALIVE: list = []


def _rank_main(rank: int, world_size: int, store: str, backend: str, model: Any, shard: Any,
               loss: Any, steps: int, timeout: float) -> StepRecord:
    """One rank: join the process group, wrap the model in DDP, train on the rank's shard (on
    ``cuda:<rank>`` with nccl, on the CPU with gloo)."""
    import datetime

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=max(timeout, 1.0)))
    try:
        try:
            if backend == "nccl":
                torch.cuda.set_device(rank)
                model, shard = model.to(f"cuda:{rank}"), shard.to(f"cuda:{rank}")
                wrapped = DistributedDataParallel(model, device_ids=[rank])
            else:
                wrapped = DistributedDataParallel(model)
        except Exception as exc:  # noqa: BLE001 - DDP refused the model: a fact
            return StepRecord(error=describe_error(exc), step=-1)
        # kept alive to the end of the rank process, which replies and leaves with os._exit:
        # freeing a DDP module (its reducer and gloo work) after the process group is gone
        # can hang or abort in C++ destructors
        _KEEP_ALIVE.append(wrapped)
        return train_record(wrapped, shard, loss, steps)
    finally:
        dist.destroy_process_group()


def run_ranks(model: Any, shards: list, loss: Any, steps: int, backend: str,
              timeout: float) -> tuple:
    """Every rank in its own child process, at once; ``(records, timed_out, crashed)`` where
    ``records[r]`` is None for a rank that timed out or crashed."""
    import pickle

    from .isolate import IsolatedCrash, IsolatedTimeout, NotIsolatable, run_isolated

    try:  # before any process starts: what cannot travel is said once, here
        pickle.dumps((model, loss, shards[0]))
    except Exception as exc:  # PicklingError, TypeError, AttributeError (local objects)
        raise NotIsolatable(describe_error(exc)) from None
    world = len(shards)
    records: list = [None] * world
    timed_out: list = []
    crashed: dict = {}
    not_sent: dict = {}
    with tempfile.TemporaryDirectory(prefix="modelcheck-ddp-") as tmp:
        store = os.path.join(tmp, "store")

        def rank(r: int) -> None:
            try:
                records[r] = run_isolated(_rank_main, r, world, store, backend, model, shards[r],
                                          loss, steps, timeout, timeout=timeout,
                                          what=f"DDP rank {r}")
            except IsolatedTimeout:
                timed_out.append(r)
            except IsolatedCrash as exc:
                crashed[r] = str(exc)
            except NotIsolatable as exc:  # the child could not unpickle the call (an import)
                not_sent[r] = str(exc)
            except Exception as exc:  # noqa: BLE001 - any other failure to run the rank
                crashed[r] = describe_error(exc)

        threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if not_sent:
        raise NotIsolatable(next(iter(not_sent.values())))
    return records, sorted(timed_out), crashed


def unused_by_shard(model: Any, shards: list, loss: Any) -> dict:
    """Rank -> trainable parameters that shard's forward and backward leave without a gradient."""
    from .batch import copy_model
    from .forward import run_forward
    from .losses import resolve_loss

    unused: dict = {}
    for r, shard in enumerate(shards):
        work = copy_model(model).train()
        try:
            out = run_forward(work, shard)
            resolve_loss(loss, shard, out).compute(out, shard, work)[0].backward()
        except Exception:  # noqa: BLE001 - the DDP run reports the error itself
            continue
        names = [n for n, p in work.named_parameters() if p.requires_grad and p.grad is None]
        if names:
            unused[r] = names
    return unused


def local_batchnorm(model: Any) -> list:
    """Names of the BatchNorm layers that would normalise with per-rank statistics."""
    import torch

    return [n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d))
            and m.training and not isinstance(m, torch.nn.SyncBatchNorm)]


def run_ddp(model: Any, batch: Any, loss: Any = None, world_size: int = 2,
            backend: str = "gloo", steps: int = 2, timeout: float = 60.0) -> DDPFacts:
    """DDP on ``world_size`` local processes beside one process on the whole batch.

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> batch = Batch.from_user((torch.randn(8, 3), torch.randn(8, 2)))
    >>> facts = run_ddp(torch.nn.Linear(3, 2), batch, "mse")
    >>> facts.rank_errors, max(facts.update_errors().values()) < 1e-3
    ({}, True)
    """
    from .batch import copy_model

    work = without_dropout(copy_model(model)).cpu().train()
    data = batch.to("cpu")
    shards = shard_batch(data, world_size)
    per = shards[0].batch_size or 0
    whole = samples(data, 0, per * world_size)
    initial = {n: p.detach().clone() for n, p in work.named_parameters()}
    reference = train_record(copy_model(work), whole, loss, steps)
    records, timed_out, crashed = run_ranks(work, shards, loss, steps, backend, timeout)
    return DDPFacts(world_size, backend, steps, per, initial, reference, records, timed_out,
                    crashed, unused_by_shard(work, shards, loss), local_batchnorm(work),
                    owners={n: type(m).__name__ for n, m in work.named_modules()})
