"""Every docstring example in the package runs and prints what it shows."""
from __future__ import annotations

import doctest
import importlib
import pkgutil
import tempfile

import pytest

import pytest_modelcheck

MODULES = sorted(m.name for m in pkgutil.walk_packages(pytest_modelcheck.__path__,
                                                        "pytest_modelcheck."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, tmp_path, monkeypatch) -> None:
    # the examples' tempfile.mkdtemp() directories go under pytest's own temporary tree
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
