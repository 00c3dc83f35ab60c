"""Memory estimate (fake tensors, no allocation) against the measured peak (CPU allocator
events) of one training step and one inference step, for every example model and batch size.

    python benchmarks/memory_estimate_vs_measured.py

Prints one row per model and phase: measured bytes, estimated bytes and their ratio.
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
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
          f" torch {torch.__version__}")
    sizes = [int(a) for a in sys.argv[1:]] or [1, 4, 8]
    print(f"{'model':18} {'batch':>5} {'phase':9} {'measured':>12} {'estimated':>12} {'ratio':>7}")
    for name in MODELS:
        mod = importlib.import_module(f"example_models.{name}")
        torch.manual_seed(0)
        model = mod.build_model()
        for size in sizes:
            batch = Batch.from_user(mod.make_batch(size))
            with torch.no_grad():
                out = batch.call(model)
            loss = resolve_loss(mod.loss_fn, batch, out)
            for phase in ("train", "inference"):
                real = measure_step_memory(model, batch, loss, phase=phase)
                est = estimate_step_memory(model, batch, loss, phase=phase)
                print(f"{name:18} {size:5} {phase:9} {format_bytes(real.peak_bytes):>12}"
                      f" {format_bytes(est.peak_bytes):>12} {est.peak_bytes / real.peak_bytes:7.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
