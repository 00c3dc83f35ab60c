"""Every diagnosis at the right line: a bug planted in the ROOT module's own ``forward`` is
named as the root's (``<root>``), with the op and the user's source line, by batch_independent
(a view that interleaves samples), memory_under (a broadcast intermediate) and operator_stable
(the op that produced the NaN). Expected lines come from a marker comment, never hard-coded."""
import inspect

import torch
from torch import nn

from pytest_modelcheck.checks.behaviour import batch_independent
from pytest_modelcheck.checks.memory import memory_under
from pytest_modelcheck.checks.stability import operator_stable
from pytest_modelcheck.core.batch import Batch

B, T, F, H = 4, 5, 6, 8


def _line(cls, marker):
    """Line number of the source line of ``cls.forward`` holding ``marker``."""
    lines, start = inspect.getsourcelines(cls.forward)
    hits = [start + k for k, text in enumerate(lines) if marker in text]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


class ViewInRoot(nn.Module):
    """(B, T, F) -> per-token Linear -> pooled over T -> head. ``bug``: the root's own forward
    moves T in front with ``view`` (which interleaves samples) instead of ``transpose``."""

    def __init__(self, bug=True):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(F, H)
        self.out = nn.Linear(H, 3)
        self.bug = bug

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        if self.bug:
            h = h.view(t, b, -1)  # planted: view mixes samples
        else:
            h = h.transpose(0, 1)
        return self.out(h.mean(0))


class TokenViewInRoot(nn.Module):
    """The same planted view in a token model's own forward (ids only, no gradient path)."""

    def __init__(self, bug=True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, H)
        self.out = nn.Linear(H, 30)
        self.bug = bug

    def forward(self, input_ids):
        b, t = input_ids.shape
        h = self.emb(input_ids)
        h = h.reshape(t, b, -1) if self.bug else h.transpose(0, 1)  # planted: token reshape
        return self.out(h.mean(0))


def test_batch_independent_names_the_root_and_the_line_of_the_view():
    x = torch.randn(B, T, F, generator=torch.Generator().manual_seed(0))
    r = batch_independent(model=ViewInRoot(), batch=x)
    assert r.passed is False
    line = _line(ViewInRoot, "# planted: view mixes samples")
    assert r.metrics["module"] == "<root>"  # not 'out', the next module
    assert r.metrics["source"].endswith(f"test_diagnosis_lines.py:{line} in forward")
    assert f"first mixing in module '<root>' (ViewInRoot) by aten.view at " in r.headline
    assert f"test_diagnosis_lines.py:{line} in forward" in r.headline
    assert batch_independent(model=ViewInRoot(bug=False), batch=x).passed is True


def test_batch_independent_names_the_root_line_for_token_inputs():
    ids = torch.randint(0, 30, (B, T), generator=torch.Generator().manual_seed(0))
    r = batch_independent(model=TokenViewInRoot(), batch=ids)
    assert r.passed is False
    line = _line(TokenViewInRoot, "# planted: token reshape")
    assert r.metrics["module"] == "<root>"
    assert r.metrics["source"].endswith(f"test_diagnosis_lines.py:{line} in forward")
    assert batch_independent(model=TokenViewInRoot(bug=False), batch=ids).passed is True


class PairwiseInRoot(nn.Module):
    """The root's own forward builds a (B, H, H) pairwise product by broadcasting."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(F, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        h = self.inp(x)
        pair = h[:, :, None] * h[:, None, :]  # planted: broadcast intermediate
        return self.head(pair.sum(-1))


def test_memory_under_attributes_the_roots_own_ops_with_the_line():
    x = torch.randn(16, F, generator=torch.Generator().manual_seed(0))
    line = _line(PairwiseInRoot, "# planted: broadcast intermediate")
    for phase in ("inference", "train"):
        r = memory_under("1 KiB", phase=phase, model=PairwiseInRoot(), batch=Batch.from_user(x))
        assert r.passed is False
        name, size = r.metrics["top_modules"][0]  # the largest: 16*64*64*4 = 256 KiB
        assert size == 16 * 64 * 64 * 4, (phase, r.metrics["top_modules"])
        assert name.startswith("<root> (PairwiseInRoot) own ops, largest aten.mul at ")
        assert name.endswith(f"test_diagnosis_lines.py:{line} in forward")
        assert name in r.details


def test_memory_under_sequential_root_has_no_own_ops_row():
    m = nn.Sequential(nn.Linear(F, 32), nn.ReLU(), nn.Linear(32, 3))
    r = memory_under("1 GiB", model=m, batch=torch.randn(8, F))
    assert all(not name.startswith("<root>") for name, _ in r.metrics["top_modules"])


class SumNormInRoot(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(F, 2)

    def forward(self, x):
        h = x / x.sum(-1, keepdim=True)  # planted: 0/0 on a zero row
        return self.head(h)


def test_operator_stable_names_the_op_and_line_that_made_the_nan():
    x = torch.rand(B, F, generator=torch.Generator().manual_seed(0))
    r = operator_stable(examples=10, model=SumNormInRoot(), batch=x)
    assert r.passed is False
    line = _line(SumNormInRoot, "# planted: 0/0")
    origin = r.metrics["origin"]
    assert "first produced in forward by div in module '<root>' (SumNormInRoot)" in origin
    assert origin.endswith(f"test_diagnosis_lines.py:{line} in forward")
    assert origin in r.headline and f"origin: {origin}" in r.details
