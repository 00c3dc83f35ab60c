"""Count the aten ops a model dispatches, and find the ops that synchronize host and device.

A ``TorchDispatchMode`` sees every aten op that reaches the dispatcher, in forward and in
backward. :func:`count_ops` records, per op, the number of calls; per module path (tracked with
forward pre/post hooks) the number of ops run while that module was on the call stack (the
module itself or anything below it); and every op that forces the host to wait for the device.

Host-device synchronizations recognised (checked on CPU with torch 2.13, where the same aten
ops are dispatched as on CUDA, so a CPU-only runner finds them):

* ``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``,
  ``if t:`` / ``if (x > 0).any():``, ``f"{t:.2f}"``, ``range(t)``, ``x[:int(t)]``,
  ``torch.arange(t)`` with a tensor bound, ``t.is_nonzero()``;
* ops whose output size depends on values: ``aten.nonzero`` (``torch.where(cond)`` with one
  argument, ``t.nonzero()``), ``aten.masked_select``, ``aten._unique2`` / ``unique_dim`` /
  ``unique_consecutive`` (``torch.unique``), ``aten.bincount``, ``aten.repeat_interleave``
  without ``output_size``;
* ops returning a Python bool: ``aten.equal``, ``aten.allclose``, ``aten.is_nonzero``;
* boolean-mask indexing: ``x[mask]`` and ``x[mask] = v`` dispatch ``aten.index.Tensor`` /
  ``aten.index_put_`` with a bool index (the ``nonzero`` runs inside the kernel, so it is
  recognised from the index dtype, not from a ``nonzero`` op);
* copies to the CPU from another device (``aten._to_copy`` / ``aten.copy_``): ``.cpu()``,
  ``.to("cpu")``, ``.numpy()`` / ``.tolist()`` of device tensors.

Not detected: ``.cpu()``, ``.numpy()`` and ``.tolist()`` of tensors already on the CPU (nothing
is dispatched, and nothing is synchronized either); work below the dispatcher (a custom C++/CUDA
extension that synchronizes internally, ``torch.cuda.synchronize()``, CUDA events); ops inside a
``torch.compile``'d region or a TorchScript module, which the mode does not see op by op.

This module imports neither pytest nor, until called, torch.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from ._torch_compat import caller_frame

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKWARD = "<backward>"
LOSS = "<loss>"
ROOT = "<root>"

# Ops that always make the host wait for the device (their result is read on the host, or
# the size of their output depends on the values).
SYNC_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount", "equal",
    "allclose",
})
_MASK_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
_SITE_NAMES = ("site-packages", "dist-packages")


@dataclass
class Sync:
    """One host-device synchronization: the aten op, the line that dispatched it, the phase.

    ``origin`` says whose code that line is (:func:`sync_site`): ``"user"``, ``"package"`` (an
    installed third-party package such as transformers; ``package`` names it and ``caller`` is
    the user's line that called into it) or ``""`` (inside autograd's backward).
    """

    op: str
    source: str = ""
    phase: str = "forward"  # "forward", "loss" or "backward"
    module: str = ""
    origin: str = "user"  # "user", "package" (installed third-party code) or "" (autograd)
    package: str = ""  # for origin "package": the distribution, "transformers 5.0.0"
    caller: str = ""  # for origin "package": the user's line that called into the package
    frames: list = field(default_factory=list)  # [[path, line, function, module], ...]

    def describe(self) -> str:
        src = f" from {self.source}" if self.source else ""
        where = f" in module '{self.module}'" if self.module and not self.module.startswith("<") else ""
        return f"{self.op}{src}{where} ({self.phase})"


@dataclass
class OpCount:
    """What :func:`count_ops` recorded. Builtin-typed fields only.

    ``by_module`` maps a module path (``"<root>"`` for the model itself, ``"<loss>"`` for the
    loss, ``"<backward>"`` for backward) to the ops run while that module was on the call stack,
    so a parent's count includes its children's. ``by_module_self`` counts each op once, for the
    innermost module only.
    """

    total: int = 0
    forward: int = 0
    backward: int = 0
    by_op: dict = field(default_factory=dict)
    by_module: dict = field(default_factory=dict)
    by_module_self: dict = field(default_factory=dict)
    syncs: list = field(default_factory=list)

    def sync_groups(self) -> list:
        """``[(op, source, phase, count), ...]``, most frequent first, each distinct place once."""
        groups = Counter((s.op, s.source, s.phase) for s in self.syncs)
        return [(op, src, phase, n) for (op, src, phase), n in
                sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))]


def _op_name(func: Any) -> tuple:
    packet = getattr(func, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or str(func).split(".")[1]
    return name, f"aten.{name}"


def _is_mask(t: Any) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _sync_kind(name: str, func: Any, args: tuple, kwargs: dict) -> Optional[str]:
    """The display name of the sync this op causes, or None when it causes none."""
    import torch

    if name in SYNC_OPS:
        return f"aten.{name}"
    if name == "repeat_interleave" and kwargs.get("output_size") is None \
            and any(isinstance(a, torch.Tensor) for a in args[1:2] or args[:1]):
        return "aten.repeat_interleave (no output_size)"
    if name in _MASK_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(_is_mask(i) for i in (indices or ()) if i is not None):
            return f"aten.{name} (boolean mask)"
    if name == "_to_copy":
        src = args[0] if args else None
        dst = kwargs.get("device")
        if isinstance(src, torch.Tensor) and dst is not None and torch.device(dst).type == "cpu" \
                and src.device.type not in ("cpu", "meta"):
            return f"aten._to_copy ({src.device.type} -> cpu)"
    if name == "copy_" and len(args) >= 2:
        dst, src = args[0], args[1]
        if isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor) \
                and dst.device.type == "cpu" and src.device.type not in ("cpu", "meta"):
            return f"aten.copy_ ({src.device.type} -> cpu)"
    return None


def user_source() -> str:
    """``file:line in function`` of the user's code that dispatched the current op.

    Walks outward from the innermost frame past this package's and torch's frames; the first
    other frame is the user's. When the walk comes back into this package first (an op of
    autograd's own backward, called from a check), there is no user line and ``""`` is returned.
    """
    import torch

    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    frame: Any = caller_frame(1)
    left_package = False
    while frame is not None:
        f = os.path.abspath(frame.f_code.co_filename)
        in_pkg = f.startswith(_PKG_DIR + os.sep)
        if in_pkg and frame.f_code.co_name == "_one_hot_marked":
            pass  # the one_hot wrapper sits between torch and the user
        elif in_pkg:
            if left_package:
                return ""
        elif f.startswith(torch_dir) or "<frozen" in f or f.endswith(("contextlib.py", "functools.py")):
            left_package = True
        else:
            rel = os.path.relpath(f)
            return f"{f if rel.startswith('..') else rel}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return ""


# ------------------------------------------------------------------ whose code is a frame in
@functools.lru_cache(maxsize=1)
def _install_dirs() -> tuple:
    """Real paths of the directories packages are installed into (site-packages, dist-packages)."""
    import site
    import sysconfig

    dirs = set()
    paths = sysconfig.get_paths()
    for key in ("purelib", "platlib"):
        if paths.get(key):
            dirs.add(paths[key])
    try:
        dirs.update(site.getsitepackages())
    except AttributeError:  # some virtualenvs' site module lacks it
        pass
    with contextlib.suppress(Exception):
        dirs.add(site.getusersitepackages())
    dirs.update(p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in _SITE_NAMES)
    return tuple(sorted({os.path.realpath(d) for d in dirs if d}, key=len, reverse=True))


@functools.lru_cache(maxsize=1)
def _stdlib_dirs() -> tuple:
    import sysconfig

    paths = sysconfig.get_paths()
    return tuple({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if paths.get(k)})


@functools.lru_cache(maxsize=1)
def _distributions() -> dict:
    """Top-level module name -> ``"dist version"`` of the installed distribution providing it."""
    from importlib import metadata

    out = {}
    with contextlib.suppress(Exception):
        for top, dists in metadata.packages_distributions().items():
            name = dists[0]
            try:
                out[top] = f"{name} {metadata.version(name)}"
            except Exception:  # noqa: BLE001 - a broken distribution's metadata
                out[top] = name
    return out


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def code_owner(filename: str, project_root: str = "") -> tuple:
    """``(kind, package, relative path)`` of the code in ``filename``.

    ``kind`` is ``"torch"`` (torch itself, this package, the standard library, frozen or
    generated code: frames a diagnosis looks past), ``"package"`` (an installed third-party
    package: a file under a site-packages/dist-packages directory) or ``"user"`` (everything
    else: the user's scripts, tests and project, including the project installed in editable
    mode, whose files stay in the project). A package installed into site-packages whose
    top-level name is also a package or module at ``project_root`` (default: the working
    directory) or ``project_root/src`` is the user's own project installed non-editable, hence
    ``"user"``. ``package`` is the
    distribution and version providing it (``"transformers 5.0.0"``, or the top-level module
    name when no distribution claims it); ``relative path`` is the path below the install
    directory (``"transformers/masking_utils.py"``).

    >>> import os, torch
    >>> code_owner(torch.__file__)[0], code_owner(os.__file__)[0]
    ('torch', 'torch')
    >>> code_owner(os.path.join("tmp", "site-packages", "fakepkg", "mod.py"))
    ('package', 'fakepkg', 'fakepkg/mod.py')
    >>> code_owner(os.path.abspath("my_model.py"))[0]
    'user'
    """
    return _code_owner(filename, project_root or os.getcwd())


@functools.lru_cache(maxsize=4096)
def _code_owner(filename: str, root: str) -> tuple:
    import torch

    if not filename or "<frozen" in filename:
        return "torch", "", ""
    if filename.startswith("<"):  # a notebook cell, a doctest, <stdin>, generated model code
        return "user", "", ""
    path = os.path.realpath(os.path.abspath(filename))
    torch_dir = os.path.realpath(os.path.dirname(os.path.abspath(torch.__file__)))
    if _under(path, os.path.realpath(_PKG_DIR)) or _under(path, torch_dir):
        return "torch", "", ""
    rel = None
    for d in _install_dirs():
        if _under(path, d):
            rel = os.path.relpath(path, d)
            break
    if rel is None:
        parts = path.split(os.sep)
        hits = [i for i, p in enumerate(parts) if p in _SITE_NAMES]
        if hits:
            rel = os.sep.join(parts[hits[-1] + 1:])
    if rel is not None:
        top = rel.split(os.sep)[0]
        top = top[:-3] if top.endswith(".py") else top
        if top in ("torch", "torchgen", "functorch"):
            return "torch", "", ""
        if top and any(os.path.isfile(os.path.join(root, *sub, name)) for sub in ((), ("src",))
                       for name in (os.path.join(top, "__init__.py"), top + ".py")):
            return "user", "", ""
        return "package", _distributions().get(top, top), rel.replace(os.sep, "/")
    if any(_under(path, d) for d in _stdlib_dirs()):
        return "torch", "", ""
    return "user", "", ""


def sync_site(project_root: str = "") -> dict:
    """Who dispatched the current op: the frames between the op and the user's code.

    Walks outward past this package's, torch's and the standard library's frames. The first
    other frame is the one responsible: ``origin`` is ``"user"`` when it is the user's code,
    ``"package"`` when it lies in an installed third-party package (see :func:`code_owner`), and
    ``""`` when the walk comes back into this package first (an op of autograd's backward).
    Returns ``{"origin", "source", "package", "caller", "frames"}``: ``source`` is
    ``file:line in function`` of that frame, ``caller`` (for ``"package"``) the user's line that
    called into the package (``""`` when the package was entered from this package, e.g. the
    model call itself), ``frames`` ``[[path, line, function, module], ...]`` from that frame out
    to the first user frame, which allow patterns are matched against.

    >>> import torch
    >>> class Peek(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x * x.sum().item()
    >>> s = count_ops(Peek(), torch.randn(2, 4)).syncs[0]  # count_ops calls sync_site per sync
    >>> s.origin, s.frames[0][2], s.caller
    ('user', 'Peek.forward', '')
    """
    frame: Any = caller_frame(1)
    left_package = False
    out: dict = {"origin": "", "source": "", "package": "", "caller": "", "frames": []}
    while frame is not None:
        code = frame.f_code
        f = os.path.abspath(code.co_filename)
        in_pkg = f.startswith(_PKG_DIR + os.sep)
        if in_pkg and code.co_name == "_one_hot_marked":
            pass
        elif in_pkg:
            if left_package:
                return out
        else:
            kind, package, rel = code_owner(code.co_filename, project_root)
            if kind == "torch":
                left_package = True
            else:
                left_package = True
                out["frames"].append([f, frame.f_lineno, getattr(code, "co_qualname", code.co_name),
                                      frame.f_globals.get("__name__", "")])
                where = f"{frame.f_lineno} in {code.co_name}"
                if kind == "user":
                    line = f"{_display(f)}:{where}"
                    if out["origin"]:
                        out["caller"] = line
                    else:
                        out.update(origin="user", source=line)
                    return out
                if not out["origin"]:
                    out.update(origin="package", package=package, source=f"{rel}:{where}")
        frame = frame.f_back
    return out


def parse_sync_pattern(pattern: Any) -> tuple:
    """``(kind, where, what)`` of an allow pattern for host-device syncs; ValueError if malformed.

    Two forms: a path (it has a ``/`` or ends in ``.py``), matched against the end of a frame's
    file path, optionally ``:LINE`` or ``:FUNCTION``: ``"transformers/masking_utils.py"``,
    ``"models/net.py:42"``; or a dotted module, optionally ``:FUNCTION``, matching that module
    and its submodules: ``"transformers"``, ``"my_pkg.mod:func"``. ``*`` globs are allowed.

    >>> parse_sync_pattern("transformers/masking_utils.py")
    ('path', 'transformers/masking_utils.py', '')
    >>> parse_sync_pattern("my_pkg.mod:func")
    ('module', 'my_pkg.mod', 'func')
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"{pattern!r} is not a non-empty string")
    where, _, what = pattern.strip().partition(":")
    if not where or (_ and not what):
        raise ValueError(f"{pattern!r} has an empty part around ':'")
    if "/" in where or "\\" in where or where.endswith(".py"):
        return "path", where.replace("\\", "/"), what
    if not all(part.replace("*", "x").isidentifier() for part in where.split(".")):
        raise ValueError(f"{pattern!r} is neither a path (with '/' or ending in .py) nor a dotted"
                         " module name")
    if what and not what.isdigit() and not all(
            p.replace("*", "x").isidentifier() for p in what.split(".")):
        raise ValueError(f"{pattern!r}: {what!r} after ':' is neither a line number nor a function")
    return "module", where, what


def sync_matches(pattern: str, sync: "Sync") -> bool:
    """Whether ``pattern`` (see :func:`parse_sync_pattern`) names one of ``sync.frames``: the
    frame that dispatched it or, for a sync inside a package, a frame on the way from the
    user's code to it.

    >>> s = Sync("aten._local_scalar_dense", frames=[
    ...     ["/venv/site-packages/transformers/masking_utils.py", 354, "_ignore_mask",
    ...      "transformers.masking_utils"]])
    >>> [sync_matches(p, s) for p in ("transformers", "transformers/masking_utils.py:354",
    ...                               "masking_utils.py:_ignore_*", "torch", "other.py")]
    [True, True, True, False, False]
    """
    from fnmatch import fnmatchcase

    kind, where, what = parse_sync_pattern(pattern)
    for path, line, function, module in sync.frames:
        if kind == "path":
            path = path.replace("\\", "/")
            if not (fnmatchcase(path, where) or fnmatchcase(path, "*/" + where.lstrip("/"))):
                continue
        elif not (fnmatchcase(module, where) or fnmatchcase(module, where + ".*")):
            continue
        if not what or (what.isdigit() and int(what) == line) or fnmatchcase(function, what) \
                or fnmatchcase(function.rsplit(".", 1)[-1], what):
            return True
    return False


def _display(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _make_mode(record: dict) -> Any:
    from ._torch_compat import dispatch_mode_base

    class OpCounterMode(dispatch_mode_base()):  # type: ignore[misc]
        """Counts every dispatched op and records host-device syncs into ``record``."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            name, full = _op_name(func)
            stack = record["stack"]
            phase = record["phase"]
            if phase == "forward":
                inner = stack[-1] if stack else ROOT
                for path in dict.fromkeys(stack or [ROOT]):
                    record["by_module"][path] += 1
            else:
                inner = LOSS if phase == "loss" else BACKWARD
                record["by_module"][inner] += 1
            record["by_module_self"][inner] += 1
            record["by_op"][full] += 1
            record["phase_total"][phase] += 1
            kind = _sync_kind(name, func, args, kwargs)
            if kind is not None and _reads_host_data(args, record):
                kind = None
            if kind is not None and not record.get("cpu_only_validation"):
                site = sync_site()
                record["syncs"].append(Sync(kind, site["source"], phase,
                                            inner if phase == "forward" else "", site["origin"],
                                            site["package"], site["caller"], site["frames"]))
            return func(*args, **kwargs)

    return OpCounterMode()


def _reads_host_data(args: tuple, record: dict) -> bool:
    """Whether the op reads a tensor that lives on the host by design whatever the model's
    device: the ``batch_sizes`` of a ``PackedSequence`` (recursive layers read its first entry
    with ``int()``; on a GPU it is a CPU tensor, so that is no device sync)."""
    import torch

    host = record.get("host_storages")
    if not host or not args or not isinstance(args[0], torch.Tensor):
        return False
    try:
        return args[0].untyped_storage().data_ptr() in host
    except RuntimeError:
        return False


def _note_host_tensors(args: Any, record: dict) -> None:
    """Remember the storages of ``PackedSequence.batch_sizes`` among a module's inputs."""
    from torch.nn.utils.rnn import PackedSequence

    for a in args if isinstance(args, tuple) else (args,):
        if isinstance(a, PackedSequence) and a.batch_sizes is not None:
            record.setdefault("host_storages", set()).add(
                a.batch_sizes.untyped_storage().data_ptr())


@contextlib.contextmanager
def _cpu_only_validation(record: dict) -> Iterator[None]:
    """Marks the syncs of ``F.one_hot(x, num_classes)``: on CPU it reads min and max of ``x``
    to validate it, which CUDA's kernel skips when ``num_classes`` is given (no sync there);
    they are not reported. ``torch.nn.functional.one_hot`` is wrapped for the duration and put
    back (a torch-function mode would also switch off torch's fused attention paths)."""
    import torch.nn.functional as F

    original = F.one_hot

    def _one_hot_marked(tensor: Any, num_classes: int = -1) -> Any:
        if isinstance(num_classes, int) and num_classes > 0:
            record["cpu_only_validation"] = record.get("cpu_only_validation", 0) + 1
            try:
                return original(tensor, num_classes)
            finally:
                record["cpu_only_validation"] -= 1
        return original(tensor, num_classes)

    F.one_hot = _one_hot_marked
    try:
        yield
    finally:
        F.one_hot = original


def count_ops(model: Any, batch: Any, *, backward: bool = False, loss: Any = None) -> OpCount:
    """Run ``model`` on ``batch`` (and, with ``backward=True``, the loss and its backward) under an
    op-counting dispatch mode; return an :class:`OpCount`.

    The model is run as given (its train/eval mode and device are the caller's business; checks
    pass a copy). ``batch`` is anything ``Batch.from_user`` accepts; ``loss`` anything
    ``resolve_loss`` accepts. Hooks and the mode are removed even when the model raises; a model
    that raises gives a ``ModelError`` naming the module.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> c = count_ops(m, torch.randn(2, 4))
    >>> c.by_module["<root>"], c.by_module["0"], c.by_module["1"], c.syncs  # t+addmm; relu+detach
    (4, 2, 2, [])
    >>> class Peek(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x * x.sum().item()
    >>> [s.op for s in count_ops(Peek(), torch.randn(2, 4)).syncs]
    ['aten._local_scalar_dense']
    """
    import torch

    from .batch import Batch
    from .forward import run_forward
    from .losses import resolve_loss

    data = Batch.from_user(batch, model=model)
    names = {m: (n or ROOT) for n, m in model.named_modules()} if hasattr(model, "named_modules") else {}
    record: dict = {"stack": [], "phase": "forward", "by_op": Counter(), "by_module": Counter(),
              "by_module_self": Counter(), "phase_total": Counter(), "syncs": []}

    def push(mod: Any, args: Any) -> None:
        record["stack"].append(names.get(mod, ROOT))
        _note_host_tensors(args, record)

    def pop(mod: Any, args: Any, out: Any) -> None:
        if record["stack"]:
            record["stack"].pop()

    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop))
        with _cpu_only_validation(record), _make_mode(record):
            out = run_forward(model, data)
            record["stack"].clear()
            if backward:
                record["phase"] = "loss"
                total, _ = resolve_loss(loss, data, out).compute(out, data, model)
                if isinstance(total, torch.Tensor) and total.requires_grad:
                    record["phase"] = "backward"
                    total.backward()
    finally:
        for h in handles:
            h.remove()
        record["stack"].clear()
    phases = record["phase_total"]
    return OpCount(total=sum(phases.values()), forward=phases["forward"],
                   backward=phases["backward"], by_op=dict(record["by_op"]),
                   by_module=dict(record["by_module"]),
                   by_module_self=dict(record["by_module_self"]), syncs=list(record["syncs"]))
