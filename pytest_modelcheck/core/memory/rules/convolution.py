"""Convolution workspaces: oneDNN's blocked copies and scratchpads, the im2col column buffers
of torch's own slow kernels (docs/memory-model.md, "oneDNN convolution" and "im2col
convolution"). The backward is table-driven: one stage function per backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..report import _is_tensor
from . import onednn
from ._common import _CONV_BLOCK, _SCRATCHPAD_PAD, _cdiv, _numel, _pad8, _threads
from .onednn import (_ISA_BLOCK, _channels_last, _conv_backend, _deconv_strided_scratchpad,
                     _dw_weight_grad_scratchpad, _onednn_depthwise, _weight_grad_kernel,
                     _weight_grad_scratchpad)
from .registry import CPU_RULES


def _conv_forward_workspace(args: tuple, out: Any) -> int:
    inp, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    depthwise = _onednn_depthwise(inp, weight, groups, transposed) or (
        # a 1D depthwise convolution runs as a 2D one of height 1 (same buffers)
        not transposed and inp.dim() == 3 and int(groups) > 1
        and int(groups) == int(inp.shape[1]) == int(weight.shape[0]))
    if (groups != 1 and not depthwise) or inp.dim() < 3 or not inp.is_floating_point():
        return 0
    backend = _conv_backend(inp, weight, bias, stride, padding, dilation, transposed,
                            output_padding, groups)
    b, n = inp.element_size(), int(inp.shape[0])
    s_in, s_out, k = _numel(inp.shape[2:]), _numel(out.shape[2:]), _numel(weight.shape[2:])
    out_bytes = out.numel() * out.element_size()
    block = _ISA_BLOCK.get(onednn._onednn_isa(), 0)
    if backend in ("Mkldnn", "MkldnnTranspose") and not block:
        return 0  # oneDNN's kernels below AVX2 (or off x86) are not modelled

    def pad(c: int) -> int:
        return _cdiv(c, block) * block

    if depthwise:
        if backend != "Mkldnn":
            return 0
        # jit_uni_dw: the input always blocked, the weight P(C)*K
        c = int(inp.shape[1])
        src_b, w_b, dst_b = n * pad(c) * s_in * b, pad(c) * k * b, n * pad(c) * s_out * b
        bias_p = pad(c) * b + _SCRATCHPAD_PAD if bias is not None and c % block else 0
        return max(bias_p + src_b + w_b + dst_b - out_bytes, dst_b)
    if backend == "Mkldnn" and _channels_last(inp):
        cin, cout = int(inp.shape[1]), int(weight.shape[0])
        return weight.numel() * b + pad(cout) * cin * k * b
    if backend == "Mkldnn" and inp.dim() == 3 and int(inp.shape[1]) == 1 and n > 1 and b == 4 \
            and (int(padding[-1]) >= k or int(padding[-1]) > 28):
        # a one-channel 1D convolution padded beyond what the blocked kernels take (a raw
        # audio front end): oneDNN's gemm convolution, per-thread columns K*OS (one channel),
        # or a copy of the output when that is larger
        return max(_threads() * k * s_out * b + _SCRATCHPAD_PAD, out_bytes)
    if backend == "Mkldnn":
        cin, cout = int(inp.shape[1]), int(weight.shape[0])
        # the 1x1 kernels (jit_*_1x1) block the input for any Cin
        blocked = cin >= block or k == 1
        src_b = n * pad(cin) * s_in * b if blocked else 0
        w_b = pad(cout) * (pad(cin) if blocked else cin) * k * b
        dst_b = n * pad(cout) * s_out * b
        # a bias zero-padded to the block, booked in the kernel's scratchpad
        bias_p = pad(cout) * b + _SCRATCHPAD_PAD if bias is not None and cout % block else 0
        if k == 1 and (any(int(v) != 1 for v in stride) or any(int(v) for v in padding)):
            # a strided (or padded) 1x1: the reduce-to-unit-stride copy of the input, per
            # thread P(Cin)*S_out (rtus_prepare_space_info: nb_reduce*ic_block*is)
            bias_p += _threads() * pad(cin) * s_out * b + _SCRATCHPAD_PAD
        return max(bias_p + src_b + w_b + dst_b - out_bytes, dst_b)
    if backend == "MkldnnTranspose":
        # a channels-last copy of the input and the weight in blocks of output channels beside
        # the output and the brgemm scratchpad, then two more output-sized tensors (the
        # result's reorder and copy).
        cout = int(out.shape[1])
        w_b = pad(cout) * int(inp.shape[1]) * k * b
        scratch = _deconv_strided_scratchpad(inp, weight, out, stride, padding, dilation,
                                             output_padding)
        return max(inp.numel() * b + w_b + scratch, 2 * out_bytes)
    if backend in ("Slow2d", "Slow3d"):
        plain = _im2col_free(weight, stride, padding, dilation)
        return 0 if plain else n * int(inp.shape[1]) * k * s_out * b
    if backend in ("SlowTranspose2d", "SlowTranspose3d"):
        cols_t = int(out.shape[1]) * k * s_in * b
        return cols_t + (s_out * b if bias is not None else 0)
    return 0


def _im2col_free(weight: Any, stride: Any, padding: Any, dilation: Any) -> bool:
    """A 1x1 kernel, stride 1, no padding or dilation: slow_conv2d/3d skip the column buffer."""
    return all(int(v) == 1 for v in list(weight.shape[2:]) + list(stride) + list(dilation)) \
        and all(int(v) == 0 for v in padding)

@dataclass
class _Backward:
    """One ``convolution_backward`` call as the rules see it (docs/memory-model.md, "oneDNN
    convolution": P(c) is ``pad``, b the element size, S_in/S_out/K the spatial and kernel
    volumes)."""

    gout: Any
    inp: Any
    weight: Any
    stride: Any
    padding: Any
    dilation: Any
    groups: int
    mask: Any
    outs: Any
    backend: str
    block: int
    b: int
    n: int
    s_in: int
    s_out: int
    k: int
    cin: int
    cout: int
    done: int  # the bytes of the gradients it returns
    gin: int  # the plain input gradient (0 when not asked for)
    gin_b: int  # the blocked input gradient

    def pad(self, c: int) -> int:
        return _cdiv(c, self.block) * self.block

    def contiguous_gout(self, stages: tuple) -> tuple:
        """A non-contiguous grad_output is copied first: its bytes beside every stage."""
        if self.gout.is_contiguous():
            return stages
        return tuple(x + self.gout.numel() * self.b if x else 0 for x in stages)


def _backward_call(args: tuple, outs: Any) -> "_Backward | None":
    """The call's facts, or None where no workspace is modelled (grouped but not depthwise,
    1-D inputs of no spatial size, integer dtypes; oneDNN below AVX2)."""
    gout, inp, weight = args[:3]
    stride, padding, dilation, transposed, output_padding, groups, mask = args[4:11]
    depthwise = _onednn_depthwise(inp, weight, groups, transposed)
    if (groups != 1 and not depthwise) or inp.dim() < 3 or not inp.is_floating_point():
        return None
    backend = _conv_backend(inp, weight, None, stride, padding, dilation, transposed,
                            output_padding, groups)
    block = _ISA_BLOCK.get(onednn._onednn_isa(), 0)
    if backend in ("Mkldnn", "MkldnnTranspose") and not block:
        return None  # oneDNN's kernels below AVX2 (or off x86) are not modelled
    b, n, cin = inp.element_size(), int(inp.shape[0]), int(inp.shape[1])
    # computed for every backend, as before the split (with block 0 it raises, and the
    # caller's guard then adds no workspace)
    gin_b = n * _cdiv(cin, block) * block * _numel(inp.shape[2:]) * b
    return _Backward(
        gout=gout, inp=inp, weight=weight, stride=stride, padding=padding, dilation=dilation,
        groups=groups, mask=mask, outs=outs, backend=("depthwise:" if depthwise else "") + backend,
        block=block, b=b, n=n, s_in=_numel(inp.shape[2:]), s_out=_numel(gout.shape[2:]),
        k=_numel(weight.shape[2:]), cin=cin, cout=int(gout.shape[1]),
        done=sum(t.numel() * t.element_size() for t in outs if _is_tensor(t)),
        gin=inp.numel() * b if mask[0] else 0, gin_b=gin_b)


def _conv_backward_workspace(args: tuple, outs: Any) -> int:
    """Bytes ``convolution_backward`` holds above its returned gradients: the stage function
    of the backend torch picks (``_BACKWARD_STAGES``), 0 where none is modelled."""
    c = _backward_call(args, outs)
    if c is None:
        return 0
    stages = _BACKWARD_STAGES.get(c.backend)
    return 0 if stages is None else stages(c)


def _depthwise_backward(c: _Backward) -> int:
    # jit_uni_dw: the same stages as a dense convolution, with the input always blocked,
    # P(C)*K weights (and weight gradients), and its own minibatch-reduction scratchpad
    b, n, k, mask = c.b, c.n, c.k, c.mask
    gout_b, w_b = n * c.pad(c.cout) * c.s_out * b, c.pad(c.cin) * k * b
    stage1 = max(gout_b + w_b + c.gin_b, c.gin_b + c.gin) if mask[0] else 0
    stage2 = c.gin + gout_b + c.gin_b + w_b + _dw_weight_grad_scratchpad(
        n, c.cin, k, c.block, bool(mask[2])) + (c.cout * b if mask[2] else 0) if mask[1] else 0
    stage1, stage2 = c.contiguous_gout((stage1, stage2))
    return max(stage1, stage2) - c.done


def _mkldnn_backward(c: _Backward) -> int:
    b, n, k, cin, cout, mask = c.b, c.n, c.k, c.cin, c.cout, c.mask
    if _channels_last(c.inp):
        return c.weight.numel() * b + 2 * c.pad(cout) * cin * k * b
    blocked = cin >= c.block
    src_b = n * c.pad(cin) * c.s_in * b if blocked else 0
    gout_b = n * c.pad(cout) * c.s_out * b
    stage1 = max(gout_b + c.pad(cout) * c.pad(cin) * k * b + c.gin_b, c.gin_b + c.gin) \
        if mask[0] else 0
    if mask[0] and any(int(st) > 1 for st in c.stride):
        # a strided input gradient is made in two unblocked input-sized buffers before
        # the plain one (measured alike on AVX-512 and AVX2, any channel count)
        stage1 = max(stage1, 3 * c.gin)
    gw_b = c.pad(cout) * (c.pad(cin) if blocked else cin) * k * b
    stage2 = c.gin + gout_b + src_b + gw_b if mask[1] else 0
    if mask[1]:
        stage2 = _mkldnn_weight_grad_stage(c, stage2)
    stage1, stage2 = c.contiguous_gout((stage1, stage2))
    return max(stage1, stage2) - c.done


def _mkldnn_weight_grad_stage(c: _Backward, stage2: int) -> int:
    """The weight-gradient stage by the kernel oneDNN picks for it (``_weight_grad_kernel``)."""
    b, n, k, cin, cout, mask = c.b, c.n, c.k, c.cin, c.cout, c.mask
    kernel = _weight_grad_kernel(c.inp, c.weight, c.gout, c.stride, c.padding, c.dilation) \
        if b == 4 else ""
    if kernel == "avx2":  # 8-channel blocks; the input copied too, unless Cin == 3 (flat)
        flat = cin == 3
        stage2 = c.gin + (n * _pad8(cout) * c.s_out + (0 if flat else n * _pad8(cin) * c.s_in)
                          + _pad8(cout) * (cin if flat else _pad8(cin)) * k) * b
    if kernel in ("avx512", "avx2") and k == 1 and n > 1 and cin <= 8 \
            and onednn._onednn_isa() == "avx512" and all(int(st) == 1 for st in c.stride) \
            and not any(int(p) for p in c.padding):
        # a pointwise convolution from few channels where oneDNN runs AVX-512: the input is
        # copied once more (docs/memory-model.md, "oneDNN convolution"; measured)
        stage2 += n * (_CONV_BLOCK if kernel == "avx512" else 8) * c.s_in * b
    if kernel:
        scratch = _weight_grad_scratchpad(kernel, c.inp, c.weight, c.gout, c.stride, c.padding,
                                          bool(mask[2]))
        # the bias gradient is made while the scratchpad is alive
        stage2 = c.done + scratch if kernel == "gemm" else \
            stage2 + scratch + (cout * b if mask[2] else 0)
    return stage2


def _transpose_backward(c: _Backward) -> int:
    # the backward of the convolution from grad_output to the input (docs/memory-model.md,
    # "oneDNN convolution", transposed): its forward for gin, its weight gradient for the weight
    b, n, k, cin, cout, mask, block = c.b, c.n, c.k, c.cin, c.cout, c.mask, c.block
    src_c = n * c.pad(cout) * c.s_out * b if cout >= block else 0
    w_c = c.pad(cin) * (c.pad(cout) if cout >= block else cout) * k * b
    stage1 = max(src_c + w_c + c.gin_b, c.gin_b + c.gin) if mask[0] else 0
    stage2 = 0
    if mask[1] and _is_tensor(c.outs[1]):
        stage2 = _transpose_weight_grad_stage(c)
    return max(stage1, stage2) - c.done


def _transpose_weight_grad_stage(c: _Backward) -> int:
    b, k, cin, cout, inp, gout, weight = c.b, c.k, c.cin, c.cout, c.inp, c.gout, c.weight
    gw = c.outs[1].numel() * c.outs[1].element_size()
    conv = (inp, gout, weight, None, c.stride, c.padding, c.dilation, False,
            [0] * (inp.dim() - 2), c.groups, [False, True, False])
    kernel = _weight_grad_kernel(gout, weight, inp, c.stride, c.padding, c.dilation) \
        if b == 4 else ""
    nested = _SCRATCHPAD_PAD if kernel and _weight_grad_scratchpad(
        kernel, gout, weight, inp, c.stride, c.padding, False) else 0
    gb = cout * b if c.mask[2] else 0
    stage2 = c.gin + gw + _conv_backward_workspace(conv, (None, c.outs[1], None)) + nested + gb
    if kernel in ("avx512", "avx2"):  # blocked as the weight-gradient kernel blocks
        kb = 16 if kernel == "avx512" else 8
        flat = cout < 16 if kernel == "avx512" else cout == 3
        gw_b = _cdiv(cin, kb) * kb * (cout if flat else _cdiv(cout, kb) * kb) * k * b
        stage2 = max(stage2, c.gin + gw_b + gw + 2 * gb)
    return stage2


def _im2col_backward(c: _Backward) -> int:
    cols = c.n * c.cin * c.k * c.s_out * c.b
    plain = _im2col_free(c.weight, c.stride, c.padding, c.dilation)
    stage1 = c.gin + (0 if plain and c.backend == "Slow2d" else cols) if c.mask[0] else 0
    stage2 = c.done + (0 if plain else cols) if c.mask[1] else 0
    return max(stage1, stage2) - c.done


def _im2col_transpose_backward(c: _Backward) -> int:
    cols_t = c.cout * c.k * c.s_in * c.b
    stage1 = c.gin + cols_t if c.mask[0] else 0
    stage2 = c.done + cols_t if c.mask[1] else 0
    return max(stage1, stage2) - c.done


# backend (``_conv_backend``; "depthwise:" + backend for depthwise calls) -> its stages
_BACKWARD_STAGES: dict[str, Callable[[_Backward], int]] = {
    "Mkldnn": _mkldnn_backward,
    "MkldnnTranspose": _transpose_backward,
    "Slow2d": _im2col_backward,
    "Slow3d": _im2col_backward,
    "SlowTranspose2d": _im2col_transpose_backward,
    "SlowTranspose3d": _im2col_transpose_backward,
    "depthwise:Mkldnn": _depthwise_backward,
}


@CPU_RULES.register("convolution")
def _convolution(name: str, args: tuple, out: Any) -> int:
    return _conv_forward_workspace(args, out)


@CPU_RULES.register("convolution_backward")
def _convolution_backward(name: str, args: tuple, out: Any) -> int:
    return _conv_backward_workspace(args, out)
