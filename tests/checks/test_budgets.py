"""flops_under and params_under, called directly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_modelcheck.checks.budgets import flops_under, params_under
from pytest_modelcheck.core.errors import UsageError
from pytest_modelcheck.core.state import fingerprints_equal, model_fingerprint


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def small_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)


# forward: 2*4*16*8 + 2*4*4*16 = 1024 + 512 = 1536 FLOPs (768 MACs)


def test_flops_under_passes_a_healthy_budget():
    r = flops_under("2k", model=small_model(), batch=small_batch())
    assert r.passed is True, r.format()
    assert r.headline == ("expected forward FLOPs under 2.00k, observed 1.54k (768 MACs;"
                          " FLOPs = 2 x MACs)")
    assert r.metrics["flops"] == 1536 and r.metrics["macs"] == 768


def test_flops_under_fails_an_oversized_model_naming_modules_and_ops():
    big = nn.Sequential(nn.Linear(8, 1024), nn.ReLU(), nn.Linear(1024, 4))  # planted: too wide
    r = flops_under("2k", model=big, batch=small_batch())
    # 2*4*1024*8 + 2*4*4*1024 = 65536 + 32768 = 98304
    assert r.passed is False
    assert r.headline == ("expected forward FLOPs under 2.00k, observed 98.30k (49.15k MACs;"
                          " FLOPs = 2 x MACs)")
    assert "costliest modules: '0' 65.54k, '2' 32.77k" in r.details
    assert "aten.addmm" in r.details and "over the limit by" in r.details
    assert "aten.relu" in r.details  # the uncovered ops are listed


def test_flops_under_backward():
    r = flops_under("10k", True, model=small_model(), batch=small_batch())
    # backward: dW of both layers (1024 + 512) and dX of the second (512) = 2048
    assert r.passed is True
    assert "forward+backward FLOPs under 10.00k, observed 3.58k" in r.headline
    assert "forward 1.54k, backward 2.05k" in r.headline
    assert r.metrics["backward_flops"] == 2048


def test_flops_under_counts_cpu_attention():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 5, 3, 1, 8).permute(2, 0, 3, 1, 4)
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    r = flops_under("1M", model=Attn(), batch=torch.randn(2, 5, 8))
    # qkv 2*10*24*8 = 3840; attention 2*2*1*5*5*8 * 2 = 1600
    assert r.metrics["flops"] == 5440


def test_flops_under_leaves_the_model_untouched():
    model, batch = small_model(), small_batch()
    model.eval()
    before = model_fingerprint(model)
    x0 = batch[0].clone()
    flops_under("1", True, model=model, batch=batch)
    assert fingerprints_equal(before, model_fingerprint(model)) == []
    assert torch.equal(batch[0], x0)


@pytest.mark.parametrize("args, message", [
    (("lots",), "limit='lots': expected a count such as"),
    ((0,), "limit=0: expected a positive count such as '4.1G' (FLOPs)"),
    (("1G", "yes"), "backward='yes': expected True or False"),
])
def test_flops_under_bad_arguments(args, message):
    with pytest.raises(UsageError) as info:
        flops_under(*args, model=small_model(), batch=small_batch())
    assert message in str(info.value) and "\n" not in str(info.value)


class Tied(nn.Module):
    def __init__(self, vocab=100, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


def test_params_under_counts_tied_weights_once():
    r = params_under("2k", model=Tied(), batch=torch.zeros(2, 3, dtype=torch.long))
    # embed 100*16 = 1600 (the head shares it), body 16*16 + 16 = 272: 1872
    assert r.passed is True
    assert r.headline == ("expected parameters under 2.00k, observed 1.87k (largest module"
                          " types: Embedding 1.60k, Linear 272)")
    assert r.metrics["params"] == 1872
    assert "'head.weight' is 'embed.weight'" in r.details


def test_params_under_fails_an_oversized_model():
    r = params_under("1k", model=Tied(vocab=1000), batch=torch.zeros(2, 3, dtype=torch.long))
    # 1000*16 + 272 = 16272
    assert r.passed is False
    assert r.headline.startswith("expected parameters under 1.00k, observed 16.27k"
                                 " (largest module types: Embedding 16.00k, Linear 272)")
    assert "over the limit by 15.27k" in r.details


def test_params_under_trainable_only():
    model = Tied()
    model.embed.requires_grad_(False)
    r = params_under(300, trainable_only=True, model=model, batch=torch.zeros(1, dtype=torch.long))
    assert r.passed is True and r.metrics["params"] == 272
    assert r.headline.startswith("expected trainable parameters under 300, observed 272")


@pytest.mark.parametrize("args, message", [
    (("-5",), "limit='-5'"),
    (("1M", 1), "trainable_only=1: expected True or False"),
])
def test_params_under_bad_arguments(args, message):
    with pytest.raises(UsageError) as info:
        params_under(*args, model=Tied(), batch=torch.zeros(1, dtype=torch.long))
    assert message in str(info.value) and "\n" not in str(info.value)
