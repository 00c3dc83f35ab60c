"""state_roundtrip: ``state_dict`` through ``torch.save``/``torch.load(weights_only=True)`` into
a fresh instance reproduces the outputs; tensors kept as plain attributes and non-persistent
buffers changed after construction are named.

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

from ..core.errors import UsageError
from ..core.result import CheckResult
from .compare import identical, output_difference, plain_attributes
from .naming import and_more, fmt
from .registry import check
from .subject import Subject


def _validate_roundtrip(factory: Any = None) -> dict:
    if factory is not None and not callable(factory):
        raise UsageError(f"factory={factory!r}: expected None or a callable returning a fresh"
                         " instance of the model, such as build_model")
    return {"factory": factory}


def _scramble(t: Any, gen: Any) -> None:
    import torch

    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype if t.is_floating_point()
                                else torch.complex64).to(device=t.device, dtype=t.dtype) * 3 + 1)
        elif t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.add_(1)


def _plain_tensor_attributes(work: Any) -> list:
    """(module name, attribute) of the floating tensors kept as plain attributes."""
    import torch

    return [(mname, attr) for mname, mod in work.named_modules()
            for attr, value in plain_attributes(mod)
            if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
            and value.numel()]


def _rebuild(mod: Any) -> Any:
    """(a fresh instance of ``mod``'s class (seeded) or None, whether its arguments were
    guessed). A class whose constructor needs arguments is built with integers from the
    module's own tensor shapes (a ``Scaler(6)`` of 6 features) and flags, accepted when the result's
    state has the same names and shapes; at most three required arguments, small modules only.
    Only constant buffers (fitted statistics start as zeros or ones) of such a rebuild are
    judged by the caller."""
    import inspect
    import itertools

    import torch

    try:
        params = list(inspect.signature(type(mod)).parameters.values())
    except (TypeError, ValueError):
        return None, False
    required = [p for p in params if p.default is p.empty and p.kind in (
        p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.default is p.empty and p.kind is p.KEYWORD_ONLY for p in params) or \
            len(required) > 3:
        return None, False
    want = {k: tuple(v.shape) for k, v in mod.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor)}  # extra state (metadata) is not a tensor
    want.update({f"buffer:{k}": tuple(v.shape) for k, v in mod.named_buffers()})
    if required and sum(v.numel() for v in mod.parameters()) > 10_000_000:
        return None, False
    dims = sorted({int(d) for t in [*mod.parameters(), *mod.buffers()] for d in t.shape})[:8]
    values = [*dims, False, True]  # sizes from the shapes, and flags
    candidates = [()] if not required else itertools.islice(
        itertools.product(values, repeat=len(required)), 300)
    for args in candidates:
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(0)
                rebuilt = type(mod)(*args)
        except Exception:  # noqa: BLE001 - a class that cannot be rebuilt so is not judged
            continue
        if not required:
            return rebuilt, False
        got = {k: tuple(v.shape) for k, v in rebuilt.state_dict(keep_vars=True).items()
               if isinstance(v, torch.Tensor)}
        got.update({f"buffer:{k}": tuple(v.shape) for k, v in rebuilt.named_buffers()})
        if got == want:
            return rebuilt, True
    return None, False


def _lost_nonpersistent_buffers(work: Any, fresh: Any, reference: Any, forward: Any) -> list:
    """Non-persistent buffers whose value differs from a freshly constructed module's and
    changes the outputs: ``[(module name, buffer, (output path, max diff)), ...]``.

    Modules are rebuilt (a fresh instance is what a reloaded checkpoint starts from) without
    arguments, or with arguments found by ``_rebuild``; buffers computed in ``__init__``
    (positional encodings, masks) come out identical and are not reported.
    """
    import copy

    import torch

    found = []
    for mname, mod in work.named_modules():
        names = [n for n in getattr(mod, "_non_persistent_buffers_set", ())
                 if isinstance(mod._buffers.get(n), torch.Tensor)]
        if not names:
            continue
        rebuilt, guessed = _rebuild(mod)
        if rebuilt is None:
            continue
        for n in names:
            new = getattr(rebuilt, n, None)
            old = mod._buffers[n]
            if not isinstance(new, torch.Tensor) or new.shape != old.shape or new.dtype != old.dtype:
                continue
            if guessed and new.numel() > 1 and not bool((new == new.flatten()[0]).all()):
                continue  # computed from arguments that were guessed: not judged
            if identical(new.to(old.device), old):
                continue
            trial = copy.deepcopy(fresh)
            target = trial.get_submodule(mname) if mname else trial
            with torch.no_grad():
                target._buffers[n].copy_(new.to(old.device))
            d = output_difference(reference, forward(trial))
            if d is not None:
                found.append((mname, n, d))
    return found



def _seeded_forward(subject: Subject) -> Callable[[Any], Any]:
    """``forward(module)``: a no-grad forward on a copy of the batch, seeded."""
    import torch

    from ..core.forward import run_forward

    def forward(m: Any) -> Any:
        torch.manual_seed(0)
        with torch.no_grad():
            return run_forward(m, subject.batch_copy())
    return forward


def _save_and_load(work: Any) -> Any:
    """``work``'s state_dict after ``torch.save`` and ``torch.load(weights_only=True)``."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(work.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def unsafe_globals(text: str) -> list:
    """The globals ``torch.load(weights_only=True)`` refused, from its error message.

    >>> unsafe_globals("WeightsUnpickler error: Unsupported global: GLOBAL torch._C._nn.gelu was"
    ...                " not an allowed global by default.")
    ['torch._C._nn.gelu']
    """
    import re

    return list(dict.fromkeys(re.findall(r"Unsupported global: GLOBAL ([\w.]+)", text)))


def _unloadable(subject: Subject, work: Any, exc: Exception) -> CheckResult:
    """The failure for a state_dict that ``torch.load(weights_only=True)`` refuses: the entries
    that are not tensors and do not load alone, and the globals they reference."""
    import io

    import torch

    text = str(exc)
    refused = unsafe_globals(text)
    culprits = []
    for key, value in work.state_dict().items():
        if isinstance(value, torch.Tensor):
            continue
        buf = io.BytesIO()
        try:
            torch.save({key: value}, buf)
            buf.seek(0)
            torch.load(buf, weights_only=True)
        except Exception:  # noqa: BLE001 - this entry is one that does not load
            culprits.append(f"'{key}' ({type(value).__name__})")
    if refused or culprits:
        what = (f"entry {culprits[0]}{and_more(culprits)} of the state_dict" if culprits
                else "the state_dict")
        refs = f" references {', '.join(refused)}" if refused else " holds objects"
        headline = (f"expected the state_dict to survive torch.save/torch.load(weights_only=True),"
                    f" observed {what}{refs}, which weights_only loading (torch.load's default"
                    " since torch 2.6) refuses")
    else:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        headline = (f"expected the state_dict to survive torch.save/torch.load(weights_only=True),"
                    f" observed {type(exc).__name__}: {first[:300]}")
    details = ["remedy: keep non-tensor metadata (configuration, functions, classes) out of the"
               " state_dict (save it beside, as plain types), or let loaders allowlist it with"
               " torch.serialization.add_safe_globals([...])"]
    return subject.failed(headline, details, {"stage": "save_load", "refused_globals": refused,
                                              "entries": culprits})


def _fresh_instance(factory: Any, work: Any, gen: Any, device: Any) -> Any:
    """``factory()`` in eval mode on the device, or a deep copy of ``work`` with its state_dict
    overwritten by noise."""
    import copy

    import torch

    if factory is not None:
        torch.manual_seed(4321)
        try:
            fresh = factory()
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"factory: calling it raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(fresh, torch.nn.Module):
            raise UsageError(f"factory: expected it to return a torch.nn.Module, got"
                             f" {type(fresh).__name__}")
        return fresh.to(device).eval()
    fresh = copy.deepcopy(work)
    for t in fresh.state_dict(keep_vars=True).values():
        if not isinstance(t, torch.Tensor):  # extra state, such as saved metadata
            continue
        _scramble(t.data if isinstance(t, torch.nn.Parameter) else t, gen)
    return fresh


def _attribute_culprits(work: Any, fresh: Any, reference: Any, forward: Any, gen: Any,
                        metrics: dict) -> list:
    """``[(module name, attribute, (output path, max diff))]``: plain tensor attributes that
    change the outputs when re-created (replaced by noise) in the fresh instance."""
    import copy

    attrs = _plain_tensor_attributes(work)
    metrics["plain_tensor_attributes"] = len(attrs)
    culprits = []
    for mname, attr in attrs[:32]:
        trial = copy.deepcopy(fresh)
        mod = trial.get_submodule(mname) if mname else trial
        value = getattr(mod, attr).detach().clone()
        _scramble(value, gen)
        setattr(mod, attr, value)
        d = output_difference(reference, forward(trial))
        if d is not None:
            culprits.append((mname, attr, d))
    return culprits


def _reload_failure(subject: Subject, diff: tuple, metrics: dict) -> CheckResult:
    """The failure when the reloaded fresh instance's outputs differ."""
    path, value = diff
    metrics.update({"stage": "outputs", "output": path, "max_abs_diff": value})
    return subject.failed(f"expected a reloaded state_dict to reproduce the outputs, observed"
                          f" {path} differs by up to {fmt(value)}",
                          "the fresh instance holds state that state_dict does not save: a"
                          " non-persistent buffer, a plain tensor attribute, or a Python value"
                          " set at construction", metrics)


# what state_dict does not save, by stage: (a details line per finding, the remedy, the
# headline's observation), formatted with the module prefix, attribute, output path, difference
_UNSAVED = {
    "nonpersistent_buffer": (
        "non-persistent buffer {prefix}{attr}: as a fresh instance builds it, {path} differs by"
        " up to {value}",
        "remedy: register it with persistent=True (the default) so that state_dict saves the"
        " value set after construction",
        "non-persistent buffer {where} (not in state_dict) was changed after construction; a"
        " fresh instance changes {path} by up to {value}"),
    "plain_attribute": (
        "plain tensor attribute {prefix}{attr}: re-created, {path} differs by up to {value}",
        "remedy: self.register_buffer(name, tensor) so that state_dict saves it (and .to(device)"
        " moves it)",
        "plain tensor attribute {where} (not in state_dict) changes them, {path} by up to"
        " {value}"),
}


def _unsaved_failure(subject: Subject, stage: str, found: list, metrics: dict) -> CheckResult:
    """The failure for state that state_dict does not save: ``found`` holds ``(module name,
    attribute, (output path, max diff))`` of each culprit."""
    line, remedy, observed = _UNSAVED[stage]

    def words(mname: str, attr: str, path: str, value: float) -> dict:
        return {"prefix": mname + "." if mname else "", "attr": attr, "path": path,
                "value": fmt(value),
                "where": f"'{attr}' of module '{mname}'" if mname else f"'{attr}' of the model"}

    details = [line.format(**words(m, a, p, v)) for m, a, (p, v) in found] + [remedy]
    mname, attr, (path, value) = found[0]
    metrics.update({"stage": stage, "attribute": f"{mname}.{attr}" if mname else attr,
                    "output": path, "max_abs_diff": value})
    return subject.failed(f"expected a reloaded state_dict to reproduce the outputs, observed"
                          f" {observed.format(**words(mname, attr, path, value))}"
                          f"{and_more(found)}", details, metrics)


@check(default=True, validate=_validate_roundtrip)
def state_roundtrip(factory: Any = None, *, subject: Subject) -> CheckResult:
    """A saved and reloaded state_dict reproduces the outputs in a fresh instance (eval mode).

    The copy's ``state_dict`` goes through ``torch.save`` and ``torch.load(weights_only=True)``
    into a fresh instance: ``factory()`` when given, otherwise a deep copy whose parameters and
    persistent buffers are overwritten with noise. The outputs must be bitwise identical.
    Without a factory, each floating tensor kept as a plain attribute (``self.scale =
    torch.tensor(2.0)``, not a registered buffer) is also replaced by noise in turn, as a fresh
    instance would re-create it; one that changes the outputs is named. A non-persistent buffer
    is compared with the one a freshly built module holds when its class takes no required
    arguments (otherwise it is covered only with a ``factory``); one changed after
    construction that changes the outputs is named.

    >>> import torch
    >>> state_roundtrip(model=torch.nn.Linear(4, 2), batch=torch.randn(3, 4)).passed
    True
    >>> class Scaled(torch.nn.Linear):
    ...     def __init__(self):
    ...         super().__init__(4, 2)
    ...         self.scale = torch.rand(())
    ...     def forward(self, x):
    ...         return super().forward(x) * self.scale
    >>> print(state_roundtrip(model=Scaled(), batch=torch.randn(3, 4)).headline.split(", ")[1])
    observed plain tensor attribute 'scale' of the model (not in state_dict) changes them
    """
    import torch

    work = subject.model_copy("eval")
    forward = _seeded_forward(subject)
    reference = forward(work)
    try:
        saved = _save_and_load(work)
    except Exception as exc:  # noqa: BLE001 - any failure here is the finding
        return _unloadable(subject, work, exc)
    metrics: dict = {"keys": len(saved), "factory": factory is not None}
    gen = torch.Generator().manual_seed(1234)
    fresh = _fresh_instance(factory, work, gen, subject.device)
    try:
        fresh.load_state_dict(saved)
    except Exception as exc:  # noqa: BLE001 - missing/unexpected keys or shape mismatches
        text = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:300]
        return subject.failed(f"expected the saved state_dict to load into a fresh instance,"
                              f" observed {type(exc).__name__}: {text}", str(exc),
                              dict(metrics, stage="load_state_dict"))
    diff = output_difference(reference, forward(fresh))
    if diff is not None:
        return _reload_failure(subject, diff, metrics)
    if factory is None:
        culprits = _attribute_culprits(work, fresh, reference, forward, gen, metrics)
        if culprits:
            return _unsaved_failure(subject, "plain_attribute", culprits, metrics)
        lost = _lost_nonpersistent_buffers(work, fresh, reference, forward)
        metrics["nonpersistent_buffers_lost"] = len(lost)
        if lost:
            return _unsaved_failure(subject, "nonpersistent_buffer", lost, metrics)
    return subject.passed(f"expected a reloaded state_dict to reproduce the outputs, observed"
                          f" identical outputs ({len(saved)} saved tensors)", metrics=metrics)
