"""The ``modelcheck`` fixture: run checks from a test body (``modelcheck.grads_finite()``,
``modelcheck.check_model()``), recorded like the markers' results."""
from __future__ import annotations

from typing import Any

import pytest

from .checks.registry import CheckSpec, all_checks
from .core.errors import UsageError
from .core.result import CheckResult
from .session import (_budget, _device, _failure_text, _fixture, _loss_fixture, _record,
                      _record_model, _report_details, _run_check, _strict_timing, _threads,
                      _usage_failure, _warn_inconclusive_results, tally_key)



# -- the modelcheck fixture ----------------------------------------------------------------
class ModelCheck:
    """Run checks from inside a test: ``modelcheck.grads_finite()``, ``modelcheck.check_model()``.

    Every check is a method with the check's own arguments; ``model=``, ``batch=``, ``loss=``
    default to the test's ``model``, ``batch`` and ``loss_fn`` fixtures. A failing check fails
    the test with its headline; the result is returned otherwise and always recorded for the
    health summary and JSON report.
    """

    def __init__(self, request: pytest.FixtureRequest):
        self._request = request

    def _subject(self, model: Any, batch: Any, loss: Any) -> tuple:
        cfg = self._request.config
        if model is None:
            model = _fixture(self._request, cfg.getini("modelcheck_model_fixture"), "modelcheck")
        if batch is None:
            batch = _fixture(self._request, cfg.getini("modelcheck_batch_fixture"), "modelcheck")
        if loss is None:
            loss = _loss_fixture(self._request)
        elif loss is False:  # not needed by the caller
            loss = None
        return model, batch, loss

    def _run(self, spec: CheckSpec, args: tuple, kwargs: dict) -> CheckResult:
        from .core.threads import torch_threads

        model, batch, loss = (kwargs.pop(k, None) for k in ("model", "batch", "loss"))
        device = kwargs.pop("device", None) or _device(self._request.config)
        model, batch, loss = self._subject(model, batch, loss)
        node = self._request.node
        budget = _budget(node)
        tally = node.stash.setdefault(tally_key, [0, 0])  # checks asked, checks run
        try:
            values = spec.bind(args, kwargs)
            _strict_timing(self._request.config, [(spec, values)])
            choice = _threads(node, model, batch)
            tally[0] += 1
            if budget.spent_out():
                result = budget.skipped(spec.name, tally[1], tally[0])
            else:
                with torch_threads(choice.count), budget.charge():
                    result = _run_check(node, spec, values, model, batch, loss, device,
                                        budget.left())
                if result.passed is None and result.metrics.get("budget_spent"):
                    skipped = budget.skipped(spec.name, tally[1], tally[0])
                    result.headline, result.details = skipped.headline, skipped.details
                    result.metrics.update(skipped.metrics)
                else:
                    tally[1] += 1
        except UsageError as exc:
            _usage_failure(f"modelcheck.{spec.name}", exc)
        result.metrics.setdefault("threads", choice.count)
        _record(node, result)
        _warn_inconclusive_results(node, [result])
        if result.passed is False:
            _report_details(self._request.node, [result])
            pytest.fail(_failure_text([result]), pytrace=False)
        return result

    def __getattr__(self, name: str) -> Any:
        specs = all_checks()
        if name not in specs:
            raise AttributeError(f"modelcheck has no check {name!r}; known: {', '.join(sorted(specs))}")
        spec = specs[name]

        def method(*args: Any, **kwargs: Any) -> CheckResult:
            return self._run(spec, args, kwargs)

        method.__doc__ = spec.impl.__doc__
        method.__name__ = name
        return method

    def __dir__(self) -> list:
        return sorted(set(super().__dir__()) | set(all_checks()))

    # -- library tools on the test's fixtures (return data; never fail the test) -----------
    def _inputs(self, model: Any, batch: Any) -> tuple:
        from .core.batch import Batch

        model, batch, _ = self._subject(model, batch, False)
        return model, Batch.from_user(batch, model=model)

    def inspect(self, model: Any = None) -> Any:
        """``inspect_model`` on the test's model: parameter counts, module types, tensor stats."""
        from .core.inspect import inspect_model

        return inspect_model(self._subject(model, False, False)[0])

    def trace(self, model: Any = None, batch: Any = None) -> Any:
        """The forward data flow (module calls, shapes, dtypes, ranges) on the test's batch."""
        from .core.batch import copy_model
        from .core.trace import trace_batch

        model, data = self._inputs(model, batch)
        return trace_batch(copy_model(model).eval(), data.clone())

    def count_flops(self, model: Any = None, batch: Any = None, *, backward: bool = False) -> Any:
        """MACs and FLOPs (FLOPs = 2 x MACs) of one forward (and backward) on the test's batch."""
        from .core.batch import copy_model
        from .core.flops import count_flops

        model, data = self._inputs(model, batch)
        return count_flops(copy_model(model), *data.args, backward=backward, **data.kwargs)

    def estimate_memory(self, model: Any = None, batch: Any = None, **kwargs: Any) -> Any:
        """``estimate_memory`` of a training step (no real allocation) on the test's batch."""
        from .core.memory import estimate_memory

        model, data = self._inputs(model, batch)
        return estimate_memory(model, data, **kwargs)

    def profile(self, model: Any = None, make_batch: Any = None, **kwargs: Any) -> Any:
        """``profile_model`` over batch sizes; ``make_batch`` defaults to the batch fixture
        when it is a factory."""
        from .core.profiler import profile_model

        model, batch, _ = self._subject(model, make_batch, False)
        if not callable(batch):
            _usage_failure("modelcheck.profile", "needs a make_batch(batch_size) factory: pass"
                                                 " make_batch= or make the batch fixture return one")
        return profile_model(model, batch, **kwargs)

    def check_model(self, model: Any = None, batch: Any = None, *, loss: Any = None,
                    checks: Any = "default", device: Any = None, fail: bool = True,
                    **declared: Any) -> Any:
        """``pytest_modelcheck.check_model`` on the test's fixtures; fails on any failed check."""
        from .api import check_model

        model, batch, loss = self._subject(model, batch, loss)
        node = self._request.node
        budget = _budget(node)
        try:
            choice = _threads(node, model, batch)
            if budget.spent_out():
                from .api import plan_checks
                from .core.result import HealthReport

                names = [spec.name for spec, _ in plan_checks(checks, **declared)]
                report = HealthReport([budget.skipped(n, 0, len(names)) for n in names],
                                      type(model).__name__)
            else:
                with budget.charge():
                    report = check_model(model, batch, loss=loss, checks=checks,
                                         device=device or _device(self._request.config),
                                         threads=choice.count, budget=budget.left(),
                                         **declared)
        except UsageError as exc:
            _usage_failure("modelcheck.check_model", exc)
        _record_model(self._request.node, model, batch)
        for r in report.results:
            _record(self._request.node, r)
        _warn_inconclusive_results(node, report.results)
        if fail and report.failed:
            _report_details(self._request.node, report.failed)
            pytest.fail(_failure_text(report.failed), pytrace=False)
        return report


@pytest.fixture
def modelcheck(request: pytest.FixtureRequest) -> ModelCheck:
    """Run model checks from a test body: ``modelcheck.grads_finite()``, ``modelcheck.check_model()``."""
    return ModelCheck(request)

