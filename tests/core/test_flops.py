"""core.flops: hand-derived counts (FLOPs = 2 x MACs), attention kernels, coverage, references."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pytest_modelcheck.core.errors import UsageError
from pytest_modelcheck.core.flops import FREE_OPS, count_flops, count_flops_batch
from tests import reference_models


def flops(model, *inputs, **kwargs):
    return count_flops(model, *inputs, **kwargs).flops


def test_linear_and_report_fields():
    torch.manual_seed(0)
    r = count_flops(nn.Linear(8, 16), torch.randn(4, 8))
    # 2*M*N*K = 2*4*16*8 = 1024 FLOPs, 512 MACs; no backward asked
    assert (r.flops, r.macs, r.forward_flops, r.backward_flops) == (1024, 512, 1024, 0)
    assert r.by_operator == {"aten.addmm": 1024}
    assert r.by_module == {"": 1024}
    assert "FLOPs = 2 x MACs" in r.convention
    assert json.loads(json.dumps(r.to_dict()))["macs"] == 512
    assert "aten.addmm" in r.render() and "<model>" in r.render()


@pytest.mark.parametrize("layer, shape, expected", [
    # Conv1d 3->8, k=5, L 32->28: 2 * B*Cout*Lout * Cin*k = 2 * 2*8*28 * 3*5 = 13440
    (nn.Conv1d(3, 8, 5), (2, 3, 32), 13440),
    # Conv2d 3->8, 3x3, pad 1, 16x16 kept: 2 * 2*8*16*16 * 3*9 = 221184
    (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 16, 16), 221184),
    # Conv3d 2->4, 3x3x3, 6^3 -> 4^3: 2 * 1*4*64 * 2*27 = 27648
    (nn.Conv3d(2, 4, 3), (1, 2, 6, 6, 6), 27648),
    # grouped Conv2d 4->8, groups 2, 8x8 kept: 2 * 1*8*64 * (4/2)*9 = 18432
    (nn.Conv2d(4, 8, 3, padding=1, groups=2), (1, 4, 8, 8), 18432),
    # depthwise Conv2d 6->6, groups 6: 2 * 1*6*10*10 * 1*9 = 10800
    (nn.Conv2d(6, 6, 3, padding=1, groups=6), (1, 6, 10, 10), 10800),
    # ConvTranspose2d 4->2, 3x3, stride 2: every input pixel meets every kernel tap of every
    # output channel: 2 * B*Cin*H*W * Cout*kh*kw = 2 * 1*4*5*5 * 2*9 = 3600
    (nn.ConvTranspose2d(4, 2, 3, stride=2), (1, 4, 5, 5), 3600),
    # ConvTranspose3d 2->3, 2x2x2, stride 2: 2 * 1*2*27 * 3*8 = 2592
    (nn.ConvTranspose3d(2, 3, 2, stride=2), (1, 2, 3, 3, 3), 2592),
])
def test_convolutions(layer, shape, expected):
    torch.manual_seed(0)
    r = count_flops(layer, torch.randn(shape))
    assert r.flops == expected and r.macs == expected // 2
    assert list(r.by_operator) == ["aten.convolution"]


def test_einsum_and_bmm():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)

    class Einsum(nn.Module):
        def forward(self, x, y):
            return torch.einsum("bij,bjk->bik", x, y)

    class Bmm(nn.Module):
        def forward(self, x, y):
            return torch.bmm(x, y)

    # 2*B*M*N*K = 2*2*3*5*4 = 240; einsum decomposes to bmm
    assert count_flops(Einsum(), a, b).by_operator == {"aten.bmm": 240}
    assert flops(Bmm(), a, b) == 240


class Attention(nn.Module):
    def forward(self, q, k, v, mask=None, causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _qkv(b=2, h=3, l=5, s=5, d=4, dv=4, grad=False):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, l, d, generator=g).requires_grad_(grad),
            torch.randn(b, h, s, d, generator=g).requires_grad_(grad),
            torch.randn(b, h, s, dv, generator=g).requires_grad_(grad))


def test_sdpa_on_cpu_is_counted_where_plain_flopcountermode_counts_zero():
    q, k, v = _qkv()
    # 2*B*H*L*S*D for QK^T + 2*B*H*L*S*Dv for P@V = 2*2*3*5*5*4 * 2 = 1200 + 1200 = 2400
    r = count_flops(Attention(), q, k, v)
    assert r.flops == 2400
    assert r.by_operator == {"aten._scaled_dot_product_flash_attention_for_cpu": 2400}
    with FlopCounterMode(display=False) as plain:
        Attention()(q, k, v)
    assert plain.get_total_flops() == 0  # the gap this module closes


def test_sdpa_causal_and_masked_count_the_full_score_matrix():
    q, k, v = _qkv()
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    # same 2400 as unmasked: the kernels (and the math path) compute all L*S scores
    assert flops(Attention(), q, k, v, causal=True) == 2400
    assert flops(Attention(), q, k, v, mask=mask) == 2400
    assert flops(Attention(), q, k, v, mask=torch.zeros(5, 5)) == 2400


def test_sdpa_cross_attention_shapes():
    q, k, v = _qkv(l=5, s=7, d=4, dv=6)
    # 2*2*3*5*7*4 (QK^T) + 2*2*3*5*7*6 (P@V) = 1680 + 2520 = 4200
    assert flops(Attention(), q, k, v) == 4200


def test_sdpa_backward():
    q, k, v = _qkv(grad=True)
    r = count_flops(Attention(), q, k, v, backward=True)
    # backward: scores recomputed, dP = dO@V^T, dV = P^T@dO, dQ = dS@K, dK = dS^T@Q:
    # 5 products of 2*B*H*5*5*4 = 1200 each = 6000, twice the forward's 2400 and a half
    assert (r.forward_flops, r.backward_flops) == (2400, 6000)
    assert r.by_operator["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == 6000


def test_math_path_attention_on_meta_matches_the_kernel_formula():
    q, k, v = (t.to("meta") for t in _qkv())
    r = count_flops(Attention(), q, k, v)  # meta runs the math path: two bmm
    assert r.flops == 2400 and r.by_operator == {"aten.bmm": 2400}


def test_multihead_attention_fast_path_and_slow_path_agree():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 10, 64)
    # q,k,v projections 2*20*64*192 = 491520; attention 2 * 2*2*10*10*64 = 51200 (sum over
    # heads: H*d = E = 64); output projection 2*20*64*64 = 163840; total 706560
    fast = count_flops(Self().eval(), x)  # eval + no_grad: fused _native_multi_head_attention
    assert fast.by_operator == {"aten._native_multi_head_attention": 706560}
    assert flops(Self().train(), x) == 706560


def test_backward_is_twice_forward_for_linear_layers():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(4, 8, requires_grad=True)
    r = count_flops(mlp, x, backward=True)
    # forward 2*4*16*8 + 2*4*4*16 = 1024 + 512 = 1536; backward: a weight gradient and an
    # input gradient per layer, each the size of the forward product: 2 * 1536 = 3072
    assert (r.forward_flops, r.backward_flops, r.flops) == (1536, 3072, 4608)
    # without an input gradient the first layer's dX (1024) is skipped: 3072 - 1024 = 2048
    r2 = count_flops(mlp, x.detach(), backward=True)
    assert r2.backward_flops == 2048
    assert all(p.grad is None for p in mlp.parameters())  # .grad put back as it was


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv2d(64, 64, 3, padding=1, groups=64), (2, 64, 8, 8)),      # depthwise
    (nn.Conv2d(16, 32, 3, padding=1, groups=4), (2, 16, 8, 8)),       # grouped
    (nn.ConvTranspose1d(6, 12, 3, stride=2, groups=3), (2, 6, 10)),   # grouped transposed
])
def test_backward_of_grouped_convolutions_is_twice_forward(layer, shape):
    # torch's own formula counts the weight gradient as if every input channel met every
    # output channel (groups times too much); the input and weight gradients are each one
    # product the size of the forward one
    x = torch.randn(*shape, requires_grad=True)
    r = count_flops(layer, x, backward=True)
    assert r.backward_flops == 2 * r.forward_flops > 0
    assert r.by_operator["aten.convolution_backward"] == r.backward_flops


def test_depthwise_backward_by_hand():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    # forward: 16 positions x 8 channels x 9 taps = 1152 MACs; backward: input and weight
    # gradients, 1152 MACs each
    r = count_flops(conv, x, backward=True)
    assert (r.forward_flops, r.backward_flops) == (2 * 1152, 2 * 2 * 1152)


def test_padded_encoder_fast_path_counts_the_real_tokens():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, x, pad):
            return self.enc(x, src_key_padding_mask=pad)

    x = torch.randn(3, 10, 32)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 5:] = True
    pad[1, 8:] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: nested tensors are a prototype
        r = count_flops(Padded().eval(), x, pad)  # packed into a nested tensor of 5, 8, 10
    # per layer, 23 real tokens: four E x E projections 4*2*23*32*32 = 188416, attention
    # 2 * 2*32*(5*5 + 8*8 + 10*10) = 24192, feed-forward 2 * 2*23*32*64 = 188416
    assert r.forward_flops == 2 * (188416 + 24192 + 188416)
    assert not any("formula failed" in op for op in r.uncovered)


def test_a_formula_that_fails_is_listed_not_fatal(monkeypatch):
    from pytest_modelcheck.core import flops as flops_module

    def broken(*args, **kwargs):
        raise RuntimeError("cannot read these arguments")

    broken._get_raw = True
    mapping = dict(flops_module.extra_formulas())
    mapping[torch.ops.aten.mm] = broken
    monkeypatch.setattr(flops_module, "extra_formulas", lambda: mapping)
    r = count_flops(nn.Linear(4, 2, bias=False), torch.randn(3, 4))
    assert r.flops == 0 and r.uncovered == {"aten.mm (formula failed)": 1}


def test_shared_weights_are_counted_per_use():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    r = count_flops(nn.Sequential(lin, nn.Tanh(), lin), torch.randn(4, 8))
    # two uses of 2*4*8*8 = 512
    assert r.flops == 1024


def test_by_module_is_hierarchical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 16)), nn.Linear(16, 4))
    r = count_flops(model, torch.randn(4, 8))
    # 0.0: 2*4*16*8 = 1024; 1: 2*4*4*16 = 512; the parent holds both
    assert r.by_module == {"": 1536, "0": 1024, "0.0": 1024, "1": 512}
    assert r.top_modules() == [("0.0", 1024), ("1", 512)]


def test_uncovered_lists_ops_without_a_formula_but_not_free_ops():
    class Planted(nn.Module):
        def forward(self, x):
            return torch.cumsum(x.view(2, 8).t().contiguous(), 0)

    r = count_flops(Planted(), torch.randn(16))
    assert r.flops == 0
    assert r.uncovered == {"aten.cumsum": 1}  # view/t/clone are free and not listed
    assert {"aten.view", "aten.t", "aten.clone"} <= FREE_OPS
    assert "aten.cumsum" in r.render()


def test_batch_with_target_and_named_loss():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    # forward 2*2*3*4 = 48; backward: only dW (the input needs no gradient): 48
    r = count_flops_batch(model, (torch.ones(2, 4), torch.tensor([0, 2])), backward=True,
                          loss="cross_entropy")
    assert (r.forward_flops, r.backward_flops) == (48, 48)


def test_bad_arguments():
    m = nn.Linear(4, 3)
    with pytest.raises(UsageError, match="backend='jax': expected one of 'torch', 'fvcore'"):
        count_flops(m, torch.ones(1, 4), backend="jax")
    with pytest.raises(UsageError, match="fvcore backend counts the forward pass only"):
        count_flops(m, torch.ones(1, 4), backend="fvcore", backward=True)


def test_fvcore_backend_agrees_on_convolutions_and_misses_attention():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    fv = count_flops(conv, x, backend="fvcore")
    assert (fv.macs, fv.flops, fv.backend) == (110592, 221184, "fvcore")  # as hand-derived
    q, k, v = _qkv()
    fv = count_flops(Attention(), q, k, v, backend="fvcore")
    assert fv.macs == 0 and any("scaled_dot_product_attention" in op for op in fv.uncovered)


def _close_to_published(ours_gmacs, published):
    # published figures carry 2-3 significant digits: allow 0.5% or half a unit of the last
    # printed digit (two decimals here), whichever is larger
    return abs(ours_gmacs - published) <= max(0.005 * published, 0.005)


@pytest.mark.parametrize("name, exact_macs", [
    ("resnet18", 1_814_073_344),
    ("resnet50", 4_089_184_256),
    ("mobilenet_v2", 300_774_272),
])
def test_vision_references_match_torchvision_published_gmacs(name, exact_macs):
    model = reference_models.BUILDERS[name](device="meta").eval()
    r = count_flops(model, torch.empty(1, 3, 224, 224, device="meta"))
    assert r.macs == exact_macs
    assert _close_to_published(r.macs / 1e9, reference_models.PUBLISHED_GMACS[name])


def test_vit_b_16_matches_published_where_plain_flopcountermode_is_36_percent_low():
    torch.manual_seed(0)
    model = reference_models.vit_b_16().eval()
    x = torch.randn(1, 3, 224, 224)
    r = count_flops(model, x)
    # per block: qkv 197*768*2304 + QK^T and P@V 2*12*197*197*64 + out 197*768*768
    # + MLP 2*197*768*3072; x12, plus the patch conv 196*768*768 and the head 768*1000
    assert r.macs == 17_563_828_224
    assert _close_to_published(r.macs / 1e9, reference_models.PUBLISHED_GMACS["vit_b_16"])
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        model(x)
    plain_macs = plain.get_total_flops() // 2
    assert plain_macs == 11_271_124_992  # the fused attention blocks counted as zero
    assert 0.35 < 1 - plain_macs / r.macs < 0.37
