"""Measure the scratch memory CUDA kernels take from the caching allocator, per operation.

    python benchmarks/cuda_workspace_probe.py > workspaces.csv

For each convolution (forward, and backward to input and weight) and attention call in a grid
of shapes, prints the bytes the allocator's peak rose above what the call's inputs and outputs
account for: the cuDNN / cuBLAS / attention workspace that the CUDA memory estimate must model.
Needs a GPU.
"""
from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F

BLOCK = 512


def _bytes(*ts: torch.Tensor) -> int:
    return sum(-(-t.untyped_storage().nbytes() // BLOCK) * BLOCK for t in ts if t is not None)


def _peak_over(fn) -> tuple:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out


def conv_rows(dims: int) -> None:
    convf = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    sizes = {1: (256, 1024), 2: (32, 96), 3: (12, 24)}[dims]
    for b, cin, cout, s, k, stride in itertools.product(
            (1, 16), (1, 3, 32, 64), (16, 64), sizes, (1, 3), (1, 2)):
        x = torch.randn(b, cin, *([s] * dims), device="cuda", requires_grad=True)
        w = torch.randn(cout, cin, *([k] * dims), device="cuda", requires_grad=True)
        bias = torch.randn(cout, device="cuda", requires_grad=True)
        with torch.no_grad():
            rise, y = _peak_over(lambda: convf(x, w, bias, stride=stride, padding=k // 2))
        fwd = rise - _bytes(y)
        y = None
        y = convf(x, w, bias, stride=stride, padding=k // 2)
        g = torch.ones_like(y)
        x.grad = w.grad = bias.grad = None
        rise, _ = _peak_over(lambda: y.backward(g))
        bwd = rise - _bytes(x.grad, w.grad, bias.grad)
        print(f"conv{dims}d,{b},{cin},{cout},{s},{k},{stride},{_bytes(x)},{_bytes(y)},"
              f"{_bytes(w)},{fwd},{bwd}", flush=True)


def transposed_rows() -> None:
    for b, cin, cout, s in itertools.product((1, 16), (16, 64), (16, 32), (24, 48)):
        x = torch.randn(b, cin, s, s, device="cuda", requires_grad=True)
        w = torch.randn(cin, cout, 2, 2, device="cuda", requires_grad=True)
        with torch.no_grad():
            rise, y = _peak_over(lambda: F.conv_transpose2d(x, w, stride=2))
        fwd = rise - _bytes(y)
        y = F.conv_transpose2d(x, w, stride=2)
        g = torch.ones_like(y)
        rise, _ = _peak_over(lambda: y.backward(g))
        bwd = rise - _bytes(x.grad, w.grad)
        print(f"convT2d,{b},{cin},{cout},{s},2,2,{_bytes(x)},{_bytes(y)},{_bytes(w)},{fwd},{bwd}",
              flush=True)


def attention_rows() -> None:
    for b, h, s, d, dtype in itertools.product((1, 16), (8,), (128, 512), (32, 64),
                                               (torch.float32, torch.bfloat16)):
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True)
                   for _ in range(3))
        with torch.no_grad():
            rise, o = _peak_over(lambda: F.scaled_dot_product_attention(q, k, v))
        fwd = rise - _bytes(o)
        o = F.scaled_dot_product_attention(q, k, v)
        g = torch.ones_like(o)
        rise, _ = _peak_over(lambda: o.backward(g))
        bwd = rise - _bytes(q.grad, k.grad, v.grad)
        print(f"sdpa,{b},{h},{s},{d},{str(dtype)[6:]},{_bytes(q)},{_bytes(o)},0,{fwd},{bwd}",
              flush=True)


def encoder_rows() -> None:
    """An eval-mode encoder's inference peak with the fused fast path on and off."""
    layer = torch.nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).cuda().eval()
    x = torch.randn(16, 128, 256, device="cuda")
    for fast in (True, False):
        torch.backends.mha.set_fastpath_enabled(fast)
        with torch.no_grad():
            rise, y = _peak_over(lambda: enc(x))
        print(f"encoder,16,8,128,32,fastpath={fast},{_bytes(x)},{_bytes(y)},0,{rise},", flush=True)
    torch.backends.mha.set_fastpath_enabled(True)


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn"
          f" {torch.backends.cudnn.version()}, benchmark={torch.backends.cudnn.benchmark},"
          f" allow_tf32={torch.backends.cudnn.allow_tf32}")
    print("op,b,cin,cout,size,k,stride,in_bytes,out_bytes,w_bytes,fwd_ws,bwd_ws")
    which = sys.argv[1:] or ["conv", "transposed", "attention", "encoder"]
    if "conv" in which:
        for dims in (1, 2, 3):
            conv_rows(dims)
    if "transposed" in which:
        transposed_rows()
    if "attention" in which:
        attention_rows()
    if "encoder" in which:
        encoder_rows()


if __name__ == "__main__":
    main()
