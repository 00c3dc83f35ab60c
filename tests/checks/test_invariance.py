"""permutation_invariant, permutation_equivariant, padding_invariant: planted bugs, healthy twins,
inputs by position, dict key and keyword, and usage errors."""
import pytest
import torch
from torch import nn

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.invariance import (
    padding_invariant,
    permutation_equivariant,
    permutation_invariant,
)

B, N, F = 4, 6, 3  # events, set elements, features


def _sets(n=N, seed=0):
    return torch.randn(B, n, F, generator=torch.Generator().manual_seed(seed))


class DeepSets(nn.Module):
    """rho(pool(phi(x))) over dim 1; ``bug`` plants positional information."""

    def __init__(self, bug=None, pool="sum"):
        super().__init__()
        torch.manual_seed(0)
        self.phi = nn.Sequential(nn.Linear(F, 16), nn.ReLU(), nn.Linear(16, 16))
        self.rho = nn.Linear(16, 2)
        self.position = nn.Parameter(torch.randn(1, N, F))
        self.bug, self.pool = bug, pool

    def forward(self, x):
        if self.bug == "position_embedding":
            x = x + self.position
        h = self.phi(x)
        if self.bug == "first_element":
            h = torch.cat([h[:, :1] * 2.0, h[:, 1:]], dim=1)  # element 0 special-cased
        pooled = h.sum(1) if self.pool == "sum" else h.max(1).values
        if self.bug == "flatten":
            pooled = pooled + h.reshape(h.shape[0], -1)[:, :16]
        return self.rho(pooled)


class Equivariant(nn.Module):
    """Per-element features plus a pooled context (a DeepSets equivariant layer)."""

    def __init__(self, bug=None):
        super().__init__()
        torch.manual_seed(0)
        self.own = nn.Linear(F, 8)
        self.ctx = nn.Linear(F, 8)
        self.bug = bug

    def forward(self, x):
        out = self.own(x) + self.ctx(x.mean(1, keepdim=True))
        if self.bug == "cumsum":
            out = out.cumsum(1)  # each element sees the elements before it
        return out, out.sum(1)  # per element (permuted) and pooled (unchanged)


def test_permutation_invariant_passes_on_symmetric_pooling():
    for pool in ("sum", "max"):
        r = permutation_invariant(1, model=DeepSets(pool=pool), batch=_sets())
        assert r.passed is True, r.headline
        assert r.headline == ("expected outputs unchanged when input[0] is permuted along dim 1,"
                              " observed equal outputs for 3 random permutations of 6 elements")


@pytest.mark.parametrize("bug", ["position_embedding", "first_element", "flatten"])
def test_permutation_invariant_catches_positional_leaks(bug):
    r = permutation_invariant(1, model=DeepSets(bug), batch=_sets())
    assert r.passed is False
    assert r.headline.startswith("expected outputs unchanged when input[0] is permuted along dim 1,"
                                 " observed max |diff| ")
    assert " in output at sample " in r.headline and "(permutation [" in r.headline
    assert "position embedding" in r.details


def test_permutations_are_seeded_and_never_the_identity():
    a = permutation_invariant(1, model=DeepSets("first_element"), batch=_sets())
    b = permutation_invariant(1, model=DeepSets("first_element"), batch=_sets())
    assert a.headline == b.headline
    # two elements: the only non-identity permutation is the swap
    r = permutation_invariant(1, trials=1, model=DeepSets("first_element"), batch=_sets()[:, :2])
    assert "(permutation [1, 0])" in r.headline


def test_permutation_equivariant_passes_and_catches_cumsum():
    r = permutation_equivariant(1, model=Equivariant(), batch=_sets())
    assert r.passed is True, r.headline
    r = permutation_equivariant(1, model=Equivariant("cumsum"), batch=_sets())
    assert r.passed is False
    assert r.headline.startswith("expected outputs permuted along dim 1 when input[0] is permuted"
                                 " along dim 1, observed max |diff| ")
    assert "in output[0]" in r.headline


def test_permutation_equivariant_over_the_batch_dimension():
    model = nn.Sequential(nn.Linear(F, 4), nn.BatchNorm1d(4)).eval()
    x = torch.randn(8, F, generator=torch.Generator().manual_seed(1))
    assert permutation_equivariant(0, model=model, batch=x).passed is True
    assert permutation_invariant(0, model=model, batch=x).passed is False  # rows move


class DictSets(nn.Module):
    def __init__(self, masked=True):
        super().__init__()
        torch.manual_seed(0)
        self.phi = nn.Linear(F, 8)
        self.rho = nn.Linear(8, 2)
        self.masked = masked

    def forward(self, batch):
        h = self.phi(batch["x"])
        m = batch["mask"].unsqueeze(-1).to(h.dtype)
        if self.masked:
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            pooled = h.mean(1)  # mean over padded positions too
        return self.rho(pooled)


def _dict_batch(n=N):
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[0, -2:] = False  # the first event has two padded elements already
    return {"x": _sets(n), "mask": mask, "targets": torch.zeros(B, 2)}


def test_inputs_named_by_dict_key_are_permuted_together():
    r = permutation_invariant(1, input_index=("x", "mask"), model=DictSets(), batch=_dict_batch())
    assert r.passed is True, r.headline
    # permuting the features without their mask moves padding onto real elements
    r = permutation_invariant(1, input_index="x", model=DictSets(), batch=_dict_batch())
    assert r.passed is False
    assert "input['x'] is permuted" in r.headline


def test_padding_invariant_passes_with_masked_pooling_and_catches_plain_mean():
    r = padding_invariant("mask", input_index="x", model=DictSets(), batch=_dict_batch())
    assert r.passed is True, r.headline
    r = padding_invariant("mask", input_index="x", model=DictSets(masked=False), batch=_dict_batch())
    assert r.passed is False
    assert r.headline.startswith("expected outputs unchanged when 3 elements masked by"
                                 " input['mask'] are appended along dim 1, observed max |diff| ")
    assert "at sample " in r.headline
    assert "pool with the mask" in r.details


class Attention(nn.Module):
    """Self-attention over a set with a key_padding_mask (True = padding), then a masked mean."""

    def __init__(self, use_mask=True):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(F, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.use_mask = use_mask

    def forward(self, x, pad_mask):
        h = self.proj(x)
        h, _ = self.attn(h, h, h, key_padding_mask=pad_mask if self.use_mask else None,
                         need_weights=False)
        keep = (~pad_mask).unsqueeze(-1).to(h.dtype)
        return (h * keep).sum(1) / keep.sum(1)


def test_padding_invariant_with_a_key_padding_mask_as_positional_input():
    x, pad_mask = _sets(), torch.zeros(B, N, dtype=torch.bool)
    r = padding_invariant(1, pad_flag=True, model=Attention(), batch=((x, pad_mask), None))
    assert r.passed is True, r.headline
    r = padding_invariant(1, pad_flag=True, model=Attention(use_mask=False), batch=((x, pad_mask), None))
    assert r.passed is False
    # the wrong mask convention is caught as well: 'False' would mark the new elements as real
    r = padding_invariant(1, pad_flag=False, model=Attention(), batch=((x, pad_mask), None))
    assert r.passed is False


def test_padding_invariant_compares_per_element_outputs_on_the_real_positions():
    class PerElement(nn.Module):
        def forward(self, x, mask):
            return x * 2 * mask.unsqueeze(-1)

    x, mask = _sets(), torch.ones(B, N)
    r = padding_invariant(1, model=PerElement(), batch=((x, mask), None))
    assert r.passed is True, r.headline


def test_keyword_inputs():
    class Kw(nn.Module):
        def forward(self, x=None, mask=None):
            return (x * mask.unsqueeze(-1)).sum(1)

    from pytest_modelcheck import Batch

    batch = Batch(kwargs={"x": _sets(), "mask": torch.ones(B, N)})
    assert permutation_invariant(1, input_index=("x", "mask"), model=Kw(), batch=batch).passed is True
    assert padding_invariant("mask", input_index="x", model=Kw(), batch=batch).passed is True


@pytest.mark.parametrize("kwargs, message", [
    ({"dim": "1"}, r"^dim='1': expected an int"),
    ({"dim": 1, "input_index": 1.5}, r"^input_index=1.5: expected a positional input index"),
    ({"dim": 1, "input_index": ()}, r"^input_index=\(\): expected a positional input index"),
    ({"dim": 1, "trials": 0}, r"^trials=0: expected an int >= 1"),
    ({"dim": 1, "atol": -1}, r"^atol=-1: expected a number >= 0"),
    ({"dim": 1, "rtol": "x"}, r"^rtol='x': expected a number >= 0"),
])
def test_permutation_checks_reject_bad_arguments(kwargs, message):
    for check in (permutation_invariant, permutation_equivariant):
        with pytest.raises(UsageError, match=message):
            check(**kwargs, model=DeepSets(), batch=_sets())


def test_permutation_checks_reject_arguments_that_do_not_fit_the_inputs():
    with pytest.raises(UsageError, match=r"^dim=5: input\[0\] has shape \[4, 6, 3\]"):
        permutation_invariant(5, model=DeepSets(), batch=_sets())
    with pytest.raises(UsageError, match=r"^input_index 2: the model takes 1 positional input"):
        permutation_invariant(1, input_index=2, model=DeepSets(), batch=_sets())
    with pytest.raises(UsageError, match=r"^input key 'y': not among the model's inputs"):
        permutation_invariant(1, input_index="y", model=DictSets(), batch=_dict_batch())
    with pytest.raises(UsageError, match=r"^dim=1: input\[0\] has size 1 there; nothing to permute"):
        permutation_invariant(1, model=DeepSets(), batch=_sets()[:, :1])
    with pytest.raises(UsageError, match=r"^out_dim=2: no output has size 6 there"):
        permutation_equivariant(1, out_dim=2, model=Equivariant(), batch=_sets())
    with pytest.raises(UsageError, match=r"^out_dim='1': expected an int"):
        permutation_equivariant(1, out_dim="1", model=Equivariant(), batch=_sets())


@pytest.mark.parametrize("kwargs, message", [
    ({"mask": 1.0}, r"^mask=1.0: expected the positional index \(int\) or key \(str\)"),
    ({"mask": "mask", "input_index": "mask"}, r"^input_index='mask': names the mask 'mask'"),
    ({"mask": "mask", "input_index": "x", "pad": 0}, r"^pad=0: expected an int >= 1"),
    ({"mask": "mask", "input_index": "x", "dim": None}, r"^dim=None: expected an int"),
    ({"mask": "mask", "input_index": "x", "pad_flag": "pad"}, r"^pad_flag='pad': expected the mask value"),
    ({"mask": "mask", "input_index": "x", "pad_value": "zero"}, r"^pad_value='zero': expected a number"),
])
def test_padding_invariant_rejects_bad_arguments(kwargs, message):
    with pytest.raises(UsageError, match=message):
        padding_invariant(**kwargs, model=DictSets(), batch=_dict_batch())


def test_padding_invariant_rejects_inputs_of_another_size():
    batch = _dict_batch()
    batch["x"] = batch["x"][:, :4]
    with pytest.raises(UsageError, match=r"^dim=1: input\['x'\] has size 4 there, the mask 6"):
        padding_invariant("mask", input_index="x", model=DictSets(), batch=batch)


def test_checks_leave_the_model_and_batch_alone():
    model, batch = DeepSets("first_element"), _sets()
    before = [p.detach().clone() for p in model.parameters()], batch.clone()
    model.train()
    permutation_invariant(1, model=model, batch=batch)
    padding_invariant("mask", input_index="x", model=DictSets(masked=False), batch=_dict_batch())
    assert model.training
    assert all(torch.equal(a, p) for a, p in zip(before[0], model.parameters()))
    assert torch.equal(before[1], batch)


def test_padding_invariant_can_pad_the_mask_alone():
    class CountReal(nn.Module):
        def forward(self, mask):
            return mask.sum(1, keepdim=True)

    mask = torch.ones(B, N)
    assert padding_invariant(0, input_index=(), model=CountReal(), batch=mask).passed is True
    r = padding_invariant(0, input_index=(), pad_flag=1, model=CountReal(), batch=mask)
    assert r.passed is False  # 'padding' marked as real elements is counted: 6 -> 9
    assert "observed max |diff| 3 in output at sample 0" in r.headline
