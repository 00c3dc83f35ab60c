"""Shared and loaded CI runners: how fast and how honest are the checks while other jobs run?

Every part runs its measured work in fresh subprocesses, with ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` removed from their environment unless a part sets them on purpose (each
tool keeps its own thread policy), next to a background load of ``--load K`` processes (default
2) that run torch matmuls in a loop with torch's default threads, as unrelated jobs do
(``benchmarks/background_load.py``: bounded lifetime, stopped by this script, no orphans).

Parts (``python benchmarks/ci_load.py PART [PART ...] [options]``; ``all`` = every part):

``zoo``
    The bug zoo (``benchmarks/bug_zoo.py``): each case's ``check_model`` (default set plus the
    case's declared facts, as ``bug_zoo.run_case``), idle and then under the load: seconds per
    check (``CheckResult.duration_s``), their total, the wall time, bugs caught and healthy
    twins flagged. Then, when ``pytest_torch`` can be imported (installed, or found in
    ``$PYTEST_TORCH_PATH`` or ``.venv/extras/pytest-torch``), pytest-torch's full suite on the
    same cases (models, batches, losses), idle and under load, timed the same way (each
    assertion's own call). See :data:`PT_SUITE` for what "full suite" means here.
``mainjob``
    ``python -m pytest --modelcheck example_models/ -q -p no:cacheprovider`` (a) with no
    thread setting and (b) with ``OMP_NUM_THREADS=1``, alternating a/b for ``--reps`` runs
    (default 1) under the load, after one idle run of each (``--no-idle`` drops those); prints
    the ratio of medians a/b (target <= 1.25).
``throughput``
    The example models' tests that carry ``throughput_at_least`` (``-m throughput_at_least``),
    ``--reps`` runs (default 20) under the load; counts failed ``throughput_at_least`` checks
    (target 0), inconclusive verdicts and failed runs (read from ``--modelcheck-json``). With
    ``--baseline``, a baseline is saved first (idle; ``--baseline-under-load``: under the load)
    and every run also compares against it: regressed metrics are gate failures (target 0).
``aa``
    ``benchmarks/gate_aa.py`` (its own CLI, ``--trials`` = ``--reps``) under the load; false
    alarms and detections are read from its output.

pytest-torch's full suite (pytest-torch 1.1.1): every assertion it offers that applies to a
model, an example batch and a loss with nothing else declared, each on a freshly built case
(seed 0), the model in eval mode (train mode for the two gradient checks) as pytest-torch's
``ModelSuite`` does, the loss being the one ``check_model`` resolves for the case:

* ``ModelSuite``'s generated tests that need no declaration: ``check_inference_contract``
  (eval_mode, finite_outputs, deterministic, batch_invariance, device_parity, dtype_parity,
  no_state_mutation; the parity items skip on a CPU-only machine without ``dtypes``),
  ``assert_compile_parity`` (``backend="eager"``, ModelSuite's default),
  ``assert_export_parity``, ``assert_torchscript_parity``, ``assert_onnx_parity`` (n/a without
  onnxruntime), ``assert_aoti_parity``, ``assert_autocast_parity``,
  ``assert_checkpoint_roundtrip``, ``assert_layout_invariant``, ``assert_gradients_finite``,
  ``assert_all_params_receive_grad``, ``assert_loss_decreases``, ``assert_overfits_one_batch``;
* the other model + inputs assertions: ``assert_deterministic``, ``assert_no_graph_breaks``,
  ``assert_gradcheck`` (n/a without a floating-point input).

Left out, because each needs a declaration or a resource a model + batch + loss does not give:
golden files, output specs, frozen patterns, invariance/equivariance transforms, permutation
dims, ``input_ids``/``attention_mask`` padding and mask invariance, reference models and
generation, latency/memory budgets, training-loop setups (optimizers: coverage, resume,
accumulation, mixed precision), streaming step functions, checkpoint files, datasets;
``assert_no_host_sync`` is CUDA-only (it skips on CPU); ``assert_finite`` and
``assert_batch_invariant`` run inside the contract. Where a zoo case declares a fact that
pytest-torch can express (``out`` -> ``assert_output_spec``, ``params_learn.frozen`` ->
``assert_frozen``, ``permutation_invariant`` -> ``assert_permutation_invariant``), that
assertion runs too and is counted apart ("with the declared facts").

A case or run counts as flagged when a check fails; for pytest-torch, when an assertion
raises (an AssertionError, or any other exception, as a test would fail); the table also gives
the counts from AssertionErrors alone, and with the zoo's declared facts that pytest-torch can
express (:data:`PT_DECLARED`). ``--tools`` picks the zoo's tools, ``--pt-skip`` leaves
pytest-torch assertions out (``aoti_parity`` compiles C++: tens of seconds per case).

Results: a table per part, and a JSON file (``--out``, default
``benchmarks/results/ci_load.json``) with the date, the machine (CPU model, cores), torch
version, thread settings and load averages, per part. The file is updated after every
measured step: parts run earlier stay in it, and ``--resume`` skips the steps of a part that
are already there with the same settings (an interrupted run goes on where it stopped).

``--smoke``: 1 rep per part, 2 zoo cases, the cheap pytest-torch assertions only, a load that
lives a few seconds, gate_aa with 1 trial; for tests of this harness, never for figures.

Do not run it for figures while other heavy jobs share the machine by accident: the load it
adds is the only load it means to measure.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from background_load import (THREAD_VARIABLES, BackgroundLoad, _die_with_parent,  # noqa: E402
                             default_thread_env)

DEFAULT_OUT = os.path.join(HERE, "results", "ci_load.json")
PARTS = ("zoo", "mainjob", "throughput", "aa")
DEFAULT_REPS = {"zoo": 1, "mainjob": 1, "throughput": 20, "aa": 20}
SMOKE_CASES = ("nan_log", "nan_log_ok")
MAINJOB = ["-m", "pytest", "--modelcheck", "example_models/", "-q", "-p", "no:cacheprovider"]
WARMUP_S = 3.0  # the load runs this long before a measurement starts

# pytest-torch's full suite: every assertion pytest-torch 1.1.1 offers that applies to a model,
# an example batch and a loss with nothing else declared. Name -> (group, mode the model is put
# in, as pytest-torch's ModelSuite does). The groups: "suite" are ModelSuite's generated tests
# that need no declaration (CHECKS minus golden, output_spec, frozen); "extra" are the other
# model + inputs assertions. Not applicable without a declaration, so not run: golden files,
# output specs, frozen patterns, invariance/equivariance transforms, permutation dims,
# input_ids/attention_mask padding and mask invariance, reference models/outputs and
# generation, latency/memory budgets, training-loop setups (optimizers, resume, accumulation,
# mixed precision), streaming step functions, checkpoint files, datasets; CUDA-only:
# assert_no_host_sync/forbid_host_sync (they skip on CPU). assert_finite and
# assert_batch_invariant are inside check_inference_contract and not run twice.
PT_SUITE = {
    "inference_contract": ("suite", "eval"),   # eval_mode, finite_outputs, deterministic,
    #   batch_invariance, device_parity (skips without a 2nd device), no_state_mutation
    "compile_parity": ("suite", "eval"),       # torch.compile(backend="eager"), ModelSuite's default
    "export_parity": ("suite", "eval"),
    "torchscript_parity": ("suite", "eval"),
    "onnx_parity": ("suite", "eval"),          # skipped without onnxruntime
    "aoti_parity": ("suite", "eval"),          # AOTInductor: needs a C++ compiler, slow
    "autocast_parity": ("suite", "eval"),      # bfloat16 autocast on CPU
    "checkpoint_roundtrip": ("suite", "eval"),
    "layout_invariance": ("suite", "eval"),
    "gradients_finite": ("suite", "train"),
    "all_params_receive_grad": ("suite", "train"),
    "loss_decreases": ("suite", "eval"),       # trains a copy in train mode
    "overfits_one_batch": ("suite", "eval"),   # idem
    "deterministic": ("extra", "eval"),        # nondeterminism.assert_deterministic (5 runs)
    "no_graph_breaks": ("extra", "eval"),      # compilation.assert_no_graph_breaks (eager)
    "gradcheck": ("extra", "eval"),            # training.assert_gradcheck (float64 finite diff.)
}
# The zoo's declared facts that have a direct pytest-torch equivalent; run as group "declared"
# and reported apart (not part of the full suite as defined above).
PT_DECLARED = ("output_spec", "frozen", "permutation_invariant")
PT_SMOKE = ("inference_contract", "gradients_finite", "all_params_receive_grad", "loss_decreases")


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Date, machine, torch and thread settings of this run (torch imported here only)."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_model(), "cores": cores, "cpu_count": os.cpu_count(),
                        "platform": platform.platform()},
            "python": platform.python_version(), "torch": torch.__version__,
            "thread_env_of_caller": {v: os.environ.get(v) for v in THREAD_VARIABLES},
            "thread_env_of_measured": "removed unless a part sets it (see each step)",
            "load_averages": [round(x, 2) for x in os.getloadavg()]}


def find_pytest_torch() -> Optional[str]:
    """Make ``pytest_torch`` importable if it can be found; return its folder or None.

    Looked up in this order: the current environment, ``$PYTEST_TORCH_PATH``, and
    ``.venv/extras/pytest-torch`` (where it can be installed with ``pip install --target``
    without registering its pytest plugin for every test run of the project).
    """
    import importlib.util

    spec = importlib.util.find_spec("pytest_torch")
    if spec is None:
        for folder in (os.environ.get("PYTEST_TORCH_PATH"),
                       os.path.join(ROOT, ".venv", "extras", "pytest-torch")):
            if folder and os.path.isdir(os.path.join(folder, "pytest_torch")):
                sys.path.insert(0, folder)
                spec = importlib.util.find_spec("pytest_torch")
                break
    return os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else None


# --------------------------------------------------------------------------- results file
class Results:
    """The JSON file: ``{"runs": [...environment...], "parts": {part: {...}}}``, written after
    every step so an interrupted benchmark keeps what it measured."""

    def __init__(self, path: str, env: dict) -> None:
        self.path, self.env = path, env
        self.doc: dict = {"parts": {}}
        if os.path.exists(path):
            try:
                with open(path) as fh:
                    self.doc = json.load(fh)
            except (OSError, ValueError):
                os.replace(path, path + ".unreadable")
        self.doc.setdefault("parts", {})
        self.doc.setdefault("runs", []).append(env)

    def part(self, name: str, settings: dict, resume: bool) -> dict:
        old = self.doc["parts"].get(name)
        if resume and old and old.get("settings") == settings:
            return old
        self.doc["parts"][name] = {"settings": settings, "environment": self.env, "steps": {},
                                   "summary": {}}
        return self.doc["parts"][name]

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.doc, fh, indent=1, default=str)
            fh.write("\n")
        os.replace(tmp, self.path)


def step(results: Results, part: dict, key: str, fn) -> dict:
    """Run ``fn()`` unless ``part`` already holds ``key`` (resume; a step that ended in an error
    or a timeout is run again); store and save its result."""
    old = part["steps"].get(key)
    if old is not None and not old.get("error") and old.get("rc") != "timeout":
        print(f"  {key}: kept from an earlier run", flush=True)
        return part["steps"][key]
    value = fn()
    if value.get("load_alive_at_end", 0) < value.get("load_processes", 0):
        value["warning"] = "the background load ended before the measurement did"
        print(f"  WARNING {key}: {value['warning']} (raise --load-lifetime)", flush=True)
    value["load_averages_after"] = [round(x, 2) for x in os.getloadavg()]
    part["steps"][key] = value
    results.save()
    return value


class Load:
    """A BackgroundLoad of ``k`` processes for one measurement (``k == 0``: idle), started
    ``WARMUP_S`` before it; records load averages at the start."""

    def __init__(self, k: int, lifetime: float, warmup: float = WARMUP_S) -> None:
        self.load = BackgroundLoad(k, lifetime=lifetime)
        self.warmup = warmup if k else 0.0
        self.info: dict = {}

    def __enter__(self) -> "Load":
        self.load.start()
        time.sleep(self.warmup)
        self.info = {"load_processes": self.load.k, "load_pids": self.load.pids,
                     "load_averages_before": [round(x, 2) for x in os.getloadavg()]}
        return self

    def snapshot(self) -> dict:
        """The start info plus how many load processes are still running now (fewer than
        ``load_processes`` means the load ended early: raise --load-lifetime)."""
        return {**self.info, "load_alive_at_end": len(self.load.pids)}

    def __exit__(self, *exc) -> None:
        self.load.stop()


def run_cmd(argv: list, env: dict, timeout: float) -> dict:
    """Run a command; wall seconds, exit status and the tail of its output."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout, start_new_session=True,
                           preexec_fn=_die_with_parent)  # no orphan if this script is killed
        rc, out = p.returncode, (p.stdout or "") + (p.stderr or "")
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    lines = out.strip().splitlines()
    return {"seconds": round(time.perf_counter() - t0, 3), "rc": rc,
            "tail": "\n".join(lines[-6:]),
            "failures": [ln[:300] for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20]}


def measured_env(**extra: str) -> dict:
    env = default_thread_env()
    env["COLUMNS"] = "300"  # pytest's short summary keeps the failure reason
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def median(xs: list) -> Optional[float]:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return round(statistics.median(xs), 3) if xs else None


# --------------------------------------------------------------------------- zoo: workers
def zoo_cases(names: Optional[list]) -> list:
    import bug_zoo

    cases = bug_zoo.BUGS + bug_zoo.HEALTHY
    if names:
        cases = [c for c in cases if c.name in names]
        missing = set(names) - {c.name for c in cases}
        if missing:
            raise SystemExit(f"--cases: no zoo case named {sorted(missing)}")
    return cases


def thread_info() -> dict:
    import inspect

    import torch

    from pytest_modelcheck import check_model

    threads = inspect.signature(check_model).parameters.get("threads")
    return {"torch_threads": torch.get_num_threads(),
            "env": {v: os.environ.get(v) for v in THREAD_VARIABLES},
            "check_model_threads_default": None if threads is None else repr(threads.default)}


def _no_dump(partial: dict) -> None:
    pass


def worker_modelcheck(cases: list, dump=_no_dump) -> dict:
    """check_model per case, as bug_zoo.run_case (no thread setting: the plugin's own policy)."""
    import warnings

    import torch

    from pytest_modelcheck import check_model

    info = thread_info()
    rows = []
    for case in cases:
        torch.manual_seed(0)
        model, batch, loss, facts = case.build()
        t0 = time.perf_counter()
        checks, error = [], None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                report = check_model(model, batch, loss=loss, **facts)
                checks = [{"check": r.check, "status": _status(r), "seconds": r.duration_s,
                           "headline": r.headline[:200]} for r in report.results]
            except Exception as exc:  # a crash of check_model itself is reported, not hidden
                error = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(_row(case, checks, time.perf_counter() - t0, error))
        dump({"tool": "modelcheck", "threads": info, "cases": rows, "incomplete": True})
    info["threads_after"] = torch.get_num_threads()
    return {"tool": "modelcheck", "threads": info, "cases": rows}


def _status(r: Any) -> str:
    """failed / passed / skipped, or 'inconclusive' for a check that did not fail but says it
    could not decide (``metrics["inconclusive"]``, a verdict or a headline saying so)."""
    if r.passed is False:
        return "failed"
    metrics = r.metrics or {}
    if metrics.get("inconclusive") or "inconclusive" in str(metrics.get("verdict", "")) \
            or r.headline.lower().startswith("inconclusive"):
        return "inconclusive"
    return "passed" if r.passed else "skipped"


def _row(case: Any, checks: list, wall: float, error: Optional[str]) -> dict:
    failed = [c["check"] for c in checks if c["status"] in ("failed", "error")]
    return {"case": case.name, "healthy": case.healthy, "expected": case.expected,
            "flagged": bool(failed) or error is not None, "failed": failed, "error": error,
            "check_seconds": round(sum(c["seconds"] for c in checks), 4),
            "wall_seconds": round(wall, 4), "checks": checks}


def pt_inputs(batch: Any, model: Any) -> tuple:
    """(inputs as pytest-torch calls the model with them: a tensor, a tuple of positional
    arguments or a dict of keywords; the batch as pytest_modelcheck splits it)."""
    from pytest_modelcheck.core.batch import Batch

    data = Batch.from_user(batch, model=model)
    if data.kwargs:
        inputs: Any = dict(data.kwargs)
    elif len(data.args) == 1:
        inputs = data.args[0]
    else:
        inputs = tuple(data.args)
    return inputs, data


def run_pt_assertion(name: str, case: Any, declared: bool = False) -> dict:
    """One pytest-torch assertion on a freshly built case; status passed / failed (an
    AssertionError) / skipped (pytest.skip, or not applicable) / error (any other exception)."""
    import torch

    import pytest_torch as pt
    from pytest_modelcheck.core.losses import resolve_loss

    torch.manual_seed(0)  # a throw-away build picks the loss (its forward may change things)
    model, batch, loss, facts = case.build()
    data = pt_inputs(batch, model)[1]
    with torch.no_grad():
        resolved = resolve_loss(loss, data, output=model(*data.args, **data.kwargs))
    torch.manual_seed(0)
    model, batch, loss, facts = case.build()
    inputs, data = pt_inputs(batch, model)
    target_model = model

    def loss_fn(output: Any) -> Any:
        return resolved.compute(output, data, target_model)[0]

    group, mode = PT_SUITE.get(name, ("declared", "eval"))
    model = model.train() if mode == "train" else model.eval()
    floats = [t for t in (inputs if isinstance(inputs, tuple) else (inputs,))
              if isinstance(t, torch.Tensor) and t.is_floating_point()]

    def make_model():
        torch.manual_seed(0)
        return case.build()[0]

    calls = {
        "inference_contract": lambda: pt.check_inference_contract(model, inputs),
        "compile_parity": lambda: pt.assert_compile_parity(model, inputs, backend="eager"),
        "export_parity": lambda: pt.assert_export_parity(model, inputs),
        "torchscript_parity": lambda: pt.assert_torchscript_parity(model, inputs),
        "onnx_parity": lambda: pt.assert_onnx_parity(model, inputs),
        "aoti_parity": lambda: pt.assert_aoti_parity(model, inputs),
        "autocast_parity": lambda: pt.assert_autocast_parity(model, inputs),
        "checkpoint_roundtrip": lambda: pt.assert_checkpoint_roundtrip(make_model, inputs,
                                                                       model=model),
        "layout_invariance": lambda: pt.assert_layout_invariant(model, inputs),
        "gradients_finite": lambda: pt.assert_gradients_finite(model, inputs, loss_fn),
        "all_params_receive_grad": lambda: pt.assert_all_params_receive_grad(model, inputs,
                                                                             loss_fn),
        "loss_decreases": lambda: pt.assert_loss_decreases(model, inputs, loss_fn),
        "overfits_one_batch": lambda: pt.assert_overfits_one_batch(model, inputs, loss_fn),
        "deterministic": lambda: pt.assert_deterministic(model, inputs),
        "no_graph_breaks": lambda: pt.assert_no_graph_breaks(model, inputs),
        "gradcheck": lambda: pt.assert_gradcheck(model, inputs),
    }
    na = None
    if name == "gradcheck" and not floats:
        na = "no floating-point input"
    elif name == "onnx_parity":
        import importlib.util
        if importlib.util.find_spec("onnxruntime") is None:
            na = "onnxruntime not installed"
    elif declared:
        calls.update(_pt_declared(pt, model, inputs, loss_fn, facts, data))
        if name not in calls:
            na = "not declared for this case"
    if na:
        return {"check": name, "group": group, "status": "n/a", "seconds": 0.0, "headline": na}
    from _pytest.outcomes import Skipped

    t0 = time.perf_counter()
    try:
        calls[name]()
        status, text = "passed", ""
    except AssertionError as exc:
        status, text = "failed", str(exc)
    except Skipped as exc:
        status, text = "skipped", str(exc)
    except Exception as exc:
        status, text = "error", f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - t0
    return {"check": name, "group": group, "status": status, "seconds": round(seconds, 4),
            "headline": text.strip().splitlines()[0][:200] if text.strip() else ""}


def _pt_declared(pt: Any, model: Any, inputs: Any, loss_fn: Any, facts: dict, data: Any) -> dict:
    """The zoo case's declared facts with a direct pytest-torch equivalent."""
    from pytest_torch.specs import TensorSpec
    from pytest_torch.utils import run_inference

    calls = {}
    if "out" in facts:
        spec = TensorSpec(shape=tuple(facts["out"]))
        calls["output_spec"] = lambda: pt.assert_output_spec(run_inference(model, inputs), spec,
                                                             B=data.batch_size)
    frozen = (facts.get("params_learn") or {}).get("frozen")
    if frozen:
        calls["frozen"] = lambda: pt.assert_frozen(model, inputs, loss_fn, list(frozen))
    if "permutation_invariant" in facts:
        dim = facts["permutation_invariant"].get("dim", 1)
        calls["permutation_invariant"] = lambda: pt.assert_permutation_invariant(model, inputs,
                                                                                 dim=dim)
    return calls


def worker_pytest_torch(cases: list, names: list, dump=_no_dump) -> dict:
    """pytest-torch's suite on every case (no thread setting: torch's defaults)."""
    import warnings

    import torch

    info = thread_info()
    rows = []
    for case in cases:
        checks = []
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in names:
                checks.append(run_pt_assertion(name, case, declared=name in PT_DECLARED))
        rows.append(_row(case, [c for c in checks if c["group"] != "declared"],
                         time.perf_counter() - t0, None))
        rows[-1]["declared"] = [c for c in checks if c["group"] == "declared"]
        rows[-1]["errors"] = [c["check"] for c in checks if c["status"] == "error"]
        dump({"tool": "pytest-torch", "threads": info, "cases": rows, "incomplete": True})
    info["threads_after"] = torch.get_num_threads()
    import pytest_torch

    return {"tool": "pytest-torch", "version": getattr(pytest_torch, "__version__", "?"),
            "threads": info, "cases": rows}


def worker_main(args: argparse.Namespace) -> int:
    def dump(doc: dict) -> None:  # after every case: a timeout still leaves what was measured
        tmp = args.worker_out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1, default=str)
        os.replace(tmp, args.worker_out)

    cases = zoo_cases(args.cases.split(",") if args.cases else None)
    if args.tool == "modelcheck":
        out = worker_modelcheck(cases, dump)
    else:
        if find_pytest_torch() is None:
            raise SystemExit("pytest_torch is not importable")
        out = worker_pytest_torch(cases, args.pt_assertions.split(","), dump)
    dump(out)
    return 0


def run_worker(tool: str, cases: Optional[list], pt_assertions: list, timeout: float) -> dict:
    """A zoo worker in a fresh subprocess (thread variables removed from its environment)."""
    fd, path = tempfile.mkstemp(prefix="ci_load_", suffix=".json")
    os.close(fd)
    argv = [sys.executable, os.path.abspath(__file__), "_worker", "--tool", tool,
            "--worker-out", path, "--pt-assertions", ",".join(pt_assertions)]
    if cases:
        argv += ["--cases", ",".join(cases)]
    env = measured_env()
    pt = find_pytest_torch()
    if pt and tool == "pytest-torch":
        env["PYTEST_TORCH_PATH"] = pt
    cache = tempfile.mkdtemp(prefix="ci_load_cache_")  # cold compile caches, as on a new runner
    env["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        res = run_cmd(argv, env, timeout)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    try:
        with open(path) as fh:
            out = json.load(fh)
        if out.get("incomplete"):
            out["error"] = f"worker rc={res['rc']} after {len(out['cases'])} case(s): {res['tail']}"
    except (OSError, ValueError):
        out = {"tool": tool, "cases": [], "error": f"worker rc={res['rc']}: {res['tail']}"}
    finally:
        for leftover in (path, path + ".tmp"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    out["process_seconds"] = res["seconds"]
    out["rc"] = res["rc"]
    return out


def zoo_summary(out: dict) -> dict:
    cases = out.get("cases", [])
    bugs = [c for c in cases if not c["healthy"]]
    goods = [c for c in cases if c["healthy"]]
    per_check: dict = {}
    for c in cases:
        for chk in c["checks"]:
            per_check[chk["check"]] = round(per_check.get(chk["check"], 0.0) + chk["seconds"], 3)
    s = {"check_seconds": round(sum(c["check_seconds"] for c in cases), 3),
         "wall_seconds": round(sum(c["wall_seconds"] for c in cases), 3),
         "process_seconds": out.get("process_seconds"),
         "caught": sum(c["flagged"] for c in bugs), "bugs": len(bugs),
         "flagged_healthy": sum(c["flagged"] for c in goods), "healthy": len(goods),
         "seconds_by_check": dict(sorted(per_check.items(), key=lambda kv: -kv[1]))}
    if out.get("tool") == "pytest-torch":
        s["caught_without_errors"] = sum(
            any(ch["status"] == "failed" for ch in c["checks"]) for c in bugs)
        s["flagged_healthy_without_errors"] = sum(
            any(ch["status"] == "failed" for ch in c["checks"]) for c in goods)
        s["caught_with_declared"] = sum(
            c["flagged"] or any(d["status"] in ("failed", "error") for d in c.get("declared", []))
            for c in bugs)
        s["flagged_healthy_with_declared"] = sum(
            c["flagged"] or any(d["status"] in ("failed", "error") for d in c.get("declared", []))
            for c in goods)
        s["check_seconds_without_aoti"] = round(s["check_seconds"]
                                                - per_check.get("aoti_parity", 0.0), 3)
        s["declared_seconds"] = round(sum(d["seconds"] for c in cases
                                          for d in c.get("declared", [])), 3)
    if out.get("error"):
        s["error"] = out["error"]
    return s


def part_zoo(args: argparse.Namespace, results: Results) -> None:
    cases = list(SMOKE_CASES) if args.smoke and not args.cases else (
        args.cases.split(",") if args.cases else None)
    pt_names = list(PT_SMOKE) if args.smoke else [n for n in PT_SUITE if n not in args.pt_skip]
    pt_names += [n for n in PT_DECLARED if n not in args.pt_skip]
    have_pt = find_pytest_torch() is not None
    tools = [t for t in ("modelcheck", "pytest-torch") if t in args.tools]
    if not have_pt and "pytest-torch" in tools:
        tools.remove("pytest-torch")
    reps = args.reps or DEFAULT_REPS["zoo"]
    settings = {"reps": reps, "load": args.load, "cases": cases, "pt_assertions": pt_names,
                "tools": tools}
    part = results.part("zoo", settings, args.resume)
    if not have_pt and "pytest-torch" in args.tools:
        part["pytest_torch"] = "not importable: pytest-torch rows left out"
        print("pytest_torch is not importable: only pytest-modelcheck is measured")
    for rep in range(reps):
        for cond, k in (("idle", 0), ("load", args.load)):
            order = tools if rep % 2 == 0 else tools[::-1]
            for tool in order:
                key = f"{tool}/{cond}/rep{rep}"

                def measure(tool=tool, k=k) -> dict:
                    with Load(k, args.load_lifetime, args.warmup) as load:
                        out = run_worker(tool, cases, pt_names, args.timeout)
                        out.update(load.snapshot())
                    out["summary"] = zoo_summary(out)
                    return out

                out = step(results, part, key, measure)
                s = zoo_summary(out)
                print(f"  {key:28} {s['check_seconds']:8.1f} s in checks  caught"
                      f" {s['caught']}/{s['bugs']}  flagged {s['flagged_healthy']}/{s['healthy']}"
                      + (f"  ERROR {s['error'][:120]}" if s.get("error") else ""), flush=True)
    rows = {}
    for tool in tools:
        for cond in ("idle", "load"):
            outs = [zoo_summary(part["steps"][f"{tool}/{cond}/rep{r}"]) for r in range(reps)]
            rows[f"{tool}/{cond}"] = {
                "check_seconds_median": median([o["check_seconds"] for o in outs]),
                "wall_seconds_median": median([o["wall_seconds"] for o in outs]),
                "caught": sorted({o["caught"] for o in outs}), "bugs": outs[0]["bugs"],
                "flagged_healthy": sorted({o["flagged_healthy"] for o in outs}),
                "healthy": outs[0]["healthy"],
                **({k: sorted({o[k] for o in outs}) for k in
                    ("check_seconds_without_aoti", "caught_without_errors",
                     "flagged_healthy_without_errors",
                     "caught_with_declared", "flagged_healthy_with_declared")
                    if k in outs[0]})}
    part["summary"] = rows
    results.save()
    print()
    print(f"{'zoo':26} {'s in checks':>11} {'wall s':>8} {'caught':>8} {'flagged healthy':>16}")
    for key, r in rows.items():
        print(f"{key:26} {_f(r['check_seconds_median']):>11} {_f(r['wall_seconds_median']):>8}"
              f" {_span(r['caught'])}/{r['bugs']:<4} {_span(r['flagged_healthy'])}/{r['healthy']}")
        costs = zoo_summary(part["steps"][f"{key}/rep0"])["seconds_by_check"]
        print(f"{'':26} costliest: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                 list(costs.items())[:4]))
        if "check_seconds_without_aoti" in r:
            print(f"{'':26} without aoti_parity: {_span(r['check_seconds_without_aoti'])} s")
        if "caught_with_declared" in r:
            print(f"{'':26} AssertionError only: caught {_span(r['caught_without_errors'])},"
                  f" flagged {_span(r['flagged_healthy_without_errors'])}; with the declared"
                  f" facts: caught {_span(r['caught_with_declared'])}, flagged"
                  f" {_span(r['flagged_healthy_with_declared'])}")


def _f(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def _span(xs: list) -> str:
    return str(xs[0]) if len(xs) == 1 else f"{xs[0]}..{xs[-1]}"


# --------------------------------------------------------------------------- mainjob
def part_mainjob(args: argparse.Namespace, results: Results) -> None:
    reps = args.reps or DEFAULT_REPS["mainjob"]
    target = ["example_models/test_fno.py"] if args.smoke else ["example_models/"]
    cmd = [sys.executable] + [a if a != "example_models/" else target[0] for a in MAINJOB]
    settings = {"reps": reps, "load": args.load, "command": cmd[1:], "idle": not args.no_idle}
    part = results.part("mainjob", settings, args.resume)
    variants = {"a": measured_env(), "b": measured_env(OMP_NUM_THREADS="1")}
    plan = [] if args.no_idle else [("idle", v, 0) for v in ("a", "b")]
    for rep in range(reps):
        order = ("a", "b") if rep % 2 == 0 else ("b", "a")
        plan += [(f"load/rep{rep}", v, args.load) for v in order]
    for cond, v, k in plan:
        key = f"{v}/{cond}"

        def measure(v=v, k=k) -> dict:
            with Load(k, args.load_lifetime, args.warmup) as load:
                out = run_cmd(cmd, variants[v], args.timeout)
                out.update(load.snapshot())
            out["env"] = {"OMP_NUM_THREADS": variants[v].get("OMP_NUM_THREADS")}
            return out

        out = step(results, part, key, measure)
        print(f"  {key:18} {out['seconds']:8.1f} s  rc={out['rc']}", flush=True)
    a = median([part["steps"][f"a/load/rep{r}"]["seconds"] for r in range(reps)])
    b = median([part["steps"][f"b/load/rep{r}"]["seconds"] for r in range(reps)])
    summary = {"a_load_median_s": a, "b_load_median_s": b,
               "ratio_a_over_b": round(a / b, 3) if a and b else None, "target": 1.25}
    if not args.no_idle:
        summary.update(a_idle_s=part["steps"]["a/idle"]["seconds"],
                       b_idle_s=part["steps"]["b/idle"]["seconds"])
    part["summary"] = summary
    results.save()
    print()
    print(f"mainjob under load {args.load}: (a) no setting {_f(a)} s, (b) OMP_NUM_THREADS=1"
          f" {_f(b)} s, a/b = {summary['ratio_a_over_b']} (target <= 1.25)")
    if not args.no_idle:
        print(f"idle: (a) {_f(summary['a_idle_s'])} s, (b) {_f(summary['b_idle_s'])} s")


# --------------------------------------------------------------------------- throughput
def throughput_counts(doc: dict) -> dict:
    """Counts from a --modelcheck-json document: throughput checks by status, failed tests,
    regressed baseline comparisons.

    >>> doc = {"tests": [{"outcome": "failed", "results": [
    ...     {"check": "throughput_at_least", "passed": False, "headline": "slow"}]}],
    ...     "comparisons": [{"verdict": "regressed"}, {"verdict": "same"}]}
    >>> c = throughput_counts(doc)
    >>> (c["throughput_failed"], c["tests_failed"], c["gate_regressed"])
    (1, 1, 1)
    """
    counts = {"throughput_passed": 0, "throughput_failed": 0, "throughput_inconclusive": 0,
              "throughput_skipped": 0, "tests": 0, "tests_failed": 0, "gate_regressed": 0,
              "gate_compared": 0, "gate_verdicts": {}, "failed_headlines": [],
              "failed_checks": []}
    for t in doc.get("tests", []):
        counts["tests"] += 1
        counts["tests_failed"] += t.get("outcome") == "failed"
        for r in t.get("results", []):
            if r.get("passed") is False:
                counts["failed_checks"].append(
                    f"{t.get('nodeid', '?')}: {r.get('check')}: {r.get('headline', '')[:200]}")
            if r.get("check") != "throughput_at_least":
                continue
            metrics = r.get("metrics") or {}
            if r.get("passed") is False:  # strict=True turns inconclusive into failed
                counts["throughput_failed"] += 1
                counts["failed_headlines"].append(r.get("headline", "")[:200])
            elif metrics.get("inconclusive") or "inconclusive" in str(metrics.get("verdict", "")) \
                    or r.get("headline", "").lower().startswith("inconclusive"):
                counts["throughput_inconclusive"] += 1
            elif r.get("passed") is True:
                counts["throughput_passed"] += 1
            else:
                counts["throughput_skipped"] += 1
    for c in doc.get("comparisons") or []:
        v = str(c.get("verdict"))
        counts["gate_verdicts"][v] = counts["gate_verdicts"].get(v, 0) + 1
        counts["gate_regressed"] += v == "regressed"
        counts["gate_compared"] += c.get("verdict") in ("same", "regressed", "improved")
    return counts


def _pytest_json(cmd: list, env: dict, timeout: float) -> dict:
    fd, path = tempfile.mkstemp(prefix="ci_load_tp_", suffix=".json")
    os.close(fd)
    os.unlink(path)
    out = run_cmd(cmd + [f"--modelcheck-json={path}"], env, timeout)
    try:
        with open(path) as fh:
            out.update(throughput_counts(json.load(fh)))
        os.unlink(path)
    except (OSError, ValueError):
        out["json"] = "missing"
    return out


def part_throughput(args: argparse.Namespace, results: Results) -> None:
    reps = args.reps or DEFAULT_REPS["throughput"]
    target = "example_models/test_fno.py" if args.smoke else "example_models/"
    cmd = [sys.executable, "-m", "pytest", "--modelcheck", target, "-m", "throughput_at_least",
           "-q", "-p", "no:cacheprovider"]
    settings = {"reps": reps, "load": args.load, "command": cmd[1:], "baseline": args.baseline,
                "baseline_under_load": args.baseline_under_load}
    part = results.part("throughput", settings, args.resume)
    env = measured_env()
    base = os.path.join(os.path.dirname(os.path.abspath(args.out)), "ci_load_baseline.json")
    if args.baseline:
        def save() -> dict:
            if os.path.exists(base):
                os.unlink(base)
            k = args.load if args.baseline_under_load else 0
            with Load(k, args.load_lifetime, args.warmup) as load:
                out = _pytest_json(cmd + [f"--modelcheck-save-baseline={base}"], env, args.timeout)
                out.update(load.snapshot())
            return out
        step(results, part, "save-baseline", save)
    with Load(args.load, args.load_lifetime, args.warmup) as load:
        for rep in range(reps):
            def measure() -> dict:
                extra = [f"--modelcheck-baseline={base}"] if args.baseline else []
                out = _pytest_json(cmd + extra, env, args.timeout)
                out.update(load.snapshot())
                return out
            out = step(results, part, f"load/rep{rep}", measure)
            print(f"  load/rep{rep:<3} {out['seconds']:7.1f} s rc={out['rc']} throughput"
                  f" failed {out.get('throughput_failed', '?')}, inconclusive"
                  f" {out.get('throughput_inconclusive', '?')}, passed"
                  f" {out.get('throughput_passed', '?')}"
                  + (f"; gate {out.get('gate_verdicts', '?')}" if args.baseline else ""),
                  flush=True)
            for line in (out.get("failed_checks") or out.get("failures") or [])[:5]:
                print(f"      {line}")
    runs = [part["steps"][f"load/rep{r}"] for r in range(reps)]
    summary = {"runs": reps,
               "runs_with_throughput_failure": sum(r.get("throughput_failed", 0) > 0 for r in runs),
               "throughput_failed": sum(r.get("throughput_failed", 0) for r in runs),
               "throughput_inconclusive": sum(r.get("throughput_inconclusive", 0) for r in runs),
               "throughput_passed": sum(r.get("throughput_passed", 0) for r in runs),
               "runs_failed": sum(r["rc"] != 0 for r in runs),
               "runs_without_json": sum(r.get("json") == "missing" for r in runs),
               "target": "0 throughput failures"}
    if args.baseline:
        verdicts: dict = {}
        for r in runs:
            for v, n in (r.get("gate_verdicts") or {}).items():
                verdicts[v] = verdicts.get(v, 0) + n
        summary.update(runs_with_gate_failure=sum(r.get("gate_regressed", 0) > 0 for r in runs),
                       gate_regressed=sum(r.get("gate_regressed", 0) for r in runs),
                       gate_verdicts=verdicts)
    part["summary"] = summary
    results.save()
    print()
    print(f"throughput under load {args.load}: {summary['runs_with_throughput_failure']}/{reps}"
          f" runs with a failed throughput check ({summary['throughput_failed']} failed,"
          f" {summary['throughput_inconclusive']} inconclusive, {summary['throughput_passed']}"
          f" passed; {summary['runs_failed']} runs exited non-zero)"
          + (f"; gate: {summary['runs_with_gate_failure']}/{reps} runs with a regression,"
             f" verdicts {summary['gate_verdicts']}" if args.baseline else ""))


# --------------------------------------------------------------------------- aa
def part_aa(args: argparse.Namespace, results: Results) -> None:
    trials = args.reps or DEFAULT_REPS["aa"]
    cmd = [sys.executable, os.path.join(HERE, "gate_aa.py"), "--trials", str(trials)]
    if args.smoke:
        cmd += ["--runs", "4"]
    settings = {"trials": trials, "load": args.load, "command": cmd[1:]}
    part = results.part("aa", settings, args.resume)

    def measure() -> dict:
        with Load(args.load, args.load_lifetime, args.warmup) as load:
            out = run_cmd(cmd, measured_env(), args.timeout)
            out.update(load.snapshot())
        for name, pattern in (("false_alarms", r"false alarms[^:]*:\s*(\d+)/(\d+)"),
                              ("detections", r"detections[^:]*:\s*(\d+)/(\d+)")):
            m = re.search(pattern, out["tail"])
            out[name] = f"{m.group(1)}/{m.group(2)}" if m else None
        return out

    out = step(results, part, "load", measure)
    part["summary"] = {k: out.get(k) for k in ("false_alarms", "detections", "rc", "seconds")}
    results.save()
    print(f"gate_aa under load {args.load}: false alarms {out.get('false_alarms')}, detections"
          f" {out.get('detections')} (rc={out['rc']}, {out['seconds']:.0f} s)")
    if out["rc"] != 0:
        print(out["tail"])


# --------------------------------------------------------------------------- main
def parse(argv: list) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=PARTS + ("all", "_worker"))
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions (zoo, mainjob: 1; throughput: 20; aa: gate_aa trials 20)")
    ap.add_argument("--load", type=int, default=2, help="background load processes (default 2)")
    ap.add_argument("--load-lifetime", type=float, default=None,
                    help="hard cap on each load process's life in seconds (default: --timeout"
                         " + 10 min; --smoke: 120); the load is stopped after each step anyway")
    ap.add_argument("--smoke", action="store_true",
                    help="1 rep, 2 zoo cases, cheap pytest-torch assertions, short load")
    ap.add_argument("--cases", default=None, help="zoo case names, comma-separated")
    ap.add_argument("--tools", default="modelcheck,pytest-torch",
                    help="zoo: the tools to measure, comma-separated (default both; pytest-torch"
                         " only where it can be imported)")
    ap.add_argument("--pt-skip", default="", help="pytest-torch assertions to leave out,"
                    " comma-separated (e.g. aoti_parity)")
    ap.add_argument("--baseline", action="store_true", help="throughput: also gate on a baseline")
    ap.add_argument("--baseline-under-load", action="store_true",
                    help="throughput: save the baseline under the load (default: idle)")
    ap.add_argument("--no-idle", action="store_true", help="mainjob: skip the idle runs")
    ap.add_argument("--timeout", type=float, default=4 * 3600.0,
                    help="per measured subprocess, seconds (default 4 h: pytest-torch's full"
                         " suite with aoti_parity on the whole zoo takes an hour or more)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    ap.add_argument("--resume", action="store_true",
                    help="keep the steps already in --out for parts with the same settings")
    ap.add_argument("--tool", choices=("modelcheck", "pytest-torch"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--pt-assertions", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.pt_skip = {s for s in args.pt_skip.split(",") if s}
    args.tools = [t for t in args.tools.split(",") if t]
    if not args.tools or set(args.tools) - {"modelcheck", "pytest-torch"}:
        ap.error(f"--tools: expected modelcheck and/or pytest-torch, got {','.join(args.tools)}")
    unknown = args.pt_skip - set(PT_SUITE) - set(PT_DECLARED)
    if unknown:
        ap.error(f"--pt-skip: unknown assertion(s) {sorted(unknown)}; choose from"
                 f" {', '.join(list(PT_SUITE) + list(PT_DECLARED))}")
    if args.smoke:
        args.reps = 1
    args.warmup = 1.0 if args.smoke else WARMUP_S
    if args.load_lifetime is None:
        args.load_lifetime = 120.0 if args.smoke else args.timeout + 600.0
    return args


def main(argv: list) -> int:
    args = parse(argv)
    if args.parts == ["_worker"]:
        return worker_main(args)
    parts = list(PARTS) if "all" in args.parts else [p for p in PARTS if p in args.parts]
    env = environment()
    env["smoke"] = args.smoke
    results = Results(args.out, env)
    print(f"{env['date']}  {env['machine']['cpu']}, {env['machine']['cores']} cores, torch"
          f" {env['torch']}, load averages {env['load_averages']}; background load {args.load}"
          f" process(es){'  [SMOKE: not for figures]' if args.smoke else ''}")
    for name in parts:
        print(f"\n== {name}", flush=True)
        {"zoo": part_zoo, "mainjob": part_mainjob, "throughput": part_throughput,
         "aa": part_aa}[name](args, results)
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
