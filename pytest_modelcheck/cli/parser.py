"""The ``modelcheck`` argument parser: every option has a help text with an example, every
subcommand an epilog of examples and the exit statuses."""
from __future__ import annotations

import argparse
import textwrap

from .commands import cmd_compare, cmd_inspect, cmd_merge
from .profile import cmd_profile

EXIT_CODES = """exit status:
  0  success
  1  a gate failed: a checkpoint that does not match the model (missing, unexpected or
     shape-mismatched keys), a failed check, drift over --fail-over, no batch size within
     --memory-budget
  2  a usage mistake: a bad option, an unknown factory, an unreadable or refused file"""

_FORMAT = argparse.RawDescriptionHelpFormatter


def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


def _epilog(*examples: str) -> str:
    return "examples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n" + EXIT_CODES


def _model_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, metavar="PKG.MOD:FACTORY",
                   help="the model factory, called with the --config arguments, e.g."
                        " --model example_models.vit3d:build_model")
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON mapping of factory keyword arguments (or a 'model:'"
                        " mapping in it), e.g. --config configs/small.yaml")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="a checkpoint (.pt, .pth, .safetensors) checked against the model; a"
                        " mismatch exits 1, e.g. --checkpoint runs/best.pt")
    p.add_argument("--allow-unsafe", action="store_true",
                   help="load a checkpoint with torch.load(weights_only=False): it RUNS ANY"
                        " CODE the file contains, so only for a file you trust (a full-model"
                        " pickle, a file with custom classes); a warning is printed, e.g."
                        " --checkpoint mine.pt --allow-unsafe")
    p.add_argument("--batch", metavar="PKG.MOD:MAKE_BATCH",
                   help="batch factory called with the batch size (default: make_batch in the"
                        " factory's module), e.g. --batch mypkg.data:make_batch")
    p.add_argument("--input-shape", metavar="SHAPE",
                   help="instead of a batch factory, one random float input of batch x SHAPE,"
                        " e.g. --input-shape 3,224,224")
    p.add_argument("--verbose", action="store_true",
                   help="more detail: every tensor, every module call, per-size details, e.g."
                        " --verbose")
    p.add_argument("--json", metavar="FILE",
                   help="also write everything to this JSON file, e.g. --json out.json")


def _inspect(sub: argparse._SubParsersAction) -> None:
    ins = sub.add_parser(
        "inspect", formatter_class=_FORMAT,
        help="model summary, parameters, forward flow, memory; or a checkpoint alone",
        description=_wrap("Describe a model (configuration, parameters, forward flow, memory estimate"
                    " of a training step), optionally checked against a checkpoint; or describe"
                    " a checkpoint file alone."),
        epilog=_epilog(
            "modelcheck inspect --model example_models.vit3d:build_model --batch-size 4",
            "modelcheck inspect --model pkg.models:build --config cfg.yaml --checkpoint best.pt",
            "modelcheck inspect --model pkg.models:build --input-shape 3,224,224 --world-size 8"
            " --strategy fsdp",
            "modelcheck inspect checkpoints/best.pt",
            "modelcheck inspect full_model.pt --allow-unsafe     # a trusted full-model pickle"))
    ins.add_argument("target", nargs="?", metavar="CHECKPOINT",
                     help="a checkpoint file (.pt, .pth, .safetensors) to describe, alone or"
                          " with --model, e.g. modelcheck inspect best.pt")
    _model_options(ins, required=False)
    ins.add_argument("--batch-size", type=int, default=4, metavar="N",
                     help="batch size of the forward flow and the memory estimate (default 4),"
                          " e.g. --batch-size 2")
    ins.add_argument("--world-size", type=int, default=None, metavar="N",
                     help="also estimate the per-rank memory of training on N ranks, e.g."
                          " --world-size 8")
    ins.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                     help="with --world-size: DistributedDataParallel or FSDP2 (default ddp),"
                          " e.g. --strategy fsdp")
    ins.set_defaults(run=cmd_inspect)


def _profile(sub: argparse._SubParsersAction) -> None:
    pro = sub.add_parser(
        "profile", formatter_class=_FORMAT,
        help="latency (p50/p90/p99), throughput, FLOPs, FLOP/s and memory per batch size",
        description=_wrap("Time the model's forward (eval mode, no_grad) at each batch size: latency"
                    " mean ± std and p50/p90/p99, samples/s, FLOPs, achieved FLOP/s, peak"
                    " memory; recommendations (throughput knee; with --memory-budget the"
                    " largest batch size whose training step fits). Progress goes to stderr: a"
                    " bar on a terminal, one line per batch size otherwise."),
        epilog=_epilog(
            "modelcheck profile --model example_models.fno:build_model --batch-sizes 1,2,4,8",
            "modelcheck profile --model pkg.models:build --input-shape 3,224,224 --memory-budget"
            " 8GiB",
            "modelcheck profile --model pkg.models:build --checkpoint best.pt --device cuda"
            " --json profile.json",
            "modelcheck profile --model pkg.models:build --batch-size 32 --warmup 2 --runs 10"))
    _model_options(pro, required=True)
    pro.add_argument("--batch-sizes", default=None, metavar="N,N,...",
                     help="comma-separated batch sizes to profile (default 1,2,4,8,16), e.g."
                          " --batch-sizes 1,2,4,8")
    pro.add_argument("--batch-size", type=int, default=None, metavar="N",
                     help="profile this one batch size (instead of --batch-sizes), e.g."
                          " --batch-size 32")
    pro.add_argument("--memory-budget", metavar="SIZE",
                     help="report the largest profiled batch size whose training step"
                          " (gradients and optimizer state included) fits 80%% of SIZE; none"
                          " fitting exits 1, e.g. --memory-budget 8GiB")
    pro.add_argument("--device", default=None,
                     help="device to profile on (default: where the model is), e.g."
                          " --device cuda:0")
    pro.add_argument("--warmup", type=int, default=10, metavar="N",
                     help="untimed runs before timing (default 10), e.g. --warmup 3")
    pro.add_argument("--runs", type=int, default=50, metavar="N",
                     help="timed runs per batch size (default 50), e.g. --runs 20")
    pro.set_defaults(run=cmd_profile)


def _compare(sub: argparse._SubParsersAction) -> None:
    cmp_ = sub.add_parser(
        "compare", formatter_class=_FORMAT,
        help="how far two checkpoints drifted, tensor by tensor; --fail-over gates on it",
        description=_wrap("Per-tensor and per-layer drift from checkpoint A to B: relative change"
                    " ||b-a||/||a|| (the absolute change ||b-a|| where ||a|| is zero, e.g. a"
                    " zero-initialised bias; each row says which), cosine similarity, max"
                    " |b-a|. Counters and integer buffers (num_batches_tracked, masks) are"
                    " listed apart. Keys or shapes that differ exit 1."),
        epilog=_epilog(
            "modelcheck compare step1000.pt step5000.pt",
            "modelcheck compare base.safetensors tuned.safetensors --fail-over 0.05 --top 20",
            "modelcheck compare a.pt b.pt --fail-over 5% --json drift.json"))
    cmp_.add_argument("a", metavar="A", help="the earlier checkpoint, e.g. step1000.pt")
    cmp_.add_argument("b", metavar="B", help="the later checkpoint, e.g. step5000.pt")
    cmp_.add_argument("--fail-over", metavar="X",
                      help="exit 1 when a tensor's relative change (absolute where its old norm"
                           " is zero) exceeds X, a number or a percentage, e.g. --fail-over"
                           " 0.05 or --fail-over 5%%")
    cmp_.add_argument("--top", type=int, default=10, metavar="N",
                      help="tensors and layers shown per table (default 10), e.g. --top 20")
    cmp_.add_argument("--verbose", action="store_true",
                      help="show every tensor that moved, not only the top N, e.g. --verbose")
    cmp_.add_argument("--allow-unsafe", action="store_true",
                      help="load with torch.load(weights_only=False): it RUNS ANY CODE the"
                           " files contain, so only for files you trust; a warning is printed,"
                           " e.g. --allow-unsafe")
    cmp_.add_argument("--json", metavar="FILE",
                      help="also write the drift report to this JSON file, e.g. --json drift.json")
    cmp_.set_defaults(run=cmd_compare)


def _merge(sub: argparse._SubParsersAction) -> None:
    mer = sub.add_parser(
        "merge", formatter_class=_FORMAT,
        help="one report and one baseline from a sharded suite's shards (refuses a test two"
             " shards hold differently)",
        description=_wrap("Join the --modelcheck-json reports (and baselines) of a suite's shards into"
                    " what one unsharded run would have written. A failed check in the merged"
                    " report exits 1."),
        epilog=_epilog(
            "modelcheck merge shard-1/report.json shard-2/report.json --json report.json",
            "modelcheck merge --baseline s1/baseline.json --baseline s2/baseline.json"
            " --baseline-out .modelcheck/baseline.json"))
    mer.add_argument("reports", nargs="*", metavar="REPORT",
                     help="the shards' --modelcheck-json reports, e.g. shard*/report.json")
    mer.add_argument("--baseline", action="append", default=[], metavar="FILE",
                     help="a shard's baseline file (repeat for each shard), e.g. --baseline"
                          " s1/baseline.json")
    mer.add_argument("--baseline-out", metavar="FILE",
                     help="where to write the merged baseline, e.g. --baseline-out"
                          " .modelcheck/baseline.json")
    mer.add_argument("--json", metavar="FILE",
                     help="where to write the merged report, e.g. --json report.json")
    mer.set_defaults(run=cmd_merge)


def parser() -> argparse.ArgumentParser:
    """The ``modelcheck`` parser with its four subcommands.

    >>> sorted(parser()._subparsers._group_actions[0].choices)
    ['compare', 'inspect', 'merge', 'profile']
    """
    p = argparse.ArgumentParser(
        prog="modelcheck", formatter_class=_FORMAT,
        description=_wrap("Inspect, profile and compare PyTorch models and checkpoints."),
        epilog="run 'modelcheck COMMAND --help' for a command's options and examples\n\n"
               + EXIT_CODES)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           title="commands")
    for add in (_inspect, _profile, _compare, _merge):
        add(sub)
    return p
