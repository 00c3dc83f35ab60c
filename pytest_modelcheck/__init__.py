"""pytest-modelcheck: PyTorch model diagnostics as test assertions.

The library is usable without pytest::

    from pytest_modelcheck import check_model
    report = check_model(model, (x, y), out=("B", 10))

Importing this package does not import torch; the names below load on first use.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckResult": "pytest_modelcheck.core.result",
    "HealthReport": "pytest_modelcheck.core.result",
    "UsageError": "pytest_modelcheck.core.errors",
    "ModelError": "pytest_modelcheck.core.errors",
    "Batch": "pytest_modelcheck.core.batch",
    "check_model": "pytest_modelcheck.api",
    "trace_model": "pytest_modelcheck.core.trace",
    "FlowTrace": "pytest_modelcheck.core.trace",
    "inspect_model": "pytest_modelcheck.core.inspect",
    "dump_model_info": "pytest_modelcheck.core.inspect",
    "ModelInfo": "pytest_modelcheck.core.inspect",
    "inspect_checkpoint": "pytest_modelcheck.core.checkpoint",
    "compare_checkpoints": "pytest_modelcheck.core.checkpoint",
    "CheckpointError": "pytest_modelcheck.core.checkpoint",
    "plan_checks": "pytest_modelcheck.api",
    "count_flops": "pytest_modelcheck.core.flops",
    "FlopReport": "pytest_modelcheck.core.flops",
    "estimate_memory": "pytest_modelcheck.core.memory",
    "profile_model": "pytest_modelcheck.core.profiler",
    "parse_bytes": "pytest_modelcheck.core.units",
    "parse_rate": "pytest_modelcheck.core.units",
}

__all__ = sorted(_EXPORTS) + ["checks", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name == "checks":
        import importlib

        return importlib.import_module("pytest_modelcheck.checks")
    raise AttributeError(f"module 'pytest_modelcheck' has no attribute {name!r}")
