"""What the ``modelcheck`` subcommands share: the factory, config and batch loaders, the
one-line :class:`CliError`, the :class:`Outcome` of a command (its data and the failures that
make it exit 1), and the wording of ``--allow-unsafe``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect as pyinspect
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.errors import UsageError, first_line

#: Exit statuses: success, a gate failed (mismatch, failed check, drift over --fail-over,
#: nothing fits --memory-budget), a usage mistake.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(UsageError):
    """A one-line command-line mistake.

    >>> str(CliError("--batch-size 0: expected a positive integer"))
    '--batch-size 0: expected a positive integer'
    """


@dataclass
class Outcome:
    """What a command produced: ``data`` (written by ``--json``) and ``failures``, one line
    each, which make the command exit 1.

    >>> Outcome({"a": 1}, ["head.weight: shape mismatch"]).exit_status
    1
    """

    data: dict
    failures: list = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        """1 when a gate failed, else 0.

        >>> Outcome({}).exit_status
        0
        """
        return EXIT_FAILED if self.failures else EXIT_OK


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
    """A dict of factory keyword arguments from a JSON or YAML file (``{}`` without a path).

    >>> load_config(None)
    {}
    """
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
    """Call the factory named by ``spec`` with the config's keyword arguments.

    >>> build_model("collections:Counter", {"a": 2})["a"]
    2
    """
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


def parse_input_shape(text: str) -> tuple:
    """One sample's shape from ``--input-shape`` (``3,224,224`` or ``3x224x224``).

    >>> parse_input_shape("3,32,32"), parse_input_shape("16")
    ((3, 32, 32), (16,))
    """
    try:
        shape = tuple(int(p) for p in re.split(r"[,x]", text.strip()))
        if min(shape) < 1:
            raise ValueError
    except ValueError:
        raise CliError(f"--input-shape {text!r}: expected one sample's shape as positive"
                       " integers, e.g. 3,224,224") from None
    return shape


def batch_hint(command: str) -> str:
    """What to pass when there is no batch, or the model does not take the one it got.

    >>> batch_hint("profile")[:48]
    'pass a batch the model takes: --batch package.mo'
    """
    return ("pass a batch the model takes: --batch package.module:make_batch (a function of the"
            " batch size returning the batch), or --input-shape with one sample's shape for a"
            f" random float input, e.g. modelcheck {command} --model pkg.models:build"
            " --input-shape 3,224,224")


def batch_factory(args: argparse.Namespace) -> Optional[tuple]:
    """``(make_batch, where it came from)`` for ``--input-shape``, ``--batch`` or the factory
    module's own ``make_batch``; None when there is none.

    >>> make, where = batch_factory(argparse.Namespace(input_shape="4", batch=None, model="m:f"))
    >>> tuple(make(2).shape), where
    ((2, 4), '--input-shape 4')
    """
    shape_text = getattr(args, "input_shape", None)
    if shape_text and args.batch:
        raise CliError(f"--batch {args.batch} and --input-shape {shape_text}: give one of them")
    if shape_text:
        shape = parse_input_shape(shape_text)

        def random_batch(n: int) -> Any:
            import torch

            return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))

        return random_batch, f"--input-shape {shape_text}"
    if args.batch:
        return load_object(args.batch, "--batch"), args.batch
    module_name = args.model.split(":", 1)[0]
    make = getattr(importlib.import_module(module_name), "make_batch", None)
    return (make, f"{module_name}:make_batch") if make is not None else None


def call_make_batch(make_batch: Any, size: int, where: str = "--batch") -> Any:
    """``make_batch(size)``; what the user's factory raises is a one-line :class:`CliError`.

    >>> call_make_batch(lambda n: [0] * n, 2)
    [0, 0]
    """
    try:
        return make_batch(size)
    except Exception as exc:  # noqa: BLE001 - the user's factory
        raise CliError(f"{where}: make_batch({size}) raised {type(exc).__name__}:"
                       f" {first_line(exc, or_type=True, limit=200)}") from None


def section(title: str) -> str:
    """A title underlined with ``=``, after a blank line.

    >>> section("Parameters").splitlines()
    ['', 'Parameters', '==========']
    """
    return f"\n{title}\n{'=' * len(title)}"


def warn_unsafe(args: argparse.Namespace, *paths: Any) -> None:
    """With ``--allow-unsafe``, say on stderr what it does to the files it will open."""
    if getattr(args, "allow_unsafe", False):
        names = ", ".join(str(p) for p in paths if p)
        print(f"modelcheck: warning: --allow-unsafe: {names or 'the checkpoint'} is loaded with"
              " torch.load(weights_only=False), which runs any code the file contains; use it"
              " only for a file you created or trust", file=sys.stderr)


def cli_message(exc: BaseException) -> str:
    """The message of a library error as the command line words it: a refused checkpoint
    names ``--allow-unsafe`` instead of the library's ``allow_unsafe=True``.

    >>> cli_message(UsageError("checkpoint 'a.pt': refused: ...; pass allow_unsafe=True only"
    ...                        " for a file you trust"))
    "checkpoint 'a.pt': refused: ...; pass --allow-unsafe only for a file you trust"
    """
    text = str(exc)
    if "refused:" in text:
        text = text.replace("pass allow_unsafe=True", "pass --allow-unsafe")
    return text


def mismatch_line(path: str, info: Any) -> str:
    """One line saying how a checkpoint (a ``CheckpointInfo`` checked against a model) does
    not fit the model.

    >>> from types import SimpleNamespace as NS
    >>> mismatch_line("ck.pt", NS(missing_keys=[], unexpected_keys=["x"],
    ...                           shape_mismatches=[["h.w", [5, 8], [10, 8]]]))
    'checkpoint ck.pt does not match the model: 0 missing, 1 unexpected, 1 shape mismatch (h.w: checkpoint (5, 8), model (10, 8))'
    """
    parts = [f"{len(info.missing_keys)} missing", f"{len(info.unexpected_keys)} unexpected",
             f"{len(info.shape_mismatches)} shape mismatch"
             + ("es" if len(info.shape_mismatches) != 1 else "")]
    first = ""
    if info.shape_mismatches:
        name, ck, mo = info.shape_mismatches[0]
        first = f" ({name}: checkpoint {tuple(ck)}, model {tuple(mo)})"
    elif info.missing_keys or info.unexpected_keys:
        first = f" (first: {(info.missing_keys or info.unexpected_keys)[0]})"
    return f"checkpoint {path} does not match the model: {', '.join(parts)}{first}"


def device_arg(device: Optional[str]) -> Optional[str]:
    """``--device`` checked as the checks check ``device=`` (None passes).

    >>> device_arg(None) is None
    True
    """
    if device:
        from ..checks.registry import validate_device

        try:
            validate_device(device)
        except UsageError as exc:
            raise CliError(f"--device: {exc}") from None
    return device


__all__ = ["CliError", "Outcome", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "load_object",
           "load_config", "build_model", "parse_input_shape", "batch_hint", "batch_factory",
           "call_make_batch", "section", "warn_unsafe", "cli_message", "mismatch_line",
           "device_arg"]
