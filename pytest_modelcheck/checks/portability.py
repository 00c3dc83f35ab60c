"""device_portable: after ``model.to(other)`` every parameter, buffer and tensor made in forward
follows (found on a CPU-only runner with the ``meta`` device, and for real on CUDA).

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import describe_error
from ..core.result import CheckResult
from .op_trace import ROOT, _flat_tensors, _ModuleStack, _op_name, _short
from .registry import SkipCheck, check
from .subject import Subject


def plain_tensor_attributes(model: Any) -> list:
    """``[(path, type name), ...]`` of tensors stored as plain module attributes.

    Such tensors are neither parameters nor registered buffers, so ``model.to(device)``,
    ``state_dict()`` and ``copy.deepcopy`` bookkeeping leave them behind. Empty placeholders
    (MONAI's ``self.att_mat = torch.Tensor()``, overwritten in forward) hold nothing to leave
    behind and are not listed.

    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> m.scale = torch.ones(2)
    >>> m.cache = torch.Tensor()
    >>> plain_tensor_attributes(m)
    [('scale', 'Linear')]
    """
    import torch

    from ..core.state import hook_managed_attributes

    found = []
    for name, mod in model.named_modules():
        managed = hook_managed_attributes(mod)
        for key, value in vars(mod).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) \
                    and key not in managed and value.numel() > 0:
                found.append((f"{name}.{key}" if name else key, type(mod).__name__))
    return found


def _device_probe(model: Any, batch: Any, device: Any) -> dict:
    """Run a copy of ``model`` moved to ``device`` on ``batch`` moved there; record every op that
    mixes ``device`` with real CPU tensors or makes a CPU tensor (0-d CPU scalars mix freely)
    that is not then moved to ``device`` (itself or a CPU tensor computed from it)."""
    import weakref

    import torch

    from ..core._torch_compat import dispatch_mode_base
    from ..core.batch import copy_model
    from ..core.dispatch import user_source

    target = torch.device(device)
    work = copy_model(model).to(target).eval()
    data = batch.clone().to(target)
    found: list = []

    def strays(tensors: list) -> list:
        return [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]

    def note(kind: str, func: Any, t: Any, module: str) -> dict:
        entry = {"kind": kind, "op": _op_name(func), "module": module,
                 "source": user_source(), "shape": tuple(t.shape)}
        found.append(entry)
        return entry

    # a CPU tensor made in forward, and the CPU tensors computed from it, carry the entry that
    # reported it; once one of them is moved to the target (x.to(device)), it was made on the
    # CPU on purpose (a cached coordinate grid, say) and the entry is withdrawn
    origin: dict = {}

    def origins(tensors: list) -> list:
        found_entries: list = []
        for t in tensors:
            ref, entries = origin.get(id(t), (None, ()))
            if ref is not None and ref() is t:
                found_entries += [e for e in entries if all(e is not f for f in found_entries)]
        return found_entries

    def mark(tensors: list, entries: list) -> None:
        for t in tensors:
            origin[id(t)] = (weakref.ref(t), tuple(entries))

    with _ModuleStack(work) as mods:
        class Recorder(dispatch_mode_base()):  # type: ignore[misc]
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                kwargs = kwargs or {}
                ins = _flat_tensors((args, kwargs))
                on_target = any(t.device.type == target.type for t in ins)
                if on_target and strays(ins) and len(found) < 20:
                    note("mix", func, strays(ins)[0], mods.current)
                out = func(*args, **kwargs)
                outs = _flat_tensors(out)
                if not ins or not strays(ins):
                    made = strays(outs)
                    if made and len(found) < 20:
                        mark(made, [note("made", func, made[0], mods.current)])
                else:
                    parents = origins(strays(ins))
                    if parents and not on_target and outs \
                            and all(t.device.type == target.type for t in outs):
                        # moved to the target: made on the CPU on purpose
                        found[:] = [f for f in found if all(f is not e for e in parents)]
                    elif parents and strays(outs):
                        mark(strays(outs), parents)
                return out

        error = None
        try:
            with torch.no_grad(), Recorder():
                data.call(work)
        except Exception as exc:  # noqa: BLE001 - reported below
            error = exc
        where = mods.describe(mods.current) if error is not None else ""
    return {"found": found, "error": error, "raised_in": where, "types": mods.types}


def _describe_stray(f: dict, types: dict, target: str) -> str:
    mod = "" if f["module"] == ROOT else f" in module '{f['module']}' ({types.get(f['module'], '?')})"
    src = _short(f["source"])
    if f["kind"] == "made":
        return (f"{f['op']} at {src}{mod} created a cpu tensor of shape {list(f['shape'])} while the"
                f" model is on {target}")
    return (f"{f['op']} at {src}{mod} mixed a {target} tensor with a cpu tensor of shape"
            f" {list(f['shape'])}")


DEVICE_REMEDY = ("remedy: register constant tensors with self.register_buffer(name, t)"
                 " (persistent=False if they should stay out of the state_dict), and create tensors"
                 " in forward with device=x.device (torch.zeros(n, device=x.device),"
                 " x.new_zeros(n), torch.arange(n, device=x.device))")


def _validate_device_portable() -> dict:
    return {}


def _probe_targets(device: Any) -> list:
    """``meta``, and ``cuda`` where it is available and not already the model's device."""
    import torch

    return ["meta"] + (["cuda"] if torch.cuda.is_available() and (
        device is None or torch.device(device).type != "cuda") else [])


def _stray_details(attrs: list, probes: dict, metrics: dict) -> tuple:
    """``(details, strays)``: the lines naming plain tensor attributes and the ops that left a
    tensor behind, and ``(target, first stray, module types)`` per target with one; the stray
    counts go into ``metrics``."""
    details: list = []
    if attrs:
        details.append("tensors kept as plain attributes (model.to() does not move them):")
        details += [f"  {a} ({t})" for a, t in attrs]
    strays = []
    for t, p in probes.items():
        metrics[f"{t}_strays"] = len(p["found"])
        if p["found"]:
            details.append(f"ops that left a tensor behind on {t}:")
            details += ["  " + _describe_stray(f, p["types"], t)
                        + (f"  [{f['source']}]" if f["source"] else "") for f in p["found"]]
            strays.append((t, p["found"][0], p["types"]))
    return details, strays


def _left_behind(attrs: list, strays: list) -> str:
    """What the failure headline says was left behind: the first attribute, then the first op."""
    if not attrs:
        return _describe_stray(strays[0][1], strays[0][2], strays[0][0])
    a, typ = attrs[0]
    observed = f"tensor attribute '{a}' ({typ}) is not a registered buffer"
    more = len(attrs) - 1
    if more:
        observed += f", and {more} more"
    if strays:
        observed += "; " + _describe_stray(strays[0][1], strays[0][2], strays[0][0])
    return observed


def _skip_if_not_run(subject: Subject, probes: dict) -> None:
    """SkipCheck when a probe's forward raised, after the same forward on the model's own device
    (a model bug is raised there, as a ModelError)."""
    import torch

    from ..core.forward import run_forward

    for t, p in probes.items():
        if p["error"] is not None:
            with torch.no_grad():
                run_forward(subject.model_copy("eval"), subject.batch_copy())
            raise SkipCheck(f"the forward cannot run on {t} ({describe_error(p['error'])} in"
                            f" {p['raised_in']}); on meta, forwards that read tensor values"
                            " (.item(), nonzero, boolean masks) cannot be checked")


@check(default=True, validate=_validate_device_portable)
def device_portable(*, subject: Subject) -> CheckResult:
    """After model.to(other device), every parameter, buffer and tensor made in forward follows.

    Moves a copy of the model and the batch to the ``meta`` device (and, when CUDA is
    available, to ``cuda``) and runs forward under a dispatch mode that records any op mixing
    the new device with a CPU tensor and any op creating a CPU tensor (``torch.zeros(n)``,
    ``torch.arange(n)``, ``torch.tensor([...])`` without ``device=``). Tensors kept as plain
    module attributes (not registered buffers) are reported directly. A forward that needs
    tensor values (``.item()``, ``nonzero``) cannot run on ``meta``: then the check is skipped,
    unless a plain tensor attribute was already found. 0-d CPU tensors mix with any device and
    are not reported.

    >>> import torch
    >>> device_portable(model=torch.nn.Linear(4, 3), batch=torch.randn(2, 4)).passed
    True
    """
    attrs = plain_tensor_attributes(subject.model)
    targets = _probe_targets(subject.device)
    probes = {t: _device_probe(subject.model, subject.batch, t) for t in targets}
    metrics: dict = {"plain_tensor_attributes": [a for a, _ in attrs], "devices": targets}
    details, strays = _stray_details(attrs, probes, metrics)
    expected = "expected every tensor to follow model.to(other device)"
    if attrs or strays:
        details.append(DEVICE_REMEDY)
        return subject.failed(f"{expected}, observed {_left_behind(attrs, strays)}", details,
                              metrics)
    _skip_if_not_run(subject, probes)
    return subject.passed(f"{expected}, observed every op's tensors on the model's device"
                          f" ({', '.join(targets)})", details, metrics)
