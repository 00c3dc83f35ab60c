"""params_learn on the mechanisms of public architectures: zero-initialised parts (ViT heads,
zero-init residuals, ReZero, LoRA, diffusion zero-convs) and tables the batch only partly looks up
(relative-position tables, positional tables longer than the sequence) are healthy; conv
subclasses get the treatment of torch's conv; dead parameters and unreached Fourier modes still
fail. Small stand-ins carry each mechanism; a few real torchvision/timm models confirm it.
"""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_modelcheck.checks.behaviour import params_learn


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(n=4, size=8):
    g = _gen()
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def _tokens(n=4, t=8, vocab=20):
    g = _gen()
    return torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, vocab, (n, t), generator=g)


# ------------------------------------------------------------------- zero-initialised parts
class ZeroHeadNet(nn.Module):
    """torchvision's ViT: the head starts at zero, so step 1 trains only the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8))
        self.head = nn.Linear(8, 5)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.body(x))


class ZeroInitResNet(nn.Module):
    """timm's zero_init_last: the last BatchNorm weight of each residual branch is zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        nn.init.zeros_(self.branch[4].weight)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.branch(h))
        return self.head(h.mean((2, 3)))


class ReZero(nn.Module):
    """x + alpha * F(x) with alpha = 0 (ReZero; a diffusion zero-conv when detached=False)."""

    def __init__(self, detached=False):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 16)
        self.f = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.alpha = nn.Parameter(torch.zeros(()))
        self.out = nn.Linear(16, 3)
        self.detached = detached

    def forward(self, x):
        h = self.inp(x)
        branch = self.f(h.detach() if self.detached else h)
        return self.out(h + self.alpha * branch)


class ZeroConvControl(nn.Module):
    """ControlNet: a trainable copy between two zero-initialised 1x1 convs (two gates in series)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Conv2d(3, 8, 3, padding=1)
        self.zin = nn.Conv2d(3, 3, 1)
        self.copy = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU())
        self.zout = nn.Conv2d(8, 8, 1)
        for z in (self.zin, self.zout):
            nn.init.zeros_(z.weight)
            nn.init.zeros_(z.bias)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.base(x) + self.zout(self.copy(x + self.zin(x)))
        return self.head(h.mean((2, 3)))


class LoRALinear(nn.Module):
    """LoRA: frozen base weight plus B @ A with B = 0."""

    def __init__(self, d_in, d_out, rank=2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, d_in) / d_in)
        self.b = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x):
        return self.base(x) + x @ self.a.t() @ self.b.t()


class LoRANet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = LoRALinear(6, 16)
        self.l2 = LoRALinear(16, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def _x(n=8):
    g = _gen()
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("build, batch", [
    (ZeroHeadNet, _images), (ZeroInitResNet, _images), (ReZero, _x), (ZeroConvControl, _images),
    (LoRANet, _x),
], ids=["vit_zero_head", "zero_init_residual", "rezero", "controlnet_zero_convs", "lora"])
def test_zero_initialised_parts_are_healthy(build, batch):
    r = params_learn(model=build(), batch=batch())
    assert r.passed is True, r.headline
    # held for a step by the zero gate, then moved: said as information, with the gate named
    assert r.metrics["reached_late"] > 0 and r.metrics["gate_steps"] >= 1
    assert "moved once zero-initialised parts had a step to open" in r.details
    assert "(and " in r.headline and "more for zero-initialised parts to open)" in r.headline


def test_zero_head_names_the_gate_and_when_the_rest_moved():
    r = params_learn(model=ZeroHeadNet(), batch=_images())
    assert r.headline == ("expected all 6 trainable tensors to change and frozen ones to stay,"
                          " observed that after 1 step (and 1 more for zero-initialised parts to"
                          " open)")  # conv, layernorm and head: a weight and a bias each
    assert "zero-initialised: head.weight, head.bias" in r.details
    assert "body.0.weight" in r.details and "first nonzero gradient in step 2" in r.details


def test_two_gates_in_series_open_in_two_steps():
    # zout opens in step 1, copy and zin get gradients in step 2
    r = params_learn(model=ZeroConvControl(), batch=_images())
    assert r.passed is True and r.metrics["gate_steps"] == 1
    assert "copy.0.weight" in r.details and "zin.weight" in r.details


# a parameter behind a zero gate that never opens is dead, however many steps it is given
def test_branch_behind_a_gate_but_detached_still_fails():
    # alpha opens in step 1, but the branch's output is detached: f never gets a gradient
    class DeadBranch(ReZero):
        def forward(self, x):
            h = self.inp(x)
            return self.out(h + self.alpha * self.f(h).detach())

    r = params_learn(model=DeadBranch(), batch=_x())
    assert r.passed is False
    assert r.headline == ("expected every trainable parameter to change within 4 steps, observed"
                          " 'f.0.weight' (Linear 'f.0') unchanged (no gradient) and 3 more")
    assert "nor in 3 more given for zero-initialised parts to open" in r.details


def test_parameter_multiplied_by_zero_forever_still_fails():
    class TimesZero(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(6, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.lin(x) + 0.0 * self.scale  # a leftover debugging switch

    r = params_learn(model=TimesZero(), batch=_x())
    assert r.passed is False
    assert r.headline == ("expected every trainable parameter to change within 4 steps, observed"
                          " 'scale' (TimesZero '<root>') unchanged (zero gradient)")


def test_zero_gradient_is_dead_even_when_weight_decay_moves_it():
    # AdamW's decoupled weight decay moves a parameter whose gradient is exactly zero
    class TimesZero(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(6, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.lin(x) * (1 + 0.0 * self.scale)

    r = params_learn(optimizer="adamw", model=TimesZero(), batch=_x())
    assert r.passed is False and "'scale' (TimesZero '<root>') unchanged (zero gradient)" in r.headline


def test_unused_layer_still_fails():
    net = ZeroHeadNet()
    net.spare = nn.Linear(8, 8)  # built, never called
    r = params_learn(model=net, batch=_images())
    assert r.passed is False
    assert "observed 'spare.weight' (Linear 'spare') unchanged (no gradient) and 1 more" in r.headline


# ---------------------------------------------------------- tables the batch partly looks up
class RelPosAttention(nn.Module):
    """Swin-style relative-position bias for windows up to ``window``; shorter inputs never index
    the table's outer rows."""

    def __init__(self, d=8, window=12):
        super().__init__()
        torch.manual_seed(0)
        self.window = window
        self.table = nn.Parameter(torch.randn(2 * window - 1) * 0.02)
        self.qkv = nn.Linear(d, 3 * d)
        self.emb = nn.Linear(3, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):                                  # (B, 3, L) sequences
        h = self.emb(x.transpose(1, 2))                    # (B, L, d)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        n = h.shape[1]
        pos = torch.arange(n, device=h.device)
        bias = self.table[pos[:, None] - pos[None, :] + self.window - 1]  # aten.index
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5 + bias, dim=-1)
        return self.head((att @ v).mean(1))


class TinyGPT(nn.Module):
    """Token and learned positional embeddings (block longer than the batch's sequence)."""

    def __init__(self, pos="slice", vocab=20, block=32, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(vocab, d)
        self.kind = pos
        if pos == "embedding":
            self.pos = nn.Embedding(block, d)
        else:
            self.pos = nn.Parameter(torch.randn(1, block, d) * 0.02)
        self.block = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, idx):
        t = idx.shape[1]
        if self.kind == "embedding":           # nanoGPT / GPT-2: wpe(arange(t))
            p = self.pos(torch.arange(t, device=idx.device))
        elif self.kind == "index":              # a parameter indexed by positions
            p = self.pos[:, torch.arange(t, device=idx.device)]
        else:                                   # minGPT: pos_emb[:, :t, :]
            p = self.pos[:, :t, :]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        return self.lm_head(self.block(self.tok(idx) + p, src_mask=mask, is_causal=True))


def _seq(n=4, length=6):
    g = _gen()
    return torch.randn(n, 3, length, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_relative_position_rows_this_input_never_indexes_are_information():
    # window 12: 23 rows; a 6-long input reaches offsets -5..5, 11 rows; 12/23 = 52% never indexed
    r = params_learn(model=RelPosAttention(), batch=_seq())
    assert r.passed is True, r.headline
    assert r.metrics["unused_at_input_size"] == 1
    assert "rows never looked up by this batch, unused at this input size" in r.details
    assert "table" in r.details and "12/23 elements (52%) unchanged, read by aten.index" in r.details


@pytest.mark.parametrize("pos", ["slice", "index", "embedding"])
def test_positional_table_longer_than_the_sequence(pos):
    r = params_learn(model=TinyGPT(pos), batch=_tokens(), loss="cross_entropy")
    assert r.passed is True, r.headline
    if pos != "embedding":  # an nn.Embedding is torch's own layer: never given the element test
        assert r.metrics["unused_at_input_size"] == 1
        how = "sliced to the input's length 8" if pos == "slice" else "read by aten.index"
        # 32 - 8 = 24 of 32 positions never seen: 24*16 = 384 of 512 elements
        assert f"384/512 elements (75%) unchanged, {how}" in r.details


class Conv3dSubclass(nn.Conv3d):
    """torchvision's Conv3DSimple: an nn.Conv3d subclass that keeps nn.Conv3d's forward."""


class TinyVideoNet(nn.Module):
    def __init__(self, conv=Conv3dSubclass):
        super().__init__()
        torch.manual_seed(0)
        self.stem = conv(3, 4, 3, stride=2, padding=1)
        self.conv = conv(4, 4, 3, padding=1)   # a 1-frame, 2x2 map: most taps only see padding
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(F.relu(self.conv(F.relu(self.stem(x)))).mean((2, 3, 4)))


def test_conv3d_subclass_taps_on_padding_are_not_reported():
    g = _gen()
    clip = torch.randn(2, 3, 1, 4, 4, generator=g), torch.randint(0, 5, (2,), generator=g)
    r = params_learn(model=TinyVideoNet(), batch=clip)
    assert r.passed is True, r.headline


class OwnForwardConv3d(nn.Conv3d):
    """A conv subclass with its own forward that slices the kernel: its elements are tested."""

    def forward(self, x):
        w = self.weight[..., :1, :, :]  # the bug: only the first temporal tap is ever used
        return F.conv3d(x, w, self.bias, self.stride, (0, 1, 1))


def test_conv_subclass_with_its_own_forward_is_still_tested():
    g = _gen()
    clip = torch.randn(2, 3, 4, 8, 8, generator=g), torch.randint(0, 5, (2,), generator=g)
    r = params_learn(model=TinyVideoNet(OwnForwardConv3d), batch=clip)
    assert r.passed is False
    # 2 of the 3 temporal taps never used: 2/3 = 67% of each kernel
    assert r.headline.startswith("expected every element of every trainable parameter to change"
                                 " within 4 steps, observed 67% of 'stem.weight'"
                                 " (OwnForwardConv3d 'stem') unchanged")


# ------------------------------------------------------- Fourier modes: a slice, not a lookup
class SpectralConv1d(nn.Module):
    """FNO layer; modes above n//2 + 1 are sliced off, never read, for every n-point input."""

    def __init__(self, channels, modes):
        super().__init__()
        g = _gen()
        self.modes = modes
        self.w = nn.Parameter(torch.randn(channels, channels, modes, 2, generator=g) / channels)

    def forward(self, x):
        xf = torch.fft.rfft(x)
        w = torch.view_as_complex(self.w)
        k = min(self.modes, xf.shape[-1])
        out = torch.zeros_like(xf)
        out[..., :k] = torch.einsum("bik,iok->bok", xf[..., :k], w[..., :k])
        return torch.fft.irfft(out, n=x.shape[-1])


class FNO1d(nn.Module):
    def __init__(self, modes):
        super().__init__()
        torch.manual_seed(0)
        self.lift = nn.Conv1d(1, 8, 1)
        self.spec = SpectralConv1d(8, modes)
        self.proj = nn.Conv1d(8, 1, 1)

    def forward(self, x):
        return self.proj(F.gelu(self.spec(self.lift(x))))


def test_fourier_modes_beyond_the_grid_still_fail():
    g = _gen()
    grid = torch.randn(4, 1, 16, generator=g), torch.randn(4, 1, 16, generator=g)
    r = params_learn(model=FNO1d(12), batch=grid)
    assert r.passed is False
    # a 16-point grid holds 9 modes: 3 of 12 never read, 8*8*3*2 = 384 of 8*8*12*2 = 1536; and
    # irfft drops the imaginary parts of modes 0 and 8, which zeroes the gradient of those two
    # modes' imaginary weights: 8*8*2 = 128 more; 512/1536 = 33%
    assert r.headline == ("expected every element of every trainable parameter to change within 4"
                          " steps, observed 33% of 'spec.w' (SpectralConv1d 'spec') unchanged"
                          " (512/1536 elements)")
    assert r.metrics["unused_at_input_size"] == 0
    assert params_learn(model=FNO1d(6), batch=grid).passed is True


# ----------------------------------------------------------------- real public architectures
FULL = os.environ.get("MODELCHECK_CONFORMANCE", "").lower() == "full"


def _real(name):
    from tests.conformance.zoo import CASES, build_case, import_torchvision

    if importlib.util.find_spec(CASES[name].package) is None:
        pytest.skip(f"{CASES[name].package} is not installed")
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()  # before timm imports it: torchvision needs zoo's care on CPU torch
    model, batch, declared = build_case(name)
    return params_learn(model=model, batch=batch, loss=declared.get("loss"))


@pytest.mark.parametrize("name, what", [
    ("timm_resnet26d", "moved once zero-initialised parts had a step to open"),
    ("timm_mixer_s32_224", "moved once zero-initialised parts had a step to open"),
])
def test_real_timm_models(name, what):
    r = _real(name)
    assert r.passed is True, r.headline
    assert what in r.details


@pytest.mark.parametrize("name, what", [
    pytest.param("tv_vit_b_32", "moved once zero-initialised parts had a step to open",
                 marks=pytest.mark.skipif(not FULL, reason="6 s: MODELCHECK_CONFORMANCE=full"
                                          " runs it (ZeroHeadNet stands in)")),
    ("tv_swin_t", "relative_position_bias_table"),
    ("tv_r3d_18", ""),
])
def test_real_torchvision_models(name, what):
    r = _real(name)
    assert r.passed is True, r.headline
    assert what in r.details
