"""Where a CUDA step's memory goes, op by op: the diagnostic behind the CUDA memory estimate.

    python benchmarks/cuda_op_trace.py OUT_DIR [--summary-only] [MODEL:BATCH ...]

For each case (a model, a batch size, a phase) it writes ``OUT_DIR/<case>.jsonl``: one line per
aten op of the real CUDA step with the bytes allocated before and after it, the peak inside it
(``max_memory_allocated`` after a reset), the bytes of its outputs and, for convolutions, their
arguments. An op whose inside peak is above both ends holds a workspace; an op whose growth is
above its outputs keeps something hidden. Every convolution is then run again on its own, as
the estimate's probe runs it (``core/cuda_probe.py``), to see whether its workspace depends on
the shape alone.
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

from pytest_modelcheck.core import cuda_probe as P  # noqa: E402
from pytest_modelcheck.core import memory as M  # noqa: E402
from pytest_modelcheck.core.cuda_workspace import CUDA_BLOCK_BYTES  # noqa: E402
from pytest_modelcheck.core.batch import Batch  # noqa: E402
from pytest_modelcheck.core.losses import resolve_loss  # noqa: E402

DEV = os.environ.get("TRACE_DEVICE", "cuda")  # "cpu" only to try the script out


def _meta(x):
    """An op argument as the probe encodes it (its string where the probe has no encoding)."""
    try:
        return P._encode(x)
    except P.Unprobeable:
        return str(x)


def _out_bytes(out) -> int:
    seen, total = set(), 0
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and t.device.type == DEV:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += -(-st.nbytes() // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
    return total


class OpLog(TorchDispatchMode):
    def __init__(self, rows: list, phase: list) -> None:
        super().__init__()
        self.rows, self.phase = rows, phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with P._Meter(None) as meter:
            out = func(*args, **kwargs)
        name = str(func)
        row = {"i": len(self.rows), "op": name, "phase": self.phase[0], "before": meter.before,
               "after": meter.after, "ws": meter.workspace, "out": _out_bytes(out)}
        if "conv" in name or "attention" in name or "batch_norm" in name:
            row["args"] = [_meta(a) for a in args]
            row["kwargs"] = {k: _meta(v) for k, v in kwargs.items()}
            row["outs"] = [_meta(o) for o in (out if isinstance(out, (tuple, list)) else [out])]
        self.rows.append(row)
        return out


def _probe(row) -> int:
    """Run one logged op again on its own, as the estimate's probe does; its workspace."""
    sig = json.dumps([row["op"], row["args"], row["kwargs"]])
    return P._probe_one(sig, torch.device(DEV), 1 << 40)


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
    from tests.gpu.test_cuda import CASES  # the CUDA tests' nets: convnet, unet, mlp, ...

    local = dict(CASES, resnetish=(_resnetish, lambda b: (torch.randn(b, 3, 128, 128),
                                                          torch.randint(0, 10, (b,))),
                                   lambda out, t: F.cross_entropy(out, t)))
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
