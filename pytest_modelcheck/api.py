"""``check_model``: run a set of checks on one model and batch, outside or inside pytest."""
from __future__ import annotations

from typing import Any

from .checks.registry import all_checks, default_checks, get_check
from .core.errors import UsageError
from .core.result import HealthReport


def _select(checks: Any, declared: dict) -> list:
    if checks == "default":
        names = default_checks()
        # a declared argument that only an opt-in check takes selects that check too
        for name, spec in all_checks().items():
            if name not in names and spec.required and all(r in declared for r in spec.required):
                names.append(name)
        return names
    if checks == "all":
        return list(all_checks())
    if isinstance(checks, str):
        checks = [checks]
    if not isinstance(checks, (list, tuple)) or not all(isinstance(c, str) for c in checks):
        raise UsageError(f"checks={checks!r}: expected 'default', 'all' or a list of check names")
    for c in checks:
        get_check(c)
    return list(checks)


def check_model(model: Any, batch: Any, *, loss: Any = None, checks: Any = "default",
                device: Any = None, **declared: Any) -> HealthReport:
    """Run the named checks (or the default set) on ``model`` and an example ``batch``.

    ``declared`` holds what the user knows about the model, given once and routed to every
    selected check that takes an argument of that name (``out=("B", 10)``,
    ``chance_level=math.log(10)``, ``limit="2 GiB"``...), or per check as a dict
    (``model_overfits={"steps": 200}``). A failing check never raises; a usage error does
    (``UsageError``, one line). See the README for how ``batch`` is split into inputs and target.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> report = check_model(m, batch, out=("B", 3))
    >>> report.passed, [r.check for r in report.results][:2]
    (True, ['grads_finite', 'shapes_consistent'])
    """
    from .core.batch import Batch
    from .core.forward import count_parameters

    specs = all_checks()
    per_check = {k: declared.pop(k) for k in list(declared) if k in specs}
    for name, args in per_check.items():
        if not isinstance(args, dict):
            raise UsageError(f"{name}={args!r}: per-check arguments must be a dict such as"
                             f" {name}={{...}}")
    names = _select(checks, declared)
    for name in per_check:
        if name not in names:
            names.append(name)
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
            raise UsageError(f"check {name} needs {', '.join(missing)}=...; pass it to check_model"
                             f" or as {name}={{...}}")
        try:
            plans.append((spec, spec.bind((), kwargs)))
        except UsageError as exc:
            raise UsageError(f"{name}: {exc}") from None
    unknown = sorted(set(declared) - used)
    if unknown:
        raise UsageError(f"{', '.join(unknown)}: not an argument of any selected check"
                         f" ({', '.join(names)})")
    from .core.state import preserved_globals

    with preserved_globals():  # calling a batch factory must not move the caller's RNG
        data = Batch.from_user(batch)
    report = HealthReport(model_name=type(model).__name__, parameters=count_parameters(model))
    for spec, values in plans:
        report.results.append(spec.run(values, model=model, batch=data, loss=loss, device=device))
    return report
