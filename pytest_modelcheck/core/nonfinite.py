"""Find the operation that produced the first non-finite value, forward or backward.

A ``TorchDispatchMode`` sees every aten op; the first whose floating output holds NaN/Inf while
its floating inputs were all finite is the origin. Module paths come from forward pre-hooks,
the user's source line from the Python stack. Backward origins come from autograd's anomaly
mode (the failing ``...Backward0`` node and the forward line that created it). Only used to
diagnose a failure, so the happy path pays nothing.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class NonFiniteOrigin:
    """Where a non-finite value first appeared."""

    phase: str  # "input", "forward" or "backward"
    op: str
    module: str = ""
    source: str = ""
    kind: str = "NaN"

    def describe(self) -> str:
        where = f" in module '{self.module}'" if self.module else ""
        src = f" at {self.source}" if self.source else ""
        return f"{self.kind} first produced in {self.phase} by {self.op}{where}{src}"


def _kind(t: Any) -> str:
    import torch

    return "NaN" if bool(torch.isnan(t).any()) else "Inf"


def _floating(obj: Any) -> list:
    from .batch import iter_tensors

    return [t for _, t in iter_tensors(obj) if t.is_floating_point() and t.device.type != "meta"]


def locate_nonfinite(model: Any, batch: Any, loss: Any) -> Optional[NonFiniteOrigin]:
    """Run forward+loss+backward on ``model`` (a copy) and return the first non-finite origin."""
    import torch
    from ._torch_compat import dispatch_mode_base

    from .dispatch import user_source
    from .forward import run_forward

    names = {m: n for n, m in model.named_modules()}
    stack: list = []
    found: list = []

    class Detector(dispatch_mode_base()):  # type: ignore[misc]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            if not found:
                outs = [t for t in _floating(out) if not bool(torch.isfinite(t).all())]
                if outs and all(bool(torch.isfinite(t).all()) for t in _floating((args, kwargs))):
                    found.append(NonFiniteOrigin("forward", str(func.overloadpacket.__name__)
                                                 if hasattr(func, "overloadpacket") else str(func),
                                                 stack[-1] if stack else "", user_source(),
                                                 _kind(outs[0])))
            return out

    handles = []
    try:
        def push(mod: Any, args: Any) -> None:
            stack.append(names.get(mod) or "<root>")

        def pop(mod: Any, args: Any, out: Any) -> None:
            if stack:
                stack.pop()

        for m in names:
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop))
        with Detector():
            out = run_forward(model, batch)
            total, _ = loss.compute(out, batch, model)
        if found:
            return found[0]
        if not bool(torch.isfinite(total.detach()).all()):
            return NonFiniteOrigin("forward", "the loss function", "", "", _kind(total.detach()))
    finally:
        for h in handles:
            h.remove()
    # The forward was finite: look for the backward node with anomaly mode.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autograd.detect_anomaly(check_nan=True):
                out = run_forward(model, batch)
                total, _ = loss.compute(out, batch, model)
                total.backward()
        except RuntimeError as exc:
            msg = str(exc)
            if "returned nan values" not in msg and "returned inf" not in msg.lower():
                return None
            node = msg.split("'")[1] if "'" in msg else msg
            source = ""
            for w in caught:
                text = str(w.message)
                if "Traceback of forward call" in text:
                    source = _last_user_line(text)
            return NonFiniteOrigin("backward", node, "", source, "NaN")
    return None


def _last_user_line(tb_text: str) -> str:
    import re

    hits = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tb_text)
    keep = [h for h in hits if "/torch/" not in h[0] and not h[0].startswith(_PKG_DIR)]
    if not keep:
        return ""
    path, lineno, func = keep[-1]
    rel = os.path.relpath(path)
    return f"{path if rel.startswith('..') else rel}:{lineno} in {func}"
