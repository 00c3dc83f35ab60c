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

With ``--sessions``, whole pytest sessions instead, as a merge gate runs them (a throughput
check of vit3d in a scratch project; the gate's verdicts read from ``--modelcheck-json``):

* ``aa-xdist``: a baseline saved serially, then ``--reps`` sessions on the unchanged model
  under ``pytest -n 2``; every 'regressed' (a failed session) is a false alarm (target 0);
* ``aa-xdist-load``: the same while ``--load-procs`` background processes run torch matmuls
  (started before and stopped after each compared session);
* ``aa-serial-load``: saved serially on an idle machine, compared serially under that load;
* ``slowdown``: saved serially, then ``--reps`` serial sessions whose forward busy-waits an
  extra ``--slowdown`` of the forward's median (measured here first); every session not
  failed on the timing is a missed regression (target: >= 19 of 20, idle machine).

Each prints the verdicts counted (regressed, inconclusive, skipped: other parallelism, same).
``python benchmarks/gate_aa.py --sessions aa-xdist --sessions slowdown --reps 20``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SESSION_CONFTEST = """
import os, time, pytest, torch
from example_models import vit3d

EXTRA_S = float(os.environ.get("GATE_EXTRA_S", "0"))


class Slowed(torch.nn.Module):
    \"\"\"The model, plus a busy-wait of EXTRA_S seconds per forward (the slowdown).\"\"\"

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        end = time.perf_counter() + EXTRA_S
        while time.perf_counter() < end:
            pass
        return out


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = vit3d.build_model()
    return Slowed(m) if EXTRA_S > 0 else m


@pytest.fixture
def batch():
    return vit3d.make_batch(4)
"""

SESSION_TEST = """
import pytest

@pytest.mark.throughput_at_least("1 samples/s")
@pytest.mark.params_under("100M")
def test_vit3d_speed(): pass
"""


class _MinimalLoad:
    """Fallback background load when benchmarks/background_load.py is absent: ``k`` processes
    running torch matmuls, each bounded to ``lifetime`` seconds, stopped on exit."""

    def __init__(self, k: int, lifetime: float = 600.0) -> None:
        self.k, self.lifetime, self.procs = k, lifetime, []

    def __enter__(self):
        code = ("import time, torch\nend = time.time() + %f\na = torch.randn(512, 512)\n"
                "while time.time() < end:\n    a @ a\n" % self.lifetime)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",
                                                               "MKL_NUM_THREADS")}
        self.procs = [subprocess.Popen([sys.executable, "-c", code], env=env)
                      for _ in range(self.k)]
        time.sleep(2.0)  # let the load average see them
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def background_load(k: int, lifetime: float):
    """A context manager running ``k`` bounded background load processes (``k = 0``: none)."""
    if k <= 0:
        import contextlib

        return contextlib.nullcontext()
    try:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        from background_load import BackgroundLoad  # noqa: E402
    except ImportError:
        return _MinimalLoad(k, lifetime)
    return BackgroundLoad(k, lifetime=lifetime)


def _session(project: str, args: list, env: dict, timeout: float) -> dict:
    """Run one pytest session in ``project``; ``{"rc", "verdicts", "lines"}``."""
    report = os.path.join(project, "report.json")
    if os.path.exists(report):
        os.remove(report)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--modelcheck",
           f"--modelcheck-json={report}", *args]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True,
                          timeout=timeout)
    verdicts, lines = [], []
    if os.path.exists(report):
        with open(report, encoding="utf-8") as fh:
            doc = json.load(fh)
        for c in doc.get("comparisons") or []:
            if c.get("kind") == "timed":
                verdicts.append(c["verdict"])
                lines.append(f"{c['verdict']}: {c.get('detail', '')}"[:300])
    return {"rc": proc.returncode, "verdicts": verdicts, "lines": lines,
            "tail": (proc.stdout + proc.stderr)[-1500:]}


def forward_median(threads: int) -> float:
    """The median seconds of vit3d's forward at batch 4 here (the slowdown's unit)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = vit3d.build_model().eval()
    x, _ = vit3d.make_batch(4)
    with torch.no_grad():
        for _ in range(5):
            model(x)
        return statistics.median(timed(lambda: model(x)) for _ in range(15))


def sessions(mode: str, args: argparse.Namespace) -> dict:
    """One ``--sessions`` experiment: save a baseline serially, compare ``args.reps`` times."""
    project = tempfile.mkdtemp(prefix=f"gate-{mode}-")
    with open(os.path.join(project, "conftest.py"), "w") as fh:
        fh.write(SESSION_CONFTEST)
    with open(os.path.join(project, "test_gate.py"), "w") as fh:
        fh.write(SESSION_TEST)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads), GATE_EXTRA_S="0")
    saved = _session(project, ["--modelcheck-save-baseline=base.json"], env, args.timeout)
    if saved["rc"] != 0:
        print(f"{mode}: the baseline session failed (rc {saved['rc']}):\n{saved['tail']}")
        return {"mode": mode, "error": saved["tail"]}
    compare_args = ["--modelcheck-baseline=base.json"]
    if mode in ("aa-xdist", "aa-xdist-load"):
        compare_args += ["-n", "2"]
    if mode == "slowdown":
        extra = args.slowdown * forward_median(args.threads)
        env = dict(env, GATE_EXTRA_S=f"{extra:.6f}")
        print(f"{mode}: forward busy-waits an extra {extra * 1e3:.2f} ms"
              f" (+{args.slowdown:.0%} of its median here)")
    load = args.load_procs if mode.endswith("-load") else 0
    counts: collections.Counter = collections.Counter()
    failed = 0
    t0 = time.perf_counter()
    for rep in range(args.reps):
        with background_load(load, lifetime=args.timeout + 60):
            r = _session(project, compare_args, env, args.timeout)
        failed += r["rc"] != 0
        counts.update(r["verdicts"] or ["(none)"])
        print(f"  {mode} {rep + 1:2d}: rc {r['rc']} "
              + ("; ".join(r["lines"]) or r["tail"][-300:]), flush=True)
    target = (f"target >= {args.reps - 1} regressed" if mode == "slowdown"
              else "target 0 regressed (false alarms)")
    print(f"{mode}: {args.reps} sessions, {failed} failed; timed verdicts"
          f" {dict(sorted(counts.items()))}; {target} ({time.perf_counter() - t0:.0f} s)")
    return {"mode": mode, "reps": args.reps, "failed": failed, "verdicts": dict(counts)}


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
    ap.add_argument("--sessions", action="append", default=[],
                    choices=("aa-xdist", "aa-xdist-load", "aa-serial-load", "slowdown"),
                    help="run whole pytest sessions instead of in-process trials (repeatable)")
    ap.add_argument("--reps", type=int, default=20, help="compared sessions per --sessions")
    ap.add_argument("--load-procs", type=int, default=2,
                    help="background load processes for the *-load sessions")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per session")
    args = ap.parse_args()
    if args.sessions:
        for mode in args.sessions:
            sessions(mode, args)
        return
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
