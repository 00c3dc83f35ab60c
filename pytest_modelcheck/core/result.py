"""Result types shared by every check: plain dataclasses with builtin-typed fields.

They serialize to JSON, travel through pytest-xdist reports as ``user_properties`` and land
in JUnit XML. Nothing here imports torch or pytest.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


def _builtin(value: Any) -> Any:
    """Turn numbers from torch/numpy and containers into JSON-friendly builtins."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_builtin(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # 0-d tensor or numpy scalar
        try:
            return _builtin(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


@dataclass
class CheckResult:
    """The outcome of one check on one model.

    ``passed`` is True, False, or None when the check was skipped (``skip_reason`` says why).
    ``headline`` is one line, "expected ... , observed ..."; ``details`` is multi-line evidence;
    ``metrics`` holds numbers and short strings only.

    >>> r = CheckResult("grads_finite", True, "expected finite gradients, observed 12/12 finite")
    >>> r.status
    'passed'
    >>> CheckResult.from_dict(r.to_dict()) == r
    True
    """

    check: str
    passed: Optional[bool]
    headline: str
    details: str = ""
    metrics: dict = field(default_factory=dict)
    arguments: dict = field(default_factory=dict)
    estimated: bool = False
    duration_s: float = 0.0

    def __post_init__(self) -> None:
        self.metrics = _builtin(dict(self.metrics))
        self.arguments = _builtin(dict(self.arguments))

    @property
    def status(self) -> str:
        return {True: "passed", False: "failed", None: "skipped"}[self.passed]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "CheckResult":
        data = {k: v for k, v in data.items() if k != "status"}
        return cls(**data)

    def format(self) -> str:
        """Headline plus indented details, as printed in a failure."""
        text = f"[{self.check}] {self.headline}"
        if self.details:
            text += "\n" + "\n".join("    " + line for line in self.details.splitlines())
        return text


@dataclass
class HealthReport:
    """All check results for one model.

    >>> rep = HealthReport([CheckResult("a", True, "ok"), CheckResult("b", False, "bad")])
    >>> (rep.passed, [r.check for r in rep.failed])
    (False, ['b'])
    """

    results: list = field(default_factory=list)
    model_name: str = ""
    parameters: Optional[int] = None

    @property
    def passed(self) -> bool:
        """True when no check failed (skipped checks do not fail a model)."""
        return not self.failed

    @property
    def failed(self) -> list:
        return [r for r in self.results if r.passed is False]

    @property
    def skipped(self) -> list:
        return [r for r in self.results if r.passed is None]

    def __getitem__(self, check: str) -> CheckResult:
        for r in self.results:
            if r.check == check:
                return r
        raise KeyError(check)

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "parameters": self.parameters,
            "passed": self.passed,
            "results": [r.to_dict() for r in self.results],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        """One line per check: status, name and headline."""
        marks = {True: "PASS", False: "FAIL", None: "SKIP"}
        return "\n".join(f"{marks[r.passed]:4} {r.check:22} {r.headline}" for r in self.results)
