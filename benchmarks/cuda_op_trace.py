"""Where a CUDA step's memory goes, op by op: the diagnostic behind the CUDA memory estimate.

    python benchmarks/cuda_op_trace.py OUT_DIR [--summary-only] [MODEL:BATCH ...]

For each case (a model, a batch size, a phase) it writes ``OUT_DIR/<case>.jsonl``: one line per
aten op of the real CUDA step with the bytes allocated before and after it, the peak inside it
(``max_memory_allocated`` after a reset), the bytes of its outputs and, for convolutions, their
arguments. An op whose inside peak is above both ends holds a workspace; an op whose growth is
above its outputs keeps something hidden. Every convolution is then run again on its own, on
empty tensors of the same layout, to see whether its workspace depends on the shape alone.
``OUT_DIR/summary.txt`` has the caching allocator's peak per phase next to the estimate's
(and, with ``--summary-only``, nothing else is run).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from pytest_modelcheck.core import memory as M  # noqa: E402
from pytest_modelcheck.core.batch import Batch  # noqa: E402
from pytest_modelcheck.core.losses import resolve_loss  # noqa: E402

BLOCK = 512
DEV = os.environ.get("TRACE_DEVICE", "cuda")  # "cpu" only to try the script out


def _rounded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _meta(x):
    if isinstance(x, torch.Tensor):
        return {"t": list(x.shape), "s": list(x.stride()), "d": str(x.dtype).replace("torch.", "")}
    if isinstance(x, (list, tuple)):
        return [_meta(v) for v in x]
    if isinstance(x, dict):
        return {k: _meta(v) for k, v in x.items()}
    if isinstance(x, (int, float, bool, str)) or x is None:
        return x
    return str(x)


def _out_bytes(out) -> int:
    seen, total = set(), 0
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and t.device.type == DEV:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += _rounded(st.nbytes())
    return total


class OpLog(TorchDispatchMode):
    def __init__(self, rows: list, phase: list) -> None:
        super().__init__()
        self.rows, self.phase = rows, phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = func(*args, **kwargs)
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
        peak = torch.cuda.max_memory_allocated()
        name = str(func)
        row = {"i": len(self.rows), "op": name, "phase": self.phase[0], "before": before,
               "after": after, "ws": peak - max(before, after), "out": _out_bytes(out)}
        if "conv" in name or "attention" in name or "batch_norm" in name:
            row["args"] = _meta(list(args))
            row["kwargs"] = _meta(kwargs)
            row["outs"] = _meta(list(out) if isinstance(out, (tuple, list)) else [out])
        self.rows.append(row)
        return out


def _probe(row) -> int:
    """Run one logged op again on empty tensors of the same layout; its workspace."""
    ns, op, overload = row["op"].split(".")
    func = getattr(getattr(getattr(torch.ops, ns), op), overload)

    def build(m):
        if isinstance(m, dict) and "t" in m:
            return torch.empty_strided(m["t"], m["s"], dtype=getattr(torch, m["d"]), device=DEV)
        if isinstance(m, list):
            return [build(v) for v in m]
        return m

    args = build(row["args"])
    kwargs = {k: build(v) for k, v in row["kwargs"].items()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = func(*args, **kwargs)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    ws = torch.cuda.max_memory_allocated() - max(before, after)
    del out, args, kwargs
    return ws


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.body(x)


class _UNet(nn.Module):
    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
        self.down = nn.Conv2d(c, 2 * c, 3, padding=1, stride=2)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec = nn.Conv2d(2 * c, 1, 3, padding=1)

    def forward(self, x):
        a = self.enc(x)
        return self.dec(torch.cat([a, self.up(F.relu(self.down(a)))], dim=1))


def _transformer():
    layer = nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 4, enable_nested_tensor=False),
                         nn.Linear(256, 256))


def _resnetish():
    def block(c):
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                             nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False),
                             nn.BatchNorm2d(c), nn.ReLU())
    return nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.ReLU(), block(64),
                         nn.Conv2d(64, 128, 3, stride=2, padding=1), block(128),
                         nn.Conv2d(128, 256, 3, stride=2, padding=1), block(256),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


def _case(name: str, size: int):
    """(model, batch, loss) on the GPU."""
    mse = lambda out, t: F.mse_loss(out, t)  # noqa: E731
    ce = lambda out, t: F.cross_entropy(out, t)  # noqa: E731
    local = {
        "convnet": (_Conv, lambda b: (torch.randn(b, 3, 64, 64), torch.randint(0, 10, (b,))), ce),
        "unet": (_UNet, lambda b: (torch.randn(b, 1, 96, 96), torch.randn(b, 1, 96, 96)), mse),
        "transformer": (_transformer, lambda b: (torch.randn(b, 128, 256),
                                                 torch.randn(b, 128, 256)), mse),
        "resnetish": (_resnetish, lambda b: (torch.randn(b, 3, 128, 128),
                                             torch.randint(0, 10, (b,))), ce),
    }
    torch.manual_seed(0)
    if name in local:
        factory, make, loss = local[name]
        model = factory().to(DEV)
        batch = Batch.from_user(tuple(t.to(DEV) for t in make(size)))
        return model, batch, loss
    mod = importlib.import_module(f"example_models.{name}")
    model = mod.build_model().to(DEV)
    batch = Batch.from_user(mod.make_batch(size)).to(DEV)
    with torch.no_grad():
        out = batch.call(model)
    return model, batch, resolve_loss(mod.loss_fn, batch, out)


def _trace(model, batch, loss, phase: str) -> list:
    rows, current = [], ["setup"]
    work = M.copy_model(model)
    data = batch.clone()
    opt = M._prepare(work, phase, "adamw", 1e-3)

    import contextlib

    @contextlib.contextmanager
    def phase_context(name):
        current[0] = name
        yield

    with OpLog(rows, current):
        keep = M._run_step(work, data, loss, phase, opt, phase_context)
    del keep, work, data, opt
    return rows


def main() -> None:
    argv = sys.argv[1:]
    summary_only = "--summary-only" in argv
    argv = [a for a in argv if a != "--summary-only"]
    out_dir = argv[0]
    os.makedirs(out_dir, exist_ok=True)
    cases = argv[1:] or ["convnet:16", "unet:16", "resnetish:16", "transformer:16",
                             "icecube_deepsets:8", "vit3d:4", "pix2pixcc_gan:4", "swinir:1",
                             "vnet_unet:4", "fno:4", "genesis_dit:4"]
    summary = open(os.path.join(out_dir, "summary.txt"), "a")

    def say(*a):
        line = " ".join(str(x) for x in a)
        print(line, flush=True)
        summary.write(line + "\n")
        summary.flush()

    say(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda},"
        f" cudnn {torch.backends.cudnn.version()}, conv tf32 {torch.backends.cudnn.allow_tf32},"
        f" matmul tf32 {torch.backends.cuda.matmul.allow_tf32}")
    # library workspaces: the main thread's, then the autograd thread's
    a0 = torch.cuda.memory_allocated()
    M._cuda_api.warm_up_libraries(DEV)
    torch.cuda.synchronize()
    a1 = torch.cuda.memory_allocated()
    lin = nn.Linear(64, 64).to(DEV)
    x = torch.randn(8, 64, device=DEV)
    lin(x).sum().backward()
    torch.cuda.synchronize()
    a2 = torch.cuda.memory_allocated()
    say(f"warm-up main thread: {a1 - a0} bytes; first backward: {a2 - a1} bytes"
        f" (params' grads {64 * 64 * 4 + 64 * 4})")
    del lin, x
    for spec in cases:
        name, size = spec.split(":")
        t0 = time.time()
        try:
            model, batch, loss = _case(name, int(size))
        except Exception as exc:  # noqa: BLE001
            say(f"{spec}: cannot build: {exc!r}")
            continue
        for phase in ("train", "inference"):
            try:
                real = M.measure_step_memory(model, batch, loss, phase=phase)
                t1 = time.time()
                est = M.estimate_step_memory(model, batch, loss, phase=phase, device="cuda")
                t1 = time.time() - t1
                say(f"{spec} {phase}: measured {real.peak_bytes} ({real.peak_phase})"
                    f" estimated {est.peak_bytes} ({est.peak_phase})"
                    f" ratio {est.peak_bytes / real.peak_bytes:.3f}"
                    f" upper {est.peak_upper_bytes / real.peak_bytes:.3f}"
                    f" | real phases {real.phase_peaks} est phases {est.phase_peaks}"
                    f" | estimate {t1:.1f} s, {est.kernel_workspaces}")
                if summary_only:
                    continue
                rows = _trace(model, batch, loss, phase)
                for row in rows:
                    if "args" in row and ("convolution" in row["op"]):
                        try:
                            row["probe"] = _probe(row)
                            row["probe2"] = _probe(row)
                        except Exception as exc:  # noqa: BLE001
                            row["probe"] = repr(exc)[:200]
                with open(os.path.join(out_dir, f"{name}_{size}_{phase}.jsonl"), "w") as f:
                    for row in rows:
                        f.write(json.dumps(row) + "\n")
                ws = [(r["op"], r["ws"], r.get("probe")) for r in rows if r["ws"] > 0]
                hidden = [(r["op"], r["after"] - r["before"] - r["out"]) for r in rows
                          if r["after"] - r["before"] - r["out"] > 0]
                say(f"   ops {len(rows)}; workspaces {len(ws)}: {ws[:12]}")
                say(f"   hidden growth: {hidden[:12]}")
            except Exception as exc:  # noqa: BLE001
                say(f"{spec} {phase}: failed: {exc!r}"[:400])
        del model, batch
        torch.cuda.empty_cache()
        say(f"   ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
