"""no_host_sync and vectorized: what the dispatcher sees (host-device syncs, op counts)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..core.errors import UsageError, describe_error
from ..core.result import CheckResult
from ..core.units import is_int
from .registry import SkipCheck, check
from .subject import Subject

SYNC_REMEDY = ("remedy: keep values on the device: replace .item()/float()/bool(tensor)/"
               "`if tensor:` with tensor ops (torch.where, clamp, multiplying by a mask), take sizes"
               " from shapes or the batch, use masked_fill/torch.where or nonzero_static instead of"
               " boolean-mask indexing; if a sync is intended, raise allow=")
LOOP_REMEDY = ("remedy: replace the Python loop over samples with batched tensor ops (index_add,"
               " scatter, gather, torch.vmap, padding plus a mask); if the growth is intended,"
               " raise tolerance=")


def _validate_sync(allow: Any = 0, strict: Any = False) -> dict:
    from ..core.dispatch import parse_sync_pattern

    expected = ("expected an int >= 0 (the number of host-device syncs tolerated), a pattern"
                " naming known syncs such as 'transformers/masking_utils.py' or 'my_pkg.mod:func',"
                " or a list of patterns with at most one int")
    items = list(allow) if isinstance(allow, (list, tuple)) else [allow]
    counts = [a for a in items if is_int(a)]
    patterns = tuple(a for a in items if isinstance(a, str))
    if (len(counts) + len(patterns) != len(items) or len(counts) > 1
            or any(c < 0 for c in counts) or not items):
        raise UsageError(f"allow={allow!r}: {expected}")
    for p in patterns:
        try:
            parse_sync_pattern(p)
        except ValueError as exc:
            raise UsageError(f"allow={allow!r}: pattern {exc}; {expected}") from None
    if not isinstance(strict, bool):
        raise UsageError(f"strict={strict!r}: expected True (syncs inside installed packages such"
                         " as transformers count too) or False (they are reported, not counted)")
    return {"allow": allow, "strict": strict}


def _split_allow(allow: Any) -> tuple:
    """``(count, patterns)`` of a validated ``allow``."""
    items = list(allow) if isinstance(allow, (list, tuple)) else [allow]
    counts = [a for a in items if is_int(a)]
    return (counts[0] if counts else 0), tuple(a for a in items if isinstance(a, str))


def _validate_vectorized(batch_sizes: Any = (4, 8), tolerance: Any = 0) -> dict:
    if (not isinstance(batch_sizes, (list, tuple)) or len(batch_sizes) < 2
            or not all(is_int(n) and n >= 1 for n in batch_sizes)
            or any(b <= a for a, b in zip(batch_sizes, batch_sizes[1:]))):
        raise UsageError(f"batch_sizes={batch_sizes!r}: expected two or more increasing ints >= 1,"
                         " such as (4, 8)")
    if not is_int(tolerance) or tolerance < 0:
        raise UsageError(f"tolerance={tolerance!r}: expected an int >= 0, the number of extra"
                         " ops tolerated")
    return {"batch_sizes": tuple(batch_sizes), "tolerance": tolerance}


def _counted(model: Any, data: Any, replay: Any, **kwargs: Any) -> Any:
    """``count_ops(model, data, **kwargs)``; when it raises, ``replay()`` runs the same work with
    no dispatch mode: a model that fails there too fails the check (ModelError), otherwise the
    mode is at fault and the check is skipped."""
    from ..core.dispatch import count_ops

    try:
        return count_ops(model, data, **kwargs)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - replayed below to tell model from mode
        replay()
        raise SkipCheck(f"the model cannot run under a TorchDispatchMode ({describe_error(exc)}), which"
                        " this check needs to see every op") from None


def _short(source: str) -> str:
    return os.path.basename(source) if source else "an unknown line"


@dataclass
class _Syncs:
    """The syncs a run saw, sorted: ``accepted`` by an ``allow`` pattern, ``counted`` against the
    limit, ``informed`` (inside installed packages, reported only) and all ``packaged`` ones."""

    accepted: list
    counted: list
    informed: list
    packaged: list

    @classmethod
    def sort(cls, syncs: list, patterns: tuple, strict: bool) -> "_Syncs":
        from ..core.dispatch import sync_matches

        accepted = [s for s in syncs if any(sync_matches(p, s) for p in patterns)]
        rest = [s for s in syncs if not any(s is a for a in accepted)]
        packaged = [s for s in rest if s.origin == "package"]
        counted = rest if strict else [s for s in rest if s.origin != "package"]
        return cls(accepted, counted, [] if strict else packaged, packaged)


def _sync_metrics(syncs: _Syncs, counts: Any, strict: bool) -> dict:
    by_op: dict = {}
    by_source: dict = {}
    for s in syncs.counted:
        by_op[s.op] = by_op.get(s.op, 0) + 1
        key = s.source or f"<{s.phase}>"
        by_source[key] = by_source.get(key, 0) + 1
    packages: dict = {}
    for s in syncs.packaged:
        packages[s.package] = packages.get(s.package, 0) + 1
    return {"count": len(syncs.counted), "by_op": by_op, "by_source": by_source,
            "ops": counts.total, "all_syncs": len(counts.syncs), "package_syncs": packages,
            "accepted": len(syncs.accepted), "strict": strict}


def _sync_details(syncs: _Syncs, groups: list, patterns: tuple) -> list:
    details = []
    if groups:
        details.append("host-device syncs (op, user line, phase):")
        details += [f"  {op:45} x{cnt:<5} {_place(s)}  [{s.phase}]" for s, op, cnt in groups[:20]]
        if len(groups) > 20:
            details.append(f"  ... and {len(groups) - 20} more places")
    if syncs.informed:
        details.append(f"information: {len(syncs.informed)} syncs inside installed packages, not"
                       " counted (the model's code cannot change them; strict=True counts them,"
                       " allow=['<file or module>'] accepts them):")
        details += [f"  {op:45} x{cnt:<5} {_place(s)}  [{s.phase}]"
                    for s, op, cnt in _groups(syncs.informed)[:10]]
    if syncs.accepted:
        details.append(f"accepted by allow={list(patterns)!r}: {len(syncs.accepted)} syncs")
        details += [f"  {op:45} x{cnt:<5} {_place(s)}  [{s.phase}]"
                    for s, op, cnt in _groups(syncs.accepted)[:10]]
    return details


def _worst_place(groups: list, n: int) -> str:
    """The most frequent sync, its count and file, and how many more elsewhere."""
    first, op, cnt = groups[0]
    src = first.source if first.origin != "package" else f"{first.source} ({first.package})"
    where = f"{op} x{cnt} from {_short(src)}"
    if len(groups) > 1:
        where += f", and {n - cnt} more at {len(groups) - 1} other places"
    return where


@check(default=True, validate=_validate_sync)
def no_host_sync(allow: Any = 0, strict: Any = False, *, subject: Subject) -> CheckResult:
    """Forward and backward cause no host-device synchronization (.item(), bool(tensor), nonzero, boolean masks).

    Runs forward, the loss and backward on a copy in train mode under a dispatch mode that sees
    every aten op; works on a CPU-only runner (the same ops are dispatched as on CUDA).
    Each sync is attributed to the nearest frame outside torch and the standard library: the
    user's code counts; a sync inside an installed third-party package (site-packages, such as
    transformers' mask helpers) is reported with its package, file and line but not counted,
    because the user cannot change it, unless ``strict=True``. ``allow`` is the number of syncs
    tolerated, or patterns naming known syncs (``'transformers/masking_utils.py'``,
    ``'models/net.py:42'``, ``'my_pkg.mod:func'``), or a list of patterns with one int.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> no_host_sync(model=m, batch=(torch.randn(2, 4), torch.tensor([0, 2]))).passed
    True
    """
    import torch

    from ..core.forward import run_forward
    from ..core.losses import resolve_loss

    limit, patterns = _split_allow(allow)
    work, data = subject.model_copy("train"), subject.batch_copy()

    def replay() -> None:
        again, fresh = subject.model_copy("train"), subject.batch_copy()
        out = run_forward(again, fresh)
        total, _ = resolve_loss(subject.loss, fresh, out).compute(out, fresh, again)
        if isinstance(total, torch.Tensor) and total.requires_grad:
            total.backward()

    counts = _counted(work, data, replay, backward=True, loss=subject.loss)
    syncs = _Syncs.sort(counts.syncs, patterns, strict)
    groups = _groups(syncs.counted)
    n = len(syncs.counted)
    metrics = _sync_metrics(syncs, counts, strict)
    details = _sync_details(syncs, groups, patterns)
    inputs: list = getattr(data, "input_tensors", lambda: [])()
    if torch.cuda.is_available() and any(t.device.type == "cuda" for _, t in inputs):
        warned = _cuda_sync_warnings(replay)
        metrics["cuda_sync_warnings"] = warned
        details.append(f"torch.cuda.set_sync_debug_mode('warn') reported {warned} syncs"
                       f" (the dispatch mode found {len(counts.syncs)})")

    expected = f"expected at most {limit} host-device syncs in forward+backward"
    if strict:
        expected += " (strict: installed packages' too)"
    aside = ""
    if syncs.informed:
        names = ", ".join(sorted({s.package.split(' ')[0] for s in syncs.informed}))
        aside = f"; {len(syncs.informed)} more inside installed packages ({names}), not counted"
    if n > limit:
        details.append(SYNC_REMEDY)
        return subject.failed(f"{expected}, observed {n} ({_worst_place(groups, n)}){aside}",
                              details, metrics)
    return subject.passed(f"{expected}, observed {n} in {counts.total} dispatched ops{aside}",
                          details, metrics)


def _groups(syncs: list) -> list:
    """``[(first sync, op, count), ...]`` per distinct (op, source, phase), most frequent first."""
    firsts: dict = {}
    n: dict = {}
    for s in syncs:
        key = (s.op, s.source, s.phase)
        firsts.setdefault(key, s)
        n[key] = n.get(key, 0) + 1
    return [(firsts[k], k[0], c) for k, c in sorted(n.items(), key=lambda kv: (-kv[1], kv[0]))]


def _place(s: Any) -> str:
    """Where a sync happened, for the details: the user's line, or package, file, line, caller."""
    if s.origin == "package":
        via = f", called from {s.caller}" if s.caller else ""
        return f"{s.package}: {s.source}{via}"
    return s.source or "(no user line: inside autograd)"


def _cuda_sync_warnings(replay: Any) -> int:
    """Syncs reported by CUDA's own sync debug mode over ``replay()`` (CUDA machines only)."""
    import warnings

    import torch

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.cuda.set_sync_debug_mode("warn")
            replay()
            torch.cuda.set_sync_debug_mode(previous)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def _depth(path: str) -> int:
    return -1 if path.startswith("<") else path.count(".")


def _same_text(tolerance: int) -> str:
    return "the same number of" if tolerance == 0 else f"at most {tolerance} more"


def _growth_result(subject: Subject, counts: dict, a: int, b: int, tolerance: int,
                   metrics: dict) -> CheckResult:
    """The failure for op counts that grew from batch size ``a`` to ``b``: where they grew."""
    small, large = counts[a], counts[b]
    growth = large.forward - small.forward
    grown = {p: large.by_module.get(p, 0) - small.by_module.get(p, 0)
             for p in set(large.by_module) | set(small.by_module)}
    grown = {p: g for p, g in grown.items() if g > 0}
    top = max(grown.values()) if grown else 0
    culprit = max((p for p, g in grown.items() if g == top), key=_depth, default="")
    metrics.update({"growth": growth, "grew_module": culprit,
                    "ops_per_extra_sample": round(growth / (b - a), 2)})
    where = f"; grew in module '{culprit}' (+{top})" if culprit else ""
    headline = (f"expected {_same_text(tolerance)} ops at batch sizes {a} and {b}, observed"
                f" {small.forward} -> {large.forward} (+{growth}){where}")
    details = [f"ops per module at batch size {a} -> {b} (modules that grew):"]
    for p in sorted(grown, key=lambda p: (-grown[p], -_depth(p), p))[:12]:
        details.append(f"  {p:40} {small.by_module.get(p, 0):>7} -> {large.by_module.get(p, 0):<7}"
                       f" (+{grown[p]})")
    op_growth = {op: large.by_op.get(op, 0) - small.by_op.get(op, 0) for op in large.by_op}
    details.append("ops that grew most:")
    details += [f"  {op:40} {small.by_op.get(op, 0):>7} -> {large.by_op[op]:<7} (+{g})"
                for op, g in sorted(op_growth.items(), key=lambda kv: (-kv[1], kv[0]))[:8] if g > 0]
    details.append(LOOP_REMEDY)
    return subject.failed(headline, details, metrics)


@check(default=True, validate=_validate_vectorized)
def vectorized(batch_sizes: Any = (4, 8), tolerance: Any = 0, *, subject: Subject) -> CheckResult:
    """The number of dispatched ops does not grow with the batch size (no Python loop over samples).

    Counts the forward's aten ops (eval mode, no_grad, on a copy) at each of ``batch_sizes``
    (``batch.resized(n)``: a make_batch(n) factory is called, other batches are sliced or tiled);
    fails when a larger size dispatches more than ``tolerance`` ops more than the smaller one.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> vectorized(model=m, batch=torch.randn(2, 4)).passed
    True
    """
    import torch

    from ..core.forward import run_forward

    work = subject.model_copy("eval")
    counts = {}
    for n in batch_sizes:
        data = subject.batch.resized(n).to(subject.device)

        def replay(data: Any = data) -> None:
            with torch.no_grad():
                run_forward(subject.model_copy("eval"), data.clone())

        with torch.no_grad():
            counts[n] = _counted(work, data.clone(), replay)
    totals = {n: c.forward for n, c in counts.items()}
    metrics: dict[str, Any] = {"ops_by_batch_size": {str(n): t for n, t in totals.items()}}
    pairs = list(zip(batch_sizes, batch_sizes[1:]))
    bad = next(((a, b) for a, b in pairs if totals[b] - totals[a] > tolerance), None)
    if bad is not None:
        return _growth_result(subject, counts, bad[0], bad[1], tolerance, metrics)
    return subject.passed(f"expected {_same_text(tolerance)} ops at batch sizes"
                          f" {_sizes(batch_sizes)}, observed "
                          + " -> ".join(str(totals[n]) for n in batch_sizes), "", metrics)


def _sizes(sizes: tuple) -> str:
    return " and ".join(str(n) for n in sizes) if len(sizes) == 2 else \
        ", ".join(str(n) for n in sizes[:-1]) + f" and {sizes[-1]}"
