"""Look inside checkpoints safely, check them against a model, and measure how far weights moved.

:func:`inspect_checkpoint` opens a PyTorch checkpoint (``torch.save`` zip or legacy format) or a
``.safetensors`` file and returns a :class:`CheckpointInfo`: stored config and metadata (epoch,
step, best metric, optimizer/scheduler state present), parameters by top-level prefix, dtypes,
sizes and, given a model, the missing/unexpected keys and shape mismatches.

Safety
    PyTorch files are read with ``torch.load(path, map_location="cpu", weights_only=True,
    mmap=True)`` (``mmap=False`` only for the legacy non-zip format): the restricted unpickler
    refuses any global that is not a tensor, container or plain value, so a hostile pickle
    (``__reduce__`` calling ``os.system``, ``eval``, ``subprocess``...) is refused before its
    payload can run and becomes a :class:`CheckpointError`. ``allow_unsafe=True`` switches to
    ``weights_only=False``: DANGEROUS, it executes whatever code the file contains; use it only
    for a file you created or fully trust. ``.safetensors`` files are parsed here (8-byte
    little-endian header length, JSON header, raw data); the header is validated against the
    file size before anything is allocated, and tensors are read through a memory map only
    when their values are needed (:func:`load_state_dict`, :func:`compare_checkpoints`).

Every problem with the file (missing, a directory, empty, truncated, corrupt, wrong format,
untrusted) is a :class:`CheckpointError` with a one-line message naming the file.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import UsageError, first_line
from .result import _builtin
from .units import dtype_name, format_bytes

#: The preamble torch puts before the reason a weights-only load failed.
_TORCH_PREAMBLE = ("Weights only load failed",)

__all__ = ["CheckpointError", "CheckpointInfo", "TensorDrift", "DriftReport",
           "inspect_checkpoint", "load_state_dict", "compare_checkpoints"]

STATE_KEYS = ("model_state_dict", "state_dict", "model", "module", "net", "network",
              "ema", "ema_state_dict", "model_ema", "ema_model")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_states", "optim", "opt")
SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "scheduler_state_dict", "lr_schedulers")
CONFIG_KEYS = ("config", "cfg", "hparams", "hyper_parameters", "args", "model_config")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
_CHUNK = 1 << 22  # elements compared in float64 at a time

_ST_DTYPES = {  # safetensors dtype -> (torch dtype name, bytes per element)
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}


class CheckpointError(UsageError):
    """A checkpoint that cannot be read (or may not be read safely); the message is one line.

    >>> str(CheckpointError("checkpoint 'x.pt': no such file"))
    "checkpoint 'x.pt': no such file"
    """


def _err(path: Any, problem: str) -> CheckpointError:
    problem = " ".join(str(problem).split())
    return CheckpointError(f"checkpoint {str(path)!r}: {problem}")


@dataclass
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found.

    ``tensors`` maps each weight name to ``[shape list, dtype name]``; ``by_prefix`` maps the
    first dotted component of each name to ``{"tensors", "numel", "bytes"}``.

    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "ck.pt")
    >>> torch.save({"model_state_dict": torch.nn.Linear(3, 2).state_dict(), "epoch": 7}, path)
    >>> info = inspect_checkpoint(path)
    >>> info.state_key, info.total_numel, info.metadata["epoch"]   # 3*2 + 2 = 8
    ('model_state_dict', 8, 7)
    """

    path: str
    format: str
    file_bytes: int
    state_key: Optional[str]
    tensors: dict
    total_numel: int
    total_bytes: int
    dtypes: dict
    by_prefix: dict
    config: Any = None
    metadata: dict = field(default_factory=dict)
    has_optimizer: bool = False
    has_scheduler: bool = False
    other_state_dicts: list = field(default_factory=list)
    other_keys: list = field(default_factory=list)
    model_checked: bool = False
    missing_keys: list = field(default_factory=list)
    unexpected_keys: list = field(default_factory=list)
    shape_mismatches: list = field(default_factory=list)
    stripped_prefix: str = ""

    @property
    def matches_model(self) -> Optional[bool]:
        """True when a model was given and keys and shapes all agree (None without a model).

        >>> CheckpointInfo("p", "torch-zip", 0, None, {}, 0, 0, {}, {}).matches_model is None
        True
        """
        if not self.model_checked:
            return None
        return not (self.missing_keys or self.unexpected_keys or self.shape_mismatches)

    def to_dict(self) -> dict:
        """JSON-ready dictionary.

        >>> CheckpointInfo("p", "safetensors", 8, None, {}, 0, 0, {}, {}).to_dict()["format"]
        'safetensors'
        """
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["matches_model"] = self.matches_model
        return _builtin(data)

    def render(self, verbose: bool = False) -> str:
        """Text report; ``verbose`` lists every tensor.

        >>> info = CheckpointInfo("ck.pt", "torch-zip", 1024, "", {"w": [[2], "float32"]}, 2, 8,
        ...                       {"float32": 2}, {"w": {"tensors": 1, "numel": 2, "bytes": 8}})
        >>> print(info.render())
        Checkpoint: ck.pt (torch-zip, 1.00 KiB)
          Weights:             top level (raw state dict)
          Tensors:             1, 2 elements, 8 B
          Dtypes:              float32: 2
          Optimizer state:     no
          Scheduler state:     no
        Parameters by prefix:
          w                   :          2 (100.0%)  8 B
        """
        where = "top level (raw state dict)" if self.state_key == "" else (
            repr(self.state_key) if self.state_key else "none found")
        lines = [f"Checkpoint: {_p(self.path)} ({self.format}, {format_bytes(self.file_bytes)})",
                 f"  Weights:             {where}",
                 f"  Tensors:             {len(self.tensors):,}, {self.total_numel:,} elements, "
                 f"{format_bytes(self.total_bytes)}",
                 "  Dtypes:              " + (", ".join(f"{k}: {v:,}" for k, v in self.dtypes.items())
                                              or "-")]
        for key, value in self.metadata.items():
            lines.append(f"  {_p(key) + ':':<21}{_p(_short(value))}")
        lines.append(f"  Optimizer state:     {'yes' if self.has_optimizer else 'no'}")
        lines.append(f"  Scheduler state:     {'yes' if self.has_scheduler else 'no'}")
        if self.other_state_dicts:
            lines.append(f"  Other weight sets:   {', '.join(map(_p, self.other_state_dicts))}")
        if self.other_keys:
            lines.append(f"  Other entries:       {', '.join(map(_p, self.other_keys))}")
        if self.config is not None:
            lines.append("Config:")
            if isinstance(self.config, dict):
                for k, v in self.config.items():
                    lines.append(f"  {_p(k) + ':':<21}{_p(_short(v))}")
            else:
                lines.append(f"  {_p(_short(self.config))}")
        lines.append("Parameters by prefix:")
        shown = self.by_prefix if verbose else dict(list(self.by_prefix.items())[:40])
        for prefix, d in shown.items():
            pct = 100.0 * d["numel"] / self.total_numel if self.total_numel else 0.0
            lines.append(f"  {_p(prefix):<20}: {d['numel']:>10,} ({pct:5.1f}%)  {format_bytes(d['bytes'])}")
        if len(shown) < len(self.by_prefix):
            lines.append(f"  ... {len(self.by_prefix) - len(shown):,} more prefixes (--verbose"
                         f" lists every tensor)")
        if self.model_checked:
            lines.append("Model check: " + ("keys and shapes match" if self.matches_model else
                                            "MISMATCH"))
            if self.stripped_prefix:
                lines.append(f"  (prefix {self.stripped_prefix!r} stripped from checkpoint keys)")
            for name in self.missing_keys:
                lines.append(f"  missing in checkpoint: {_p(name)}")
            for name in self.unexpected_keys:
                lines.append(f"  unexpected (not in model): {_p(name)}")
            for name, ck, mo in self.shape_mismatches:
                lines.append(f"  shape mismatch: {_p(name)}: checkpoint {tuple(ck)}, model {tuple(mo)}")
        if verbose:
            lines.append("Tensors:")
            for name, (shape, dtype) in self.tensors.items():
                lines.append(f"  {_p(name)}  {tuple(shape)}  {dtype}")
        return "\n".join(lines)


def _p(value: Any) -> str:
    """A name read from a file, safe to print: control characters (newlines, terminal escapes)
    and lone surrogates shown as escapes.

    >>> _p("line1\\nline2\\x1b[31m")
    'line1\\\\nline2\\\\x1b[31m'
    """
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _short(value: Any, limit: int = 100) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------


def _check_path(path: Any) -> int:
    p = os.fspath(path)
    if not os.path.exists(p):
        raise _err(path, "no such file")
    if os.path.isdir(p):
        raise _err(path, "is a directory, expected a checkpoint file")
    if not os.path.isfile(p):
        raise _err(path, "is not a regular file (a device, FIFO or socket), expected a"
                         " checkpoint file")
    size = os.path.getsize(p)
    if size == 0:
        raise _err(path, "is empty (0 bytes)")
    return size


def _sniff(path: Any, size: int) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    if size >= 9 and head[8:9] == b"{":
        return "safetensors"
    if str(path).endswith(".safetensors"):
        return "safetensors"
    raise _err(path, f"not a PyTorch (zip or pickle) or safetensors file (starts with {head[:8]!r})")


def _safetensors_header(path: Any, size: int) -> tuple:
    """Validated (entries, metadata, data_start); nothing is allocated from declared sizes."""
    if size < 8:
        raise _err(path, f"truncated safetensors file ({size} bytes, the header length alone needs 8)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise _err(path, f"safetensors header declares {n:,} bytes but the file has only "
                             f"{size - 8:,} after the length field (truncated or not safetensors)")
        if n > MAX_SAFETENSORS_HEADER:
            raise _err(path, f"safetensors header of {format_bytes(n)} exceeds the "
                             f"{format_bytes(MAX_SAFETENSORS_HEADER)} limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _err(path, f"corrupt safetensors header (not JSON: {exc})") from None
    except RecursionError:
        raise _err(path, "corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise _err(path, "corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _err(path, "corrupt safetensors header (__metadata__ is not an object)")
    entries = {}
    for name, spec in header.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str) \
                or spec["dtype"] not in _ST_DTYPES:
            raise _err(path, f"safetensors tensor {name!r}: unknown or missing dtype "
                             f"{spec.get('dtype') if isinstance(spec, dict) else spec!r}")
        shape, offsets = spec.get("shape"), spec.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
            raise _err(path, f"safetensors tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(_is_int(o) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise _err(path, f"safetensors tensor {name!r}: bad data_offsets {offsets!r}")
        dtype, itemsize = _ST_DTYPES[spec["dtype"]]
        nbytes = math.prod(shape) * itemsize
        if offsets[1] > data_len:
            raise _err(path, f"safetensors tensor {name!r} declares {format_bytes(nbytes)} ending at "
                             f"byte {offsets[1]:,} of the data, but the file holds only "
                             f"{format_bytes(data_len)} of data (truncated or corrupt)")
        if offsets[1] - offsets[0] != nbytes:
            raise _err(path, f"safetensors tensor {name!r}: shape {shape} of {dtype} needs "
                             f"{nbytes:,} bytes, data_offsets span {offsets[1] - offsets[0]:,}")
        entries[name] = (shape, dtype, offsets[0], nbytes)
    end = 0  # the format lays tensors end to end: no overlap (aliasing), no gap
    for name, (_, _, begin, nbytes) in sorted(entries.items(), key=lambda kv: (kv[1][2],
                                                                                 kv[1][3])):
        if nbytes and begin != end:
            problem = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise _err(path, f"safetensors tensor {name!r}: data_offsets start at byte {begin:,},"
                             f" which {problem} (expected {end:,}; corrupt or crafted)")
        end = max(end, begin + nbytes)
    return entries, {str(k): v for k, v in metadata.items()}, 8 + n


from .units import is_int as _is_int


def _safetensors_tensors(path: Any, entries: dict, start: int) -> dict:
    import torch

    out = {}
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if entries and any(
            e[3] for e in entries.values()) else None
    for name, (shape, dtype, offset, nbytes) in entries.items():
        tdtype = getattr(torch, dtype)
        if nbytes == 0:
            try:
                out[name] = torch.empty(shape, dtype=tdtype)
            except (RuntimeError, ValueError, OverflowError, TypeError) as exc:
                raise _err(path, f"tensor {name!r}: shape {list(shape)} cannot be made"
                                 f" ({first_line(exc, or_type=True, limit=200, skip=_TORCH_PREAMBLE)})") from None
            continue
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=start + offset)
        out[name] = flat.view(tdtype).reshape(shape)
    return out


_MAX_INFLATE = 64 << 20  # a compressed record may inflate to this much (or 4x the file)
_MAX_PICKLE = 256 << 20  # the pickle and other metadata records of a torch.save archive


def _verify_zip(path: Any, full: bool) -> None:
    """CRC-check the small records (pickle, version, byteorder) or, with ``full``, every record."""
    try:
        with zipfile.ZipFile(path) as zf:
            file_size = os.path.getsize(path)
            for item in zf.infolist():
                if item.compress_type != zipfile.ZIP_STORED and \
                        item.file_size > max(_MAX_INFLATE, 4 * file_size):
                    raise _err(path, f"record {item.filename!r} inflates to {item.file_size}"
                                     f" bytes from {item.compress_size} (a zip bomb?);"
                                     f" torch.save stores its records uncompressed")
                if "/data/" not in item.filename and item.file_size > _MAX_PICKLE:
                    raise _err(path, f"record {item.filename!r} declares {item.file_size}"
                                     f" bytes, more than a checkpoint's metadata needs"
                                     f" ({_MAX_PICKLE} at most)")
            for item in zf.infolist():
                if full or "/data/" not in item.filename:
                    with zf.open(item) as member:
                        while member.read(1 << 24):
                            pass
    except CheckpointError:
        raise
    except zipfile.BadZipFile as exc:
        raise _err(path, f"corrupt or truncated zip archive ({exc})") from None
    except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error) as exc:
        raise _err(path, f"corrupt or truncated zip archive ({type(exc).__name__}: {exc})") from None


def _torch_load(path: Any, fmt: str, allow_unsafe: bool, verify: bool) -> Any:
    import pickle

    import torch

    if fmt == "torch-zip":
        _verify_zip(path, verify)
    try:
        with warnings.catch_warnings():  # torch's deprecation notes about the file's contents
            warnings.simplefilter("ignore")
            if allow_unsafe:
                return torch.load(path, map_location="cpu", weights_only=False)
            try:
                os.fspath(path).encode("utf-8")
            except UnicodeEncodeError:  # a name torch's C++ reader cannot take: read via a handle
                with open(path, "rb") as fh:
                    return torch.load(fh, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=fmt == "torch-zip")
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text and (found or "Unsupported" in text):
            what = f" (it references {found.group(1)})" if found else ""
            raise _err(path, f"refused: loading it needs an untrusted (weights_only=False) load, "
                             f"which can run arbitrary code{what}; pass allow_unsafe=True only "
                             f"for a file you trust") from None
        raise _err(path, f"corrupt or truncated pickle data ({first_line(text, limit=200, skip=_TORCH_PREAMBLE)})") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for bad files
        problem = first_line(exc, or_type=True, limit=200, skip=_TORCH_PREAMBLE)
        raise _err(path, f"corrupt or truncated ({type(exc).__name__}: {problem})") from None




def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _is_state_dict(x: Any) -> bool:
    return isinstance(x, dict) and bool(x) and all(isinstance(k, str) for k in x) and \
        sum(_is_tensor(v) for v in x.values()) >= max(1, len(x) // 2)


def _open(path: Any, allow_unsafe: bool, verify: bool, need_values: bool) -> tuple:
    """(format, file size, loaded object or None, safetensors (entries, metadata, start) or None)."""
    size = _check_path(path)
    fmt = _sniff(path, size)
    if fmt == "safetensors":
        header = _safetensors_header(path, size)
        obj = _safetensors_tensors(path, header[0], header[2]) if need_values else None
        return fmt, size, obj, header
    return fmt, size, _torch_load(path, fmt, allow_unsafe, verify), None


def _module_state(x: Any) -> Any:
    """The state dict of a whole pickled ``nn.Module`` (``torch.save(model)``, loaded with
    ``allow_unsafe=True``), or None for anything else."""
    if isinstance(x, dict) or not (callable(getattr(x, "state_dict", None))
                                   and callable(getattr(x, "named_parameters", None))):
        return None
    try:
        state = x.state_dict()
    except Exception:  # noqa: BLE001 - an object that only looks like a module
        return None
    return state if _is_state_dict(state) else None


def _split(obj: Any) -> tuple:
    """(state key, state dict, the rest of a wrapper dict); the standard wrapper keys
    (``model_state_dict``, ``state_dict``, ...) are looked for first, so a wrapper holding a
    few tensors of its own (a step counter) is not taken for the state dict. A whole pickled
    module, alone or under one of those keys, gives its ``state_dict()``.

    >>> import torch
    >>> key, state, rest = _split({"model": torch.nn.Linear(2, 1), "epoch": 3})
    >>> key, sorted(state), rest
    ('model (a pickled Linear module)', ['bias', 'weight'], {'epoch': 3})
    """
    module_state = _module_state(obj)
    if module_state is not None:
        return (f"<a pickled {type(obj).__name__} module>",
                {k: v for k, v in module_state.items() if _is_tensor(v)}, {})
    if isinstance(obj, dict):
        for key in STATE_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return key, {k: v for k, v in obj[key].items() if _is_tensor(v)}, \
                    {k: v for k, v in obj.items() if k != key}
            module_state = _module_state(obj.get(key))
            if module_state is not None:
                return (f"{key} (a pickled {type(obj[key]).__name__} module)",
                        {k: v for k, v in module_state.items() if _is_tensor(v)},
                        {k: v for k, v in obj.items() if k != key})
    if _is_state_dict(obj):
        return "", {k: v for k, v in obj.items() if _is_tensor(v)}, \
            {k: v for k, v in obj.items() if not _is_tensor(v)}
    if isinstance(obj, dict):
        return None, {}, dict(obj)
    return None, {}, {"<object>": obj}


def _shape(t: Any) -> list:
    """A tensor's shape; a nested tensor (no single shape) counts as its flat storage."""
    try:
        return list(t.shape)
    except RuntimeError:
        return [int(_stored_bytes(t) // max(1, t.element_size()))]


def _stored_bytes(t: Any) -> int:
    """Bytes a tensor holds in the file: its storage (an expanded, stride-0 tensor stores one
    row), or its values and indices when sparse."""
    import torch

    try:
        if t.layout != torch.strided:
            return sum(_stored_bytes(x) for x in _sparse_parts(t))
        return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, TypeError):
        return 0


def _sparse_parts(t: Any) -> list:
    import torch

    if t.layout == torch.sparse_coo:
        return [t._values(), t._indices()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.values(), t.crow_indices(), t.col_indices()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.values(), t.ccol_indices(), t.row_indices()]
    return []


def _resolve_model(model: Any) -> Any:
    import torch

    if model is None or isinstance(model, torch.nn.Module):
        return model
    if callable(model):
        built = model()
        if isinstance(built, torch.nn.Module):
            return built
        raise UsageError(f"model: expected an nn.Module or a zero-argument factory returning one, "
                         f"the factory returned {type(built).__name__}")
    raise UsageError(f"model: expected an nn.Module or a zero-argument factory, got "
                     f"{type(model).__name__}")


def load_state_dict(path: Any, allow_unsafe: bool = False, verify: bool = False) -> dict:
    """The weights stored in ``path`` (state dict found as in :func:`inspect_checkpoint`), CPU,
    memory-mapped where the format allows.

    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "ck.pt")
    >>> torch.save({"state_dict": {"w": torch.ones(2)}, "step": 3}, path)
    >>> load_state_dict(path)
    {'w': tensor([1., 1.])}
    """
    fmt, _, obj, _ = _open(path, allow_unsafe, verify, need_values=True)
    if fmt == "safetensors":
        return obj
    key, state, _ = _split(obj)
    if key is None:
        raise _err(path, "holds no state dict (no tensors at the top level nor under "
                         f"{', '.join(STATE_KEYS[:4])}, ...)")
    return state


def inspect_checkpoint(path: Any, model: Any = None, allow_unsafe: bool = False,
                       verify: bool = False) -> CheckpointInfo:
    """Describe the checkpoint at ``path`` (see the module doc for what is safe).

    ``model`` (an ``nn.Module`` or a zero-argument factory; a ``meta``-device model is fine)
    adds the key and shape comparison; a ``"module."`` prefix on every checkpoint key (saved
    from ``DataParallel``) is stripped for it. ``verify=True`` CRC-checks every record of a zip
    checkpoint (reads the whole file); by default only the small metadata records are checked.
    ``allow_unsafe=True`` runs an unrestricted unpickler: it executes any code in the file.

    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "ck.pt")
    >>> torch.save({"fc.weight": torch.zeros(4, 3)}, path)
    >>> info = inspect_checkpoint(path, model=torch.nn.Sequential(torch.nn.Linear(3, 4)))
    >>> info.missing_keys, info.unexpected_keys
    (['0.bias', '0.weight'], ['fc.weight'])
    """
    fmt, size, obj, header = _open(path, allow_unsafe, verify, need_values=False)
    metadata: dict = {}
    config = None
    rest: dict = {}
    if fmt == "safetensors":
        entries, st_meta, _ = header
        tensors = {name: [list(e[0]), e[1]] for name, e in entries.items()}
        nbytes = {name: e[3] for name, e in entries.items()}
        key = ""
        metadata.update(st_meta)
        for ck in CONFIG_KEYS:
            if isinstance(metadata.get(ck), str):
                text = metadata.pop(ck)
                try:
                    config = json.loads(text)
                except (ValueError, RecursionError):
                    config = text
                break
    else:
        key, state, rest = _split(obj)
        tensors = {n: [_shape(t), dtype_name(t.dtype)] for n, t in state.items()}
        nbytes = {n: _stored_bytes(t) for n, t in state.items()}
    info = CheckpointInfo(str(path), fmt, size, key, tensors, 0, 0, {}, {})
    for name, (shape, dtype) in tensors.items():
        n = math.prod(shape)
        info.total_numel += n
        info.total_bytes += nbytes[name]
        info.dtypes[dtype] = info.dtypes.get(dtype, 0) + n
        prefix = name.split(".", 1)[0]
        d = info.by_prefix.setdefault(prefix, {"tensors": 0, "numel": 0, "bytes": 0})
        d["tensors"] += 1
        d["numel"] += n
        d["bytes"] += nbytes[name]
    for k, v in rest.items():
        if k in OPTIMIZER_KEYS:
            info.has_optimizer = info.has_optimizer or bool(v)
        elif k in SCHEDULER_KEYS:
            info.has_scheduler = info.has_scheduler or bool(v)
        elif k in CONFIG_KEYS and config is None:
            config = v if isinstance(v, (dict, list, str, int, float, bool)) else \
                getattr(v, "__dict__", str(v))
        elif _is_state_dict(v):
            info.other_state_dicts.append(str(k))
        elif v is None or isinstance(v, (int, float, str, bool)) or (
                _is_tensor(v) and v.numel() == 1):
            metadata[str(k)] = v.item() if _is_tensor(v) else v
        else:
            info.other_keys.append(k)
    info.metadata = _bounded(metadata)
    info.config = _bounded(config) if config is not None else None
    info.dtypes = dict(sorted(info.dtypes.items(), key=lambda kv: -kv[1]))
    info.by_prefix = dict(sorted(info.by_prefix.items(), key=lambda kv: -kv[1]["numel"]))
    module = _resolve_model(model)
    if module is not None:
        _compare_with_model(info, module)
    return info


_MAX_CONFIG_ITEMS = 20000  # values kept from a stored config (a file could nest without end)
_MAX_CONFIG_DEPTH = 32


def _bounded(value: Any) -> Any:
    """``_builtin`` of a stored config or metadata, at most ``_MAX_CONFIG_ITEMS`` values and
    ``_MAX_CONFIG_DEPTH`` levels: a shared or deeply nested structure in a small file (a
    "billion laughs" list) is cut with a marker, never expanded.

    >>> deep = []
    >>> for _ in range(3):
    ...     deep = [deep, deep]
    >>> _bounded(deep)
    [[[[], []], [[], []]], [[[], []], [[], []]]]
    """
    budget = [_MAX_CONFIG_ITEMS]

    def walk(v: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            return "<cut: too many values>"
        if depth > _MAX_CONFIG_DEPTH:
            return "<cut: nested too deep>"
        if isinstance(v, dict):
            return {_short(k, 200): walk(x, depth + 1) for k, x in list(v.items())}
        if isinstance(v, (list, tuple)):
            return [walk(x, depth + 1) for x in v]
        if isinstance(v, str):
            return v[:10000]
        return _builtin(v)

    out = walk(value, 0)
    if budget[0] < 0:
        return {"<truncated>": f"more than {_MAX_CONFIG_ITEMS} values", "head": out} \
            if not isinstance(out, dict) else {**out, "<truncated>": True}
    return out


def _compare_with_model(info: CheckpointInfo, module: Any) -> None:
    expected = {n: list(t.shape) for n, t in module.state_dict().items()}
    stored = dict(info.tensors)
    for prefix in ("module.", "_orig_mod."):
        if stored and all(n.startswith(prefix) for n in stored) and not any(
                n.startswith(prefix) for n in expected):
            stored = {n[len(prefix):]: v for n, v in stored.items()}
            info.stripped_prefix = prefix
            break
    info.model_checked = True
    info.missing_keys = sorted(set(expected) - set(stored))
    info.unexpected_keys = sorted(set(stored) - set(expected))
    info.shape_mismatches = [[n, stored[n][0], expected[n]] for n in sorted(set(stored) & set(expected))
                             if list(stored[n][0]) != expected[n]]


# The drift between two checkpoints lives in checkpoint_compare.py (it imports from here); its
# names stay importable from this module.
from .checkpoint_compare import DriftReport, TensorDrift, compare_checkpoints  # noqa: E402,F401
