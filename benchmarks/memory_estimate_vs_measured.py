"""Memory estimate (fake tensors, no allocation) against the measured peak (CPU allocator
events) of one training step and one inference step, for every example model and batch size.

    python benchmarks/memory_estimate_vs_measured.py [BATCH_SIZE ...] [--device cuda]

Prints one row per model and phase: measured bytes, estimated bytes and their ratio. With
``--device cuda`` the model runs on the GPU and is measured by the caching allocator
(``max_memory_allocated``), and the estimate is the CUDA one (512-byte blocks, no CPU
kernel workspaces); the ``upper`` column adds cuDNN's largest convolution workspaces
(``core/cuda_workspace.py``).
"""
from __future__ import annotations

import importlib
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pytest_modelcheck.core.batch import Batch  # noqa: E402
from pytest_modelcheck.core.losses import resolve_loss  # noqa: E402
from pytest_modelcheck.core.memory import estimate_step_memory, measure_step_memory  # noqa: E402
from pytest_modelcheck.core.units import format_bytes  # noqa: E402

MODELS = ["icecube_deepsets", "genesis_dit", "pix2pixcc_gan", "vnet_unet", "fno", "vit3d", "swinir"]


def main() -> None:
    args = sys.argv[1:]
    device = "cpu"
    if "--device" in args:
        at = args.index("--device")
        device = args[at + 1]
        del args[at:at + 2]
    where = (torch.cuda.get_device_name(device) if device.startswith("cuda")
             else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"# {where}, torch {torch.__version__}")
    sizes = [int(a) for a in args] or [1, 4, 8]
    print(f"{'model':18} {'batch':>5} {'phase':9} {'measured':>12} {'estimated':>12} {'ratio':>7}"
          + (f" {'upper':>7}" if device.startswith("cuda") else ""))
    for name in MODELS:
        mod = importlib.import_module(f"example_models.{name}")
        torch.manual_seed(0)
        model = mod.build_model().to(device)
        for size in sizes:
            batch = Batch.from_user(mod.make_batch(size)).to(device)
            with torch.no_grad():
                out = batch.call(model)
            loss = resolve_loss(mod.loss_fn, batch, out)
            for phase in ("train", "inference"):
                real = measure_step_memory(model, batch, loss, phase=phase)
                est = estimate_step_memory(model, batch, loss, phase=phase, device=device)
                upper = ("" if est.peak_upper_bytes is None
                         else f" {est.peak_upper_bytes / real.peak_bytes:7.3f}")
                print(f"{name:18} {size:5} {phase:9} {format_bytes(real.peak_bytes):>12}"
                      f" {format_bytes(est.peak_bytes):>12} {est.peak_bytes / real.peak_bytes:7.3f}"
                      + upper, flush=True)


if __name__ == "__main__":
    main()
