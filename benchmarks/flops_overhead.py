"""Time of ``count_flops`` against one plain ``FlopCounterMode`` pass, on a resnet50 at 224x224.

Run: ``python benchmarks/flops_overhead.py [repeats]``. Both do one forward pass under no_grad
on the same model and input; the target is count_flops at most 1.3x the plain pass (best of
``repeats`` each, interleaved).
"""
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pytest_modelcheck.core.flops import count_flops  # noqa: E402
from tests.reference_models import resnet50  # noqa: E402


def main(repeats: int = 5) -> None:
    torch.manual_seed(0)
    model = resnet50().eval()
    x = torch.randn(1, 3, 224, 224)

    def plain():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return counter.get_total_flops()

    def ours():
        return count_flops(model, x).flops

    assert plain() == ours()  # warm-up, and the same number
    times = {"plain FlopCounterMode": [], "count_flops": []}
    for _ in range(repeats):
        for name, fn in (("plain FlopCounterMode", plain), ("count_flops", ours)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    for k, v in best.items():
        print(f"{k:22} best {v * 1e3:8.1f} ms  (median {sorted(times[k])[len(times[k]) // 2] * 1e3:.1f} ms)")
    print(f"ratio count_flops / plain: {best['count_flops'] / best['plain FlopCounterMode']:.3f}"
          f" (target <= 1.3); torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
