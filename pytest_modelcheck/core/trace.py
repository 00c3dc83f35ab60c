"""Forward data flow: every module call in order with input/output shapes, dtypes and ranges.

``trace_model(model, *inputs)`` (or ``trace_batch(model, batch)``) records each submodule call
through forward hooks that are removed in ``finally``, also when the forward raises: the
partial trace then shows the last module that ran and the one that raised.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from .batch import Batch, iter_tensors


def _tensor_info(obj: Any, with_ranges: bool) -> list:
    infos = []
    for path, t in iter_tensors(obj):
        info = {"path": path, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        if with_ranges and t.numel() and t.device.type != "meta" and not t.is_complex() \
                and t.dtype != __import__("torch").bool:
            d = t.detach()
            finite = d.isfinite() if d.is_floating_point() else None
            if finite is not None and not bool(finite.all()):
                info["nonfinite"] = int((~finite).sum())
                d = d[finite]
            if d.numel():
                info["min"] = float(d.min())
                info["max"] = float(d.max())
        infos.append(info)
    return infos


def _fmt(infos: list) -> str:
    parts = []
    for i in infos:
        s = f"({', '.join(str(d) for d in i['shape'])}) {i['dtype']}"
        if "min" in i:
            s += f" [{i['min']:.3g}, {i['max']:.3g}]"
        if i.get("nonfinite"):
            s += f" !{i['nonfinite']} non-finite"
        parts.append(s)
    return ", ".join(parts) if parts else "-"


@dataclass
class FlowEvent:
    """One module call: its dotted path, type, nesting depth, inputs and outputs."""

    path: str
    type: str
    depth: int
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    raised: str = ""

    @property
    def shape_changed(self) -> bool:
        ins = [i["shape"] for i in self.inputs]
        outs = [o["shape"] for o in self.outputs]
        return bool(outs) and ins[:1] != outs[:1]


@dataclass
class FlowTrace:
    """Module calls in the order they started; ``render()`` draws the indented tree."""

    events: list = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict:
        return {"events": [e.__dict__ for e in self.events], "error": self.error}

    def find(self, path: str) -> list:
        return [e for e in self.events if e.path == path]

    def render(self, max_lines: int = 80, ranges: Optional[tuple] = None) -> str:
        """Indented tree, one line per call: ``path (Type): in -> out``.

        Lines whose shape changes are marked ``*``; with ``ranges=(lo, hi)`` an output whose
        values leave ``[lo, hi]`` is marked ``!range``.
        """
        lines = []
        for e in self.events:
            mark = "*" if e.shape_changed else " "
            flag = ""
            if ranges is not None:
                lo, hi = ranges
                if any(o.get("min", lo) < lo or o.get("max", hi) > hi for o in e.outputs):
                    flag = "  !range"
            if any(o.get("nonfinite") for o in e.outputs):
                flag += "  !non-finite"
            out = f"RAISED {e.raised}" if e.raised else _fmt(e.outputs)
            lines.append(f"{mark} {'  ' * e.depth}{e.path or '<root>'} ({e.type}): "
                         f"{_fmt(e.inputs)} -> {out}{flag}")
        if len(lines) > max_lines:
            keep = max_lines // 2
            lines = lines[:keep] + [f"  ... {len(lines) - 2 * keep} more calls ..."] + lines[-keep:]
        if self.error:
            lines.append(f"forward raised: {self.error}")
        return "\n".join(lines)


def trace_batch(model: Any, batch: Batch, *, ranges: bool = True) -> FlowTrace:
    """Trace one forward of ``model`` on a Batch; never raises for the model's own errors.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> tr = trace_batch(m, Batch.from_user(torch.zeros(2, 4)))
    >>> [(e.path, e.outputs[0]["shape"]) for e in tr.events]
    [('', [2, 8]), ('0', [2, 8]), ('1', [2, 8])]
    """
    import torch

    trace = FlowTrace()
    stack: list = []
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def pre(module: Any, args: tuple, kwargs: dict) -> None:
        ev = FlowEvent(names.get(module, "?"), type(module).__name__, len(stack),
                       _tensor_info((args, kwargs), ranges))
        trace.events.append(ev)
        stack.append(ev)

    def post(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if stack:
            stack.pop().outputs = _tensor_info(output, ranges)

    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        with torch.no_grad():
            batch.call(model)
    except Exception as exc:  # noqa: BLE001 - the trace reports it
        trace.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        for ev in stack:
            ev.raised = "(raised inside)"
        if stack:
            stack[-1].raised = type(exc).__name__
    finally:
        for h in handles:
            h.remove()
    return trace


def trace_model(model: Any, *inputs: Any, **kwargs: Any) -> FlowTrace:
    """Trace ``model(*inputs, **kwargs)``; see ``trace_batch``.

    >>> import torch
    >>> print(trace_model(torch.nn.Linear(3, 2), torch.zeros(1, 3)).render().split(":")[0])
    * <root> (Linear)
    """
    return trace_batch(model, Batch(args=inputs, kwargs=kwargs))


@contextlib.contextmanager
def module_stack(model: Any, on_output: Any = None) -> Iterator[list]:
    """Keep the yielded list equal to the paths of the modules running now (outermost first),
    through forward hooks removed in ``finally``; ``on_output(name, module, args, output)`` is
    called after each module's forward.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> seen = []
    >>> with module_stack(m, lambda name, mod, args, out: seen.append(name)) as stack:
    ...     _ = m(torch.ones(1, 2))
    >>> seen, stack
    (['0', ''], [])
    """
    names = {m: n for n, m in model.named_modules()}
    stack: list = []

    def push(mod: Any, args: Any) -> None:
        stack.append(names.get(mod, ""))

    def pop(mod: Any, args: Any, out: Any) -> None:  # returns None: the output is kept
        if stack:
            stack.pop()
        if on_output is not None:
            on_output(names.get(mod, ""), mod, args, out)

    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop))
        yield stack
    finally:
        for h in handles:
            h.remove()
        stack.clear()
