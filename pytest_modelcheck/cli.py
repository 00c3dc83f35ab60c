"""The ``modelcheck`` command: ``inspect``, ``profile``, ``compare`` and ``merge`` on top of the library.

    modelcheck inspect --model example_models.vit3d:build_model [--config cfg.yaml|json]
                       [--checkpoint ckpt.pt] [--batch-size N] [--verbose] [--json out.json]
    modelcheck inspect ckpt.pt                 # the checkpoint alone
    modelcheck profile --model pkg.mod:factory [--batch-sizes 1,2,4,8] [--json out.json]
    modelcheck compare a.pt b.pt
    modelcheck merge shard*/report.json --json report.json \\
                     --baseline shard1/baseline.json --baseline shard2/baseline.json \\
                     --baseline-out .modelcheck/baseline.json

User mistakes (unknown factory, bad config, unreadable file) print one line saying what to fix
and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import inspect as pyinspect
import json
import os
import sys
from typing import Any, Callable, Optional

from .core.errors import UsageError, first_line


class CliError(UsageError):
    """A one-line command-line mistake."""


def load_object(spec: str, what: str = "--model") -> Any:
    """Import ``package.module:attribute`` (the current directory is importable).

    >>> load_object("os.path:join")("a", "b")
    'a/b'
    """
    if ":" not in spec:
        raise CliError(f"{what} {spec!r}: expected 'package.module:factory', e.g."
                       " example_models.vit3d:build_model")
    module_name, attr = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not module_name or module_name.startswith(".") or not attr:
        raise CliError(f"{what} {spec!r}: expected an absolute 'package.module:factory', e.g."
                       " example_models.vit3d:build_model")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"{what} {spec!r}: cannot import {module_name!r} ({exc}); run from the"
                       " directory that contains the package or install it") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise CliError(f"{what} {spec!r}: importing {module_name!r} raised"
                       f" {type(exc).__name__}: {first_line(exc, or_type=True, limit=200)}") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise CliError(f"{what} {spec!r}: {module_name} has no {attr!r}; callables there:"
                       f" {', '.join(names[:12])}") from None
    return obj


def load_config(path: Optional[str]) -> dict:
    """A dict of factory keyword arguments from a JSON or YAML file (``{}`` without a path)."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise CliError(f"--config {path}: not a text file (expected UTF-8 JSON or YAML)") from None
    except OSError as exc:
        raise CliError(f"--config {path}: cannot read it ({exc.strerror})") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        first = first_line(exc, or_type=True, limit=200)
        raise CliError(f"--config {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}"
                       f" ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"--config {path}: expected a mapping of factory arguments, got"
                       f" {type(data).__name__}")
    return data.get("model", data) if isinstance(data.get("model"), dict) else data


def build_model(spec: str, config: dict) -> Any:
    """Call the factory named by ``spec`` with the config's keyword arguments."""
    factory = load_object(spec)
    if not callable(factory):
        raise CliError(f"--model {spec!r}: not callable")
    try:
        params = pyinspect.signature(factory).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in config if k not in params and not accepts_any]
    except (TypeError, ValueError):
        unknown = []
    if unknown:
        raise CliError(f"--config: {spec} takes no argument {unknown[0]!r}; it takes"
                       f" {', '.join(params) or 'no arguments'}")
    try:
        return factory(**config)
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        raise CliError(f"--model {spec}: the factory raised {type(exc).__name__}: {exc}") from None


def _batch_factory(args: argparse.Namespace) -> Optional[Callable[[int], Any]]:
    if args.batch:
        return load_object(args.batch, "--batch")
    module = importlib.import_module(args.model.split(":", 1)[0])
    return getattr(module, "make_batch", None)


def _section(title: str) -> str:
    return f"\n{title}\n{'=' * len(title)}"


def cmd_inspect(args: argparse.Namespace) -> dict:
    from .core.checkpoint import inspect_checkpoint
    from .core.inspect import inspect_model

    out: dict = {}
    ranks = _distributed(args)  # before any work: a mistake costs nothing
    if args.model is None:
        if not args.target:
            raise CliError("inspect: give --model package.module:factory or a checkpoint file")
        ckinfo = inspect_checkpoint(args.target)
        print(ckinfo.render())
        return {"checkpoint": ckinfo.to_dict()}
    config = load_config(args.config)
    model = build_model(args.model, config)
    print(_section(f"Model: {type(model).__name__}  ({args.model})"))
    if config:
        print(_section("Configuration"))
        width = max(len(k) for k in config)
        for k, v in config.items():
            print(f"  {k:<{width}}  {v}")
    out["config"] = config
    ckpt = args.checkpoint or args.target
    if ckpt:
        cinfo = inspect_checkpoint(ckpt, model=model)
        print(_section(f"Checkpoint: {ckpt}"))
        print(cinfo.render())
        out["checkpoint"] = cinfo.to_dict()
    info = inspect_model(model)
    print(_section("Parameters"))
    print(info.render(verbose=args.verbose))
    out["model"] = info.to_dict()
    make_batch = _batch_factory(args)
    if make_batch is None:
        print("\n(no make_batch found next to the factory: pass --batch package.module:make_batch"
              " for the forward flow and the memory estimate)")
        return out
    from .core.batch import Batch
    from .core.trace import trace_batch

    batch = Batch.from_user(_call_make_batch(make_batch, args.batch_size), model=model)
    import torch

    print(_section(f"Forward flow (batch size {args.batch_size}; * = shape changes)"))
    trace = trace_batch(model.eval(), batch)
    print(trace.render(max_lines=400 if args.verbose else 60))
    out["flow"] = trace.to_dict()
    from .core.memory import estimate_memory

    print(_section(f"Memory estimate, training step at batch size {args.batch_size}"))
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
    del torch
    return out


def _distributed(args: argparse.Namespace) -> dict:
    """``world_size``/``strategy`` for the estimate when ``--world-size`` was given."""
    if args.world_size is None:
        return {}
    if args.world_size < 1:
        raise CliError(f"--world-size {args.world_size}: expected a positive integer")
    return {"world_size": args.world_size, "strategy": args.strategy}


def _call_make_batch(make_batch: Any, size: int) -> Any:
    try:
        return make_batch(size)
    except Exception as exc:  # noqa: BLE001 - the user's factory
        raise CliError(f"--batch: make_batch({size}) raised {type(exc).__name__}:"
                       f" {first_line(exc, or_type=True, limit=200)}") from None


def cmd_profile(args: argparse.Namespace) -> dict:
    from .core.profiler import profile_model

    model = build_model(args.model, load_config(args.config))
    make_batch = _batch_factory(args)
    if make_batch is None:
        raise CliError("profile: no make_batch next to the factory; pass --batch"
                       " package.module:make_batch")
    try:
        sizes = tuple(int(s) for s in args.batch_sizes.split(","))
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        raise CliError(f"--batch-sizes {args.batch_sizes!r}: expected positive integers such as"
                       " 1,2,4,8") from None
    if args.device:
        from .checks.registry import validate_device

        try:
            validate_device(args.device)
        except UsageError as exc:
            raise CliError(f"--device: {exc}") from None
    _call_make_batch(make_batch, sizes[0])  # a factory that fails, before the long sweep
    try:
        report = profile_model(model, make_batch, batch_sizes=sizes, device=args.device,
                               warmup=args.warmup, runs=args.runs, progress=True)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model or the device failed in the sweep
        raise CliError(f"profile: {type(exc).__name__}: {first_line(exc, or_type=True, limit=200)}") from None
    print(report.render())
    return json.loads(report.to_json())


def cmd_compare(args: argparse.Namespace) -> dict:
    from .core.checkpoint import compare_checkpoints

    report = compare_checkpoints(args.a, args.b)
    print(report.render())
    return report.to_dict()


def cmd_merge(args: argparse.Namespace) -> dict:
    """One report (and one baseline) from the ``--modelcheck-json`` reports (and the baselines)
    of a suite's shards; a test that two shards hold differently is refused, named."""
    from .core.baseline import Baseline
    from .core.files import atomic_write_text
    from .report.merge import merge_reports

    if not args.reports and not args.baseline:
        raise CliError("merge: expected shard reports (--modelcheck-json files) and/or"
                       " --baseline files to merge")
    docs = [_read_json(path, "report") for path in args.reports]
    merged = merge_reports(docs, args.reports) if docs else {}
    if docs:
        s = merged["summary"]
        print(f"merged {len(docs)} reports: {s['tests']} tests, {s['checks']} checks,"
              f" {s['failed_checks']} failed")
    if args.baseline:
        from .core.shards import merge_baselines

        if not args.baseline_out:
            raise CliError("merge: --baseline given without --baseline-out; expected the file to"
                           " write the merged baseline to")
        base = merge_baselines([Baseline.load(path) for path in args.baseline], args.baseline)
        atomic_write_text(args.baseline_out, json.dumps(base.to_dict(), indent=1, sort_keys=True,
                                                        allow_nan=False) + "\n")
        tests = sum(len(t) for t in base.entries.values())
        print(f"merged {len(args.baseline)} baselines: {tests} tests on {len(base.machines)}"
              f" machine(s), written to {args.baseline_out}")
    return merged


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise CliError(f"merge: {path}: cannot read the {what} ({exc.strerror})") from None
    except ValueError as exc:
        raise CliError(f"merge: {path}: not a JSON {what} ({exc})") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelcheck", description="Inspect, profile and compare"
                                " PyTorch models and checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="model summary, parameters, forward flow, memory; or a"
                         " checkpoint alone")
    ins.add_argument("target", nargs="?", help="a checkpoint file (.pt, .pth, .safetensors)")
    ins.add_argument("--model", help="factory as package.module:function")
    ins.add_argument("--config", help="YAML or JSON file of factory keyword arguments")
    ins.add_argument("--checkpoint", help="checkpoint to check against the model")
    ins.add_argument("--batch", help="batch factory package.module:make_batch (default: the"
                     " factory module's make_batch)")
    ins.add_argument("--batch-size", type=int, default=4)
    ins.add_argument("--verbose", action="store_true", help="every tensor and every module call")
    ins.add_argument("--world-size", type=int, default=None,
                     help="also estimate the per-rank memory of training on N ranks")
    ins.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                     help="with --world-size: DistributedDataParallel or FSDP2 (default ddp)")
    ins.add_argument("--json", help="also write everything to this JSON file")
    ins.set_defaults(run=cmd_inspect)
    pro = sub.add_parser("profile", help="latency, throughput, memory and FLOPs per batch size")
    pro.add_argument("--model", required=True)
    pro.add_argument("--config")
    pro.add_argument("--batch")
    pro.add_argument("--batch-sizes", default="1,2,4,8,16")
    pro.add_argument("--device", default=None)
    pro.add_argument("--warmup", type=int, default=10)
    pro.add_argument("--runs", type=int, default=50)
    pro.add_argument("--json")
    pro.set_defaults(run=cmd_profile)
    cmp_ = sub.add_parser("compare", help="how far two checkpoints drifted, tensor by tensor")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    cmp_.add_argument("--json")
    cmp_.set_defaults(run=cmd_compare)
    mer = sub.add_parser("merge", help="one report and one baseline from a sharded suite's"
                         " shards (refuses a test two shards hold differently)")
    mer.add_argument("reports", nargs="*", help="the shards' --modelcheck-json reports")
    mer.add_argument("--baseline", action="append", default=[],
                     help="a shard's baseline file (repeat for each shard)")
    mer.add_argument("--baseline-out", help="where to write the merged baseline")
    mer.add_argument("--json", help="where to write the merged report")
    mer.set_defaults(run=cmd_merge)
    return p


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``modelcheck`` console script; returns the exit status."""
    args = parser().parse_args(argv)
    if getattr(args, "batch_size", 1) is not None and getattr(args, "batch_size", 1) < 1:
        print(f"modelcheck: error: --batch-size {args.batch_size}: expected a positive integer",
              file=sys.stderr)
        return 2
    if getattr(args, "json", None) and os.path.isdir(args.json):
        print(f"modelcheck: error: --json {args.json}: is a directory; expected a file path such"
              f" as {os.path.join(args.json, 'report.json')}", file=sys.stderr)
        return 2
    try:
        data = args.run(args)
    except UsageError as exc:
        print(f"modelcheck: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        from .core.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(data, indent=2, default=str) + "\n")
        print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
