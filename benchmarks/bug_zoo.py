"""Bug zoo: small CPU models with one classic bug each, and healthy twins, run through check_model.

Each case builds a model, a batch, a loss and the facts a user would naturally declare
(output shape, output ranges, invariances, supported sizes, memory and throughput budgets),
then runs ``check_model`` with the default set plus those facts. A bug is *caught* when at
least one check fails; a healthy twin is *flagged* when any check fails.

Run:  python benchmarks/bug_zoo.py            (all cases, a table and totals)
      python benchmarks/bug_zoo.py nan_log     (only cases whose name contains 'nan_log')

>>> len(BUGS) >= 25 and len(HEALTHY) >= 12
True
"""
from __future__ import annotations

import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_modelcheck import check_model

B, D, C = 8, 6, 4  # batch size, input features, classes


@dataclass
class Case:
    """One zoo entry: ``build() -> (model, batch, loss, facts)`` and the check expected to fail."""

    name: str
    expected: str
    build: Callable[[], tuple]
    healthy: bool = False
    note: str = ""
    failed: list = field(default_factory=list)


BUGS: list = []
HEALTHY: list = []


def bug(expected: str, note: str = "") -> Callable:
    """Register a buggy case; ``expected`` names the check that should fail."""
    def deco(fn: Callable) -> Callable:
        BUGS.append(Case(fn.__name__, expected, fn, False, note))
        return fn
    return deco


def healthy(twin_of: str) -> Callable:
    """Register a healthy case (a twin of the named bug, declared with the same facts)."""
    def deco(fn: Callable) -> Callable:
        HEALTHY.append(Case(fn.__name__, twin_of, fn, True))
        return fn
    return deco


def cls_batch(n: int = B, d: int = D, c: int = C) -> tuple:
    return torch.randn(n, d), torch.randint(0, c, (n,))


def reg_batch(n: int = B, d: int = D, k: int = 2) -> tuple:
    return torch.randn(n, d), torch.randn(n, k)


def mlp(d: int = D, h: int = 32, c: int = C) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))


class Head(nn.Module):
    """An MLP whose hidden activation goes through ``mid(h)`` (the place where bugs are planted)."""

    def __init__(self, mid: Callable, d: int = D, h: int = 32, c: int = C) -> None:
        super().__init__()
        self.fc1, self.fc2, self.mid = nn.Linear(d, h), nn.Linear(h, c), mid

    def forward(self, x):
        return self.fc2(self.mid(self.fc1(x)))


CLS = {"out": ("B", C)}

# ------------------------------------------------------------------------------- numerics


@bug("grads_finite", "log of an unclamped linear output")
def nan_log():
    return Head(lambda h: torch.log(h)), cls_batch(), None, CLS


@healthy("nan_log")
def nan_log_ok():
    return Head(lambda h: torch.log(F.softplus(h) + 1e-6)), cls_batch(), None, CLS


@bug("grads_finite", "sqrt of an unclamped linear output")
def nan_sqrt():
    return Head(lambda h: torch.sqrt(h)), cls_batch(), None, CLS


@bug("grads_finite", "normalising by the std over a size-1 dimension (0/0)")
def nan_div():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.proj, self.fc2 = nn.Linear(D, 32), nn.Linear(32, 1), nn.Linear(1, C)

        def forward(self, x):
            s = self.proj(torch.relu(self.fc1(x)))          # (B, 1)
            s = (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True)
            return self.fc2(s)
    return M(), cls_batch(), None, CLS


def deep(depth: int, act: Callable, std: float = None, width: int = 32) -> nn.Module:
    layers: list = [nn.Linear(D, width)]
    for _ in range(depth):
        lin = nn.Linear(width, width)
        if std is not None:
            nn.init.normal_(lin.weight, 0.0, std)
        layers += [act(), lin]
    layers += [act(), nn.Linear(width, C)]
    return nn.Sequential(*layers)


@bug("activations_healthy", "N(0, 1) init in 12 wide tanh-free linear layers (gain ~ sqrt(width))")
def exploding_init():
    torch.manual_seed(0)
    m = deep(12, nn.Identity, std=1.0)
    return m, cls_batch(), None, CLS


@healthy("exploding_init")
def deep_kaiming_init():
    m = deep(12, nn.ReLU)
    for lin in m:
        if isinstance(lin, nn.Linear):
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
    return m, cls_batch(), None, CLS


@bug("activations_healthy", "20 sigmoid layers: vanishing gradients")
def vanishing_sigmoid():
    return deep(20, nn.Sigmoid), cls_batch(), None, CLS


@bug("activations_healthy", "ReLU after a layer with bias -100: all units dead")
def dead_relu():
    m = Head(nn.ReLU())
    with torch.no_grad():
        m.fc1.bias.fill_(-100.0)
    return m, cls_batch(), None, CLS


@healthy("dead_relu")
def relu_ok():
    return Head(nn.ReLU()), cls_batch(), None, CLS


@bug("params_learn", ".detach() in the middle of forward")
def detach_middle():
    return Head(lambda h: torch.relu(h).detach()), cls_batch(), None, CLS


@bug("params_learn", "a branch built in __init__ but never used in forward")
def unused_branch():
    m = Head(nn.ReLU())
    m.aux = nn.Linear(32, C)
    return m, cls_batch(), None, CLS


# ------------------------------------------------------------------------ batch mixing


@bug("batch_independent", "view(features, batch).t() reshape mixing samples")
def view_mixing():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, 32), nn.Linear(32, C)

        def forward(self, x):
            h = torch.relu(self.fc1(x))                     # (B, 32)
            h = h.reshape(h.shape[1], h.shape[0]).t()       # should be a plain (B, 32)
            return self.fc2(h)
    return M(), cls_batch(), None, CLS


@bug("batch_independent", "BatchNorm1d(track_running_stats=False) normalises by the batch in eval")
def bn_no_running_stats():
    m = nn.Sequential(nn.Linear(D, 32), nn.BatchNorm1d(32, track_running_stats=False), nn.ReLU(),
                      nn.Linear(32, C))
    return m, cls_batch(), None, CLS


@healthy("bn_no_running_stats")
def bn_ok():
    m = nn.Sequential(nn.Linear(D, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, C))
    return m, cls_batch(), None, CLS


@bug("batch_independent", "softmax over dim 0 (the batch)")
def softmax_batch_dim():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return torch.log(torch.softmax(self.net(x), dim=0) + 1e-9)
    return M(), cls_batch(), None, CLS


@healthy("softmax_batch_dim")
def softmax_ok():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return torch.log_softmax(self.net(x), dim=-1)
    return M(), cls_batch(), "nll", CLS


# ------------------------------------------------------------------- eval behaviour


@bug("eval_deterministic", "F.dropout(h, 0.5) without training=self.training")
def functional_dropout():
    return Head(lambda h: F.dropout(torch.relu(h), 0.5)), cls_batch(), None, CLS


@healthy("functional_dropout")
def dropout_ok():
    return Head(nn.Sequential(nn.ReLU(), nn.Dropout(0.5))), cls_batch(), None, CLS


@bug("eval_deterministic", "noise added in forward whatever the mode")
def eval_noise():
    return Head(lambda h: torch.relu(h) + 0.1 * torch.randn_like(h)), cls_batch(), None, CLS


# ---------------------------------------------------------------- dispatch / loops


@bug("no_host_sync", ".item() per sample (seed 003)")
def item_per_sample():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            out = self.net(x)
            scale = [1.0 / (1.0 + abs(out[i, 0].item())) for i in range(out.shape[0])]
            return out * torch.tensor(scale).unsqueeze(1)
    return M(), cls_batch(), None, CLS


@bug("vectorized", "Python loop over samples")
def python_sample_loop():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return torch.stack([self.net(x[i]) for i in range(x.shape[0])])
    return M(), cls_batch(), None, CLS


# ------------------------------------------------------------------ device / dtype


@bug("device_portable", "a plain tensor attribute instead of a registered buffer")
def tensor_attribute():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.scale = torch.linspace(0.5, 1.5, C)

        def forward(self, x):
            return self.net(x) * self.scale
    return M(), cls_batch(), None, CLS


@healthy("tensor_attribute")
def buffer_ok():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.register_buffer("scale", torch.linspace(0.5, 1.5, C))

        def forward(self, x):
            return self.net(x) * self.scale
    return M(), cls_batch(), None, CLS


@bug("device_portable", "torch.arange(n) in forward without device=")
def no_device_arg():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x) + 0.01 * torch.arange(C, dtype=x.dtype)
    return M(), cls_batch(), None, CLS


@healthy("no_device_arg")
def device_arg_ok():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x) + 0.01 * torch.arange(C, dtype=x.dtype, device=x.device)
    return M(), cls_batch(), None, CLS


@bug("dtype_stable", "a float64 numpy array added to activations")
def float64_numpy():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x) + torch.from_numpy(np.linspace(0.0, 0.1, C))
    return M(), cls_batch(), None, CLS


@bug("dtype_stable", "torch.tensor(..., dtype=float64) weights in forward")
def float64_tensor():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            w = torch.tensor([0.5] * C, dtype=torch.float64)
            return self.net(x) * w
    return M(), cls_batch(), None, CLS


# ------------------------------------------------------------------------ outputs

ANGLES = {"out": ("B", 2), "output_range": {"ranges": {0: (0.0, 2 * math.pi), 1: (0.0, math.pi)}}}


@bug("output_range", "azimuth/zenith heads left unconstrained (seed 003)")
def unconstrained_angles():
    return mlp(c=2), reg_batch(), None, ANGLES


@healthy("unconstrained_angles")
def constrained_angles():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(c=2)

        def forward(self, x):
            s = torch.sigmoid(self.net(x))
            return torch.stack([s[:, 0] * 2 * math.pi, s[:, 1] * math.pi], 1)
    return M(), reg_batch(), None, ANGLES


@bug("shapes_consistent", "head built for 5 classes where (B, 4) is declared (cross_entropy still runs)")
def wrong_output_shape():
    return mlp(c=C + 1), cls_batch(), None, CLS


# ---------------------------------------------------------------------- state


@bug("stateless_forward", "forward scales its input in place")
def inplace_input():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            x.mul_(0.5)
            return self.net(x)
    return M(), cls_batch(), None, CLS


@bug("stateless_forward", "forward appends activations to a list attribute")
def appends_to_list():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.history = []

        def forward(self, x):
            out = self.net(x)
            self.history.append(out.detach())
            return out
    return M(), cls_batch(), None, CLS


@bug("state_roundtrip", "a non-persistent buffer used in forward (lost by state_dict)")
def buffer_not_saved():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.register_buffer("mean", torch.zeros(D), persistent=False)

        def forward(self, x):
            return self.net(x - self.mean)
    m = M()
    with torch.no_grad():
        m.mean.copy_(torch.linspace(-1, 1, D))  # fitted on the training data
    return m, cls_batch(), None, CLS


@healthy("buffer_not_saved")
def buffer_saved():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.register_buffer("mean", torch.zeros(D))

        def forward(self, x):
            return self.net(x - self.mean)
    m = M()
    with torch.no_grad():
        m.mean.copy_(torch.linspace(-1, 1, D))
    return m, cls_batch(), None, CLS


class EncHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(D, 32), nn.ReLU())
        self.head = nn.Linear(32, C)

    def forward(self, x):
        return self.head(self.encoder(x))


FROZEN = {**CLS, "params_learn": {"frozen": ["encoder.*"]}}


@bug("params_learn", "encoder declared frozen but its requires_grad was never turned off")
def frozen_still_trains():
    return EncHead(), cls_batch(), None, FROZEN


@healthy("frozen_still_trains")
def frozen_ok():
    m = EncHead()
    m.encoder.requires_grad_(False)
    return m, cls_batch(), None, FROZEN


# -------------------------------------------------------------------- learning


@bug("model_overfits", "output multiplied by 0 (a leftover debugging switch)")
def output_times_zero():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.gate = 0.0

        def forward(self, x):
            return self.net(x) * self.gate
    return M(), cls_batch(), None, CLS


@bug("model_overfits", "sigmoid output against an unnormalised target in [0, 100]")
def target_not_normalised():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(c=1)

        def forward(self, x):
            return torch.sigmoid(self.net(x))
    x = torch.randn(B, D)
    y = torch.rand(B, 1) * 100
    return M(), (x, y), "mse", {"out": ("B", 1)}


@healthy("target_not_normalised")
def target_normalised():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(c=1)

        def forward(self, x):
            return torch.sigmoid(self.net(x))
    x = torch.randn(B, D)
    y = torch.rand(B, 1)
    return M(), (x, y), "mse", {"out": ("B", 1)}


# ---------------------------------------------------------------- invariances

SETS = {"out": ("B", 2), "permutation_invariant": {"dim": 1}}


class DeepSets(nn.Module):
    def __init__(self, leak: bool = False, n: int = 10):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 32))
        self.rho = nn.Sequential(nn.ReLU(), nn.Linear(32, 2))
        self.leak = leak
        self.pos = nn.Parameter(torch.randn(n, 3) * 0.5) if leak else None

    def forward(self, x):                                  # (B, N, 3)
        if self.leak:                                      # element i gets embedding i
            x = x + self.pos[: x.shape[1]]
        return self.rho(self.phi(x).sum(1))


def set_batch():
    return torch.randn(B, 10, 3), torch.randn(B, 2)


@bug("permutation_invariant", "a positional embedding in a DeepSets model")
def deepsets_positional_leak():
    return DeepSets(leak=True), set_batch(), None, SETS


@healthy("deepsets_positional_leak")
def deepsets_ok():
    return DeepSets(), set_batch(), None, SETS


class MaskedPool(nn.Module):
    def __init__(self, use_mask: bool):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(3, 32), nn.ReLU())
        self.out = nn.Linear(32, 2)
        self.use_mask = use_mask

    def forward(self, x, mask):                            # (B, N, 3), (B, N) 1 = real
        h = self.phi(x)
        if self.use_mask:
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            pooled = h.mean(1)
        return self.out(pooled)


PAD = {"out": ("B", 2), "padding_invariant": {"mask": 1, "input_index": 0}}


def padded_batch():
    x = torch.randn(B, 10, 3)
    mask = torch.ones(B, 10)
    mask[:, 7:] = 0
    x[:, 7:] = 0
    return (x, mask), torch.randn(B, 2)


@bug("padding_invariant", "mean pooling that counts the padded elements")
def mean_pool_with_padding():
    return MaskedPool(False), padded_batch(), None, PAD


@healthy("mean_pool_with_padding")
def masked_mean_pool():
    return MaskedPool(True), padded_batch(), None, PAD


# -------------------------------------------------------------- architectures


class SpectralConv1d(nn.Module):
    def __init__(self, ch: int, modes: int):
        super().__init__()
        self.modes1 = modes
        self.w = nn.Parameter(torch.randn(ch, ch, modes, 2) / ch)

    def forward(self, x):                                  # (B, ch, n)
        xf = torch.fft.rfft(x)
        w = torch.view_as_complex(self.w)
        out = torch.zeros_like(xf)
        k = min(self.modes1, xf.shape[-1])                 # silently truncates past Nyquist
        out[..., :k] = torch.einsum("bik,iok->bok", xf[..., :k], w[..., :k])
        return torch.fft.irfft(out, n=x.shape[-1])


class FNO1d(nn.Module):
    def __init__(self, modes: int, ch: int = 8):
        super().__init__()
        self.lift = nn.Conv1d(1, ch, 1)
        self.spec = SpectralConv1d(ch, modes)
        self.skip = nn.Conv1d(ch, ch, 1)
        self.proj = nn.Conv1d(ch, 1, 1)

    def forward(self, x):
        h = self.lift(x)
        h = F.gelu(self.spec(h) + self.skip(h))
        return self.proj(h)


FNO = {"out": ("B", 1, 16), "fno_modes": {"grid_sizes": [16]}}


def grid_batch():
    return torch.randn(B, 1, 16), torch.randn(B, 1, 16)


@bug("fno_modes", "12 Fourier modes on a 16-point grid (Nyquist allows 9)")
def fno_modes_beyond_grid():
    return FNO1d(12), grid_batch(), None, FNO


@healthy("fno_modes_beyond_grid")
def fno_modes_ok():
    return FNO1d(6), grid_batch(), None, FNO


class TinyUNet(nn.Module):
    def __init__(self, ch: int = 8):
        super().__init__()
        self.inc = nn.Conv2d(1, ch, 3, padding=1)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(ch, ch, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(2 * ch, ch, 2, stride=2)
        self.outc = nn.Conv2d(2 * ch, 1, 1)

    def forward(self, x):
        a = F.relu(self.inc(x))
        b = F.relu(self.down(a))
        c = F.relu(self.mid(b))
        u = torch.cat([self.up1(c), b], 1)
        u = torch.cat([self.up2(u), a], 1)
        return self.outc(u)


def img_batch(n: int = 16):
    return torch.randn(B, 1, n, n), torch.randn(B, 1, n, n)


@bug("unet_skips", "two stride-2 levels but 18x18 declared (18 -> 9 -> 5 -> 10 != 9)")
def unet_skip_mismatch():
    return TinyUNet(), img_batch(16), None, {"unet_skips": {"sizes": [16, 18]}}


@healthy("unet_skip_mismatch")
def unet_sizes_ok():
    return TinyUNet(), img_batch(16), None, {"unet_skips": {"sizes": [16, 24]}}


# ------------------------------------------------------------------------ budgets

MEM = {**CLS, "memory_under": {"limit": "16 MiB"}}


@bug("memory_under", "a (B, 512, 512) pairwise intermediate blows a 16 MiB budget")
def memory_blowup():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(D, 512)
            self.out = nn.Linear(512, C)

        def forward(self, x):
            h = self.up(x)                                   # (B, 512)
            pair = torch.tanh(h.unsqueeze(2) * h.unsqueeze(1))   # (B, 512, 512): 8 MiB at B=8, x3 saved
            return self.out(pair.mean(2))
    return M(), cls_batch(), None, MEM


@healthy("memory_blowup")
def memory_ok():
    return mlp(), cls_batch(), None, MEM


# generous budget: the healthy MLP does >10k samples/s even on a loaded 2-core box, the slow
# model ~100 samples/s (a 10x margin on either side)
RATE = {**CLS, "throughput_at_least": {"rate": "1000 samples/s"}}


@bug("throughput_at_least", "an orthonormal basis recomputed (QR of 128x128, 288 times) every forward")
def slow_forward():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.register_buffer("seed_matrix", torch.randn(128, 128))

        def forward(self, x):
            with torch.no_grad():
                q = self.seed_matrix
                for _ in range(288):
                    q = torch.linalg.qr(q @ q.T + q)[0]
                s = q[0, :C].abs().sum() * 0 + 1
            return self.net(x) * s
    return M(), cls_batch(), None, RATE


@healthy("slow_forward")
def fast_forward():
    return mlp(), cls_batch(), None, RATE


# ------------------------------------------------------------------- language models
V_LM, T_LM = 24, 12  # vocabulary, tokens per sample


class TinyLM(nn.Module):
    """A one-block causal language model: token embedding, a learned positional table longer
    than the example sequence, pre-norm masked self-attention, a head tied to the embedding.

    ``forward(ids, mask=None)``; ``mask`` is 1 for real tokens and 0 for padding. The switches
    plant one bug each: ``diagonal=2`` (each position sees the next token), ``scores="multiply"``
    (scores times sqrt(d)), ``invert_mask`` (attends to padding only), ``softmax_out``
    (probabilities fed to cross_entropy), ``tie=False`` (a declared tie never made).
    """

    def __init__(self, diagonal: int = 1, scores: str = "divide", invert_mask: bool = False,
                 softmax_out: bool = False, tie: bool = True, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(V_LM, d)
        nn.init.normal_(self.emb.weight, std=0.02)  # GPT-2's init: the tied head's logits start small
        self.pos = nn.Parameter(torch.randn(32, d) * 0.02)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.pre, self.norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.head = nn.Linear(d, V_LM, bias=False)
        if tie:
            self.head.weight = self.emb.weight
        self.diagonal, self.scores, self.d = diagonal, scores, d
        self.invert_mask, self.softmax_out = invert_mask, softmax_out

    def forward(self, ids, mask=None):
        t = ids.shape[1]
        h = self.emb(ids) + self.pos[:t]
        q, k, v = self.qkv(self.pre(h)).chunk(3, -1)
        s = q @ k.transpose(1, 2)
        s = s * math.sqrt(self.d) if self.scores == "multiply" else s / math.sqrt(self.d)
        if self.diagonal is not None:  # None: a bidirectional encoder (token tagging)
            ahead = torch.triu(torch.ones(t, t, dtype=torch.bool, device=ids.device), self.diagonal)
            s = s.masked_fill(ahead, float("-inf"))
        if mask is not None:
            ignore = mask.bool() if self.invert_mask else ~mask.bool()
            s = s.masked_fill(ignore[:, None, :], float("-inf"))
        h = h + self.proj(s.softmax(-1) @ v)
        out = self.head(self.norm(h))
        return out.softmax(-1) if self.softmax_out else out


def lm_tokens(n: int = B, shift: bool = True) -> tuple:
    """Next-token batches: inputs ids[:, :-1] and targets ids[:, 1:] (``shift=False``: the
    inputs themselves)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V_LM, (n, T_LM + 1), generator=g)
    return ids[:, :-1], (ids[:, 1:] if shift else ids[:, :-1].clone())


def tagged_tokens(n: int = B) -> tuple:
    """Token tagging for a bidirectional encoder: ((ids, mask), tags), the odd samples padded at
    the end (mask 0, tag -100)."""
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, V_LM, (n, T_LM), generator=g) for _ in range(2))
    m = torch.ones_like(x)
    m[1::2, -3:] = 0
    return (x, m), y.masked_fill(m == 0, -100)


def lm_step(model, tokens, cache):
    """Incremental decoding by recomputation: the cache is the tokens seen so far."""
    seen = tokens if cache is None else torch.cat([cache, tokens], 1)
    return model(seen)[:, -tokens.shape[1]:], seen


def lm_step_forgets_context(model, tokens, cache):
    """The bug: each new token is decoded without the tokens before it."""
    seen = tokens if cache is None else torch.cat([cache, tokens], 1)
    return model(tokens), seen


LM = {"chance_level": math.log(V_LM), "causal": {},
      "tied_parameters": {"tied": [("emb.weight", "head.weight")]},
      "kv_cache_consistent": {"step_fn": lm_step}}
ENCODER = {"chance_level": math.log(V_LM), "tied_parameters": LM["tied_parameters"],
           "padding_invariant": {"mask": 1, "input_index": 0}}


@bug("causal", "a triu(diagonal=2) mask: each position sees the next token")
def lm_causal_leak():
    return TinyLM(diagonal=2), lm_tokens(), None, LM


@healthy("lm_causal_leak")
def lm_ok():
    return TinyLM(), lm_tokens(), None, LM


@bug("kv_cache_consistent", "incremental decoding drops the context before the new token")
def lm_kv_cache_mismatch():
    return TinyLM(), lm_tokens(), None, {**LM, "kv_cache_consistent": {"step_fn": lm_step_forgets_context}}


@bug("padding_invariant", "an inverted padding mask: attends to padding, ignores real tokens")
def lm_inverted_padding_mask():
    return TinyLM(diagonal=None, invert_mask=True), tagged_tokens(), None, ENCODER


@healthy("lm_inverted_padding_mask")
def lm_padding_mask_ok():
    return TinyLM(diagonal=None), tagged_tokens(), None, ENCODER


@bug("model_overfits", "softmax before cross_entropy on (B, T, V) outputs")
def lm_softmax_before_ce():
    return TinyLM(softmax_out=True), lm_tokens(), None, LM


@bug("data_sane", "targets equal the inputs: no label shift")
def lm_no_label_shift():
    return TinyLM(), lm_tokens(shift=False), None, LM


@bug("activations_healthy", "attention scores multiplied by sqrt(d) instead of divided (d=64)")
def lm_saturated_attention():
    return TinyLM(scores="multiply", d=64), lm_tokens(), None, LM


@healthy("lm_saturated_attention")
def lm_wide_ok():
    return TinyLM(d=64), lm_tokens(), None, LM


@bug("tied_parameters", "the head declared tied to the embedding but built separately")
def lm_untied_head():
    return TinyLM(tie=False), lm_tokens(), None, LM


# ------------------------------------------------------------------------- runner


def run_case(case: Case) -> float:
    """Build the case and run check_model (default set + declared facts); returns the seconds."""
    torch.manual_seed(0)
    model, batch, loss, facts = case.build()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            report = check_model(model, batch, loss=loss, **facts)
        except Exception as exc:  # a crash of check_model itself is reported, not hidden
            case.failed = [f"ERROR {type(exc).__name__}: {exc}"]
            case.headlines = {}
            return time.perf_counter() - t0
    case.failed = [r.check for r in report.results if not r.passed and not getattr(r, "skipped", False)]
    case.headlines = {r.check: r.headline for r in report.results if r.check in case.failed}
    return time.perf_counter() - t0


def main(argv: list) -> int:
    """Run the zoo (optionally filtered by substrings of case names) and print the table."""
    pick = argv[1:]
    verbose = "-v" in pick
    pick = [p for p in pick if p != "-v"]
    t_start = time.perf_counter()
    bugs = [c for c in BUGS if not pick or any(p in c.name for p in pick)]
    goods = [c for c in HEALTHY if not pick or any(p in c.name for p in pick)]
    print(f"{'bug':28} {'expected check':22} {'caught':6} {'by':40} {'s':>5}")
    for c in bugs:
        t = run_case(c)
        by = ", ".join(c.failed) or "-"
        print(f"{c.name:28} {c.expected:22} {'yes' if c.failed else 'NO':6} {by:40} {t:5.1f}")
        if verbose:
            for k, v in c.headlines.items():
                print(f"    {k}: {v}")
    print()
    print(f"{'healthy twin':28} {'twin of':22} {'result':6} {'flagged by':40} {'s':>5}")
    for c in goods:
        t = run_case(c)
        by = ", ".join(c.failed) or "-"
        print(f"{c.name:28} {c.expected:22} {'FLAG' if c.failed else 'clean':6} {by:40} {t:5.1f}")
        for k, v in c.headlines.items():
            print(f"    {k}: {v}")
    caught = sum(bool(c.failed) for c in bugs)
    by_expected = sum(c.expected in c.failed for c in bugs)
    flagged = sum(bool(c.failed) for c in goods)
    elapsed = time.perf_counter() - t_start
    print()
    print(f"bugs caught: {caught}/{len(bugs)} ({by_expected} by the expected check)")
    print(f"healthy flagged: {flagged}/{len(goods)}")
    print(f"run time: {elapsed:.0f} s on {platform.machine()} {platform.processor() or ''}"
          f" with {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    return 0 if not flagged else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
