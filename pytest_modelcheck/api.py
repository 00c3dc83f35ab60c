"""``check_model``: run a set of checks on one model and batch, outside or inside pytest."""
from __future__ import annotations

from typing import Any

from .checks.registry import all_checks, default_checks, get_check
from .core.errors import UsageError
from .core.result import HealthReport


def _select(checks: Any) -> list:
    if checks == "default":
        return default_checks()
    if checks == "all":
        return [n for n, s in all_checks().items() if not s.required]
    if isinstance(checks, str):
        checks = [checks]
    if not isinstance(checks, (list, tuple)) or not all(isinstance(c, str) for c in checks):
        raise UsageError(f"checks={checks!r}: expected 'default', 'all' or a list of check names")
    for c in checks:
        get_check(c)
    return list(checks)


def plan_checks(checks: Any = "default", **declared: Any) -> list:
    """Bind and validate the arguments of the selected checks, before anything runs.

    Returns ``[(CheckSpec, bound_values), ...]``; raises UsageError (one line) for an unknown
    check, a declared fact no selected check takes, a missing required argument or a bad value.

    >>> [spec.name for spec, _ in plan_checks(["shapes_consistent"], out=("B", 3))]
    ['shapes_consistent']
    """
    specs = all_checks()
    per_check = {k: declared.pop(k) for k in list(declared) if k in specs}
    for name, args in per_check.items():
        if not isinstance(args, dict):
            raise UsageError(f"{name}={args!r}: per-check arguments must be a dict such as"
                             f" {name}={{...}}")
    names = _select(checks)
    names += [n for n in per_check if n not in names]
    if not names:
        raise UsageError(f"checks={checks!r}: an empty selection runs nothing; expected 'default',"
                         " 'all' or a list of check names such as ['grads_finite']")
    used: set = set()
    plans = []
    for name in names:
        spec = specs[name]
        accepted = {p.name for p in spec.user_params}
        kwargs = {k: v for k, v in declared.items() if k in accepted}
        used |= set(kwargs)
        kwargs.update(per_check.get(name, {}))
        missing = [r for r in spec.required if r not in kwargs]
        if missing:
            raise UsageError(f"check {name} needs {', '.join(missing)}=...; pass it as"
                             f" {name}={{{missing[0]!r}: ...}}")
        try:
            plans.append((spec, spec.bind((), kwargs)))
        except UsageError as exc:
            raise UsageError(f"{name}: {exc}") from None
    unknown = sorted(set(declared) - used)
    if unknown:
        raise UsageError(f"{', '.join(unknown)}: not an argument of any selected check"
                         f" ({', '.join(names)}); give it per check, e.g. memory_under={{'limit': '2 GiB'}}")
    return plans


def check_model(model: Any, batch: Any, *, loss: Any = None, checks: Any = "default",
                device: Any = None, threads: Any = "auto", budget: Any = None,
                **declared: Any) -> HealthReport:
    """Run the named checks (or the default set) on ``model`` and an example ``batch``.

    ``declared`` holds what the user knows about the model, given once and routed to every
    selected check that takes an argument of that name (``out=("B", 10)``,
    ``chance_level=math.log(10)``...), or per check as a dict (``model_overfits={"steps": 200}``,
    ``memory_under={"limit": "2 GiB"}``); a per-check dict also selects a check outside the
    default set. A failing check never raises; a usage error does
    (``UsageError``, one line). See the README for how ``batch`` is split into inputs and target.

    ``threads`` is torch's CPU thread count while the checks run: ``"auto"`` (one thread for a
    small model or a loaded machine, see ``core.threads.choose_threads``), ``"keep"`` or a
    number; the process setting is put back afterwards and each result's
    ``metrics["threads"]`` says what was used. ``budget`` (``"60s"``) bounds the time of all
    checks together: once spent, the remaining checks are skipped and say so.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> report = check_model(m, batch, out=("B", 3))
    >>> report.passed, [r.check for r in report.results][:2]
    (True, ['grads_finite', 'shapes_consistent'])
    """
    from .checks.registry import CheckBudget, run_plans, validate_budget
    from .core.batch import Batch
    from .core.forward import count_parameters
    from .core.threads import validate_threads

    try:
        threads = validate_threads(threads)
    except UsageError as exc:
        raise UsageError(f"threads={threads!r}: {exc}") from None
    try:
        seconds = validate_budget(budget)
    except UsageError as exc:
        raise UsageError(f"budget={budget!r}: {exc}") from None
    plans = plan_checks(checks, **declared)
    from .core.state import preserved_globals

    with preserved_globals():  # calling a batch factory must not move the caller's RNG
        data = Batch.from_user(batch, model=model)
    report = HealthReport(model_name=type(model).__name__, parameters=count_parameters(model))
    budget_ = CheckBudget(seconds)
    with budget_.charge():
        choice = choose_for_model(threads, model, data, origin=f"threads={threads}")

    def run(spec: Any, values: dict, left: Any) -> Any:
        return spec.run(values, model=model, batch=data, loss=loss, device=device,
                        budget_left=left)

    from .core.threads import torch_threads

    with torch_threads(choice.count):
        report.results = run_plans(plans, run, budget_)
    for r in report.results:
        r.metrics.setdefault("threads", choice.count)
    return report


def choose_for_model(setting: Any, model: Any, batch: Any = None, *, origin: str = "threads=",
                     timeout: Any = None, load: Any = None) -> Any:
    """``choose_threads(setting)`` for ``model``: with ``"auto"`` the forward FLOPs of ``batch``
    are counted first (``core.facts.model_facts``, on a copy, at the thread budget the machine
    allows) and decide; otherwise nothing runs.

    >>> import torch
    >>> choose_for_model("auto", torch.nn.Linear(4, 3), torch.zeros(2, 4)).count
    1
    """
    from .core.threads import choose_threads, machine_load, torch_threads, validate_threads

    setting = validate_threads(setting)
    if setting != "auto":
        return choose_threads(setting, origin=origin)
    from .core.facts import model_facts

    load = machine_load() if load is None else load
    first = choose_threads("auto", load=load)  # the budget, before the size is known
    with torch_threads(first.count):
        facts = model_facts(model, batch, timeout=timeout)
    return choose_threads("auto", flops=facts.get("flops"), parameters=facts.get("parameters"),
                          load=load)
