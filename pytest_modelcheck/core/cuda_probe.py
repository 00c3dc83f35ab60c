"""Ask the GPU how much scratch memory its kernels take: the workspaces of a CUDA estimate.

A CUDA memory estimate runs the step on fake tensors, which gives every tensor that is alive
between ops exactly, but not what a kernel allocates for itself while it runs and frees before
it returns. On an H200 (``benchmarks/cuda_op_trace.py``) those workspaces were most of the gap
between the fake-tensor estimate and the caching allocator's peak:

* cuDNN convolutions, forward and backward: copies of the operands in another layout, chosen
  per shape by cuDNN's heuristics (up to 2.3x the operands; no shape rule predicts which);
* the memory-efficient attention backward, reductions that split across blocks (a bias
  gradient's ``sum``: twice its input), ``mse_loss``, layer norm, ``roll``, cuFFT plans.

Which kernel runs, and so its workspace, depends on the GPU, the library versions and the
global backend flags, so no table written on one machine holds on another. When the estimate
runs where the target GPU is, this module measures instead: every distinct op signature of the
fake step (op, argument shapes, strides, dtypes and values) is run once on zero-filled tensors
of the same layout, in a child process on the same device, with the parent's cuDNN, TF32,
SDPA and determinism flags; the op's workspace is the caching allocator's peak during the op
above its inputs and outputs. The child keeps the caller's process untouched: its peak
statistics, its caching allocator, its CUDA streams. Only the op's own operands are allocated,
one op at a time (ops whose operands would take more than :data:`MAX_SHARE` of the free device
memory, and multi-tensor optimizer kernels, are not run). Results are cached per device,
flags and signature for the life of the process.

Ops the CPU fake step runs under a CPU-only name are mapped to what the GPU runs: the CPU
flash-attention forward and backward become ``scaled_dot_product_attention`` and its autograd
backward, which pick the same SDPA backend the real step does. Ops that cannot be probed (a
CPU-only kernel, a custom op the child cannot load, an argument it cannot rebuild) keep the
fixed rules (``memory._cuda_attention_workspace``, :mod:`.cuda_workspace`'s bound).
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any, Optional

MAX_SHARE = 0.4  # of the device's free memory, for one probed op's operands
PROBE_TIMEOUT_S = 180.0
SDPA = "scaled_dot_product_attention"
_SDPA_CPU = {"_scaled_dot_product_flash_attention_for_cpu": "forward",
             "_scaled_dot_product_flash_attention_for_cpu_backward": "backward"}
_CACHE: dict = {}


class Unprobeable(Exception):
    """An op argument the child could not rebuild."""


def _encode(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided or x.is_quantized or getattr(x, "is_nested", False):
            raise Unprobeable("layout")
        return {"T": list(x.shape), "S": list(x.stride()), "D": str(x.dtype)[6:]}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, complex):
        return {"C": [x.real, x.imag]}
    if isinstance(x, torch.dtype):
        return {"dtype": str(x)[6:]}
    if isinstance(x, torch.device):
        return {"device": 1}
    if isinstance(x, torch.layout):
        return {"layout": str(x)[6:]}
    if isinstance(x, torch.memory_format):
        return {"mf": str(x)[6:]}
    raise Unprobeable(type(x).__name__)


def _has_tensor(x: Any) -> bool:
    import torch

    if isinstance(x, torch.Tensor):
        return True
    return isinstance(x, (list, tuple)) and any(_has_tensor(v) for v in x)


def op_signature(func: Any, args: tuple, kwargs: Optional[dict]) -> Optional[str]:
    """The JSON text that identifies an op call for probing, or None when it is not probed
    (views, ops without tensor operands, multi-tensor optimizer kernels, CPU-only kernels,
    arguments the child cannot rebuild).

    >>> import torch
    >>> x = torch.empty(2, 3, device="meta")
    >>> op_signature(torch.ops.aten.sum.dim_IntList, (x, [0]), {})
    '["aten.sum.dim_IntList", [{"T": [2, 3], "S": [3, 1], "D": "float32"}, [0]], {}]'
    >>> op_signature(torch.ops.aten.view.default, (x, [6]), {}) is None
    True
    """
    name = func.overloadpacket.__name__
    namespace = getattr(func, "namespace", "aten")
    if namespace == "prim" or getattr(func, "is_view", False) or name.startswith("_foreach_") \
            or name in ("detach", "copy_", "lift_fresh", "_local_scalar_dense"):
        return None
    kwargs = dict(kwargs or {})
    if name in _SDPA_CPU:
        return _sdpa_signature(_SDPA_CPU[name], args, kwargs)
    if "mkldnn" in name or name.endswith("_for_cpu") or not _has_tensor(list(args)):
        return None
    try:
        return json.dumps([str(func), _encode(list(args)), {k: _encode(v)
                                                             for k, v in kwargs.items()}])
    except (Unprobeable, ValueError):
        return None


def layout_alternatives(sig: str) -> list:
    """Other signatures a convolution may really have had: batch-of-one operands that are not
    contiguous, made contiguous.

    Fake tensors reproduce strides exactly except those of size-1 dimensions, and with a batch
    of one that stride decides whether torch reads an operand as channels-last (its
    ``suggest_memory_format``), so whether cuDNN runs an NHWC engine or copies to NCHW
    (seen on an H200: a SwinIR-style model at batch 1 had 0.45 MiB of workspace estimated
    where the step took 0.94 MiB). The estimate probes both and keeps the larger workspace.

    >>> import torch
    >>> x = torch.empty(1, 8, 4, 4, device="meta").to(memory_format=torch.channels_last)
    >>> w = torch.empty(8, 8, 3, 3, device="meta")
    >>> sig = op_signature(torch.ops.aten.convolution.default,
    ...                    (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1), {})
    >>> [json.loads(a)[1][0]["S"] for a in layout_alternatives(sig)]
    [[128, 16, 4, 1]]
    """
    spec = json.loads(sig)
    if "convolution" not in str(spec[0]):
        return []
    changed = False

    def contiguous(x: Any) -> Any:
        nonlocal changed
        if isinstance(x, list):
            return [contiguous(v) for v in x]
        if isinstance(x, dict) and "T" in x and len(x["T"]) >= 4 and x["T"][0] == 1:
            strides: list = []
            step = 1
            for n in reversed(x["T"]):
                strides.insert(0, step)
                step *= max(n, 1)
            if strides != x["S"]:
                changed = True
                return {**x, "S": strides}
        return x

    alternative = json.dumps([spec[0], contiguous(spec[1]), spec[2]])
    return [alternative] if changed else []


def _sdpa_signature(direction: str, args: tuple, kwargs: dict) -> Optional[str]:
    # forward (q, k, v, dropout_p=0, is_causal=False, *, attn_mask=None, scale=None);
    # backward (grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale)
    rest = list(args[1:4] if direction == "backward" else args[:3])
    extra = list(args[6:8] if direction == "backward" else args[3:5])
    dropout = extra[0] if extra else kwargs.get("dropout_p", 0.0)
    causal = extra[1] if len(extra) > 1 else kwargs.get("is_causal", False)
    grad = any(getattr(t, "requires_grad", False) for t in rest)
    try:
        return json.dumps([SDPA, direction if direction == "backward" or not grad else "train",
                           _encode(rest),
                           {"attn_mask": _encode(kwargs.get("attn_mask")),
                            "dropout_p": dropout, "is_causal": causal,
                            "scale": kwargs.get("scale")}])
    except (Unprobeable, ValueError):
        return None


def backend_settings() -> dict:
    """The global flags that choose CUDA kernels, to be set alike in the child.

    >>> sorted(backend_settings())[:2]
    ['cudnn_allow_tf32', 'cudnn_benchmark']
    """
    import torch

    cuda = torch.backends.cuda
    settings = {
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": cuda.matmul.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    for flag in ("flash", "mem_efficient", "math", "cudnn"):
        getter = getattr(cuda, f"{flag}_sdp_enabled", None)
        if getter is not None:
            settings[f"sdp_{flag}"] = bool(getter())
    return settings


def probe_workspaces(signatures: list, device: Any) -> Optional[dict]:
    """Workspace bytes for each signature, measured in a child process on ``device``
    (None for a signature the child could not run); None when there is no child to ask (no
    CUDA here, the child failed to start or timed out).

    >>> probe_workspaces([], "cuda")
    {}
    """
    import torch

    if not signatures:
        return {}
    if not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    settings = backend_settings()
    key = (torch.cuda.get_device_name(index), index, json.dumps(settings, sort_keys=True))
    todo = [s for s in dict.fromkeys(signatures) if (key, s) not in _CACHE]
    if todo:
        found = _run_child(todo, index, settings)
        if found is None:
            return None
        for sig in todo:
            _CACHE[(key, sig)] = found.get(sig)
    return {s: _CACHE[(key, s)] for s in signatures}


def _run_child(signatures: list, index: int, settings: dict) -> Optional[dict]:
    """One request to the probe process (started on first use, kept for the life of this
    process, started again if it died); None when it cannot answer in time."""
    request = json.dumps({"device": index, "settings": settings, "ops": signatures})
    for _attempt in range(2):
        child = _child()
        if child is None:
            return None
        try:
            child.stdin.write(request + "\n")
            child.stdin.flush()
            line = _read_line(child, PROBE_TIMEOUT_S + 0.5 * len(signatures))
        except (OSError, ValueError):
            line = None
        except BaseException:  # a time budget's interrupt: the answer would come out of turn
            _stop_child()
            raise
        if line is not None:
            try:
                return dict(json.loads(line)["results"])
            except (ValueError, KeyError, TypeError):
                return None
        _stop_child()
    return None


_CHILD: list = []
_CHILD_STARTS: list = []


def _child() -> Any:
    if _CHILD and _CHILD[0].poll() is None:
        return _CHILD[0]
    _CHILD.clear()
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    try:
        child = subprocess.Popen([sys.executable, "-m", "pytest_modelcheck.core.cuda_probe"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, env=env)
    except OSError:
        return None
    if not _CHILD_STARTS:
        atexit.register(_stop_child)
    _CHILD_STARTS.append(child.pid)
    _CHILD.append(child)
    return child


def _read_line(child: Any, timeout: float) -> Optional[str]:
    """The child's next line of results, or None if it ends or takes longer than ``timeout``.

    A thread per child reads its stdout line by line into a queue (``select`` on a buffered
    pipe would miss a second line already read into the buffer)."""
    lines = getattr(child, "_lines", None)
    if lines is None:
        lines = child._lines = queue.Queue()

        def pump() -> None:
            try:
                for line in child.stdout:
                    lines.put(line)
            except (OSError, ValueError):
                pass
            lines.put(None)

        threading.Thread(target=pump, name="modelcheck-cuda-probe", daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            return None
        if line is None:
            return None
        if line.startswith("{"):
            return line


def _stop_child() -> None:
    """End the probe process (at exit, or when it stopped answering)."""
    while _CHILD:
        child = _CHILD.pop()
        try:
            child.kill()
            child.wait(timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass
        for pipe in (child.stdin, child.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass


# --- the child --------------------------------------------------------------------------------

def _apply(settings: dict) -> None:
    import torch

    torch.backends.cudnn.enabled = settings["cudnn_enabled"]
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = settings["cudnn_deterministic"]
    torch.backends.cudnn.allow_tf32 = settings["cudnn_allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = settings["matmul_allow_tf32"]
    torch.set_float32_matmul_precision(settings["matmul_precision"])
    torch.use_deterministic_algorithms(settings["deterministic"], warn_only=True)
    for flag in ("flash", "mem_efficient", "math", "cudnn"):
        setter = getattr(torch.backends.cuda, f"enable_{flag}_sdp", None)
        if setter is not None and f"sdp_{flag}" in settings:
            setter(settings[f"sdp_{flag}"])


def _decode(x: Any, device: Any, sizes: list) -> Any:
    """Rebuild an encoded argument on ``device``; tensors are zero-filled (valid indices,
    no NaN-dependent paths). ``sizes`` collects the bytes each tensor takes."""
    import torch

    if isinstance(x, list):
        return [_decode(v, device, sizes) for v in x]
    if not isinstance(x, dict):
        return x
    if "T" in x:
        shape, stride, dtype = x["T"], x["S"], getattr(torch, x["D"])
        span = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        sizes.append(span * torch.empty((), dtype=dtype).element_size())
        return torch.zeros(span, dtype=dtype, device=device).as_strided(shape, stride)
    if "C" in x:
        return complex(*x["C"])
    if "dtype" in x:
        return getattr(torch, x["dtype"])
    if "device" in x:
        return device
    if "layout" in x:
        return getattr(torch, x["layout"])
    if "mf" in x:
        return getattr(torch, x["mf"])
    raise Unprobeable(str(x))


def _op(name: str) -> Any:
    import torch

    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


class _Meter:
    """The caching allocator's peak during a call, above its start and its end."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def __enter__(self) -> "_Meter":
        import torch

        torch.cuda.synchronize(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        self.after = torch.cuda.memory_allocated(self.device)
        self.workspace = max(0, torch.cuda.max_memory_allocated(self.device)
                             - max(self.before, self.after))


def _probe_one(sig: str, device: Any, budget: int) -> Optional[int]:
    import torch

    spec = json.loads(sig)
    sizes: list = []
    if spec[0] == SDPA:
        _, direction, qkv, options = spec
        q, k, v = (t.requires_grad_(direction != "forward") for t in _decode(qkv, device, sizes))
        mask = _decode(options.pop("attn_mask"), device, sizes)
        if sum(sizes) * 3 > budget:
            return None
        fn = torch.nn.functional.scaled_dot_product_attention
        if direction != "backward":  # "train": the forward that keeps what backward needs
            with torch.set_grad_enabled(direction == "train"), _Meter(device) as meter:
                out = fn(q, k, v, attn_mask=mask, **options)
        else:
            out = fn(q, k, v, attn_mask=mask, **options)
            grad = torch.zeros_like(out)
            kept = []  # the gradients are outputs: alive when the meter stops
            with _Meter(device) as meter:
                kept.append(torch.autograd.grad(out, (q, k, v), grad))
            kept.clear()
        del out
        return meter.workspace
    func = _op(spec[0])
    args = _decode(spec[1], device, sizes)
    kwargs = {k: _decode(v, device, sizes) for k, v in spec[2].items()}
    if sum(sizes) > budget:
        return None
    with torch.no_grad(), _Meter(device) as meter:
        out = func(*args, **kwargs)
    del out, args, kwargs
    return meter.workspace


def _warm_up(device: Any) -> None:
    """Create the library handles and workspaces a process keeps (cuBLAS, cuBLASLt, the
    autograd thread's own), so that no probe counts them."""
    import torch

    a = torch.ones(8, 8, device=device, requires_grad=True)
    torch.nn.functional.linear(a, a, a[0]).sum().backward()
    torch.mm(a.detach(), a.detach())
    torch.cuda.synchronize(device)


def main() -> None:
    """The child: one JSON request per line on stdin, one JSON line of results on stdout for
    each, until stdin closes."""
    for line in sys.stdin:
        if line.strip():
            answer = _serve(json.loads(line))
            print(json.dumps(answer), flush=True)
            if answer.get("context_lost"):
                return  # a CUDA error poisons the context: the parent starts a new child


_WARM: set = set()


# Test seam: with this set to "1" the child runs every op on the CPU and reports a workspace
# of 0, so the protocol, the rebuilding of arguments and the ops themselves are tested on
# machines without a GPU.
CPU_SEAM_ENV = "MODELCHECK_TEST_PROBE_ON_CPU"


def _serve(request: dict) -> dict:
    import torch

    if os.environ.get(CPU_SEAM_ENV) == "1":
        return _serve_on_cpu(request)
    device = torch.device("cuda", int(request["device"]))
    torch.cuda.set_device(device)
    _apply(request["settings"])
    if device not in _WARM:
        _warm_up(device)
        _WARM.add(device)
    results: dict = {}
    lost = False
    for sig in request["ops"]:
        try:
            free, _total = torch.cuda.mem_get_info(device)
            results[sig] = _probe_one(sig, device, int(free * MAX_SHARE))
        except Exception as exc:  # noqa: BLE001 - this op is not probed; a dead context ends it
            results[sig] = None
            if "CUDA error" in str(exc) or "illegal" in str(exc):
                lost = True
                break
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - the context is gone
            lost = True
            break
    return {"device": torch.cuda.get_device_name(device), "results": results,
            "context_lost": lost}


class _NoMeter:
    """The CPU seam's meter: no allocator statistics, a workspace of 0."""

    def __init__(self, device: Any) -> None:
        self.workspace = 0

    def __enter__(self) -> "_NoMeter":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _serve_on_cpu(request: dict) -> dict:
    import torch

    global _Meter
    _Meter = _NoMeter  # type: ignore[misc,assignment]
    results: dict = {}
    for sig in request["ops"]:
        try:
            results[sig] = _probe_one(sig, torch.device("cpu"), 1 << 40)
        except Exception:  # noqa: BLE001 - reported as not probed, as on the GPU
            results[sig] = None
    return {"device": "cpu (test seam)", "results": results, "context_lost": False}


if __name__ == "__main__":
    main()
