"""Counting FLOPs and MACs with torch's own formulas, plus a coverage list of what was not counted.

Convention (``CONVENTION``): one multiply-add (MAC) counts as 2 FLOPs, and both numbers are
reported. Counted are matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``; ``linear``,
``matmul`` and ``einsum`` reach them), convolutions of every dimension (transposed and grouped
too) and scaled-dot-product attention on every kernel; elementwise, normalization, softmax,
pooling and reduction ops are not counted, and every such op that ran is listed in
``FlopReport.uncovered`` with its number of calls, so nothing is a silent zero. Ops that do no
arithmetic at all (views, copies, creation, indexing) are in ``FREE_OPS`` and are not listed.

``torch.utils.flop_counter.FlopCounterMode`` supplies the counting and the formulas. It has no
formula for ``aten._scaled_dot_product_flash_attention_for_cpu`` (what
``scaled_dot_product_attention`` runs on CPU) nor for its backward, and counts them as zero; the
formulas added here (``EXTRA_FORMULAS``) go through ``custom_mapping``, reusing torch's
``sdpa_flop_count`` helpers, and never touch torch's global registry. Attention is counted for
the full query x key score matrix even when it is causal or masked, as torch's formulas for the
CUDA kernels and the math path (explicit ``bmm``) do.

The ``"fvcore"`` backend (``fvcore.nn.FlopCountAnalysis``) is for cross-checking: it traces the
model with ``torch.jit.trace``, counts forward only, 1 per MAC, and has no handle for attention.

This module imports torch only inside functions.
"""
from __future__ import annotations

import collections
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .batch import Batch
from .errors import UsageError

CONVENTION = ("FLOPs = 2 x MACs (one multiply-add is 2 FLOPs); counted: matrix products,"
              " convolutions (every dimension, transposed, grouped) and scaled-dot-product"
              " attention (full score matrix, causal or masked alike); not counted: elementwise,"
              " normalization, softmax, pooling and reductions (listed as uncovered)")

BACKENDS = ("torch", "fvcore")

# Ops that do no arithmetic: views, layout changes, copies, creation, indexing, RNG draws.
FREE_OPS = frozenset("aten." + name for name in """
    alias as_strided as_strided_ _unsafe_view view view_as _reshape_alias reshape expand expand_as
    permute transpose t t_ transpose_ squeeze squeeze_ unsqueeze unsqueeze_ flatten unflatten
    movedim slice select narrow diagonal unfold split split_with_sizes chunk unbind
    detach detach_ lift_fresh lift clone copy_ _to_copy to contiguous _copy_from resize_ set_
    empty empty_like empty_strided new_empty new_empty_strided zeros zeros_like new_zeros
    ones ones_like new_ones full full_like new_full fill_ fill zero_ scalar_tensor arange
    linspace eye randn randn_like rand rand_like randint randint_like normal_ uniform_
    bernoulli_ random_ randperm
    cat stack index_select gather index _unsafe_index index_put_ index_put embedding
    slice_scatter select_scatter as_strided_scatter constant_pad_nd repeat roll flip
    tril triu where masked_fill masked_fill_ im2col col2im pixel_shuffle pixel_unshuffle
    channel_shuffle _local_scalar_dense item _assert_async _assert_tensor_metadata
    _efficientzerotensor split_copy view_copy unbind_copy view_as_complex view_as_real
    _nested_tensor_from_mask _nested_tensor_from_mask_left_aligned to_padded_tensor
""".split())


def _sdpa_forward(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                  out_shape: Any = None, **kwargs: Any) -> int:
    """Forward attention FLOPs: ``2*B*H*L*S*E`` (scores) + ``2*B*H*L*S*Ev`` (weights @ V)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any,
                   *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Backward attention FLOPs: the scores recomputed plus four gradient products."""
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _lengths(x: Any) -> list:
    """The sequence length of every sample of a (B, L, E), unbatched (L, E) or nested tensor
    (the fast paths pack a padded batch into a nested tensor of the unpadded sequences)."""
    if getattr(x, "is_nested", False):
        return [int(row[0]) for row in x._nested_tensor_size().tolist()]
    shape = tuple(x.shape)
    return [shape[0]] if len(shape) == 2 else [shape[1]] * shape[0]


def _mha_flops(q_lens: list, k_lens: list, embed_dim: int) -> int:
    """The fused multi-head attention of ``nn.MultiheadAttention``'s fast path: q, k, v and
    output projections (``2*tokens*E*E`` each) plus ``2*L*S*E`` twice per sample for the
    attention products (summed over heads, ``H*d = E``)."""
    e = embed_dim
    projections = 2 * sum(q_lens) * e * e * 2 + 2 * sum(k_lens) * e * e * 2
    return projections + sum(2 * (2 * q * k * e) for q, k in zip(q_lens, k_lens))


def _native_mha(query: Any, key: Any, value: Any, embed_dim: int, *args: Any,
                out_val: Any = None, **kwargs: Any) -> int:
    """``aten._native_multi_head_attention`` (eval-mode, no-grad ``nn.MultiheadAttention``)."""
    return _mha_flops(_lengths(query), _lengths(key), int(embed_dim))


def _encoder_layer(src: Any, embed_dim: int, num_heads: int, *args: Any, out_val: Any = None,
                   **kwargs: Any) -> int:
    """``aten._transformer_encoder_layer_fwd`` (the ``nn.TransformerEncoderLayer`` fast path):
    self-attention plus the two feed-forward products ``2*tokens*E*F`` each; a padded batch
    (a nested tensor) counts its real tokens only, as the kernel computes them."""
    ffn_weight_1 = args[11] if len(args) > 11 else kwargs["ffn_weight_1"]
    lens = _lengths(src)
    return _mha_flops(lens, lens, int(embed_dim)) + 2 * (2 * sum(lens) * int(embed_dim)
                                                        * int(ffn_weight_1.shape[0]))


# these two take the tensors themselves: their input may be a nested tensor, which has no shape
_native_mha._get_raw = True  # type: ignore[attr-defined]
_encoder_layer._get_raw = True  # type: ignore[attr-defined]


def _conv_backward(grad_out_shape: Any, x_shape: Any, w_shape: Any, bias: Any, stride: Any,
                   padding: Any, dilation: Any, transposed: bool, output_padding: Any,
                   groups: int, output_mask: Any, out_shape: Any = None) -> int:
    """Backward convolution FLOPs: torch's formula, whose weight-gradient term leaves out the
    groups (it counts every input channel against every output channel), divided by them."""
    from torch.utils.flop_counter import conv_backward_flop

    shapes_in = getattr(conv_backward_flop, "__wrapped__", conv_backward_flop)

    def torch_formula(mask: list) -> int:
        return shapes_in(grad_out_shape, x_shape, w_shape, bias, stride, padding,
                                  dilation, transposed, output_padding, groups, mask,
                                  out_shape=out_shape)

    grad_input = torch_formula([output_mask[0], False, False])
    grad_weight = torch_formula([False, output_mask[1], False]) // max(1, int(groups))
    return grad_input + grad_weight


# op name -> formula (shapes in, FLOPs out); added only where torch has no formula of its own
EXTRA_FORMULAS = {
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa_forward,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward,
    "_scaled_dot_product_fused_attention_overrideable": _sdpa_forward,
    "_scaled_dot_product_fused_attention_overrideable_backward": _sdpa_backward,
    "_native_multi_head_attention": _native_mha,
    "_transformer_encoder_layer_fwd": _encoder_layer,
}

# op name -> formula that replaces torch's own (where torch's is wrong)
CORRECTED_FORMULAS = {
    "convolution_backward": _conv_backward,
}

_MAPPING: Optional[dict] = None


def extra_formulas() -> dict:
    """The ``custom_mapping`` for FlopCounterMode: attention kernels torch counts as zero, and
    the corrections of torch's formulas (``CORRECTED_FORMULAS``).

    Built once; an op torch already has a formula for keeps torch's unless it is corrected.

    >>> import torch
    >>> torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in extra_formulas()
    True
    """
    global _MAPPING
    if _MAPPING is None:
        import torch
        from torch.utils.flop_counter import flop_registry

        mapping = {}
        for name, formula in EXTRA_FORMULAS.items():
            packet = getattr(torch.ops.aten, name, None)
            if packet is not None and packet not in flop_registry:
                mapping[packet] = formula
        for name, formula in CORRECTED_FORMULAS.items():
            packet = getattr(torch.ops.aten, name, None)
            if packet is not None:
                mapping[packet] = formula
        _MAPPING = mapping
    return _MAPPING


@dataclass
class FlopReport:
    """FLOPs and MACs of one forward (and optionally backward) pass, with where they went.

    ``flops`` = 2 x ``macs``; ``by_module`` maps module paths ("" is the model itself) to FLOPs,
    hierarchically (a module includes its children); ``by_operator`` maps op names to FLOPs;
    ``uncovered`` maps each op that ran with no formula and is not known to be free to its
    number of calls.

    >>> r = FlopReport(flops=8, macs=4, forward_flops=8, backward_flops=0,
    ...                by_module={"": 8}, by_operator={"aten.mm": 8})
    >>> r.to_dict()["macs"]
    4
    """

    flops: int
    macs: int
    forward_flops: int
    backward_flops: int
    by_module: dict = field(default_factory=dict)
    by_operator: dict = field(default_factory=dict)
    uncovered: dict = field(default_factory=dict)
    convention: str = CONVENTION
    backend: str = "torch"
    backward: bool = False

    def to_dict(self) -> dict:
        """Builtin types only (JSON-ready).

        >>> FlopReport(2, 1, 2, 0).to_dict()["flops"]
        2
        """
        return asdict(self)

    def top_modules(self, n: int = 5) -> list:
        """The ``n`` costliest modules with no costly submodule, as ``(path, flops)``.

        >>> FlopReport(8, 4, 8, 0, by_module={"": 8, "a": 6, "b": 2, "c": 0}).top_modules()
        [('a', 6), ('b', 2)]
        """
        items = [(p, f) for p, f in self.by_module.items() if f > 0]
        keep = [(path, flops) for path, flops in items
                if not any(p != path and (p.startswith(path + ".") if path else True)
                           for p, _ in items)]
        keep.sort(key=lambda item: -item[1])
        return keep[:n]

    def render(self, top: int = 10) -> str:
        """A text table: totals, the costliest modules and operators, and the uncovered ops.

        >>> print(FlopReport(8, 4, 8, 0, by_module={"": 8}, by_operator={"aten.mm": 8}).render())
        ... # doctest: +NORMALIZE_WHITESPACE
        FLOPs 8 (4 MACs; forward 8, backward 0; backend torch)
        module       FLOPs      share
          <model>    8          100.0%
        operator     FLOPs      share
          aten.mm    8          100.0%
        uncovered ops: none
        convention: FLOPs = 2 x MACs (one multiply-add is 2 FLOPs); ...
        """
        from .units import format_count

        total = self.flops or 1
        lines = [f"FLOPs {format_count(self.flops)} ({format_count(self.macs)} MACs; forward"
                 f" {format_count(self.forward_flops)}, backward {format_count(self.backward_flops)};"
                 f" backend {self.backend})"]
        rows = sorted(self.by_module.items(), key=lambda kv: -kv[1])[:top]
        width = max([len(p or "<model>") for p, _ in rows] + [len(k) for k in self.by_operator]
                    + [8]) + 2
        lines.append(f"{'module':{width + 2}} {'FLOPs':10} share")
        lines += [f"  {p or '<model>':{width}} {format_count(f):10} {100 * f / total:.1f}%"
                  for p, f in rows]
        lines.append(f"{'operator':{width + 2}} {'FLOPs':10} share")
        lines += [f"  {k:{width}} {format_count(f):10} {100 * f / total:.1f}%"
                  for k, f in sorted(self.by_operator.items(), key=lambda kv: -kv[1])[:top]]
        if self.uncovered:
            shown = ", ".join(f"{k} x{n}" for k, n in list(self.uncovered.items())[:20])
            more = len(self.uncovered) - 20
            lines.append(f"uncovered ops (ran, no FLOP formula, counted as 0): {shown}"
                         + (f" and {more} more" if more > 0 else ""))
        else:
            lines.append("uncovered ops: none")
        lines.append(f"convention: {self.convention.split(';')[0]}; ..."
                     if self.backend == "torch" else f"convention: {self.convention}")
        return "\n".join(lines)


def _module_path(name: str, root_name: str) -> str:
    if name == root_name:
        return ""
    if name.startswith(root_name + "."):
        return name[len(root_name) + 1:]
    return name


def _make_counter() -> Any:
    from torch.utils.flop_counter import FlopCounterMode

    class CoverageFlopCounter(FlopCounterMode):
        """FlopCounterMode that also records each op that ran without a formula."""

        def __init__(self) -> None:
            super().__init__(display=False, custom_mapping=extra_formulas())
            self.no_formula: collections.Counter = collections.Counter()

        def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
            if func_packet not in self.flop_registry:
                self.no_formula[str(func_packet)] += 1
                return out
            try:
                return super()._count_flops(func_packet, out, args, kwargs)
            except Exception:  # a formula that cannot read these arguments: listed, not fatal
                self.no_formula[f"{func_packet} (formula failed)"] += 1
                return out

    return CoverageFlopCounter()


def _backward_of(total: Any, model: Any, batch: Batch) -> None:
    """Backward of ``total`` to the trainable parameters (and inputs that require grad); their
    ``.grad`` is put back as it was afterwards."""
    import torch

    wrt = [p for p in model.parameters() if p.requires_grad]
    wrt += [t for _, t in batch.input_tensors() if t.requires_grad and t.is_leaf]
    if not total.requires_grad or not wrt:
        return
    saved = [t.grad for t in wrt]
    try:
        for t in wrt:
            t.grad = None
        torch.autograd.backward(total, inputs=wrt)
    finally:
        for t, grad in zip(wrt, saved):
            t.grad = grad


def _count_torch(model: Any, batch: Batch, backward: bool, loss: Any) -> FlopReport:
    import torch

    from .forward import run_forward
    from .losses import resolve_loss, surrogate_loss

    counter = _make_counter()
    root_name = type(model).__name__
    with torch.set_grad_enabled(backward):
        with counter:
            out = run_forward(model, batch)
            if backward:
                if loss is None and not batch.has_target:
                    total = surrogate_loss(out)
                else:
                    total, _ = resolve_loss(loss, batch, out).compute(out, batch, model)
            forward = sum(counter.flop_counts["Global"].values())
            if backward:
                _backward_of(total, model, batch)
    counts = counter.get_flop_counts()
    flops = sum(counts.get("Global", {}).values())
    by_module = {_module_path(name, root_name): sum(ops.values())
                 for name, ops in counts.items() if name != "Global"}
    by_operator = {str(op): n for op, n in sorted(counts.get("Global", {}).items(),
                                                  key=lambda kv: -kv[1])}
    uncovered = {op: n for op, n in counter.no_formula.most_common() if op not in FREE_OPS}
    return FlopReport(flops=flops, macs=flops // 2, forward_flops=forward,
                      backward_flops=flops - forward, by_module=by_module,
                      by_operator=by_operator, uncovered=uncovered, backend="torch",
                      backward=backward)


def _count_fvcore(model: Any, batch: Batch, backward: bool) -> FlopReport:
    if backward:
        raise UsageError("backward=True: the fvcore backend counts the forward pass only; use"
                         " backend='torch'")
    if batch.kwargs:
        raise UsageError("inputs: the fvcore backend takes positional inputs only (it traces"
                         " with torch.jit.trace); use backend='torch'")
    import torch

    with warnings.catch_warnings():
        # importing fvcore (torch.jit.script), tracing and fvcore's unsupported-op notes warn;
        # the ops it could not count are reported in `uncovered`
        warnings.simplefilter("ignore")
        try:
            from fvcore.nn import FlopCountAnalysis
        except ImportError:
            raise UsageError("backend='fvcore': fvcore is not installed (pip install fvcore)"
                             ) from None
        analysis = (FlopCountAnalysis(model, tuple(batch.args))
                    .unsupported_ops_warnings(False).uncalled_modules_warnings(False)
                    .tracer_warnings("none"))
        with torch.no_grad():
            macs = int(analysis.total())
            by_module = {k: 2 * int(v) for k, v in analysis.by_module().items()}
            by_operator = {k: 2 * int(v) for k, v in sorted(analysis.by_operator().items(),
                                                            key=lambda kv: -kv[1])}
            uncovered = dict(analysis.unsupported_ops().most_common())
    return FlopReport(flops=2 * macs, macs=macs, forward_flops=2 * macs, backward_flops=0,
                      by_module=by_module, by_operator=by_operator, uncovered=uncovered,
                      convention="fvcore.nn.FlopCountAnalysis counts 1 per multiply-add (its"
                      " total is MACs; FLOPs here = 2 x MACs), forward only, from a"
                      " torch.jit.trace; ops it has no handle for are listed as uncovered",
                      backend="fvcore", backward=False)


def count_flops_batch(model: Any, batch: Any, *, backward: bool = False, loss: Any = None,
                      backend: str = "torch") -> FlopReport:
    """FLOPs of ``model`` on a ``Batch`` (or anything ``Batch.from_user`` takes).

    With ``backward=True`` the loss (``loss``: a name, a callable or None for the automatic
    choice, see ``core.losses``) is differentiated with respect to the trainable parameters
    (and inputs that require grad), whose ``.grad`` is then put back. The model runs as it is (its mode,
    its device); checks pass a copy.

    >>> import torch
    >>> m = torch.nn.Linear(4, 3)
    >>> count_flops_batch(m, (torch.ones(2, 4), torch.zeros(2, 3)), backward=True).flops
    96
    """
    if backend not in BACKENDS:
        raise UsageError(f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
    if not isinstance(backward, bool):
        raise UsageError(f"backward={backward!r}: expected True or False")
    data = Batch.from_user(batch, model=model)
    if backend == "fvcore":
        return _count_fvcore(model, data, backward)
    return _count_torch(model, data, backward, loss)


def count_flops(model: Any, *inputs: Any, backward: bool = False, backend: str = "torch",
                **kwargs: Any) -> FlopReport:
    """FLOPs and MACs of ``model(*inputs, **kwargs)`` (and its backward with ``backward=True``,
    through the surrogate loss ``mean(output**2)``).

    >>> import torch
    >>> r = count_flops(torch.nn.Linear(4, 3), torch.ones(2, 4))
    >>> r.flops, r.macs  # 2*M*N*K = 2*2*3*4 = 48
    (48, 24)
    >>> count_flops(torch.nn.Linear(4, 3), torch.ones(2, 4), backend="fvcore").macs
    24
    """
    return count_flops_batch(model, Batch(args=tuple(inputs), kwargs=dict(kwargs)),
                             backward=backward, backend=backend)
