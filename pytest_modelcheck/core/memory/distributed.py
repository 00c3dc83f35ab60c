"""Per-rank memory of data-parallel training (DDP, FSDP2) from the single-device estimate.

The model is arithmetic on top of the single-device ``MemoryEstimate`` (its batch is the
*per-rank* batch); it is stated, with its cross-checks, in ``docs/memory-model.md`` ("Per-rank
memory of distributed training"). No process group and no GPU are needed.

* ``ddp``: every rank holds the whole model, its gradients and optimizer state, plus the
  reducer's gradient buckets (flat copies of the gradients, ``gradients_bytes`` in all).
* ``fsdp`` (FSDP2 ``fully_shard``, FULL_SHARD, units as ``fsdp_units`` says):
  parameters, gradients and optimizer state are divided by ``world_size``; forward and
  backward add the all-gathered parameters of the root and of the largest pair of neighbouring
  units (the one running and the one prefetched), backward also the largest unit's unsharded
  gradients (the reduce-scatter input); the unit that takes the batch keeps its gathered
  parameters, unsharded gradients and reduce-scatter input (three times its size) until the end
  of backward, as FSDP2 has no post-backward hook on inputs that need no gradient; the
  optimizer step works on shards only. The peak is the largest of the three phases.
"""
from __future__ import annotations

from typing import Any

from ..errors import UsageError

STRATEGIES = ("ddp", "fsdp")


def check_distributed(world_size: Any, strategy: Any) -> tuple:
    """Validate ``world_size`` and ``strategy`` (both or neither); return them.

    >>> check_distributed(None, None)
    (None, None)
    >>> check_distributed(4, "FSDP")
    (4, 'fsdp')
    >>> check_distributed(0, "ddp")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: world_size=0: expected an integer >= 1
    """
    from ..units import is_int

    if world_size is None:
        if strategy is not None:
            raise UsageError(f"strategy={strategy!r}: needs world_size (the number of ranks)")
        return None, None
    if not is_int(world_size) or isinstance(world_size, bool) or world_size < 1:
        raise UsageError(f"world_size={world_size!r}: expected an integer >= 1")
    name = strategy.lower() if isinstance(strategy, str) else strategy
    if name not in STRATEGIES:
        raise UsageError(f"strategy={strategy!r}: expected 'ddp' or 'fsdp'")
    return int(world_size), name


def fsdp_units(model: Any) -> list:
    """The modules ``fully_shard`` is assumed applied to, root last: every direct child of the
    root, with ``ModuleList``/``ModuleDict`` containers replaced by their elements (the usual
    ``for block in model.layers: fully_shard(block)``), then the root.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ModuleList([torch.nn.ReLU()]))
    >>> [type(u).__name__ for u in fsdp_units(m)]
    ['Linear', 'ReLU', 'Sequential']
    """
    import torch

    containers = (torch.nn.ModuleList, torch.nn.ModuleDict)
    units: list = []
    todo = list(model.children())
    while todo:
        child = todo.pop(0)
        if isinstance(child, containers):
            todo[:0] = list(child.children())
        else:
            units.append(child)
    return units + [model]


def unit_bytes(model: Any) -> list:
    """Parameter bytes of every FSDP unit (see ``fsdp_units``), in order; a unit owns the
    parameters of its subtree that no earlier unit owns (the root: what is left).

    >>> import torch
    >>> unit_bytes(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
    [80, 40, 0]
    """
    owned: set = set()
    sizes = []
    for unit in fsdp_units(model):
        size = 0
        for p in unit.parameters():
            if id(p) not in owned:
                owned.add(id(p))
                size += p.numel() * p.element_size()
        sizes.append(size)
    return sizes


def largest_unit_bytes(model: Any) -> int:
    """Parameter bytes of the largest FSDP unit.

    >>> import torch
    >>> largest_unit_bytes(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
    80
    """
    return max(unit_bytes(model))


def gathered_bytes(sizes: list) -> int:
    """Unsharded parameter bytes alive at once, from ``unit_bytes``: the root's own parameters
    (FSDP2 keeps the root unsharded between forward and backward) plus the largest pair of
    neighbouring units (the one running and the one prefetched next to it).

    >>> gathered_bytes([80, 40, 8, 0])
    120
    >>> gathered_bytes([0])
    0
    """
    *units, root = sizes
    pairs = [a + b for a, b in zip(units, units[1:])] or units or [0]
    return root + max(pairs)


def per_rank(estimate: Any, model: Any, world_size: int, strategy: str) -> dict:
    """The per-rank figures of ``estimate`` (a single-device ``MemoryEstimate``), as a dict.

    >>> from pytest_modelcheck.core.memory.report import MemoryEstimate
    >>> import torch
    >>> e = MemoryEstimate(batch_size=2, phase="train", optimizer="adamw", amp=None,
    ...                    device="cpu", peak_bytes=1000, peak_phase="optimizer step",
    ...                    parameters_bytes=200, gradients_bytes=200,
    ...                    optimizer_state_bytes=400, activations_bytes=100)
    >>> r = per_rank(e, torch.nn.Linear(7, 7), 2, "ddp")
    >>> r["communication_buffers_bytes"], r["peak_bytes"]
    (200, 1200)
    """
    params, grads = int(estimate.parameters_bytes), int(estimate.gradients_bytes)
    opt = int(estimate.optimizer_state_bytes)
    row = {"world_size": world_size, "strategy": strategy,
           "activations_bytes": int(estimate.activations_bytes)}
    if strategy == "ddp":
        comm = grads if estimate.phase == "train" else 0
        row.update(parameters_bytes=params, gradients_bytes=grads,
                   optimizer_state_bytes=opt, communication_buffers_bytes=comm,
                   peak_bytes=int(estimate.peak_bytes) + comm)
        return row
    shard = -(-params // world_size), -(-grads // world_size), -(-opt // world_size)
    sizes = unit_bytes(model) if world_size > 1 else [0]
    unit = max(sizes)
    gathered = gathered_bytes(sizes)
    train = estimate.phase == "train"
    comm = gathered + (unit if train else 0)
    peaks = {str(k): int(v) for k, v in estimate.phase_peaks.items()}
    acts = int(estimate.activations_bytes)
    phases = [shard[0] + max(0, peaks.get("forward", estimate.peak_bytes) - params) + gathered]
    if train:
        phases.append(shard[0] + shard[1] + gathered + unit
                      + max(acts, peaks.get("backward", 0) - params - grads))
        # the unit that takes the batch: its inputs need no gradient, so FSDP2's post-backward
        # hook never fires for it; its parameters stay gathered until the final callback, which
        # copies its unsharded gradients into the reduce-scatter input beside them
        first = next((b for b in sizes[:-1] if b), 0)
        phases.append(shard[0] + shard[1] + sizes[-1] + 3 * first
                      + max(0, peaks.get("backward", 0) - params - grads))
        extra = max(0, peaks.get("optimizer step", 0) - params - grads - opt)
        phases.append(sum(shard) + -(-extra // world_size))
    row.update(parameters_bytes=shard[0], gradients_bytes=shard[1] if train else 0,
               optimizer_state_bytes=shard[2], communication_buffers_bytes=comm,
               peak_bytes=max(phases))
    return row


def render_per_rank(row: dict) -> list:
    """Text lines for a per-rank row (see ``per_rank``).

    >>> render_per_rank({"world_size": 2, "strategy": "ddp", "parameters_bytes": 1,
    ...     "gradients_bytes": 1, "optimizer_state_bytes": 2, "activations_bytes": 3,
    ...     "communication_buffers_bytes": 1, "peak_bytes": 9})[0]
    'per rank with ddp on 2 ranks (the batch is the per-rank batch): peak 9 B'
    """
    from ..units import format_bytes

    lines = [f"per rank with {row['strategy']} on {row['world_size']} ranks (the batch is the"
             f" per-rank batch): peak {format_bytes(row['peak_bytes'])}"]
    for key in ("parameters", "gradients", "optimizer_state", "activations",
                "communication_buffers"):
        lines.append(f"    {key.replace('_', ' '):<22}{format_bytes(row[key + '_bytes']):>12}")
    return lines


def _rank_peak(rank: int, world_size: int, store: str, strategy: str, model: Any, batch: Any,
               loss: Any, optimizer: Any, lr: float) -> int:
    """One gloo rank: wrap ``model`` (DDP, or ``fully_shard`` on every unit), run one training
    step on ``batch`` and return the rank's peak bytes from the CPU allocator events: what was
    alive after wrapping (the rank's parameters or shards, DDP's buckets) plus the step."""
    import torch
    import torch.distributed as dist

    from ..batch import Batch
    from .measure import allocation_profiler
    from .step import _prepare, _run_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    try:
        with allocation_profiler() as prof:
            work = _wrap(model, strategy, world_size)
            data = Batch.from_user(batch, model=work)
            opt = _prepare(work, "train", optimizer, lr)
            keep = _run_step(work, data, loss, "train", opt, _no_phase)
            del keep
        return _peak(prof)
    finally:
        dist.destroy_process_group()


def _no_phase(name: str) -> Any:
    import contextlib

    return contextlib.nullcontext()


def _wrap(model: Any, strategy: str, world_size: int) -> Any:
    import copy

    work = copy.deepcopy(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # every rank deep-copies the same model, so the initial broadcast of rank 0's state is
        # not needed; its flat buffer is freed on a gloo thread, which the profiler misses
        return DistributedDataParallel(work, init_sync=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for unit in fsdp_units(work):
        fully_shard(unit, mesh=mesh)
    return work


def _peak(prof: Any) -> int:
    """Peak of the running sum of the window's allocator events (in start order)."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.nbytes() != 0),
                    key=lambda e: e.start_ns())
    alive = peak = 0
    for e in events:
        alive += e.nbytes()
        peak = max(peak, alive)
    return peak


def measure_per_rank(model: Any, batch: Any, loss: Any = None, *, world_size: int = 2,
                     strategy: str = "ddp", optimizer: Any = "adamw", lr: float = 1e-3,
                     timeout: float = 300.0, repeats: int = 1) -> list:
    """Measured peak bytes of every rank of one DDP/FSDP2 training step on ``world_size`` local
    gloo ranks (CPU), each holding ``batch`` (the per-rank batch). The model, batch and loss
    must pickle. Used to validate ``per_rank`` (benchmarks/distributed_memory.py).

    A buffer whose last reference a gloo worker thread drops (an all-gather output, say) is
    freed on that thread, where the profiler records no event: the buffer then looks alive to
    the end of the step. Which thread drops it is a race, so a run's peak can only come out
    too high, never too low; with ``repeats`` > 1 the step is run that many times and each
    rank's lowest peak is returned.

    >>> import torch
    >>> peaks = measure_per_rank(torch.nn.Linear(64, 64), torch.ones(8, 64), world_size=2)
    >>> len(peaks), all(p > 4 * 64 * 64 for p in peaks)
    (2, True)
    """
    import tempfile
    import threading

    from ..isolate import run_isolated

    world_size, strategy = check_distributed(world_size, strategy)
    if repeats > 1:
        runs = [measure_per_rank(model, batch, loss, world_size=world_size, strategy=strategy,
                                 optimizer=optimizer, lr=lr, timeout=timeout)
                for _ in range(repeats)]
        return [min(run[r] for run in runs) for r in range(world_size)]
    peaks: list = [None] * world_size
    errors: list = []
    with tempfile.TemporaryDirectory(prefix="modelcheck-mem-") as tmp:
        store = f"{tmp}/store"

        def rank(r: int) -> None:
            try:
                peaks[r] = run_isolated(_rank_peak, r, world_size, store, strategy, model, batch,
                                        loss, optimizer, lr, timeout=timeout,
                                        what=f"{strategy} rank {r}")
            except Exception as exc:  # noqa: BLE001 - reported once all ranks are done
                errors.append(f"rank {r}: {exc}")

        threads = [threading.Thread(target=rank, args=(r,), daemon=True)
                   for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError("; ".join(sorted(errors)))
    return peaks
