"""Validate the per-rank estimate of ``estimate_memory(world_size=, strategy=)`` against real
per-rank peaks: one training step (AdamW) of DDP and of FSDP2 ``fully_shard`` on 2 and 4 local
gloo ranks (CPU), each rank measured with CPU allocator events inside its own process.

    OMP_NUM_THREADS=1 python benchmarks/distributed_memory.py [--worlds 2 4] [--strategies ddp fsdp]

Prints one row per (architecture, strategy, ranks): the estimated per-rank peak, the measured
peak of every rank (the lowest of --repeats runs: a buffer freed on a gloo thread is missed by
the profiler, which can only inflate a run's peak), and estimate / (largest measured rank peak).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def models() -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
    return {
        "mlp": (nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 256)), torch.randn(32, 256)),
        "cnn": (nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3),
                              nn.ReLU(), nn.Flatten(), nn.Linear(64 * 30 * 30, 64)),
                torch.randn(8, 3, 32, 32)),
        "transformer": (nn.TransformerEncoder(enc, 2, enable_nested_tensor=False),
                        torch.randn(8, 64, 128)),
        "embedding": (nn.Sequential(nn.Embedding(8192, 256), nn.Linear(256, 256)),
                      torch.randint(0, 8192, (16, 32))),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"])
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per row; each rank's lowest peak is kept (see measure_per_rank)")
    args = parser.parse_args()

    import torch

    from pytest_modelcheck.core.memory import estimate_memory
    from pytest_modelcheck.core.memory.distributed import measure_per_rank

    print(f"# torch {torch.__version__}, {os.cpu_count()} cores, AdamW, one training step,"
          " gloo on CPU; bytes")
    print(f"{'model':<12}{'strategy':<9}{'ranks':>5}{'single':>11}{'estimate':>11}"
          f"{'measured per rank':>40}{'ratio':>7}")
    for name, (model, batch) in models().items():
        for strategy in args.strategies:
            for n in args.worlds:
                start = time.perf_counter()
                est = estimate_memory(model, batch, world_size=n, strategy=strategy)
                try:
                    peaks = measure_per_rank(model, batch, world_size=n, strategy=strategy,
                                             repeats=args.repeats)
                except Exception as exc:  # noqa: BLE001 - a row says what failed
                    print(f"{name:<12}{strategy:<9}{n:>5}  failed: {str(exc)[:200]}")
                    continue
                ratio = est.per_rank["peak_bytes"] / max(peaks)
                print(f"{name:<12}{strategy:<9}{n:>5}{est.peak_bytes:>11}"
                      f"{est.per_rank['peak_bytes']:>11}{str(peaks):>40}{ratio:>7.3f}"
                      f"  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
