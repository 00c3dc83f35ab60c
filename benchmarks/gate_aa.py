"""How well does the baseline gate tell a real slowdown from noise, on this machine?

Times ``example_models.vit3d`` forward passes and runs the timed-regression rule
(:func:`pytest_modelcheck.core.stats.timed_regression`, through ``Baseline.compare`` exactly
as a ``--modelcheck-baseline`` run does) on

* A/A pairs: both sides time the same forward, interleaved run by run (alternating which side
  goes first), so drift and load from other processes hit both sides alike. Every alarm is a
  false alarm (target: 0 of 20);
* A/B pairs: side B does 25% more work per run (a busy-wait of 25% of the forward's median,
  re-measured before each trial). Every miss is a missed regression (target: >= 19 of 20);

and checks the deterministic side: the FLOPs counted for the same model twice compare 'same',
and a 10% FLOPs increase is flagged every time (an exact comparison).

Run: ``python benchmarks/gate_aa.py [--trials 20] [--runs 30] [--threads 1] [--clock cpu]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from example_models import vit3d  # noqa: E402
from pytest_modelcheck.core.baseline import Baseline, compare  # noqa: E402
from pytest_modelcheck.core.result import CheckResult  # noqa: E402

FP = {"key": "this-machine"}
NODE = "example_models/test_vit3d.py::test_forward"


CLOCK = time.perf_counter  # --clock cpu: time.thread_time


def spin(seconds: float) -> None:
    """Busy-wait: extra CPU work of a known duration on the chosen clock (sleep would yield
    the core and cost no CPU time)."""
    end = CLOCK() + seconds
    while CLOCK() < end:
        pass


def timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def row(times: list, flops: int) -> dict:
    results = [CheckResult("throughput_at_least", True, "ok",
                           metrics={"times_s": times, "samples_per_s": 4 / statistics.median(times)}),
               CheckResult("flops_under", True, "ok", metrics={"flops": flops})]
    return {"nodeid": NODE, "outcome": "passed", "model": {"parameters": 0},
            "results": [r.to_dict() for r in results]}


def trial(forward, runs: int, extra: float, flops_old: int, flops_new: int) -> dict:
    """One gate decision: ``runs`` interleaved timings per side, then ``compare``."""
    a, b = [], []

    def slow():
        forward()
        spin(extra)

    for i in range(runs):
        if i % 2:
            b.append(timed(slow))
            a.append(timed(forward))
        else:
            a.append(timed(forward))
            b.append(timed(slow))
    base = Baseline.from_rows([row(a, flops_old)], FP)
    comps = {c.metric: c for c in compare(base, [row(b, flops_new)], FP)}
    return comps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--slowdown", type=float, default=0.25)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter (what throughput_at_least records); cpu:"
                         " time.thread_time, blind to time spent descheduled by other processes")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vit3d.build_model().eval()
    x, _ = vit3d.make_batch(args.batch_size)

    def forward():
        with torch.no_grad():
            model(x)

    from pytest_modelcheck.core.flops import count_flops
    flops = count_flops(model, x).flops
    flops_again = count_flops(model, x).flops
    for _ in range(10):
        forward()
    print(f"vit3d forward, batch {args.batch_size}, {args.threads} thread(s), {os.cpu_count()}"
          f" cores, load average {os.getloadavg()[0]:.1f}; {args.runs} runs per side, interleaved;"
          f" {args.clock} clock")
    print(f"FLOPs counted: {flops} and {flops_again}")

    def report(label: str, extra_frac: float, flops_new: int) -> tuple:
        flagged, ratios, ps, det = 0, [], [], 0
        t0 = time.perf_counter()
        for t in range(args.trials):
            median = statistics.median(timed(forward) for _ in range(9))
            c = trial(forward, args.runs, extra_frac * median, flops, flops_new)
            timing = c["throughput_at_least.times_s"]
            flagged += timing.verdict == "regressed"
            det += c["flops_under.flops"].verdict == "regressed"
            ratios.append(1 + timing.change)
            ps.append(timing.detail.split("p=")[1].split(",")[0])
            print(f"  {label} trial {t + 1:2d}: {timing.verdict:9s} {timing.detail}", flush=True)
        print(f"{label}: {flagged}/{args.trials} flagged as timing regressions; ratio of medians"
              f" {min(ratios):.3f}..{max(ratios):.3f}; FLOPs flagged {det}/{args.trials}"
              f" ({time.perf_counter() - t0:.0f} s)")
        return flagged, det

    aa, aa_flops = report("A/A", 0.0, flops_again)
    ab, ab_flops = report(f"A/B +{args.slowdown:.0%}", args.slowdown, round(flops * 1.10))
    print()
    print(f"false alarms (A/A timing): {aa}/{args.trials}   target 0")
    print(f"detections (+{args.slowdown:.0%} timing): {ab}/{args.trials}   target >= "
          f"{args.trials - 1}")
    print(f"FLOPs: same model flagged {aa_flops}/{args.trials} (target 0); +10% FLOPs flagged"
          f" {ab_flops}/{args.trials} (target {args.trials})")


if __name__ == "__main__":
    main()
