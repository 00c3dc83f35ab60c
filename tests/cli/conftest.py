"""A tiny model package written per test, importable by ``--model`` from the test's directory."""
import textwrap

import pytest

TINY = textwrap.dedent('''
    import torch
    from torch import nn


    def build(out=10, features=8):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(features, 16), nn.BatchNorm1d(16), nn.ReLU(),
                             nn.Linear(16, out))


    def make_batch(n):
        return torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
''')

NO_BATCH = textwrap.dedent('''
    import torch


    def build():
        torch.manual_seed(0)
        return torch.nn.Linear(8, 3)
''')


@pytest.fixture
def tiny(tmp_path, monkeypatch, request):
    """The name of a fresh module (``<name>:build``, ``<name>:make_batch``) in the cwd."""
    name = "tiny_" + "".join(c if c.isalnum() else "_" for c in request.node.name)
    (tmp_path / f"{name}.py").write_text(TINY)
    (tmp_path / f"{name}_nobatch.py").write_text(NO_BATCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return name
