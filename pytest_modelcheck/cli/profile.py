"""``modelcheck profile``: latency (mean, p50/p90/p99), throughput, FLOPs, FLOP/s and memory per
batch size; ``--memory-budget`` reports the largest batch size whose training step fits."""
from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from ..core.errors import ModelError, UsageError, first_line
from .common import (CliError, Outcome, batch_factory, batch_hint, build_model, call_make_batch,
                     device_arg, load_config, mismatch_line, section, warn_unsafe)


def parse_sizes(args: argparse.Namespace) -> tuple:
    """The batch sizes from ``--batch-sizes 1,2,4`` or ``--batch-size N`` (not both).

    >>> parse_sizes(argparse.Namespace(batch_sizes="1,2,4", batch_size=None))
    (1, 2, 4)
    >>> parse_sizes(argparse.Namespace(batch_sizes=None, batch_size=8))
    (8,)
    """
    if args.batch_size is not None:
        if args.batch_sizes is not None:
            raise CliError(f"--batch-size {args.batch_size} and --batch-sizes {args.batch_sizes}:"
                           " give one of them (--batch-sizes 1,2,4 profiles several)")
        return (args.batch_size,)
    text = args.batch_sizes if args.batch_sizes is not None else "1,2,4,8,16"
    try:
        sizes = tuple(int(s) for s in text.split(","))
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        raise CliError(f"--batch-sizes {text!r}: expected positive integers such as"
                       " 1,2,4,8") from None
    return sizes


def parse_budget(text: Optional[str]) -> Optional[int]:
    """``--memory-budget`` in bytes (``8GiB``, ``512 MB``, a number of bytes).

    >>> parse_budget("8GiB"), parse_budget(None)
    (8589934592, None)
    """
    if text is None:
        return None
    from ..core.units import parse_bytes

    try:
        budget = parse_bytes(text)
    except (UsageError, ValueError):
        budget = 0
    if budget <= 0:
        raise CliError(f"--memory-budget {text!r}: expected a size such as 8GiB or 512MB")
    return budget


def load_weights(model: Any, path: str, allow_unsafe: bool) -> Optional[str]:
    """Load the checkpoint at ``path`` into ``model``; the mismatch line (and nothing loaded)
    when its keys or shapes do not fit the model, else None."""
    from ..core.checkpoint import inspect_checkpoint, load_state_dict

    info = inspect_checkpoint(path, model=model, allow_unsafe=allow_unsafe)
    if info.matches_model is False:
        print(section(f"Checkpoint: {path}"))
        print(info.render())
        return mismatch_line(path, info)
    state = load_state_dict(path, allow_unsafe=allow_unsafe)
    prefix = info.stripped_prefix
    model.load_state_dict({k[len(prefix):] if prefix else k: v for k, v in state.items()})
    print(f"weights loaded from {path}")
    return None


def cmd_profile(args: argparse.Namespace) -> Outcome:
    """Profile the model per batch size; a checkpoint that does not fit the model, or a
    ``--memory-budget`` that no profiled batch size fits, fails."""
    from ..core.profiler import profile_model

    sizes = parse_sizes(args)
    budget = parse_budget(args.memory_budget)
    device_arg(args.device)
    warn_unsafe(args, args.checkpoint)
    model = build_model(args.model, load_config(args.config))
    if args.checkpoint:
        failure = load_weights(model, args.checkpoint, args.allow_unsafe)
        if failure:
            return Outcome({"checkpoint": args.checkpoint}, [failure])
    found = batch_factory(args)
    if found is None:
        raise CliError(f"profile: no make_batch next to the factory; {batch_hint('profile')}")
    make_batch, where = found
    call_make_batch(make_batch, sizes[0], where)  # a factory that fails, before the long sweep
    try:
        report = profile_model(model, make_batch, batch_sizes=sizes, device=args.device,
                               warmup=args.warmup, runs=args.runs, memory_budget=budget,
                               progress=True)
    except UsageError:
        raise
    except ModelError as exc:  # the model did not take the batch
        cause = exc.original or exc
        raise CliError(f"profile: the model raised on the batch from {where}"
                       f" ({type(cause).__name__}: {first_line(cause, or_type=True, limit=200)});"
                       f" {batch_hint('profile')}") from None
    except Exception as exc:  # noqa: BLE001 - the model or the device failed in the sweep
        raise CliError(f"profile: {type(exc).__name__}: {first_line(exc, or_type=True, limit=200)}") from None
    print(report.render())
    if args.verbose:
        _details(report.batch_profiling)
    failures = []
    if budget is not None:
        line, fits = _budget_line(report, args.memory_budget)
        print(line)
        if not fits:
            failures.append(line)
    return Outcome(json.loads(report.to_json()), failures)


def _budget_line(report: Any, text: str) -> tuple:
    """The ``--memory-budget`` verdict: (line, whether a profiled batch size fits)."""
    rec = next(r for r in report.recommendations if r["kind"] == "largest_fitting")
    if rec["batch_size"] is None:
        return (f"--memory-budget {text}: no profiled batch size fits ({rec['reason']}); try"
                " smaller --batch-sizes, e.g. --batch-sizes 1,2"), False
    line = f"Largest batch size that fits --memory-budget {text}: {rec['batch_size']} ({rec['reason']})"
    profiled = [r["batch_size"] for r in report.batch_profiling]
    if rec["batch_size"] == max(profiled) and report.stopped is None:
        line += (f"; it is the largest profiled, so a larger one may fit too: profile larger"
                 f" sizes, e.g. --batch-sizes {max(profiled)},{2 * max(profiled)},{4 * max(profiled)}")
    return line, True


def _details(rows: list) -> None:
    """``--verbose``: latency min/max, memory method, activations and the training-step peak."""
    from ..core.units import format_bytes

    print(section("Details per batch size"))
    for r in rows:
        lat = r["latency_ms"]
        train = r.get("train_peak_bytes")
        print(f"  batch {r['batch_size']}: input {r['input_shape']}, {r['runs']} runs, latency"
              f" min {lat['min']:.2f} / max {lat['max']:.2f} ms, activations"
              f" {format_bytes(r['activation_bytes'])}, memory {r['memory_method']}"
              + (f", training step {format_bytes(train)}" if train is not None else ""))
