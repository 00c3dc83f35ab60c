"""The ``modelcheck`` command: ``inspect``, ``profile``, ``compare`` and ``merge`` on top of the library.

    modelcheck inspect --model example_models.vit3d:build_model [--config cfg.yaml|json]
                       [--checkpoint ckpt.pt] [--batch-size N] [--verbose] [--json out.json]
    modelcheck inspect ckpt.pt [--allow-unsafe]      # the checkpoint alone
    modelcheck profile --model pkg.mod:factory [--batch-sizes 1,2,4,8] [--input-shape 3,224,224]
                       [--memory-budget 8GiB] [--checkpoint ckpt.pt] [--json out.json]
    modelcheck compare a.pt b.pt [--fail-over 0.05] [--top 20]
    modelcheck merge shard*/report.json --json report.json \\
                     --baseline shard1/baseline.json --baseline shard2/baseline.json \\
                     --baseline-out .modelcheck/baseline.json

Exit status (also in every subcommand's ``--help``):

    0  success
    1  a gate failed: a checkpoint that does not match the model (missing, unexpected or
       shape-mismatched keys; ``inspect``/``profile --checkpoint``, and keys or shapes that differ
       in ``compare``), a failed check in a merged report, drift over ``compare --fail-over``,
       no profiled batch size within ``profile --memory-budget``
    2  a usage mistake (unknown factory, bad config or option, unreadable file, a checkpoint
       refused without ``--allow-unsafe``): one line on stderr saying what to fix

``--allow-unsafe`` (``inspect``, ``profile``, ``compare``) loads checkpoints with
``torch.load(weights_only=False)``, which runs any code the file holds: a warning is printed on
stderr each time it is used.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

from ..core.errors import UsageError
from .commands import _distributed, _read_json, cmd_compare, cmd_inspect, cmd_merge
from .common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, Outcome, build_model,
                     call_make_batch, cli_message, load_config, load_object, section)
from .parser import parser
from .profile import cmd_profile

_section = section
_call_make_batch = call_make_batch

__all__ = ["main", "parser", "CliError", "Outcome", "load_object", "load_config", "build_model",
           "cmd_inspect", "cmd_profile", "cmd_compare", "cmd_merge", "EXIT_OK", "EXIT_FAILED",
           "EXIT_USAGE", "_distributed", "_read_json"]


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``modelcheck`` console script; returns the exit status (0 success,
    1 a gate failed, 2 a usage mistake).

    >>> main(["compare", "/nonexistent/a.pt", "/nonexistent/b.pt"])
    2
    """
    args = parser().parse_args(argv)
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        print(f"modelcheck: error: --batch-size {args.batch_size}: expected a positive integer",
              file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "json", None) and os.path.isdir(args.json):
        print(f"modelcheck: error: --json {args.json}: is a directory; expected a file path such"
              f" as {os.path.join(args.json, 'report.json')}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = args.run(args)
    except UsageError as exc:
        print(f"modelcheck: error: {cli_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    outcome = result if isinstance(result, Outcome) else Outcome(result)
    if args.json:
        from ..core.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(outcome.data, indent=2, default=str) + "\n")
        print(f"\nwritten to {args.json}")
    for failure in outcome.failures:
        print(f"modelcheck: failed: {failure}", file=sys.stderr)
    return outcome.exit_status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
