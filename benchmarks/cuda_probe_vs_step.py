"""The probed workspaces of a CUDA estimate next to the workspaces the real step's kernels
took, convolution by convolution (a diagnostic for ``core/cuda_probe.py``; needs a GPU).

    python benchmarks/cuda_probe_vs_step.py swinir:1 unet:1:inference [MODEL:BATCH[:PHASE] ...]
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cuda_op_trace as T  # noqa: E402

from pytest_modelcheck.core import memory as M  # noqa: E402


def main() -> None:
    for spec in sys.argv[1:] or ["swinir:1"]:
        name, size, phase = (spec + ":train").split(":")[:3]
        model, batch, loss = T._case(name, int(size))
        real = M.measure_step_memory(model, batch, loss, phase=phase)
        grabbed: list = []
        original = M._add_kernel_workspaces

        def grab(tracker, records, dev):
            grabbed.extend(records)
            return original(tracker, records, dev)

        M._add_kernel_workspaces = grab
        est = M.estimate_step_memory(model, batch, loss, phase=phase, device="cuda")
        M._add_kernel_workspaces = original
        found = M.probe_workspaces([s for r in grabbed for s in r[2]], "cuda")

        def ws(sigs):
            known = [found[s] for s in sigs if found.get(s) is not None]
            return max(known) if known else None

        print(f"{spec}: measured {real.phase_peaks} estimated {est.phase_peaks}")
        rows = T._trace(model, batch, loss, phase)
        base = rows[0]["before"] - est.baseline_bytes
        real_convs = [r for r in rows if "convolution" in r["op"]]
        est_convs = [r for r in grabbed if "convolution" in r[2][0][:40]]
        for a, b in zip(real_convs, est_convs):
            sig = json.loads(b[2][0])
            fs = [x["S"] for x in sig[1][:3] if isinstance(x, dict)]
            rs = [x["S"] for x in a["args"][:3] if isinstance(x, dict)]
            print(f"  {a['op'][5:25]:20} {a['phase'][:4]} real ws {a['ws']:>8} after"
                  f" {a['after'] - base:>9} | est ws {ws(b[2])!s:>8} after {b[1]:>9}"
                  f" same strides {fs == rs} {'' if fs == rs else (rs, fs)}")
        peak = max(rows, key=lambda r: max(r["before"], r["after"]) + r["ws"])
        print(f"  real peak at {peak['i']} {peak['op']} ws {peak['ws']} after"
              f" {peak['after'] - base}")
        best = max(grabbed, key=lambda r: r[1] + (ws(r[2]) or 0))
        print(f"  est peak at {json.loads(best[2][0])[0]} ws {ws(best[2])} after {best[1]}")


if __name__ == "__main__":
    main()
