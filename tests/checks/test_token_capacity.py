"""token_capacity: ViT3D at growing token counts (forward and backward), the planted position
table that breaks above a token count, a loss that grows with the sequence, and the largest
token count that fits a memory budget (estimated on fake tensors)."""
import pytest
import torch

from example_models import vit3d
from pytest_modelcheck import UsageError
from pytest_modelcheck.checks import token_capacity

SMALL = {"embed_dim": 32, "depth": 1, "num_heads": 2}


class FixedTableViT(vit3d.ViT3D):
    """Planted bug: positions come from a learned table of 200 rows sliced to the sequence
    (``pos[:, :n]``), so any input above 200 tokens no longer matches it."""

    def __init__(self, **cfg):
        super().__init__(**cfg)
        self.pos_table = torch.nn.Parameter(torch.randn(1, 200, cfg["embed_dim"]) * 0.02)

    def forward(self, x):
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        x = x + self.pos_table[:, :x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class SumPoolViT(vit3d.ViT3D):
    """Planted bug: the head reads the sum of the tokens, not their mean, so the output (and
    the loss) grows with the token count."""

    def forward(self, x):
        tokens = self.patch_embed(x)
        grid = tuple(s // self.patch_size for s in x.shape[2:])
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1) + self._pos_for(grid)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).sum(dim=1))


def _model(cls=vit3d.ViT3D, **cfg):
    torch.manual_seed(0)
    return cls(**{**SMALL, **cfg})


def test_planted_fixed_position_table_fails_with_the_token_count():
    r = token_capacity(513, model=_model(FixedTableViT), batch=vit3d.make_batch(2))
    assert r.passed is False
    assert r.headline.startswith("expected finite outputs and a stable loss up to 513 tokens,"
                                 " observed at 217 tokens (size 24): forward raised RuntimeError")
    assert "(217) must match the size of tensor b (200)" in r.headline
    assert r.metrics["failed_at_tokens"] == 217 and r.metrics["tokens"] == [65, 126]


def test_healthy_interpolating_vit3d_passes_and_reports_the_budget():
    r = token_capacity(513, memory_budget="64 MiB", model=_model(interpolate_pos=True),
                       batch=vit3d.make_batch(2))
    assert r.passed is True, r.headline
    assert r.metrics["tokens"] == [65, 126, 217, 344, 513]
    assert r.metrics["max_tokens_in_budget"] >= 513
    assert " tokens (size " in r.headline and "fit in 64.00 MiB (estimated" in r.headline


def test_budget_below_the_expected_token_count_fails():
    r = token_capacity(513, memory_budget="2 MiB", model=_model(interpolate_pos=True),
                       batch=vit3d.make_batch(2))
    assert r.passed is False
    assert "and 513 tokens to fit in 2.00 MiB, observed only " in r.headline
    assert 65 <= r.metrics["max_tokens_in_budget"] < 513


def test_loss_growing_with_the_sequence_fails():
    r = token_capacity(513, model=_model(SumPoolViT, interpolate_pos=True), batch=vit3d.make_batch(2))
    assert r.passed is False
    assert "the example size's" in r.headline and "(max_loss_ratio 10)" in r.headline


def test_fixed_size_vit3d_fails_at_the_first_other_size():
    r = token_capacity(126, model=_model(), batch=vit3d.make_batch(1))
    assert r.passed is False
    assert "observed at 126 tokens (size 20): forward raised ValueError" in r.headline


def test_example_size_already_enough_runs_only_it():
    r = token_capacity(65, model=_model(), batch=vit3d.make_batch(1))
    assert r.passed is True and r.metrics["tokens"] == [65]


def test_no_patch_embedding_skips():
    r = token_capacity(100, model=torch.nn.Linear(4, 2), batch=torch.zeros(2, 4))
    assert r.passed is None


@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_tokens": 0}, "max_tokens=0: expected a positive int"),
    ({"max_tokens": "lots"}, "max_tokens='lots': expected a positive int"),
    ({"max_tokens": 100, "memory_budget": "8 parsecs"}, "memory_budget='8 parsecs':"),
    ({"max_tokens": 100, "phase": "eval"}, "phase='eval': expected 'train' or 'inference'"),
    ({"max_tokens": 100, "max_loss_ratio": 1}, "max_loss_ratio=1: expected a number > 1"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(UsageError) as info:
        token_capacity(**kwargs, model=_model(), batch=vit3d.make_batch(1))
    assert fragment in str(info.value)


def test_bad_marker_arguments_fail_at_setup_in_one_line(healthy_project):
    healthy_project.makepyfile("""
        import pytest
        @pytest.mark.token_capacity(max_tokens=0)
        def test_a(): raise AssertionError("the test body must not run")
        @pytest.mark.token_capacity(513, memory_budget="lots")
        def test_b(): raise AssertionError("the test body must not run")
    """)
    result = healthy_project.runpytest("--modelcheck")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*@pytest.mark.token_capacity: max_tokens=0: expected a positive int*",
                                 "*@pytest.mark.token_capacity: memory_budget='lots': *"])
    out = result.stdout.str()
    assert "Traceback" not in out and "the test body must not run" not in out


def test_model_batch_and_globals_are_unchanged():
    from pytest_modelcheck.core.state import fingerprints_equal, global_state_fingerprint, model_fingerprint

    model, (x, y) = _model(interpolate_pos=True), vit3d.make_batch(2)
    before, x0, state = model_fingerprint(model), x.clone(), global_state_fingerprint()
    token_capacity(217, memory_budget="1 MiB", model=model, batch=(x, y))
    assert not fingerprints_equal(before, model_fingerprint(model))
    assert torch.equal(x, x0) and global_state_fingerprint() == state
