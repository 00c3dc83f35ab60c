"""A/B comparison of two models in one process: the baseline (A) and the candidate (B).

Timing two commits in two CI jobs compares two machines as much as two models. Here both models
are timed in the same job, interleaved pair by pair (the order inside each pair drawn by a seeded
RNG, so a drift of the machine — thermal throttling, a neighbour starting — lands on both
equally), and the two samples are judged by ``core.stats.timed_regression`` (ratio of medians
beyond ``1 + threshold`` *and* a significant Mann-Whitney test). Deterministic facts —
parameter count and forward FLOPs — are compared exactly: any growth is a regression.

Both models are deep-copied; the caller's models, batch, RNG states and torch settings are left
as they were. Nothing here imports pytest; torch is imported inside functions.
"""
from __future__ import annotations

import numbers
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .batch import Batch, copy_model
from .errors import UsageError
from .stats import Verdict, timed_regression

__all__ = ["FactComparison", "ABReport", "compare_ab", "PHASES"]

PHASES = ("inference", "train")


@dataclass
class FactComparison:
    """One deterministic fact of A and B, compared exactly (lower is better).

    >>> FactComparison("parameters", 8, 10).verdict
    'regressed'
    >>> FactComparison("forward_flops", None, 10).verdict  # unknown for A: not judged
    'unknown'
    """

    name: str
    a: Optional[int]
    b: Optional[int]

    @property
    def verdict(self) -> str:
        if self.a is None or self.b is None:
            return "unknown"
        return "regressed" if self.b > self.a else "improved" if self.b < self.a else "same"

    def to_dict(self) -> dict:
        """Builtin types only.

        >>> FactComparison("parameters", 8, 8).to_dict()["verdict"]
        'same'
        """
        return {"name": self.name, "a": self.a, "b": self.b, "verdict": self.verdict}


@dataclass
class ABReport:
    """The outcome of ``compare_ab``: a timing verdict and exact fact comparisons.

    ``times_a`` / ``times_b`` are the per-run seconds; ``order`` the order runs were taken in
    (``"AB"`` or ``"BA"`` per pair). ``regressed`` is true when the timing regressed or any fact
    grew.

    >>> from pytest_modelcheck.core.stats import timed_regression
    >>> t = [1.0] * 10
    >>> r = ABReport("inference", timed_regression(t, t), t, t, ["AB"] * 10,
    ...              [FactComparison("parameters", 8, 8)])
    >>> (r.regressed, r.ratio, r.verdict)
    (False, 1.0, 'same')
    """

    phase: str
    timing: Verdict
    times_a: list
    times_b: list
    order: list
    facts: list = field(default_factory=list)
    device: str = "cpu"

    @property
    def ratio(self) -> float:
        """``median(B) / median(A)``."""
        return self.timing.ratio

    @property
    def p_value(self) -> float:
        return self.timing.p_value

    @property
    def ci(self) -> tuple:
        return self.timing.ci

    @property
    def median_a(self) -> float:
        return self.timing.old_median

    @property
    def median_b(self) -> float:
        return self.timing.new_median

    @property
    def regressed_facts(self) -> list:
        """Names of the deterministic facts that grew from A to B."""
        return [f.name for f in self.facts if f.verdict == "regressed"]

    @property
    def regressed(self) -> bool:
        return self.timing.regressed or bool(self.regressed_facts)

    @property
    def verdict(self) -> str:
        """'regressed', 'improved' (timing improved, no fact grew) or 'same'."""
        if self.regressed:
            return "regressed"
        return "improved" if self.timing.improved else "same"

    def headline(self) -> str:
        """One line, expected vs observed, naming what regressed."""
        what = []
        if self.timing.regressed:
            what.append(f"{self.phase} time x{self.ratio:.3f} (p={self.p_value:.2g})")
        for f in self.facts:
            if f.verdict == "regressed":
                what.append(f"{f.name} {f.a:,} -> {f.b:,}")
        if what:
            return f"expected candidate B no worse than baseline A, observed {'; '.join(what)}"
        return (f"expected candidate B no worse than baseline A, observed {self.verdict}:"
                f" {self.phase} time x{self.ratio:.3f} (p={self.p_value:.2g})")

    def to_dict(self) -> dict:
        """Builtin types only (JSON-ready).

        >>> import json
        >>> from pytest_modelcheck.core.stats import timed_regression
        >>> r = ABReport("train", timed_regression([1.0] * 3, [1.0] * 3), [1.0] * 3, [1.0] * 3,
        ...              ["AB"] * 3)
        >>> sorted(json.loads(json.dumps(r.to_dict())))[:4]
        ['ci', 'device', 'facts', 'median_a']
        """
        return {
            "phase": self.phase, "device": self.device, "verdict": self.verdict,
            "regressed": self.regressed, "ratio": float(self.ratio),
            "p_value": float(self.p_value), "ci": [float(c) for c in self.ci],
            "median_a": float(self.median_a), "median_b": float(self.median_b),
            "runs": len(self.times_a), "timing_verdict": self.timing.verdict,
            "times_a": [float(t) for t in self.times_a],
            "times_b": [float(t) for t in self.times_b], "order": list(self.order),
            "facts": [f.to_dict() for f in self.facts],
        }

    def render(self) -> str:
        """A few lines of text for a terminal or a report section."""
        lines = [self.headline(),
                 f"  {self.phase} timing on {self.device}, {len(self.times_a)} interleaved pairs:"
                 f" {self.timing.describe()}"]
        for f in self.facts:
            a = "?" if f.a is None else f"{f.a:,}"
            b = "?" if f.b is None else f"{f.b:,}"
            lines.append(f"  {f.name}: A {a}, B {b} ({f.verdict})")
        return "\n".join(lines)


def _positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UsageError(f"{name}={value!r}: expected an int >= {minimum}")
    return int(value)


def _validate(phase: Any, runs: Any, warmup: Any, threshold: Any, p: Any, timer: Any) -> None:
    if phase not in PHASES:
        raise UsageError(f"phase={phase!r}: expected one of {', '.join(map(repr, PHASES))}")
    _positive_int("runs", runs, 2)
    _positive_int("warmup", warmup, 0)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
            or float(threshold) < 0:
        raise UsageError(f"threshold={threshold!r}: expected a fraction >= 0 such as 0.10")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < float(p) < 1:
        raise UsageError(f"p={p!r}: expected a significance level between 0 and 1")
    if timer is not None and not callable(timer):
        raise UsageError(f"timer={timer!r}: expected a zero-argument clock returning seconds")


def _make_step(model: Any, batch: Batch, phase: str, loss: Any, optimizer: Any,
               lr: float) -> Callable[[], Any]:
    """A zero-argument callable doing one forward (inference) or one training step."""
    from .training import make_step

    return make_step(model, batch, phase, loss, optimizer, lr)


def _forward_flops(model: Any, batch: Batch) -> Optional[int]:
    from .flops import count_flops_batch

    m = copy_model(model).eval()
    try:
        import torch

        with torch.no_grad():
            return int(count_flops_batch(m, batch.clone()).forward_flops)
    except Exception:  # noqa: BLE001 - a model FLOPs cannot be counted for is not judged
        return None


def compare_ab(model_a: Any, model_b: Any, batch: Any, *, phase: str = "inference",
               runs: int = 30, warmup: int = 5, threshold: float = 0.10, p: float = 0.002,
               timer: Optional[Callable[[], float]] = None, device: Any = None,
               loss: Any = None, optimizer: Any = "sgd", lr: float = 1e-3,
               seed: int = 0) -> ABReport:
    """Time baseline ``model_a`` and candidate ``model_b`` interleaved, and compare their facts.

    Each model runs on its own deep copy with its own clone of ``batch``. After ``warmup``
    untimed steps of each, ``runs`` pairs are timed; inside each pair the order (A then B, or B
    then A) is drawn by ``random.Random(seed)``. ``phase="inference"`` times one forward under
    ``eval()`` and ``torch.no_grad()``; ``phase="train"`` one forward + loss (``loss``: None,
    a name or a callable, see ``core.losses``) + backward + optimizer step (``optimizer`` and
    ``lr`` as in ``core.training.make_optimizer``). ``timer`` is a zero-argument clock in
    seconds (default ``time.perf_counter``; on a CUDA device the device is synchronised before
    each reading). The timing verdict is ``timed_regression(times_a, times_b, threshold=...,
    p=...)``; parameter counts and forward FLOPs are compared exactly (growth regresses).

    With a fake clock that advances 1 ms per reading, both models take 1 ms per run:

    >>> import itertools, torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 3)
    >>> clock = itertools.count(0.0, 0.001).__next__
    >>> r = compare_ab(a, b, torch.ones(2, 4), runs=10, warmup=1, timer=clock)
    >>> r.timing.verdict, r.regressed_facts  # 4*2+2 = 10 -> 4*3+3 = 15 parameters
    ('same', ['parameters', 'forward_flops'])
    """
    import torch

    from .forward import count_parameters, model_device
    from .state import preserved_globals

    _validate(phase, runs, warmup, threshold, p, timer)
    data = Batch.from_user(batch, model=model_a)
    if device is None:
        device = model_device(model_a)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"device={device!r}: expected a torch device such as 'cpu' or"
                         " 'cuda:0'") from None
    clock = timer if timer is not None else time.perf_counter
    sync = ((lambda: torch.cuda.synchronize(device)) if device.type == "cuda"
            else (lambda: None))

    with preserved_globals():
        facts = [FactComparison("parameters", count_parameters(model_a),
                                count_parameters(model_b))]
        facts.append(FactComparison("forward_flops", _forward_flops(model_a, data),
                                    _forward_flops(model_b, data)))
        steps = {}
        for name, model in (("A", model_a), ("B", model_b)):
            torch.manual_seed(seed)
            copy = copy_model(model).to(device)
            steps[name] = _make_step(copy, data.clone().to(device), phase, loss, optimizer, lr)
        for _ in range(warmup):
            steps["A"]()
            steps["B"]()
        rng = random.Random(seed)
        times: dict = {"A": [], "B": []}
        order = []
        for _ in range(runs):
            pair = "AB" if rng.random() < 0.5 else "BA"
            order.append(pair)
            for name in pair:
                sync()
                t0 = clock()
                steps[name]()
                sync()
                times[name].append(float(clock() - t0))
    verdict = timed_regression(times["A"], times["B"], threshold=threshold, p=p)
    return ABReport(phase, verdict, times["A"], times["B"], order, facts, str(device))
