"""What a model is made of: parameter counts, sizes, module types, tied weights and weight statistics.

:func:`inspect_model` walks the model's registered parameters and buffers once and returns a
:class:`ModelInfo` (plain data, JSON-ready through :meth:`ModelInfo.to_dict`).

Counting rules
    * A tensor is counted once even when it is registered under several names (tied weights
      such as an embedding shared with the output projection, or two parameters that are views
      of exactly the same storage region). :attr:`ModelInfo.tied` lists which names share it.
    * "By module type" attributes each parameter to the module that owns it directly (the
      module whose ``_parameters`` holds it; for a tied tensor, the first owner met in
      ``named_parameters`` order), so the percentages add up to 100%.
    * Buffers (running statistics, masks, position tables) are reported separately and never
      counted as parameters.

Statistics
    ``mean``, ``std`` (population, ``ddof=0`` like numpy), ``min`` and ``max`` are computed in
    float64 on the CPU over the finite values, chunk by chunk, so a large tensor is never
    copied whole; ``zero_fraction`` is over all elements and ``nonfinite`` counts NaN and
    +-Inf. On the ``meta`` device (no data) and for complex tensors they are ``None``, and
    nothing is allocated.

:func:`dump_model_info` prints the report (or sends it to a logger) and can save a grid of
weight-distribution histograms as a PNG.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from .result import _builtin
from .units import dtype_name, format_bytes

__all__ = ["TensorRow", "ModelInfo", "inspect_model", "dump_model_info", "tensor_stats"]

_CHUNK = 1 << 22  # elements converted to float64 at a time (32 MiB)
MAX_PLOTS = 64


@dataclass
class TensorRow:
    """One parameter or buffer of a model (a tied tensor gets one row; ``aliases`` names the rest).

    >>> row = TensorRow("fc.weight", (5, 10), "float32", 50, 200, True, "param", "Linear")
    >>> row.to_dict()["shape"]
    [5, 10]
    """

    name: str
    shape: tuple
    dtype: str
    numel: int
    bytes: int
    requires_grad: bool
    kind: str  # "param" or "buffer"
    module_type: str
    aliases: list = field(default_factory=list)
    mean: Optional[float] = None
    std: Optional[float] = None
    min: Optional[float] = None
    max: Optional[float] = None
    zero_fraction: Optional[float] = None
    nonfinite: Optional[int] = None

    def to_dict(self) -> dict:
        """Builtin-typed fields (non-finite floats as strings).

        >>> TensorRow("b", (2,), "float32", 2, 8, False, "buffer", "BatchNorm1d").to_dict()["kind"]
        'buffer'
        """
        return _builtin({k: getattr(self, k) for k in self.__dataclass_fields__})


@dataclass
class ModelInfo:
    """The result of :func:`inspect_model`.

    >>> import torch
    >>> info = inspect_model(torch.nn.Linear(10, 5))
    >>> info.total_params, info.trainable_params, info.frozen_params  # 10*5 + 5 = 55
    (55, 55, 0)
    >>> info.by_module_type
    {'Linear': 55}
    """

    model_type: str
    total_params: int
    trainable_params: int
    frozen_params: int
    param_bytes: int
    buffer_tensors: int
    buffer_numel: int
    buffer_bytes: int
    by_module_type: dict
    dtypes: dict
    devices: list
    tied: list
    tensors: list
    num_modules: int
    has_statistics: bool
    plot_path: Optional[str] = None

    @property
    def non_trainable_params(self) -> int:
        """Alias of :attr:`frozen_params`.

        >>> import torch
        >>> m = torch.nn.Linear(2, 2).requires_grad_(False)
        >>> inspect_model(m).non_trainable_params  # 2*2 + 2
        6
        """
        return self.frozen_params

    @property
    def total_bytes(self) -> int:
        """Parameters plus buffers, in bytes.

        >>> import torch
        >>> inspect_model(torch.nn.BatchNorm1d(4)).total_bytes  # 8 float32 params + 8 float32 + 1 int64 buffers
        72
        """
        return self.param_bytes + self.buffer_bytes

    @property
    def params(self) -> list:
        """The parameter rows.

        >>> import torch
        >>> [r.name for r in inspect_model(torch.nn.Linear(2, 2)).params]
        ['weight', 'bias']
        """
        return [r for r in self.tensors if r.kind == "param"]

    @property
    def buffers(self) -> list:
        """The buffer rows.

        >>> import torch
        >>> [r.name for r in inspect_model(torch.nn.BatchNorm1d(2)).buffers]
        ['running_mean', 'running_var', 'num_batches_tracked']
        """
        return [r for r in self.tensors if r.kind == "buffer"]

    def module_type_percentages(self) -> dict:
        """Share of the parameters held by each module type, in percent.

        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        >>> inspect_model(m).module_type_percentages()  # 12 and 6 of 18
        {'Linear': 66.66666666666667, 'LayerNorm': 33.333333333333336}
        """
        total = self.total_params
        return {k: (100.0 * v / total if total else 0.0) for k, v in self.by_module_type.items()}

    def row(self, name: str) -> TensorRow:
        """The row of the tensor registered as ``name`` (an alias of a tied tensor works too).

        >>> import torch
        >>> inspect_model(torch.nn.Linear(2, 3)).row("weight").shape
        (3, 2)
        """
        for r in self.tensors:
            if r.name == name or name in r.aliases:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        """JSON-ready dictionary (derived numbers included).

        >>> import json, torch
        >>> d = inspect_model(torch.nn.Linear(2, 2)).to_dict()
        >>> d["total_params"], d["tensors"][0]["name"], bool(json.dumps(d))
        (6, 'weight', True)
        """
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "tensors"}
        data["total_bytes"] = self.total_bytes
        data["module_type_percentages"] = self.module_type_percentages()
        data = _builtin(data)
        data["tensors"] = [r.to_dict() for r in self.tensors]
        return data

    def render(self, verbose: bool = False) -> str:
        """The text report: summary, parameter statistics, parameters by module type; with
        ``verbose`` also one line per tensor (shape, size, gradient flag) and weight statistics.

        >>> import torch
        >>> print(inspect_model(torch.nn.Linear(10, 5)).render())  # doctest: +NORMALIZE_WHITESPACE
        Model summary: Linear
          Modules:               1
          Devices:               cpu
        Parameter statistics:
          Total parameters:      55
          Trainable parameters:  55
          Frozen parameters:     0
          Parameter size:        220 B (float32)
          Buffers:               0 tensors, 0 elements, 0 B
          Total size:            220 B
        Parameters by module type:
          Linear              :         55 (100.0%)
        """
        lines = [f"Model summary: {self.model_type}",
                 f"  Modules:               {self.num_modules:,}",
                 f"  Devices:               {', '.join(self.devices) or '-'}",
                 "Parameter statistics:",
                 f"  Total parameters:      {self.total_params:,}",
                 f"  Trainable parameters:  {self.trainable_params:,}",
                 f"  Frozen parameters:     {self.frozen_params:,}",
                 f"  Parameter size:        {format_bytes(self.param_bytes)}"
                 + (f" ({', '.join(self.dtypes)})" if self.dtypes else ""),
                 f"  Buffers:               {self.buffer_tensors:,} tensors, {self.buffer_numel:,} "
                 f"elements, {format_bytes(self.buffer_bytes)}",
                 f"  Total size:            {format_bytes(self.total_bytes)}"]
        for group in self.tied:
            lines.append(f"  Tied (counted once):   {' = '.join(group)}")
        lines.append("Parameters by module type:")
        for kind, pct in self.module_type_percentages().items():
            lines.append(f"  {kind:<20}: {self.by_module_type[kind]:>10,} ({pct:5.1f}%)")
        if verbose:
            width = max([len(r.name) for r in self.tensors] + [10])
            lines.append("Tensors:")
            lines.append(f"  {'Name':<{width}}  {'Kind':<6}  {'Shape':<18}  {'Dtype':<9}  "
                         f"{'Numel':>12}  {'Size':>10}  Grad")
            for r in self.tensors:
                lines.append(f"  {r.name:<{width}}  {r.kind:<6}  {str(tuple(r.shape)):<18}  "
                             f"{r.dtype:<9}  {r.numel:>12,}  {format_bytes(r.bytes):>10}  "
                             f"{'yes' if r.requires_grad else 'no'}")
            lines.append("Weight statistics:")
            if not self.has_statistics:
                lines.append("  (none: the tensors hold no data, e.g. on the meta device)")
            else:
                lines.append(f"  {'Name':<{width}}  {'Mean':>11}  {'Std':>11}  {'Min':>11}  "
                             f"{'Max':>11}  {'Zeros':>6}  Non-finite")
                for r in self.tensors:
                    if r.mean is None and r.nonfinite is None:
                        continue
                    lines.append(f"  {r.name:<{width}}  {_num(r.mean)}  {_num(r.std)}  "
                                 f"{_num(r.min)}  {_num(r.max)}  {_pct(r.zero_fraction)}  "
                                 f"{r.nonfinite}")
        return "\n".join(lines)


def _num(x: Optional[float]) -> str:
    return f"{'-':>11}" if x is None else f"{x:>11.4g}"


def _pct(x: Optional[float]) -> str:
    return f"{'-':>6}" if x is None else f"{100 * x:>5.1f}%"


def _has_data(t: Any) -> bool:
    return t.device.type != "meta" and not getattr(t, "is_quantized", False) and \
        not type(t).__name__.startswith("Fake")


def _storage_key(t: Any) -> Optional[tuple]:
    """Identity of the exact memory region a tensor views (None where there is no real storage)."""
    if not _has_data(t) or t.layout != _torch().strided:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    if ptr == 0:
        return None
    return (t.device.type, t.device.index, ptr, t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype)


def _torch() -> Any:
    import torch

    return torch


def tensor_stats(t: Any) -> dict:
    """mean, std (ddof=0), min and max over the finite values, computed in float64 on the CPU
    chunk by chunk; ``zero_fraction`` over all elements; ``nonfinite`` counts NaN and +-Inf.
    All None (nonfinite too) when the tensor holds no data (meta device) or is complex.

    >>> import torch
    >>> s = tensor_stats(torch.tensor([0.0, 1.0, 2.0, float("nan")]))
    >>> s["mean"], s["min"], s["max"], s["zero_fraction"], s["nonfinite"]
    (1.0, 0.0, 2.0, 0.25, 1)
    >>> tensor_stats(torch.empty(3, device="meta"))["mean"] is None
    True
    """
    torch = _torch()
    out: dict = {"mean": None, "std": None, "min": None, "max": None, "zero_fraction": None,
           "nonfinite": None}
    if not _has_data(t) or t.is_complex() or t.layout != torch.strided:
        return out
    n_total = t.numel()
    if n_total == 0:
        out.update(zero_fraction=0.0, nonfinite=0)
        return out
    flat = t.detach().reshape(-1)
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    zeros = nonfinite = 0
    with torch.no_grad():
        for start in range(0, n_total, _CHUNK):
            chunk = flat[start:start + _CHUNK].to(device="cpu", dtype=torch.float64)
            zeros += int((chunk == 0).sum())
            finite = torch.isfinite(chunk)
            n_fin = int(finite.sum())
            nonfinite += chunk.numel() - n_fin
            if n_fin == 0:
                continue
            if n_fin != chunk.numel():
                chunk = chunk[finite]
            c_mean = float(chunk.mean())
            c_m2 = float(((chunk - c_mean) ** 2).sum())
            lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
            # Chan et al. pairwise combination of means and sums of squared deviations
            delta = c_mean - mean
            new = count + n_fin
            mean += delta * n_fin / new
            m2 += c_m2 + delta * delta * count * n_fin / new
            count = new
    out["zero_fraction"] = zeros / n_total
    out["nonfinite"] = nonfinite
    if count:
        out.update(mean=mean, std=math.sqrt(m2 / count), min=lo, max=hi)
    return out


def inspect_model(model: Any, statistics: bool = True) -> ModelInfo:
    """Count, size and describe every parameter and buffer of ``model`` (see the module doc).

    ``statistics=False`` skips the weight statistics (they are skipped anyway on ``meta``).

    >>> import torch
    >>> emb = torch.nn.Embedding(100, 8)   # 100*8 = 800
    >>> head = torch.nn.Linear(8, 100)     # weight tied to emb; own bias 100
    >>> head.weight = emb.weight
    >>> info = inspect_model(torch.nn.ModuleDict({"emb": emb, "head": head}))
    >>> info.total_params, info.tied                     # 800 + 100, the tied weight once
    (900, [['emb.weight', 'head.weight']])
    >>> info.by_module_type                              # owned by the first module met
    {'Embedding': 800, 'Linear': 100}
    """
    torch = _torch()
    if not isinstance(model, torch.nn.Module):
        from .errors import UsageError

        raise UsageError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    module_types = {name: type(m).__name__ for name, m in model.named_modules(remove_duplicate=False)}
    rows: list = []
    seen: dict = {}  # id(tensor) or storage key -> row
    by_type: dict = {}
    dtypes: dict = {}
    devices: list = []
    total = trainable = p_bytes = 0
    b_count = b_numel = b_bytes = 0
    any_stats = False

    def visit(named, kind: str) -> None:
        nonlocal total, trainable, p_bytes, b_count, b_numel, b_bytes, any_stats
        for name, t in named:
            key = _storage_key(t)
            row = seen.get(id(t)) or (seen.get(key) if key is not None else None)
            if row is not None:
                if name != row.name and name not in row.aliases:
                    row.aliases.append(name)
                seen[id(t)] = row
                continue
            owner = name.rpartition(".")[0]
            mtype = module_types.get(owner, type(model).__name__)
            nbytes = t.numel() * t.element_size()
            row = TensorRow(name, tuple(int(s) for s in t.shape), dtype_name(t.dtype), t.numel(),
                            nbytes, bool(t.requires_grad), kind, mtype)
            if statistics:
                stats = tensor_stats(t)
                any_stats = any_stats or stats["nonfinite"] is not None
                for k, v in stats.items():
                    setattr(row, k, v)
            seen[id(t)] = row
            if key is not None:
                seen[key] = row
            rows.append(row)
            dev = str(t.device)
            if dev not in devices:
                devices.append(dev)
            if kind == "param":
                total += t.numel()
                trainable += t.numel() if t.requires_grad else 0
                p_bytes += nbytes
                by_type[mtype] = by_type.get(mtype, 0) + t.numel()
                dtypes[row.dtype] = dtypes.get(row.dtype, 0) + t.numel()
            else:
                b_count += 1
                b_numel += t.numel()
                b_bytes += nbytes

    visit(model.named_parameters(remove_duplicate=False), "param")
    visit(model.named_buffers(remove_duplicate=False), "buffer")
    tied = [[r.name] + r.aliases for r in rows if r.aliases]
    by_type = dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0])))
    dtypes = dict(sorted(dtypes.items(), key=lambda kv: -kv[1]))
    return ModelInfo(type(model).__name__, total, trainable, total - trainable, p_bytes, b_count,
                     b_numel, b_bytes, by_type, dtypes, devices, tied, rows,
                     len(module_types), any_stats)


def _histogram_sample(t: Any, limit: int = 1 << 20) -> Any:
    """At most ``limit`` finite values of ``t`` as a float64 numpy array (evenly strided)."""
    torch = _torch()
    flat = t.detach().reshape(-1)
    if flat.numel() > limit:
        flat = flat[:: -(-flat.numel() // limit)]
    values = flat.to(device="cpu", dtype=torch.float64)
    return values[torch.isfinite(values)].numpy()


def _plot(model: Any, info: ModelInfo, save_path: str, max_plots: int) -> Optional[str]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("dump_model_info: matplotlib is not installed, so the weight-distribution "
                      "plot was skipped (pip install matplotlib)", stacklevel=3)
        return None
    tensors = dict(model.named_parameters())
    rows = [r for r in info.params if r.name in tensors and _has_data(tensors[r.name])
            and not tensors[r.name].is_complex()][:max_plots]
    if not rows:
        warnings.warn("dump_model_info: no parameter holds data (meta device?), so no "
                      "weight-distribution plot was saved", stacklevel=3)
        return None
    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig = Figure(figsize=(4 * cols, 3 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, r in enumerate(rows):
        ax = fig.add_subplot(nrows, cols, i + 1)
        values = _histogram_sample(tensors[r.name])
        if values.size:
            ax.hist(values, bins=50, color="tab:blue", alpha=0.8)
        ax.set_title(r.name if len(r.name) <= 40 else "..." + r.name[-37:], fontsize=8)
        ax.tick_params(labelsize=7)
        if r.mean is not None:
            ax.text(0.02, 0.95, f"mean {r.mean:.3g}\nstd {r.std:.3g}", transform=ax.transAxes,
                    fontsize=7, va="top")
    fig.savefig(save_path, format="png", dpi=80)
    return str(save_path)


def dump_model_info(model: Any, logger: Any = None, plot_distributions: bool = True,
                    save_path: Optional[str] = None, max_plots: int = MAX_PLOTS) -> ModelInfo:
    """Inspect ``model``, print the verbose report (or ``logger.info`` it) and return the
    :class:`ModelInfo`.

    A weight-distribution PNG (one histogram per parameter tensor, the first ``max_plots``) is
    written only when ``plot_distributions`` is true AND ``save_path`` is given: no file ever
    appears in the working directory uninvited. The figure is drawn on
    ``matplotlib.figure.Figure`` with the Agg canvas, so pyplot and the user's backend are not
    touched. Without matplotlib a ``UserWarning`` says the plot was skipped.
    ``info.plot_path`` is the written file or None.

    >>> import torch
    >>> info = dump_model_info(torch.nn.Linear(10, 5), plot_distributions=False)  # doctest: +ELLIPSIS
    Model summary: Linear
    ...
    Weight statistics:
    ...
    >>> info.total_params
    55
    """
    info = inspect_model(model)
    text = info.render(verbose=True)
    if logger is None:
        print(text)
    else:
        logger.info(text)
    if plot_distributions and save_path is not None:
        info.plot_path = _plot(model, info, save_path, max_plots)
    return info
