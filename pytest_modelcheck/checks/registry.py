"""The check registry: one plain function per check; its signature is the marker's signature.

A check is written as::

    @check(default=True)
    def grads_finite(allow_unused=(), *, model, batch, loss=None, device=None) -> CheckResult:
        '''One-line summary used for `pytest --markers`.'''

User arguments come first; ``model``, ``batch``, ``loss`` and ``device`` are keyword-only and
injected (by ``check_model``, the pytest markers or the ``modelcheck`` fixture). ``validate``
turns the user arguments into checked values at marker-binding time, before anything runs,
and raises ``UsageError`` with a one-line message. Registering a name twice is an error.
This module imports neither torch nor pytest.
"""
from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..core.errors import ModelError, UsageError, first_line
from ..core.result import CheckResult
from .subject import Subject

CONTEXT = ("model", "batch", "loss", "device")
MARKER_CONTEXT = ("loss", "device")  # context a marker may also set


class SkipCheck(Exception):
    """Raised inside a check when it cannot apply (absent device, nothing to check)."""


@dataclass
class CheckSpec:
    name: str
    impl: Callable
    signature: inspect.Signature
    summary: str
    default: bool
    validate: Optional[Callable[..., dict]]
    absent_device_ok: bool
    takes_subject: bool = False

    @property
    def user_params(self) -> list:
        return [p for p in self.signature.parameters.values() if p.name not in CONTEXT]

    @property
    def required(self) -> list:
        return [p.name for p in self.user_params if p.default is inspect.Parameter.empty]

    def marker_help(self) -> str:
        """``memory_under(limit, phase='train', *, loss=None, device=None): summary``."""
        parts, star = [], False
        for p in self.signature.parameters.values():
            if p.name in ("model", "batch"):
                continue
            if p.kind is p.KEYWORD_ONLY and not star:
                parts.append("*")
                star = True
            parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
        return f"{self.name}({', '.join(parts)}): {self.summary}"

    def bind(self, args: tuple = (), kwargs: Optional[dict] = None) -> dict:
        """Bind marker (or call) arguments; validate; return the keyword dict to run with.

        Raises UsageError naming what was given and what is expected.
        """
        kwargs = dict(kwargs or {})
        for name in ("model", "batch"):
            if name in kwargs:
                raise UsageError(f"{name}= is not a marker argument; name the fixture with"
                                 f" {name}_fixture='...' instead")
        user_sig = self.signature.replace(parameters=[
            p for p in self.signature.parameters.values() if p.name not in ("model", "batch")])
        try:
            bound = user_sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise UsageError(f"{exc}; expected {self.marker_help().split(':')[0]}") from None
        values = dict(bound.arguments)
        if self.validate is not None:
            user = {k: v for k, v in values.items() if k not in CONTEXT}
            checked = self.validate(**user)
            values.update(checked or {})
        if "loss" in values:
            from ..core.losses import validate_loss_arg

            values["loss"] = validate_loss_arg(values["loss"])
        if values.get("device") is not None:
            values["device"] = validate_device(values["device"])
        return values

    def run(self, values: dict, *, model: Any, batch: Any, loss: Any = None,
            device: Any = None, timeout: Optional[float] = None,
            budget_left: Optional[float] = None) -> CheckResult:
        """Run with already-bound ``values``; a failing model becomes a failed result, and so do
        an overrun of ``timeout`` seconds and running out of memory (memory is released).

        ``budget_left`` is what is left of the test's time budget: the check is stopped after
        ``min(timeout, budget_left)`` seconds, and when the budget was the nearer limit it is
        reported as skipped (``metrics["budget_spent"]``), not failed."""
        from ..core.guard import CheckTimeout, is_out_of_memory, release_memory, time_budget
        from ..core.state import preserved_globals

        by_budget = budget_left is not None and (timeout is None or budget_left < timeout)
        if by_budget:
            budget_left = max(float(budget_left or 0.0), 0.001)
            timeout = budget_left
        context = {"loss": loss, "device": device}
        context.update({k: v for k, v in values.items() if k in MARKER_CONTEXT and v is not None})
        user = {k: v for k, v in values.items() if k not in CONTEXT}
        start = time.perf_counter()
        validate_model(model, self.absent_device_ok)
        with preserved_globals():  # a batch factory's random draws are undone too
            try:
                with time_budget(timeout):
                    batch = _user_batch(batch, model)
                device = _resolve_device(context["device"], model, self.absent_device_ok)
                with time_budget(timeout):
                    if self.takes_subject:
                        result = self.impl(**user, subject=Subject(
                            self.name, model, batch, context["loss"], device))
                    else:
                        result = self.impl(**user, model=model, batch=batch,
                                           loss=context["loss"], device=device)
            except SkipCheck as exc:
                result = CheckResult(self.name, None, str(exc))
            except CheckTimeout as exc:
                if by_budget:
                    result = budget_skip(self.name)
                else:
                    result = CheckResult(self.name, False, f"expected the check to finish in"
                                         f" {timeout:g} s, observed it {exc}",
                                         metrics={"timeout_s": timeout},
                                         details="raise the budget with --modelcheck-timeout or"
                                         " the modelcheck_timeout ini key, or use a smaller"
                                         " batch")
            except ModelError as exc:
                if is_out_of_memory(exc.original or exc):
                    result = _oom_result(self.name, exc.original or exc, release_memory())
                else:
                    result = CheckResult(self.name, False, str(exc), details=_cause(exc),
                                         metrics={"raised_in": exc.module})
            except UsageError:
                raise
            except Exception as exc:  # noqa: BLE001 - never a traceback from inside a check
                if is_out_of_memory(exc):
                    result = _oom_result(self.name, exc, release_memory())
                elif _on_meta(model):
                    result = CheckResult(
                        self.name, False, "expected a model with real weights, observed"
                        " parameters on the meta device (no values): this check runs the model;"
                        " the FLOP, parameter and memory checks work on meta models",
                        details=_cause(ModelError("", original=exc)),
                        metrics={"error": type(exc).__name__})
                else:
                    result = CheckResult(
                        self.name, False, f"expected the check to run on this model, observed"
                        f" {type(exc).__name__}: {first_line(exc, or_type=True, limit=200)}",
                        details=_cause(ModelError("", original=exc)),
                        metrics={"error": type(exc).__name__})
            except (KeyboardInterrupt, GeneratorExit):
                raise
            except BaseException as exc:  # noqa: B036 - SystemExit & co. from the model's code
                if _is_pytest_outcome(exc):  # pytest.skip/fail/exit (pytest-timeout too): theirs
                    raise
                result = _base_exception_result(self.name, exc)
        result.duration_s = round(time.perf_counter() - start, 4)
        result.arguments = {k: _describe(v) for k, v in values.items()}
        return result

    def __call__(self, *args: Any, model: Any, batch: Any, loss: Any = None, device: Any = None,
                 **kwargs: Any) -> CheckResult:
        from ..core.losses import validate_loss_arg

        values = self.bind(args, kwargs)
        loss = validate_loss_arg(loss)
        return self.run(values, model=model, batch=batch, loss=loss, device=device)


def budget_skip(name: str, budget: Optional[float] = None, ran: Optional[int] = None,
                total: Optional[int] = None) -> CheckResult:
    """The skipped result of a check that the test's time budget left no time for (or that was
    stopped when the budget ran out while it ran).

    >>> budget_skip("grads_finite", 60, 2, 5).headline
    "skipped: the test's time budget of 60 s was spent (ran 2 of 5 checks)"
    """
    text = "skipped: the test's time budget"
    text += f" of {budget:g} s was spent" if budget is not None else " was spent"
    if ran is not None and total is not None:
        text += f" (ran {ran} of {total} checks)"
    metrics: dict = {"budget_spent": True}
    if budget is not None:
        metrics["budget_s"] = budget
    return CheckResult(name, None, text, metrics=metrics,
                       details="raise it with --modelcheck-budget or the modelcheck_budget ini"
                       " key, or split the test's checks over several tests")


class CheckBudget:
    """The time budget of one test's checks: the seconds spent running them are charged to it,
    and once they reach ``seconds`` the remaining checks are skipped. ``clock`` is injectable
    (a fake one in tests); ``seconds=None`` is no budget.

    >>> ticks = iter([0.0, 40.0, 40.0, 70.0])
    >>> b = CheckBudget(60, clock=lambda: next(ticks))
    >>> with b.charge():
    ...     pass
    >>> b.left(), b.spent_out()
    (20.0, False)
    >>> with b.charge():
    ...     pass
    >>> b.left(), b.spent_out()
    (0.0, True)
    """

    def __init__(self, seconds: Optional[float] = None, clock: Optional[Callable] = None):
        self.seconds = seconds
        self.clock = clock or time.monotonic
        self.spent = 0.0

    def left(self) -> Optional[float]:
        if self.seconds is None:
            return None
        return max(self.seconds - self.spent, 0.0)

    def spent_out(self) -> bool:
        return self.seconds is not None and self.spent >= self.seconds

    def charge(self) -> Any:
        """A context manager that adds the time spent in its body to the budget."""
        import contextlib

        @contextlib.contextmanager
        def charging() -> Any:
            start = self.clock()
            try:
                yield
            finally:
                self.spent += self.clock() - start

        return charging()

    def skipped(self, name: str, ran: int, total: int) -> CheckResult:
        return budget_skip(name, self.seconds, ran, total)


def run_plans(plans: list, run: Callable, budget: Optional[CheckBudget] = None) -> list:
    """Run ``[(CheckSpec, values), ...]`` in order with ``run(spec, values, budget_left)``
    (returns a CheckResult) and return the results. Once ``budget`` is spent the remaining
    checks are not run but recorded as skipped; a check stopped by the budget while it ran is
    skipped too, with the same headline.

    >>> spec = get_check("grads_finite")
    >>> ticks = iter([0.0, 30.0, 30.0, 61.0])
    >>> budget = CheckBudget(60, clock=lambda: next(ticks))
    >>> fake = lambda spec, values, left: CheckResult(spec.name, True, "ok")
    >>> [r.status for r in run_plans([(spec, {})] * 3, fake, budget)]
    ['passed', 'passed', 'skipped']
    """
    budget = budget or CheckBudget(None)
    results: list = []
    total = len(plans)
    for spec, values in plans:
        if budget.spent_out():
            results.append(budget.skipped(spec.name, _ran(results), total))
            continue
        with budget.charge():
            result = run(spec, values, budget.left())
        if result.passed is None and result.metrics.get("budget_spent"):
            skipped = budget.skipped(spec.name, _ran(results), total)
            result.headline, result.details = skipped.headline, skipped.details
            result.metrics.update(skipped.metrics)
        results.append(result)
    return results


def _ran(results: list) -> int:
    return sum(1 for r in results if not r.metrics.get("budget_spent"))


def _oom_result(name: str, exc: BaseException, peak: Optional[int]) -> CheckResult:
    from ..core.units import format_bytes

    seen = f", peak {format_bytes(peak)} allocated" if peak is not None else ""
    first = first_line(exc, or_type=True)
    return CheckResult(name, False, f"expected the check to fit in device memory, observed out of"
                       f" memory{seen} ({first[:160]})", metrics={"oom": True, "peak_bytes": peak},
                       details="memory was released (gc, torch.cuda.empty_cache); use a smaller"
                       " batch or a larger device")


def _is_pytest_outcome(exc: BaseException) -> bool:
    """``pytest.skip``/``fail``/``xfail``/``exit`` raised in user code (or by pytest-timeout's
    handler) is pytest's control flow, not a model error (no pytest import here)."""
    import sys

    outcomes = sys.modules.get("_pytest.outcomes")
    kinds = tuple(k for k in (getattr(outcomes, "OutcomeException", None),
                              getattr(outcomes, "Exit", None)) if isinstance(k, type))
    return bool(kinds) and isinstance(exc, kinds)


def _base_exception_result(name: str, exc: BaseException) -> CheckResult:
    """A ``SystemExit`` (``sys.exit()`` in a forward or loss) or another ``BaseException``
    subclass out of the model's code: a failed check naming it, so the test's other checks run."""
    kind = type(exc).__name__
    if isinstance(exc, SystemExit):
        what = f"SystemExit (sys.exit({exc.code!r}))"
    else:
        text = first_line(exc, or_type=True)
        what = kind if text == kind else f"{kind}: {text[:200]}"
    return CheckResult(name, False, f"expected the check to run on this model, observed {what}"
                       " raised while it ran", details=_cause(ModelError("", original=exc)),
                       metrics={"error": kind})


def _cause(exc: ModelError) -> str:
    import traceback

    if exc.original is None:
        return ""
    frames = traceback.format_exception(type(exc.original), exc.original, exc.original.__traceback__)
    text = "".join(frames).rstrip().splitlines()
    return "\n".join(text[-12:])


def _describe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    return getattr(value, "__name__", None) or repr(value)


def _user_batch(batch: Any, model: Any = None) -> Any:
    """``Batch.from_user`` (a dict batch is passed as keywords when ``model`` takes it so); a
    batch factory that raises is the user's error, named."""
    from ..core.batch import Batch
    from ..core.guard import CheckTimeout

    try:
        return Batch.from_user(batch, model=model)
    except (UsageError, CheckTimeout):
        raise
    except Exception as exc:  # noqa: BLE001 - the user's make_batch raised
        raise UsageError(f"the batch (or its make_batch factory) raised"
                         f" {type(exc).__name__}: {first_line(exc, or_type=True)}") from None


def _on_meta(model: Any) -> bool:
    try:
        return any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    except Exception:  # noqa: BLE001 - a model that cannot list its tensors: not meta
        return False


#: The most training steps a check may be asked for (each is a forward and a backward pass on
#: the batch; model_overfits may go on to 3x as many): more is a typo, not a test.
MAX_STEPS = 10**6
#: Seeds are what ``torch.manual_seed`` takes without wrapping around: 0 .. 2**63 - 1.
MAX_SEED = 2**63 - 1


def _whole(value: Any) -> Any:
    """``value`` as an int when it is a whole number (an int, or a float such as 100.0), else
    None; bools, NaN, infinities and other types are None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")) \
            and value.is_integer():
        return int(value)
    return None


def validate_steps(steps: Any, name: str = "steps") -> int:
    """A number of training steps: a whole number from 1 to ``MAX_STEPS``, else a UsageError.

    >>> validate_steps(200)
    200
    >>> validate_steps(10**12)
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: steps=1000000000000: expected at most 1000000 steps (each is a forward and a backward pass)
    """
    n = _whole(steps)
    if n is None or n < 1:
        raise UsageError(f"{name}={steps!r}: expected a positive integer")
    if n > MAX_STEPS:
        raise UsageError(f"{name}={steps!r}: expected at most {MAX_STEPS} steps (each is a"
                         " forward and a backward pass)")
    return n


def validate_seed(seed: Any, name: str = "seed") -> int:
    """A random seed: a whole number from 0 to 2**63 - 1 (what ``torch.manual_seed`` takes),
    else a UsageError.

    >>> validate_seed(0)
    0
    >>> validate_seed(2**70)
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: seed=1180591620717411303424: expected an integer from 0 to 2**63 - 1
    """
    n = _whole(seed)
    if n is None or not 0 <= n <= MAX_SEED:
        raise UsageError(f"{name}={seed!r}: expected an integer from 0 to 2**63 - 1")
    return n


_DEVICE_TYPES = ("cpu", "cuda", "meta", "mps", "xpu", "hpu", "mtia", "privateuseone")


def validate_device(device: Any) -> Any:
    """A device given to a check: a ``torch.device``, an index or a string such as ``"cpu"``,
    ``"cuda"`` or ``"cuda:1"``; anything else is a UsageError naming it.

    An index this machine does not have is a UsageError too: a bare int (an accelerator index;
    torch is imported to count them) on a machine with no accelerator or fewer devices, and
    ``"cuda:N"`` or a ``torch.device`` past the CUDA devices present when CUDA is. ``"cuda"``
    or ``"cuda:N"`` on a machine without CUDA is accepted (the check is skipped there). Strings
    never import torch; they are counted once torch is imported (again when the check runs).
    The devices are counted through NVML where it works, which does not initialise CUDA.

    >>> validate_device("cpu"), validate_device("cuda")
    ('cpu', 'cuda')
    >>> validate_device("5 parsecs")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: device='5 parsecs': expected a device such as 'cpu', 'cuda' or 'cuda:1'
    """
    import re
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(device, torch.device):
        if device.type == "cuda" and device.index is not None:
            _check_cuda_index(device, device.index, torch)
        return device
    if isinstance(device, int) and not isinstance(device, bool) and 0 <= device < 1024:
        _check_bare_index(device)
        return device
    if isinstance(device, str) and re.fullmatch(
            rf"({'|'.join(_DEVICE_TYPES)})(:\d{{1,4}})?", device.strip()):
        text = device.strip()
        if torch is not None and text.startswith("cuda:"):
            _check_cuda_index(device, int(text[5:]), torch)
        return text
    raise UsageError(f"device={device!r}: expected a device such as 'cpu', 'cuda' or 'cuda:1'")


def _cuda_count(torch: Any) -> int:
    """CUDA devices present (0 on a build without CUDA); NVML first, as torch does."""
    try:
        return int(torch.cuda.device_count()) if torch.backends.cuda.is_built() else 0
    except Exception:  # noqa: BLE001 - a broken driver: no devices
        return 0


def _check_cuda_index(device: Any, index: int, torch: Any) -> None:
    count = _cuda_count(torch)
    if count and index >= count:
        raise UsageError(f"device={device!r}: this machine has {count} CUDA device"
                         f"{'s' if count > 1 else ''} ({_indices(count)}); expected an index"
                         " below that, 'cuda' for the current one, or 'cpu'")


def _check_bare_index(index: int) -> None:
    """A bare int is an index of the accelerator torch finds (``torch.device(5)``)."""
    import torch

    count = _cuda_count(torch)
    kind = "CUDA"
    if not count:
        accelerator = getattr(torch, "accelerator", None)
        try:
            current = accelerator.current_accelerator() if accelerator is not None else None
            count = int(accelerator.device_count()) if accelerator is not None \
                and current is not None else 0
            kind = getattr(current, "type", "accelerator")
        except Exception:  # noqa: BLE001 - no usable accelerator API: none
            count = 0
    if not count:
        raise UsageError(f"device={index!r}: a bare index names an accelerator (GPU) device and"
                         f" this machine has none; expected 'cuda:{index}' (skipped where there is"
                         " no CUDA) or 'cpu'")
    if index >= count:
        raise UsageError(f"device={index!r}: this machine has {count} {kind} device"
                         f"{'s' if count > 1 else ''} ({_indices(count)}); expected an index below"
                         " that, or 'cpu'")


def _indices(count: int) -> str:
    return "index 0" if count == 1 else f"indices 0 to {count - 1}"


def validate_budget(value: Any) -> Optional[float]:
    """A time budget in seconds from a duration (``"60s"``, ``"5 min"``, a number of seconds);
    ``None`` or ``""`` is no budget. Anything else is a one-line UsageError.

    >>> validate_budget("2 min"), validate_budget(None)
    (120.0, None)
    """
    if value is None or value == "":
        return None
    from ..core.units import parse_duration

    seconds = parse_duration(value)
    if not 0 < seconds <= 1e7:
        raise UsageError(f"expected a positive duration up to 1e7 s (about 115 days), such as"
                         f" '60s', got {value!r}")
    return seconds


def validate_model(model: Any, absent_ok: bool = False) -> None:
    """The model given to a check must be an eager ``torch.nn.Module``; anything else is a
    UsageError naming what was given. (A model on the ``meta`` device is accepted: the checks
    that count or estimate run on it, and the others fail saying they need real weights.)"""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UsageError(f"model: got a TorchScript module ({type(model).__name__}); the checks"
                         " run the eager torch.nn.Module (hooks, copies, autograd): pass the"
                         " module before torch.jit.script/trace")


def _resolve_device(device: Any, model: Any, absent_ok: bool) -> Any:
    import torch

    from ..core.forward import model_device

    if device is None:
        return model_device(model)
    dev = torch.device(validate_device(device))
    if dev.type == "cuda" and not torch.cuda.is_available() and not absent_ok:
        raise SkipCheck(f"device {device!r} is not available on this machine")
    if dev.type not in ("cpu", "cuda", "meta") and not absent_ok:
        try:
            torch.empty(0, device=dev)
        except Exception:  # noqa: BLE001 - any backend failure means absent
            raise SkipCheck(f"device {device!r} is not available on this machine") from None
    return dev


REGISTRY: dict = {}


def _public_signature(name: str, sig: inspect.Signature) -> tuple:
    """The check's public signature and whether its function takes a ``subject``: a function
    declaring ``*, subject`` is shown (marker help, reference, ``check_model``) with the four
    context keywords in its place."""
    kw_only = inspect.Parameter.KEYWORD_ONLY
    if "subject" in sig.parameters:
        if sig.parameters["subject"].kind is not kw_only or any(c in sig.parameters for c in CONTEXT):
            raise TypeError(f"check {name}: 'subject' must be keyword-only and replaces"
                            f" {list(CONTEXT)}")
        params = [p for p in sig.parameters.values() if p.name != "subject"]
        params += [inspect.Parameter("model", kw_only), inspect.Parameter("batch", kw_only),
                   inspect.Parameter("loss", kw_only, default=None),
                   inspect.Parameter("device", kw_only, default=None)]
        return sig.replace(parameters=params), True
    missing = [c for c in CONTEXT if c not in sig.parameters
               or sig.parameters[c].kind is not kw_only]
    if missing:
        raise TypeError(f"check {name}: {missing} must be keyword-only parameters")
    return sig, False


def check(*, default: bool = True, validate: Optional[Callable[..., dict]] = None,
          absent_device_ok: bool = False, name: Optional[str] = None) -> Callable:
    """Register a check function; returns the public, validating, state-preserving wrapper."""

    def decorate(fn: Callable) -> Callable:
        check_name = name or fn.__name__
        if check_name in REGISTRY:
            raise ValueError(f"a check named {check_name!r} is already registered")
        sig, takes_subject = _public_signature(check_name, inspect.signature(fn))
        summary = (inspect.getdoc(fn) or "").strip().splitlines()[0] if fn.__doc__ else ""
        spec = CheckSpec(check_name, fn, sig, summary, default, validate, absent_device_ok,
                         takes_subject)
        REGISTRY[check_name] = spec

        @functools.wraps(fn)
        def public(*args: Any, **kwargs: Any) -> CheckResult:
            return spec(*args, **kwargs)

        public.spec = spec  # type: ignore[attr-defined]
        public.__signature__ = sig  # type: ignore[attr-defined]
        return public

    return decorate


def get_check(name: str) -> CheckSpec:
    """The registered check called ``name`` (UsageError listing the known names otherwise)."""
    _load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown check {name!r}; known checks: {', '.join(sorted(REGISTRY))}") from None


def all_checks() -> dict:
    """Every registered check, by name (imports the built-in check modules once)."""
    _load_all()
    return dict(REGISTRY)


def default_checks() -> list:
    """Names of the checks that run when nothing is declared (no required argument)."""
    return [n for n, s in all_checks().items() if s.default and not s.required]


def _load_all() -> None:
    import pytest_modelcheck.checks  # noqa: F401  (importing the package registers the built-ins)
