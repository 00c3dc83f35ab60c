"""``modelcheck inspect``, ``compare`` and ``merge``: each returns an :class:`.Outcome` (its
JSON data and the failures that make it exit 1)."""
from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from ..core.errors import first_line
from .common import (CliError, Outcome, batch_factory, batch_hint, build_model, call_make_batch,
                     load_config, mismatch_line, section, warn_unsafe)


def cmd_inspect(args: argparse.Namespace) -> Outcome:
    """A checkpoint alone, or a model: configuration, checkpoint check (a mismatch fails),
    parameters, forward flow and memory estimate."""
    from ..core.checkpoint import inspect_checkpoint
    from ..core.inspect import inspect_model

    ranks = _distributed(args)  # before any work: a mistake costs nothing
    if args.model is None:
        if not args.target:
            raise CliError("inspect: give --model package.module:factory or a checkpoint file")
        warn_unsafe(args, args.target)
        ckinfo = inspect_checkpoint(args.target, allow_unsafe=args.allow_unsafe)
        print(ckinfo.render(verbose=args.verbose))
        return Outcome({"checkpoint": ckinfo.to_dict()})
    config = load_config(args.config)
    ckpt = args.checkpoint or args.target
    warn_unsafe(args, ckpt)
    model = build_model(args.model, config)
    out: dict = {"config": config}
    failures = []
    print(section(f"Model: {type(model).__name__}  ({args.model})"))
    if config:
        print(section("Configuration"))
        width = max(len(k) for k in config)
        for k, v in config.items():
            print(f"  {k:<{width}}  {v}")
    if ckpt:
        cinfo = inspect_checkpoint(ckpt, model=model, allow_unsafe=args.allow_unsafe)
        print(section(f"Checkpoint: {ckpt}"))
        print(cinfo.render(verbose=args.verbose))
        out["checkpoint"] = cinfo.to_dict()
        if cinfo.matches_model is False:
            failures.append(mismatch_line(ckpt, cinfo))
    info = inspect_model(model)
    print(section("Parameters"))
    print(info.render(verbose=args.verbose))
    out["model"] = info.to_dict()
    found = batch_factory(args)
    if found is None:
        print("\n(no make_batch found next to the factory, so no forward flow and no memory"
              f" estimate: {batch_hint('inspect')})")
        return Outcome(out, failures)
    _flow_and_memory(args, model, found, ranks, out)
    return Outcome(out, failures)


def _flow_and_memory(args: argparse.Namespace, model: Any, found: tuple, ranks: dict,
                     out: dict) -> None:
    from ..core.batch import Batch
    from ..core.memory import estimate_memory
    from ..core.trace import trace_batch

    make_batch, where = found
    batch = Batch.from_user(call_make_batch(make_batch, args.batch_size, where), model=model)
    print(section(f"Forward flow (batch size {args.batch_size}; * = shape changes)"))
    trace = trace_batch(model.eval(), batch)
    print(trace.render(max_lines=400 if args.verbose else 60))
    if trace.error:  # the model did not take the batch: the memory estimate cannot run either
        raise CliError(f"inspect: the model raised on the batch from {where} at batch size"
                       f" {args.batch_size} ({first_line(trace.error, limit=200)});"
                       f" {batch_hint('inspect')}")
    out["flow"] = trace.to_dict()
    print(section(f"Memory estimate, training step at batch size {args.batch_size}"))
    out["memory"] = {}
    for amp in (None, "bf16"):
        try:
            est = estimate_memory(model, batch, phase="train", amp=amp, **ranks)
        except Exception as exc:  # noqa: BLE001 - an estimate that cannot run is reported
            print(f"  {'fp32' if amp is None else amp}: not available ({type(exc).__name__}: {exc})")
            continue
        print(f"-- {'fp32' if amp is None else 'bf16 autocast'}")
        print(est.render())
        out["memory"]["fp32" if amp is None else amp] = est.to_dict()


def _distributed(args: argparse.Namespace) -> dict:
    """``world_size``/``strategy`` for the estimate when ``--world-size`` was given."""
    if args.world_size is None:
        return {}
    if args.world_size < 1:
        raise CliError(f"--world-size {args.world_size}: expected a positive integer")
    return {"world_size": args.world_size, "strategy": args.strategy}


def parse_fraction(text: Optional[str], option: str = "--fail-over") -> Optional[float]:
    """A non-negative threshold: a number (``0.05``) or a percentage (``5%``).

    >>> parse_fraction("0.05"), parse_fraction("5%"), parse_fraction(None)
    (0.05, 0.05, None)
    """
    if text is None:
        return None
    try:
        value = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
        if not value >= 0 or value == float("inf"):
            raise ValueError
    except ValueError:
        raise CliError(f"{option} {text!r}: expected a non-negative relative change such as"
                       " 0.05 or 5%") from None
    return value


def cmd_compare(args: argparse.Namespace) -> Outcome:
    """Drift between two checkpoints; keys or shapes that differ, or drift over
    ``--fail-over``, fail."""
    from ..core.checkpoint import compare_checkpoints

    threshold = parse_fraction(args.fail_over)
    if args.top < 1:
        raise CliError(f"--top {args.top}: expected a positive integer")
    warn_unsafe(args, args.a, args.b)
    report = compare_checkpoints(args.a, args.b, allow_unsafe=args.allow_unsafe)
    print(report.render(top=max(len(report.tensors), 1) if args.verbose else args.top))
    failures = []
    if not report.matches:
        failures.append(f"the checkpoints do not hold the same tensors: {len(report.only_in_a)}"
                        f" only in {args.a}, {len(report.only_in_b)} only in {args.b},"
                        f" {len(report.shape_mismatches)} with another shape")
    if threshold is not None:
        over = report.drift_over(threshold)
        if over:
            shown = ", ".join(f"{t.name} {t.change:.4g} ({t.measure})" for t in over[:5])
            more = f" and {len(over) - 5} more" if len(over) > 5 else ""
            failures.append(f"--fail-over {args.fail_over}: {len(over)} tensor(s) moved more:"
                            f" {shown}{more}")
        else:
            print(f"\nNo tensor moved more than --fail-over {args.fail_over} (relative change;"
                  " absolute where the old norm is zero)")
    return Outcome(report.to_dict(), failures)


def cmd_merge(args: argparse.Namespace) -> Outcome:
    """One report (and one baseline) from the ``--modelcheck-json`` reports (and the baselines)
    of a suite's shards; a test that two shards hold differently is refused, named; a failed
    check in the merged report fails the command."""
    from ..core.baseline import Baseline
    from ..core.files import atomic_write_text
    from ..report.json_report import failed_checks
    from ..report.merge import merge_reports

    if not args.reports and not args.baseline:
        raise CliError("merge: expected shard reports (--modelcheck-json files) and/or"
                       " --baseline files to merge")
    docs = [_read_json(path, "report") for path in args.reports]
    merged = merge_reports(docs, args.reports) if docs else {}
    failures = []
    if docs:
        s = merged["summary"]
        expected = s.get("expected_failed_checks")
        print(f"merged {len(docs)} reports: {s['tests']} tests, {s['checks']} checks,"
              f" {s['failed_checks']} failed"
              + (f" ({expected} more in tests expected to fail)" if expected else ""))
        failed = failed_checks(merged.get("tests", []))
        if s["failed_checks"]:
            failures.append(f"{s['failed_checks']} failed check(s) in the merged report: "
                            + ", ".join(failed[:5]) + (" ..." if len(failed) > 5 else ""))
    if args.baseline:
        from ..core.shards import merge_baselines

        if not args.baseline_out:
            raise CliError("merge: --baseline given without --baseline-out; expected the file to"
                           " write the merged baseline to")
        base = merge_baselines([Baseline.load(path) for path in args.baseline], args.baseline)
        atomic_write_text(args.baseline_out, json.dumps(base.to_dict(), indent=1, sort_keys=True,
                                                        allow_nan=False) + "\n")
        tests = sum(len(t) for t in base.entries.values())
        print(f"merged {len(args.baseline)} baselines: {tests} tests on {len(base.machines)}"
              f" machine(s), written to {args.baseline_out}")
    return Outcome(merged, failures)


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise CliError(f"merge: {path}: cannot read the {what} ({exc.strerror})") from None
    except ValueError as exc:
        raise CliError(f"merge: {path}: not a JSON {what} ({exc})") from None
