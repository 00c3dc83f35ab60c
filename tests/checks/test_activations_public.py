"""activations_healthy on public architectures: growth along the data path, saturated attention.

Activation growth is measured along the path the data takes: a residual branch that is tiny by
design (ConvNeXt's layer scale of 1e-6) meets the main path in ``x + branch`` and the next module
runs on the sum, so it is not compared with the branch. Attention that saturates at
initialisation (a score multiplied by sqrt(d) instead of divided) is reported with the module,
the op, the line and the mean top probability.
"""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_modelcheck import Batch
from pytest_modelcheck.checks.numerics import ATTENTION_SATURATED, activations_healthy
from pytest_modelcheck.core.errors import UsageError


def _images(n=8, ch=16, size=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, ch, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


def _tokens(n=8, t=16, d=64, classes=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, t, d, generator=g), torch.randint(0, classes, (n,), generator=g)


# ----------------------------------------------------------------------- growth along the path
class LayerScaleBlock(nn.Module):
    """ConvNeXt's block: x + gamma * branch(x), gamma initialised to ``scale`` (1e-6)."""

    def __init__(self, ch, scale):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.GELU(), nn.Conv2d(ch, ch, 1))
        self.gamma = nn.Parameter(torch.full((ch, 1, 1), scale))
        self.drop = nn.Identity()  # a leaf that outputs the scaled branch, as StochasticDepth does

    def forward(self, x):
        out = self.drop(self.gamma * self.branch(x))
        out += x  # in place, as torchvision's CNBlock does
        return out


class LayerScaleNet(nn.Module):
    def __init__(self, scale=1e-6, ch=16):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(ch, ch, 1)
        self.blocks = nn.Sequential(*[LayerScaleBlock(ch, scale) for _ in range(3)])
        self.norm = nn.GroupNorm(1, ch)  # runs on the main path, right after a tiny branch
        self.head = nn.Linear(ch, 3)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.stem(x))).mean((2, 3)))


def test_a_tiny_residual_branch_is_not_compared_with_the_main_path():
    # the branch output's std is ~1e-6 of the main path's; the GroupNorm after it runs on the sum
    r = activations_healthy(model=LayerScaleNet(1e-6), batch=_images())
    assert r.passed is True, r.headline
    assert r.metrics["data_path_traced"] is True
    assert r.metrics["std_growth"] < 10


class ExplodingResidual(nn.Module):
    """x + W x with W ~ N(0, gain^2 / fan_in): each block multiplies the std by about
    sqrt(1 + gain^2) = sqrt(1 + 16) = 4.1, so the last branch's output is about
    4 * 4.1**9 = 1e6 times the input layer's std (measured 2.3e6) > 1e4."""

    def __init__(self, gain=4.0, width=32, depth=10):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        for lin in self.layers:
            nn.init.normal_(lin.weight, std=gain / math.sqrt(width))
            nn.init.zeros_(lin.bias)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for lin in self.layers:
            h = h + lin(h)
        return self.head(h)


def test_growth_along_a_residual_path_is_still_caught():
    x, y = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    r = activations_healthy(model=ExplodingResidual(), batch=(x, y))
    assert r.passed is False
    assert "observed exploding activations at '" in r.headline
    assert "earlier on its data path (max_growth 10000)" in r.headline
    assert r.metrics["std_growth"] > 1e4
    # the healthy twin: the same net with a gain that keeps the std in check
    assert activations_healthy(model=ExplodingResidual(gain=0.3), batch=(x, y)).passed is True


class RefusesDispatchModes(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if _get_current_dispatch_mode() is not None:
            raise RuntimeError("this model does not run under a dispatch mode")
        return self.net(x)


def test_a_model_that_cannot_run_under_a_dispatch_mode_is_measured_in_call_order():
    x, y = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    r = activations_healthy(model=RefusesDispatchModes(), batch=(x, y))
    assert r.passed is True, r.headline
    assert r.metrics["data_path_traced"] is False
    assert "measured in call order, not along the data path" in r.details


class ZeroHead(nn.Module):
    """torchvision's ViT zero-initialises its classifier: at step 1 nothing upstream gets a gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_zero_initialised_head_is_not_vanishing_gradients():
    x, y = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    r = activations_healthy(model=ZeroHead(), batch=(x, y))
    assert r.passed is True, r.headline
    assert r.metrics["grad_ratio_first_last"] == 0
    assert "gradient ratio not judged" in r.details and "head.weight" in r.details


# ---------------------------------------------------------------------- saturated attention
class SelfAttention(nn.Module):
    def __init__(self, d, scaled_up, causal, fused):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.d, self.scaled_up, self.causal, self.fused = d, scaled_up, causal, fused

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        if self.fused:  # one head, (B, 1, T, d): torch's fused kernel
            q, k, v = (t.unsqueeze(1) for t in (q, k, v))
            scale = math.sqrt(self.d) if self.scaled_up else None  # the bug: sqrt(d), not 1/sqrt(d)
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                                  scale=scale).squeeze(1)
        scores = q @ k.transpose(-2, -1)
        scores = scores * math.sqrt(self.d) if self.scaled_up else scores / math.sqrt(self.d)
        if self.causal:
            t = x.shape[1]
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1) @ v


class TinyTransformer(nn.Module):
    def __init__(self, d=64, scaled_up=False, causal=False, fused=False):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(d)
        self.attn = SelfAttention(d, scaled_up, causal, fused)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return self.head(x.mean(1))


@pytest.mark.parametrize("fused", [False, True], ids=["softmax", "sdpa"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_attention_scaled_by_sqrt_d_saturates_and_is_reported(fused, causal):
    # d=64, T=16: q.k has std ~ sqrt(64) * 0.33 = 2.6 before scaling; times 8 instead of / 8,
    # the top key takes ~0.94 of each row (0.96 causal); divided, 0.11 (0.19 causal)
    r = activations_healthy(model=TinyTransformer(scaled_up=True, causal=causal, fused=fused),
                            batch=_tokens())
    assert r.passed is False
    op = "aten._scaled_dot_product_" if fused else "aten._softmax"
    assert f"observed saturated attention in 'attn' (SelfAttention): {op}" in r.headline
    assert "test_activations_public.py:" in r.headline  # the line of the attention
    assert r.metrics["attention"]["attn"] >= 0.9
    assert f"mean max probability of {r.metrics['attention']['attn']:.3f}" in r.headline
    assert "multiplied by sqrt(d) instead of divided" in r.headline
    healthy = activations_healthy(model=TinyTransformer(causal=causal, fused=fused), batch=_tokens())
    assert healthy.passed is True, healthy.headline
    assert healthy.metrics["attention"]["attn"] < 0.25


class TorchAttention(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        if kind == "mha":
            self.body = nn.MultiheadAttention(64, 4, batch_first=True)
        else:
            self.body = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True,
                                                   norm_first=kind == "encoder_norm_first")
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        h = self.body(x, x, x)[0] if isinstance(self.body, nn.MultiheadAttention) else self.body(x)
        return self.head(h.mean(1))


@pytest.mark.parametrize("kind", ["mha", "encoder", "encoder_norm_first"])
def test_healthy_torch_attention_passes(kind):
    r = activations_healthy(model=TorchAttention(kind), batch=_tokens())
    assert r.passed is True, r.headline
    assert 0 < r.metrics["attention_max_prob"] < 0.3  # measured 0.14; uniform over 16 keys: 0.0625


def test_attention_threshold_is_an_argument():
    model, batch = TorchAttention("mha"), _tokens()
    assert activations_healthy(attention_max_prob=0.1, model=model, batch=batch).passed is False
    assert activations_healthy(model=model, batch=batch).passed is True
    assert ATTENTION_SATURATED == 0.85


@pytest.mark.parametrize("value", [0, 1.5, "high", True])
def test_bad_attention_threshold_is_a_usage_error(value):
    with pytest.raises(UsageError, match=r"^attention_max_prob=.*: expected a probability in \(0, 1\]"):
        activations_healthy(attention_max_prob=value, model=TorchAttention("mha"), batch=_tokens())


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "additive", "gqa"])
def test_fused_attention_probabilities_are_recomputed_from_query_key_scale_and_mask(mask):
    from pytest_modelcheck.checks.numerics import _sdpa_attention, _top_probs

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 6, 8, generator=g) * 3, torch.randn(2, 4, 6, 8, generator=g) * 3
    v = torch.randn(2, 4, 6, 8, generator=g)
    allowed = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    allowed[..., 0] = True
    kwargs, keys = {"scale": 0.5}, k
    if mask == "causal":
        allowed = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 4, 6, 6)
        kwargs["is_causal"] = True
    elif mask == "bool":
        kwargs["attn_mask"] = allowed
    elif mask == "additive":
        kwargs["attn_mask"] = torch.zeros(2, 1, 6, 6).masked_fill(~allowed, torch.finfo(torch.float).min)
    elif mask == "gqa":
        keys, k, v = k, k[:, :2], v[:, :2]
        keys = k.repeat_interleave(2, dim=1)
        kwargs["enable_gqa"] = True
    if mask in ("none", "gqa"):
        allowed = torch.ones(2, 4, 6, 6, dtype=torch.bool)
    expected = (q @ keys.transpose(-2, -1) * 0.5).masked_fill(~allowed, -math.inf).softmax(-1)
    seen = []

    from torch.utils._python_dispatch import TorchDispatchMode

    class Grab(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__.startswith("_scaled_dot_product"):
                seen.append(_sdpa_attention(func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Grab():
        F.scaled_dot_product_attention(q, k, v, **kwargs)
    if not seen:
        pytest.skip("this torch build runs this attention without a fused kernel")
    want = _top_probs(expected, allowed.expand(2, 4, 6, 6))
    assert seen[0][1] == want[1]
    assert seen[0][0] == pytest.approx(want[0], rel=1e-5)


def test_a_softmax_that_is_not_attention_is_not_measured():
    # class probabilities (B, C) and a (B, T, V) softmax over a vocabulary are no attention
    class Probs(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(64, 4)

        def forward(self, x):
            return (self.lin(x) * 100).softmax(-1).mean(1)

    r = activations_healthy(model=Probs(), batch=_tokens(), loss=lambda out, y: out.sum())
    assert r.metrics["attention_max_prob"] is None


# -------------------------------------------------------------------- public architectures
PUBLIC = ["tv_convnext_tiny", "timm_convnextv2_atto", "tv_swin_t", "tv_vit_b_32",
          "tv_efficientnet_b0", "hf_vit", "hf_bert", "hf_gpt2", "timm_vit_tiny_patch16_224"]


@pytest.mark.parametrize("name", PUBLIC)
def test_no_false_alarm_on_public_architectures(name):
    from tests.conformance import zoo

    package = zoo.CASES[name].package
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[conformance]')")
    model, batch, _ = zoo.build_case(name)
    if isinstance(batch, dict):  # Hugging Face: model(**batch), labels in the batch
        batch = Batch(kwargs=dict(batch), target=batch.get("labels"), has_target=True,
                      target_key="labels")
    r = activations_healthy(model=model, batch=batch)
    assert r.passed is True, f"{name}: {r.headline}"
    assert r.metrics["data_path_traced"] is True
    if r.metrics["attention_max_prob"] is not None:  # measured 0.05 (swin_t) to 0.33 (vit_b_32)
        assert r.metrics["attention_max_prob"] < 0.5
