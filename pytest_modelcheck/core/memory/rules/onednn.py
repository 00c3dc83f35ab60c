"""oneDNN's convolution kernels on x86: the instruction set they run with, the backend torch picks,
and the scratchpads of the weight-gradient, depthwise and deconvolution kernels
(docs/memory-model.md, "oneDNN convolution")."""
from __future__ import annotations

from typing import Any

from ..._torch_compat import conv_backend_members, cpu_isa_support, select_conv_backend
from ._common import _CONV_BLOCK, _PAGE, _SCRATCHPAD_PAD, _cdiv, _numel, _pad8, _pad16, _threads


# oneDNN's channel block for f32 convolutions per instruction set: 16 floats in an AVX-512
# register, 8 in an AVX2 one.
_ISA_BLOCK = {"avx512": 16, "avx2": 8}
_CPU_ISA: list = []  # the hardware's, found once


def _cpu_isa() -> str:
    """The widest instruction set among those oneDNN's f32 convolutions are modelled for that
    this CPU has: "avx512" (oneDNN's avx512_core: AVX-512 F/BW/VL/DQ), "avx2", or "".

    Read from the hardware (cpuinfo, through torch.cpu), not from
    torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY lowers without
    changing what oneDNN runs."""
    import torch

    if not _CPU_ISA:
        try:
            has = cpu_isa_support()
            isa = "avx512" if has["avx512"] else "avx2" if has["avx2"] else ""
        except Exception:  # noqa: BLE001 - an older torch: ATen's capability (env can lower it)
            capability = str(torch.backends.cpu.get_cpu_capability()).upper()
            isa = "avx512" if capability.startswith("AVX512") else \
                "avx2" if capability == "AVX2" else ""
        _CPU_ISA.append(isa)
    return _CPU_ISA[0]


def _onednn_isa() -> str:
    """The instruction set oneDNN's f32 convolution kernels use here: "avx512", "avx2", or ""
    (an older x86 CPU, another architecture, or a limit below AVX2: not modelled).

    oneDNN takes the widest the CPU has, capped by ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA;
    src/cpu/x64/cpu_isa_traits.cpp, get_max_cpu_isa), which it reads once, at its first use:
    this assumes the variable has not been changed in this process since. A value it does not
    know leaves the CPU's own."""
    import os

    isa = _cpu_isa()
    limit = ""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if os.environ.get(name):
            limit = os.environ[name].strip().upper()
            break
    if not isa or limit in ("", "ALL", "DEFAULT") or limit.startswith(("AVX512", "AVX10")):
        return isa
    if limit.startswith("AVX2"):  # AVX2, AVX2_VNNI, AVX2_VNNI_2
        return "avx2"
    if limit in ("SSE41", "AVX"):
        return ""
    return isa


def _channels_last(t: Any) -> bool:
    """Laid out channels-last (NHWC/NDHWC) rather than contiguous: oneDNN then computes in
    that layout directly, with no blocked copies of the activations."""
    import torch

    if t.is_contiguous():
        return False
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt)


def _conv_backend(inp: Any, weight: Any, bias: Any, stride: Any, padding: Any,
                  dilation: Any, transposed: bool, output_padding: Any, groups: int) -> str:
    """The name of the convolution backend torch picks for these arguments ("" where this torch
    cannot say: no workspace is modelled then).

    >>> import torch
    >>> x, w = torch.zeros(4, 16, 8, 8), torch.zeros(16, 16, 3, 3)
    >>> _conv_backend(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1) != ""
    True
    """
    backend = select_conv_backend(inp, weight, bias, stride, padding, dilation, transposed,
                                  output_padding, groups)
    if backend is None:
        return ""
    name = str(backend).rpartition(".")[2]
    if name == "???":
        # a value the Python binding does not name: MkldnnTranspose is not bound in some
        # releases (2.13 among them) and prints as ``???``; ConvUtils.h's ConvBackend puts it
        # between Mkldnn and MkldnnEmpty
        members = conv_backend_members()
        mkldnn, empty = members.get("Mkldnn"), members.get("MkldnnEmpty")
        if mkldnn is not None and empty is not None \
                and int(backend) == int(mkldnn) + 1 == int(empty) - 1:
            return "MkldnnTranspose"
    return name


def _onednn_depthwise(inp: Any, weight: Any, groups: int, transposed: bool) -> bool:
    """A 2D depthwise convolution (groups == Cin == Cout, plain layout): oneDNN's jit_uni_dw
    kernels take it."""
    return (int(groups) > 1 and not transposed and inp.dim() == 4 and not _channels_last(inp)
            and int(inp.shape[1]) == int(groups) == int(weight.shape[0])
            and int(weight.shape[1]) == 1)


def _conv_geometry(inp: Any, weight: Any, gout: Any, stride: Any, padding: Any) -> dict:
    """oneDNN's view of a 1D/2D/3D convolution: depth/height are 1 where absent."""
    def three(v: Any, fill: int) -> list:
        v = [int(x) for x in v]
        return [fill] * (3 - len(v)) + v

    ins, outs, ks = three(inp.shape[2:], 1), three(gout.shape[2:], 1), three(weight.shape[2:], 1)
    strides, pads = three(stride, 1), three(padding, 0)
    ends = [(o - 1) * s + k - i - p for o, s, k, i, p in zip(outs, strides, ks, ins, pads)]
    return {"dims": inp.dim() - 2, "in": ins, "out": outs, "k": ks, "stride": strides,
            "pad": pads, "end": ends}


def _weight_grad_kernel(inp: Any, weight: Any, gout: Any, stride: Any, padding: Any,
                        dilation: Any) -> str:
    """The oneDNN kernel that computes a plain f32 weight gradient (groups 1), the first whose
    checks pass: "avx512" (jit_avx512_common_conv_bwd_weights_kernel_f32::init_conf: Cin >= 16,
    or Cin <= 3 as a first convolution; its padding checks), "avx2"
    (jit_avx2_conv_bwd_weights_kernel_f32::init_conf: its padding checks, no depth padding),
    else "gemm" (gemm_convolution_bwd_weights_t); "" where unsure (dilation)."""
    cin = int(inp.shape[1])
    isa = _onednn_isa()
    if any(int(d) != 1 for d in dilation) or not isa:
        return ""
    g = _conv_geometry(inp, weight, gout, stride, padding)
    (kd, kh, kw), (pd, ph, pw) = g["k"], g["pad"]
    id_, ih = g["in"][0], g["in"][1]
    ed, eh, ew = (max(0, e) for e in g["end"])
    avx512 = (kw <= 14 and pw < kw and ew < kw and pw <= 28 and ew <= 28
              and ph <= kh // 2 and eh <= kh // 2 and pd < kd and ed < kd
              and (pd == 0 or kd < id_ + pd))
    if avx512 and (cin >= _CONV_BLOCK or cin <= 3) and isa == "avx512":
        return "avx512"
    avx2 = (kw < 14 and pw < kw and ew < kw and ph < kh and eh < kh and kh <= ph + ih
            and kh <= ih and pd == 0 and ed == 0 and kd <= id_)
    return "avx2" if avx2 else "gemm"


def _barriers(n: int) -> int:
    """A scratchpad entry of ``n`` simple_barrier contexts: observed 8192 bytes for one (one
    page plus its page alignment)."""
    return n * _PAGE + _PAGE


def _reduce_balance(nthr: int, job: int, njobs: int, red: int, max_buf: int) -> tuple:
    """reduce_balancer_t::balance() (src/cpu/x64/cpu_reducer.cpp), lock-free:
    (groups, threads per group, jobs per group)."""
    min_per = max(1, njobs // nthr)
    max_per = max(1, max_buf // (nthr * job))
    groups = min(njobs // min_per, nthr)
    per = min(nthr // groups, red)
    ub = _cdiv(njobs, groups)
    best = njobs * job * red
    for c in range(min_per, njobs):
        cg = min(njobs // c, nthr)
        cp = min(nthr // cg, red)
        cub = _cdiv(njobs, cg)
        if cp > 1 and cub > max_per:
            continue
        cost = job * cub * (_cdiv(red, cp) + (cp != 1))
        if cost < best:
            groups, per, ub, best = cg, cp, cub, cost
    return groups, per, ub


def _reducer_scratchpad(nthr: int, job: int, njobs: int, red: int, max_buf: int) -> int:
    """cpu_reducer_t::conf_t::init_scratchpad: partial sums of all but each group's first
    thread (page-aligned), and one barrier per group."""
    groups, per, ub = _reduce_balance(nthr, job, njobs, red, max_buf)
    if per == 1:
        return 0
    return groups * (per - 1) * ub * job * 4 + _PAGE + _barriers(groups)


def _avx512_balance(g: dict, mb: int, nb_ic: int, ic_block: int, nb_oc: int,
                    nthreads: int) -> tuple:
    """jit_avx512_common_conv_bwd_weights_kernel_f32::balance (groups 1): (nthr, nthr_mb)."""
    (id_, ih, iw), (od, oh, ow), (kd, kh, kw) = g["in"], g["out"], g["k"]
    sd, sh, sw = g["stride"]
    two_d = g["dims"] == 2 and oh > 9  # harness_2d_reduction (min_oh_reduce = 9)
    ih_r, oh_r = (ih, oh) if two_d else (1, 1)
    ih_n, oh_n = (1, 1) if two_d else (ih, oh)
    nthr_oh_reduce = max(1, oh_r // 9)

    def mem(n_mb: int, n_oc: int, n_ic: int) -> int:
        return (_cdiv(mb * ih_r, n_mb) * _cdiv(nb_ic, n_ic) * ic_block * ih_n * iw * id_
                // sd // sh // sw
                + _cdiv(mb * oh_r, n_mb) * _cdiv(nb_oc, n_oc) * 16 * oh_n * ow * od
                + 8 * _cdiv(nb_oc, n_oc) * _cdiv(nb_ic, n_ic) * kh * kw * kd * ic_block * 16)

    def comp(n_mb: int, n_oc: int, n_ic: int) -> int:
        return _cdiv(mb * oh_r, n_mb) * _cdiv(nb_oc, n_oc) * _cdiv(nb_ic, n_ic)

    mb_max = min(nthreads, mb * od * nthr_oh_reduce)
    grid = []
    for n_mb in range(1, mb_max + 1):
        par = nthreads // n_mb
        for n_oc in range(1, min(par, nb_oc) + 1):
            grid.append((n_mb, n_oc, min(par // n_oc, nb_ic)))
    best = (1, 1, 1)
    best_mem = mem(*best)
    for cfg in grid:
        if mem(*cfg) <= best_mem:
            best, best_mem = cfg, mem(*cfg)
    best_comp = comp(*best)
    for cfg in grid:
        c = comp(*cfg)
        if (c <= best_comp and mem(*cfg) < 1.1 * best_mem) or 4 * c <= 3 * best_comp:
            best, best_comp = cfg, c
    n_mb, n_oc, n_ic = best
    if nthreads // 2 < n_mb < nthreads:
        n_mb = min(mb * od * nthr_oh_reduce, nthreads)
    return n_mb * n_oc * n_ic, n_mb


def _weight_grad_scratchpad(kernel: str, inp: Any, weight: Any, gout: Any, stride: Any,
                            padding: Any, bias: bool) -> int:
    """Bytes of the scratchpad of oneDNN's f32 weight-gradient kernel (see the rules above)."""
    import torch

    threads = max(1, torch.get_num_threads())
    g = _conv_geometry(inp, weight, gout, stride, padding)
    n, cin, cout = int(inp.shape[0]), int(inp.shape[1]), int(gout.shape[1])
    ks = _numel(weight.shape[2:])
    if kernel == "gemm":
        return _gemm_weight_grad_scratchpad(inp, weight, gout, stride, threads)
    if kernel == "avx2":
        # Cin == 3 is read flat: one block of 3 input channels
        ic_block, nb_ic = (3, 1) if cin == 3 else (8, _pad8(cin) // 8)
        nb_oc = _pad8(cout) // 8
        total = _pad8(cout) * 4 + _SCRATCHPAD_PAD if bias and cout % 8 else 0
        if bias:
            total += _reducer_scratchpad(threads, 8, nb_oc, n, 1 << 21)
        return total + _reducer_scratchpad(threads, ks * ic_block * 8, nb_ic * nb_oc,
                                           n * g["out"][0], 1 << 21)
    first = cin < _CONV_BLOCK
    ic_block = cin if first else _CONV_BLOCK
    nb_ic = 1 if first else _pad16(cin) // _CONV_BLOCK
    nb_oc = _pad16(cout) // _CONV_BLOCK
    nthr, nthr_mb = _avx512_balance(g, n, nb_ic, ic_block, nb_oc, threads)
    total = 0
    if nthr_mb > 1:  # partial weight and bias gradients of all but the first minibatch thread
        wei = _pad16(cout) * nb_ic * ic_block * ks + _pad16(cout)
        total += (nthr_mb - 1) * wei * 4 + _SCRATCHPAD_PAD + _barriers(1)
    if bias and cout % _CONV_BLOCK:
        total += _pad16(cout) * 4 + _SCRATCHPAD_PAD
    if bias:
        total += _reducer_scratchpad(nthr, _CONV_BLOCK, nb_oc, n, nthr * 3 * 5 * 5 * 16 * 16)
    return total


def _gemm_weight_grad_scratchpad(inp: Any, weight: Any, gout: Any, stride: Any,
                                 threads: int) -> int:
    """gemm_convolution_utils.cpp, init_conf, the ``!jcp.is_nspc && is_bwd_w`` branch (f32)."""
    n, cin = int(inp.shape[0]), int(inp.shape[1])
    outs = [int(d) for d in gout.shape[2:]]
    os_ = outs[-1] * (outs[-2] if len(outs) >= 2 else 1)
    ks = _numel(weight.shape[2:])
    w_bytes = weight.numel() * 4
    same = list(inp.shape[2:]) == list(gout.shape[2:]) and ks == 1 \
        and all(int(s) == 1 for s in stride)
    im2col = 0 if same else cin * ks * os_
    limit = min(1 << 30, 15 * threads * (inp.numel() * 4 + w_bytes + gout.numel() * 4))
    mem_ok = 4 * threads * w_bytes + 4 * threads * cin * ks * 16 < limit
    nthr = threads if mem_ok and os_ // threads < 256 and n != 1 else 1
    reduction = nthr * w_bytes * 4  # booked as nthr * weights_d.size() floats
    cols = nthr * im2col
    available = limit - (reduction + _SCRATCHPAD_PAD)
    if im2col and available < cols * 4:  # too big: the columns are made os_block at a time
        max_os_block = available // (4 * nthr * (im2col // os_))
        os_block = max(16, int(max_os_block * 0.05))
        cols = nthr * cin * ks * os_block
    return reduction + _SCRATCHPAD_PAD + (cols * 4 + _SCRATCHPAD_PAD if cols else 0)


def _dw_weight_grad_scratchpad(n: int, c: int, k: int, block: int, bias: bool) -> int:
    """The scratchpad of oneDNN's f32 depthwise weight-gradient kernel
    (jit_uni_dw_conv_bwd_weights_kernel: balance() and init_scratchpad()). The channel blocks
    nb_ch = P(C)/B go to nthr_g = min(nb_ch, T) threads, the minibatch to
    nthr_mb = min(max(1, T // nthr_g), N); with nthr_mb > 1, the partial weight gradients of
    all but one minibatch thread, (nthr_mb - 1)*P(C)*K floats, and the partial bias gradients,
    (nthr_mb - 1)*P(C) floats (the kernel pads its group count to the block). Each entry
    takes its alignment (128 bytes) more."""
    import torch

    threads = max(1, torch.get_num_threads())
    nb_ch = _cdiv(c, block)
    nthr_mb = min(max(1, threads // min(nb_ch, threads)), int(n))
    if nthr_mb == 1:
        return 0
    total = (nthr_mb - 1) * nb_ch * block * k * 4 + _SCRATCHPAD_PAD
    if bias:
        total += (nthr_mb - 1) * nb_ch * block * 4 + _SCRATCHPAD_PAD
    return total


_BRGEMM_BATCH_ELEMENT = 40  # sizeof(brgemm_batch_element_t) on x86-64


def _deconv_strided_scratchpad(inp: Any, weight: Any, out: Any, stride: Any, padding: Any,
                               dilation: Any, output_padding: Any) -> int:
    """The scratchpad of oneDNN's strided f32 deconvolution (brg_deconv over
    brgconv_strided; see the rules above), or 0 where it is not modelled."""
    stride, padding = [int(v) for v in stride], [int(v) for v in padding]
    dilation, output_padding = [int(v) for v in dilation], [int(v) for v in output_padding]
    ks = [int(v) for v in weight.shape[2:]]
    if (inp.element_size() != 4 or all(s == 1 for s in stride) or any(d != 1 for d in dilation)
            or int(out.shape[-1]) % stride[-1]):
        return 0
    # brgemm_convolution_bwd_utils::init_conf: the input buffer covers the deconvolution's
    # input plus the rows the kernel overflows into (l_ovf/r_ovf and their h, d kin), Cin
    # channels in one block
    spatial = 1
    for i, k, s, p, op in zip(inp.shape[2:], ks, stride, padding, output_padding):
        lo = max(0, k - 1 - p) // s
        hi = max(0, k - 1 - (p - op)) // s
        spatial *= int(i) + lo + hi
    in_buf = _cdiv(spatial * int(inp.shape[1]), _PAGE) * _PAGE * 4
    gbs = _numel(ks)  # jcp.gemm_batch_size <= the kernel volume (exact while <= 102)
    batch = _cdiv(_cdiv(gbs * _BRGEMM_BATCH_ELEMENT, _PAGE) * _PAGE,
                  _BRGEMM_BATCH_ELEMENT) * _BRGEMM_BATCH_ELEMENT
    mask = _PAGE  # rnd_up(nb_id*nb_ih*nb_iw, 4096) bytes: one page below 4096 blocks
    return 3 * _PAGE + _SCRATCHPAD_PAD + _threads() * (batch + in_buf + mask)
