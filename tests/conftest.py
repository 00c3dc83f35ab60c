"""Shared helpers for the project's own tests."""
import textwrap

import pytest
# Imported here, in the outer process, so that pytester's in-process runs never import torch
# for the first time: pytester restores sys.modules after each run, and importing torch twice in
# one process crashes it.
import torch  # noqa: F401

# A healthy model and batch as a conftest for pytester-made test projects.
HEALTHY_CONFTEST = textwrap.dedent('''
    import pytest
    import torch

    @pytest.fixture
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))

    @pytest.fixture
    def batch():
        g = torch.Generator().manual_seed(0)
        return torch.randn(16, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
''')


@pytest.fixture(autouse=True)
def _subprocess_runs_are_not_xdist_workers(request, monkeypatch):
    """pytester's subprocess runs inherit the environment: under ``-n``, an xdist worker's
    variables would make them look like workers to other plugins (older pytest-benchmark then
    warns at start-up, an error under ``-W error``)."""
    if "pytester" in request.fixturenames:
        for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def healthy_project(pytester):
    """A pytester project whose conftest provides a healthy ``model`` and ``batch``."""
    pytester.makeconftest(HEALTHY_CONFTEST)
    return pytester
