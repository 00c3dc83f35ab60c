"""Estimate one training step of a 7-billion-parameter LLaMA-like model without allocating it.

    python benchmarks/estimate_7b.py [--layers N] [--seq S] [--amp bf16|fp16|none]
        [--world-sizes 8 64] [--strategy fsdp|ddp]

Batch 1, sequence 2048, AdamW, bf16 autocast by default. The model is built on the meta device
and the step runs on fake tensors, so neither the 27 GB of weights nor anything else is
allocated. Prints wall time, peak resident memory (``ru_maxrss``), the estimated peak and its
parts, and checks the parts against hand-derived figures.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--amp", default="bf16")
    parser.add_argument("--device", default=None, help="'cuda' rounds to 512-byte blocks and"
                        " uses foreach AdamW, as on a GPU")
    parser.add_argument("--world-sizes", type=int, nargs="*", default=[],
                        help="also print the per-rank figures on these numbers of ranks")
    parser.add_argument("--strategy", default="fsdp", choices=["ddp", "fsdp"])
    args = parser.parse_args()
    start = time.perf_counter()

    import torch

    from llama_like import LlamaConfig, LlamaLike, lm_loss, make_batch
    from pytest_modelcheck.core.memory import estimate_memory
    from pytest_modelcheck.core.units import format_bytes

    cfg = LlamaConfig(n_layers=args.layers)
    amp = None if args.amp == "none" else args.amp
    with torch.device("meta"):
        model = LlamaLike(cfg)
    est = estimate_memory(model,
                          lambda n: make_batch(n, args.seq, cfg.vocab),
                          batch_sizes=[args.batch], optimizer="adamw", amp=amp, loss=lm_loss,
                          device=args.device)
    from pytest_modelcheck.core.memory.distributed import per_rank, render_per_rank

    for world in args.world_sizes:  # the batch is the per-rank batch
        print("\n".join(render_per_rank(per_rank(est, model, world, args.strategy))))
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    n = cfg.parameter_count()
    print(f"# torch {torch.__version__}, {os.cpu_count()} cores")
    print(est.render(top=5))
    print(f"parameters: {n:,} (expected {cfg.parameter_count():,}), counted {est.parameter_count:,}")
    checks = [
        ("parameters fp32 = 4 x N", est.parameters_bytes, 4 * n),
        ("gradients fp32 = 4 x N", est.gradients_bytes, 4 * n),
        # AdamW: 2 states x 4 bytes x N params, plus a 4-byte step counter per parameter tensor
        # (embedding, final norm, head + 9 per layer: 4 attention, 3 MLP, 2 norms); a CUDA
        # estimate rounds each counter up to a 512-byte block
        ("AdamW state = 2 x 4 x N (+ steps)", est.optimizer_state_bytes,
         2 * 4 * n + (512 if args.device == "cuda" else 4) * (3 + 9 * cfg.n_layers)),
    ]
    for name, got, want in checks:
        print(f"  check {name:<36} {format_bytes(got):>12} vs {format_bytes(want):>12}"
              f"  {'ok' if got == want else 'MISMATCH'}")
    if amp is not None:
        # autocast caches a half-precision copy of every weight it casts, and matmuls save
        # that copy for backward: 2 bytes x N of the activations are these copies
        copies = 2 * (n - cfg.d_model * cfg.vocab - (2 * cfg.n_layers + 1) * cfg.d_model)
        print(f"  of the activations, {amp} weight copies kept for backward:"
              f" {format_bytes(copies)} (2 bytes x linear weights; the embedding and norms"
              f" are not cast); the rest {format_bytes(est.activations_bytes - copies)}")
    print(f"wall time {wall:.1f} s, max RSS {format_bytes(rss)}")
    print(f"targets: under 120 s -> {'met' if wall < 120 else 'MISSED'};"
          f" under 2 GiB RSS -> {'met' if rss < 2 * 2**30 else 'MISSED'}")


if __name__ == "__main__":
    main()
