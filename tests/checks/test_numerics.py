"""device_portable, dtype_stable, activations_healthy, output_range: planted bugs, healthy twins,
usage errors, and no false alarm on the example models."""
import importlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.numerics import (
    activations_healthy,
    device_portable,
    dtype_stable,
    output_range,
    plain_tensor_attributes,
)


def _x(n=6, features=4, seed=0):
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


def _batch(n=6, features=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


class Net(nn.Module):
    """``kind`` plants one bug in an otherwise healthy two-layer net."""

    def __init__(self, kind="healthy"):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.kind = kind
        if kind == "plain_attribute":
            self.offset = torch.ones(3)  # not a buffer: model.to() leaves it behind
        else:
            self.register_buffer("offset", torch.ones(3))

    def forward(self, x):
        h = torch.relu(self.body(x))
        out = self.head(h) + self.offset
        if self.kind == "arange":
            out = out + torch.arange(3)  # CPU tensor whatever the model's device
        elif self.kind == "zeros":
            out = out + torch.zeros(x.shape[0], 3)
        elif self.kind == "tensor_literal":
            out = out * torch.tensor([1.0, 2.0, 3.0])
        elif self.kind == "followed":
            out = out + torch.arange(3, device=x.device) + x.new_zeros(x.shape[0], 3)
        elif self.kind == "numpy_scalar":
            out = out * torch.tensor(np.float64(0.5))  # a float64 0-d tensor
        elif self.kind == "numpy_array":
            out = out + torch.from_numpy(np.ones(3))  # float64: the output becomes float64
        elif self.kind == "float64_literal":
            out = out * torch.tensor(0.5, dtype=torch.float64)
        elif self.kind == "double":
            out = self.head(h.double().float()) + self.offset
        elif self.kind == "python_float":
            out = out * 0.5 + torch.tensor(0.25)  # Python floats stay in the default dtype
        elif self.kind == "item":
            out = out * float(x.abs().max().item() > 0)
        elif self.kind == "overflow_fp16":
            out = self.head(h * 1e5) + self.offset  # ~1e5: fine in float32, inf in float16
        return out


# ------------------------------------------------------------------------------ device_portable
def test_device_portable_passes_on_healthy_and_device_aware_models():
    for kind in ("healthy", "followed", "python_float"):
        r = device_portable(model=Net(kind), batch=_batch())
        assert r.passed is True, (kind, r.headline)
        assert "(meta" in r.headline


def test_device_portable_reports_a_plain_tensor_attribute():
    r = device_portable(model=Net("plain_attribute"), batch=_batch())
    assert r.passed is False
    assert "tensor attribute 'offset' (Net) is not a registered buffer" in r.headline
    assert "aten.add at test_numerics.py" in r.headline  # the op that mixed meta and cpu
    assert r.metrics["plain_tensor_attributes"] == ["offset"]
    assert "register_buffer" in r.details


@pytest.mark.parametrize("kind, op", [("arange", "aten.arange"), ("zeros", "aten.zeros")])
def test_device_portable_names_the_line_that_created_a_cpu_tensor(kind, op):
    r = device_portable(model=Net(kind), batch=_batch())
    assert r.passed is False
    assert f"observed {op} at test_numerics.py:" in r.headline
    assert "created a cpu tensor of shape [" in r.headline and "model is on meta" in r.headline


class CachedGrid(nn.Module):
    """neuraloperator's grid embedding: coordinates made with torch.linspace on the CPU, combined
    with meshgrid, then moved with .to(x.device) before they meet the input."""

    def forward(self, x):
        n = x.shape[-1]
        gx, gy = torch.meshgrid(torch.linspace(0, 1, n + 1)[:-1], torch.linspace(0, 1, n + 1)[:-1],
                                indexing="ij")
        grid = torch.stack([gx, gy]).to(x.device).to(x.dtype)
        return torch.cat([x, grid.expand(x.shape[0], -1, -1, -1)], dim=1)


class ForgottenGrid(CachedGrid):
    """The same grid, not moved: it meets the input on the CPU."""

    def forward(self, x):
        n = x.shape[-1]
        gx, gy = torch.meshgrid(torch.linspace(0, 1, n), torch.linspace(0, 1, n), indexing="ij")
        return x + (gx + gy)


def test_device_portable_accepts_a_cpu_tensor_moved_to_the_device_before_use():
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    r = device_portable(model=CachedGrid(), batch=x)
    assert r.passed is True, r.headline
    r = device_portable(model=ForgottenGrid(), batch=x)
    assert r.passed is False
    assert "created a cpu tensor of shape [8]" in r.headline or "mixed a meta tensor" in r.headline


def test_device_portable_names_the_op_that_used_a_tensor_literal():
    # torch.tensor([...]) is built outside the dispatcher; the first op using it is reported
    r = device_portable(model=Net("tensor_literal"), batch=_batch())
    assert r.passed is False
    assert "observed aten.mul at test_numerics.py:" in r.headline
    assert "mixed a meta tensor with a cpu tensor of shape [3]" in r.headline


def test_device_portable_names_the_module_of_a_nested_stray():
    class Block(nn.Module):
        def forward(self, x):
            return x + torch.ones(x.shape[-1])

    model = nn.Sequential(nn.Linear(4, 4), Block())
    r = device_portable(model=model, batch=_x())
    assert r.passed is False
    assert "in module '1' (Block)" in r.headline


def test_device_portable_skips_a_forward_that_reads_values_and_fails_on_an_attribute():
    r = device_portable(model=Net("item"), batch=_batch())
    assert r.passed is None
    assert "cannot run on meta" in r.headline and ".item()" in r.headline
    model = Net("item")
    model.extra = torch.ones(2)
    r = device_portable(model=model, batch=_batch())
    assert r.passed is False
    assert "tensor attribute 'extra' (Net)" in r.headline


def test_plain_tensor_attributes_ignores_parameters_and_buffers():
    assert plain_tensor_attributes(Net()) == []
    assert plain_tensor_attributes(Net("plain_attribute")) == [("offset", "Net")]


def test_an_empty_placeholder_attribute_is_no_stray():
    """MONAI's SABlock keeps ``self.att_mat = torch.Tensor()`` for attention it may save."""
    model = Net()
    model.att_mat = torch.Tensor()
    assert plain_tensor_attributes(model) == []
    assert device_portable(model=model, batch=_batch()).passed is True


def test_device_portable_takes_no_user_arguments():
    with pytest.raises(UsageError, match="expected device_portable"):
        device_portable(1, model=Net(), batch=_batch())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_portable_runs_for_real_on_cuda():
    r = device_portable(model=Net("arange"), batch=_batch())
    assert r.metrics["devices"] == ["meta", "cuda"]
    assert r.metrics["cuda_strays"] >= 1


# -------------------------------------------------------------------------------- dtype_stable
def test_dtype_stable_passes_on_healthy_models():
    for kind in ("healthy", "python_float"):
        r = dtype_stable(model=Net(kind), batch=_batch())
        assert r.passed is True, (kind, r.headline)
        assert "autocast(bfloat16)" in r.headline


@pytest.mark.parametrize("kind", ["numpy_scalar", "numpy_array", "float64_literal", "double"])
def test_dtype_stable_reports_the_first_float64_op(kind):
    r = dtype_stable(model=Net(kind), batch=_batch(), amp=None)
    assert r.passed is False
    assert r.headline.startswith("expected activations in the parameters' dtype float32, observed aten.")
    assert "producing float64 at test_numerics.py:" in r.headline
    assert r.metrics["first_wide_source"].split(":")[0].endswith("test_numerics.py")


def test_dtype_stable_names_the_float64_output_and_module():
    r = dtype_stable(model=Net("numpy_array"), batch=_batch())
    assert "output is float64" in r.headline
    model = nn.Sequential(nn.Linear(4, 4), DoubleUp())
    r = dtype_stable(model=model, batch=_x())
    assert r.passed is False
    assert "aten._to_copy producing float64" in r.headline and "in module '1' (DoubleUp)" in r.headline


class DoubleUp(nn.Module):
    def forward(self, x):
        return x.double()


def test_dtype_stable_accepts_complex64_from_ffts():
    class Spectral(nn.Module):
        def forward(self, x):
            return torch.fft.irfft(torch.fft.rfft(x) * 2, n=x.shape[-1])

    assert dtype_stable(model=Spectral(), batch=_x(features=8), amp=None).passed is True


def test_dtype_stable_reports_an_autocast_overflow():
    r = dtype_stable("fp16", model=Net("overflow_fp16"), batch=_batch())
    assert r.passed is False
    assert "torch.autocast('cpu', float16)" in r.headline
    assert "non-finite values in output" in r.headline
    assert "aten.mul at test_numerics.py" in r.headline
    # the same model in bfloat16 (range up to ~3e38) is fine
    assert dtype_stable("bf16", model=Net("overflow_fp16"), batch=_batch()).passed is True


def test_dtype_stable_reports_an_op_that_fails_under_autocast():
    class NeedsFloat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            h = self.proj(x)  # bfloat16 under autocast
            index = torch.arange(x.shape[0], device=x.device)
            return torch.zeros_like(x).index_add(0, index, h)  # float32 buffer, bfloat16 source

    r = dtype_stable(model=NeedsFloat(), batch=_x())
    assert r.passed is False
    assert "torch.autocast('cpu', bfloat16)" in r.headline and "forward raised" in r.headline
    assert dtype_stable(None, model=NeedsFloat(), batch=_x()).passed is True


@pytest.mark.parametrize("amp", ["fp8", 16, True])
def test_dtype_stable_rejects_bad_amp(amp):
    with pytest.raises(UsageError, match=r"^amp=.*expected 'bf16', 'fp16' or None"):
        dtype_stable(amp, model=Net(), batch=_batch())


# ------------------------------------------------------------------------ activations_healthy
def _mlp(depth, act=nn.ReLU, gain=None, width=16, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        if gain is not None:
            nn.init.normal_(lin.weight, std=gain / math.sqrt(width))
            nn.init.zeros_(lin.bias)
        layers += [lin, act()]
    return nn.Sequential(*layers, nn.Linear(width, 3))


def _wide_batch(n=16, width=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, width, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("model", [
    _mlp(8), _mlp(20, gain=math.sqrt(2)), _mlp(6, act=nn.Tanh), _mlp(6, act=nn.Sigmoid),
    nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 3)),
], ids=["relu8_default", "relu20_kaiming", "tanh6", "sigmoid6", "layernorm_gelu"])
def test_activations_healthy_passes_on_healthy_nets(model):
    r = activations_healthy(model=model, batch=_wide_batch())
    assert r.passed is True, r.headline
    assert r.details.splitlines()[0].startswith("layer")


def test_activations_healthy_reports_exploding_activations():
    # init std 3/sqrt(fan_in): each Linear+ReLU multiplies the std by about 3/sqrt(2) = 2.1,
    # so 20 layers grow it by about 2.1**19 = 1.6e6 > 1e4
    r = activations_healthy(model=_mlp(20, gain=3.0), batch=_wide_batch())
    assert r.passed is False
    assert r.headline.startswith("expected healthy activations and gradients, observed exploding"
                                 " activations at '")
    assert "max_growth 10000" in r.headline
    assert r.metrics["std_growth"] > 1e4


def test_activations_healthy_reports_vanishing_gradients_of_a_deep_default_init_mlp():
    # torch's default Linear init (uniform, std 1/sqrt(3 fan_in)) with ReLU shrinks the signal
    # by about sqrt(1/6) = 0.41 per layer: 0.41**20 = 2e-8 between the first and last layer
    r = activations_healthy(model=_mlp(20), batch=_wide_batch())
    assert r.passed is False
    assert "observed vanishing gradients at '0' (Linear)" in r.headline


def test_activations_healthy_reports_vanishing_gradients():
    # 20 sigmoids: each backward step multiplies by sigmoid' <= 0.25 times a weight of ~0.6,
    # so the first layer's gradient is ~1e-17 of the last one's
    r = activations_healthy(model=_mlp(20, act=nn.Sigmoid), batch=_wide_batch())
    assert r.passed is False
    assert "observed vanishing gradients at '0' (Linear)" in r.headline
    assert "that of the last layer '40'" in r.headline
    assert r.metrics["grad_ratio_first_last"] < 1e-5


def test_activations_healthy_reports_a_dead_relu_first():
    model = _mlp(3)
    with torch.no_grad():
        model[2].bias.fill_(-10.0)  # pre-activations ~ -10: the ReLU at '3' never fires
    r = activations_healthy(model=model, batch=_wide_batch())
    assert r.passed is False
    assert "observed dead ReLU at '3' (ReLU): 100% of its units are zero for every sample" in r.headline
    assert "vanishing:0" in r.metrics["problems"]  # its consequence, reported after it


def test_activations_healthy_reports_saturated_tanh():
    model = _mlp(3, act=nn.Tanh, gain=30.0)  # pre-activations with std ~30
    r = activations_healthy(model=model, batch=_wide_batch())
    assert r.passed is False
    assert "saturated Tanh at '" in r.headline and "of its outputs saturated" in r.headline


def test_activations_healthy_thresholds_are_arguments():
    model = _mlp(3)
    assert activations_healthy(max_growth=1.0, model=model, batch=_wide_batch()).passed is False
    assert activations_healthy(dead_fraction=1.0, saturated_fraction=1.0, min_grad_ratio=0.0,
                               model=model, batch=_wide_batch()).passed is True


@pytest.mark.parametrize("kwargs, message", [
    ({"max_growth": 0.5}, r"^max_growth=0.5: expected a number >= 1"),
    ({"max_growth": "big"}, r"^max_growth='big': expected a number >= 1"),
    ({"min_grad_ratio": 1.5}, r"^min_grad_ratio=1.5: expected a number in \[0, 1\)"),
    ({"dead_fraction": 0}, r"^dead_fraction=0: expected a fraction in \(0, 1\]"),
    ({"saturated_fraction": 2}, r"^saturated_fraction=2: expected a fraction in \(0, 1\]"),
])
def test_activations_healthy_rejects_bad_thresholds(kwargs, message):
    with pytest.raises(UsageError, match=message):
        activations_healthy(**kwargs, model=_mlp(2), batch=_wide_batch())


# -------------------------------------------------------------------------------- output_range
class AngleHead(nn.Module):
    def __init__(self, constrained=True):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        self.constrained = constrained

    def forward(self, x):
        out = self.net(x)
        if not self.constrained:
            return out
        return torch.stack([2 * math.pi * torch.sigmoid(out[:, 0]), math.pi * torch.sigmoid(out[:, 1])], 1)


ANGLES = {"[:, 0]": (0, 2 * math.pi), 1: (0, math.pi)}


def test_output_range_passes_on_a_bounded_head():
    r = output_range(ANGLES, model=AngleHead(), batch=_x(8))
    assert r.passed is True, r.headline
    assert r.metrics["probes"] == ["the example batch", "batch size 1", "batch size 16", "inputs x10"]


def test_output_range_fails_on_an_unbounded_head_naming_column_and_sample():
    r = output_range(ANGLES, model=AngleHead(constrained=False), batch=_x(8))
    assert r.passed is False
    assert r.headline.startswith("expected output[:, ")
    assert "observed min " in r.headline and " max " in r.headline and "(sample " in r.headline


def test_output_range_scaled_inputs_expose_an_unbounded_head():
    class Identity(nn.Module):
        def forward(self, x):
            return x

    x = torch.linspace(-0.9, 0.9, 8).reshape(8, 1)  # inside (-1, 1); x*10 reaches -9 and 9
    r = output_range((-1, 1), batch_sizes=(), model=Identity(), batch=x)
    assert r.passed is False
    assert r.headline == ("expected output in [-1, 1], observed min -9 max 9 (sample 0 of"
                          " inputs x10)")
    assert output_range((-1, 1), scale=None, model=Identity(), batch=x).passed is True


def test_output_range_dict_outputs_and_unbounded_sides():
    class Heads(nn.Module):
        def forward(self, x):
            return {"prob": torch.sigmoid(x), "energy": torch.nn.functional.softplus(x) - 1.0}

    x = _x(8)
    assert output_range({"prob": (0, 1), "energy": (-1, None)}, model=Heads(), batch=x).passed is True
    r = output_range({"prob": (0, 1), "energy[:, 0]": (0, None)}, model=Heads(), batch=x)
    assert r.passed is False
    assert r.headline.startswith("expected output['energy'][:, 0] in [0, inf], observed min -")


def test_output_range_reports_non_finite_values():
    class Log(nn.Module):
        def forward(self, x):
            return torch.log(x)

    r = output_range((None, None), scale=None, batch_sizes=(), model=Log(), batch=_x(8))
    assert r.passed is False
    assert "non-finite" in r.headline


@pytest.mark.parametrize("ranges, message", [
    ((1, 0), r"^ranges=\(1, 0\): expected lo <= hi"),
    ((0, 1, 2), r"^ranges=\(0, 1, 2\): expected a \(lo, hi\) pair"),
    ("0..1", r"^ranges='0..1': expected \(lo, hi\) or a dict"),
    ({}, r"^ranges=\{\}: expected \(lo, hi\) or a dict"),
    ({"[:, x]": (0, 1)}, r"^ranges key '\[:, x\]': expected ints, slices"),
    ({1.5: (0, 1)}, r"^ranges key 1.5: expected a column index"),
    ({0: "positive"}, r"^ranges\[0\]='positive': expected a \(lo, hi\) pair"),
])
def test_output_range_rejects_bad_ranges(ranges, message):
    with pytest.raises(UsageError, match=message):
        output_range(ranges, model=AngleHead(), batch=_x())


def test_output_range_rejects_bad_scale_batch_sizes_and_unknown_keys():
    with pytest.raises(UsageError, match=r"^scale='x': expected a number"):
        output_range((0, 1), scale="x", model=AngleHead(), batch=_x())
    with pytest.raises(UsageError, match=r"^batch_sizes=\[0\]: expected a list of ints >= 1"):
        output_range((0, 1), batch_sizes=[0], model=AngleHead(), batch=_x())
    with pytest.raises(UsageError, match=r"^ranges key 'prob': the output has no such key"):
        output_range({"prob": (0, 1)}, model=AngleHead(), batch=_x())


def test_output_range_on_icecube_angles():
    from example_models import icecube_deepsets as ice

    ranges = {0: (0, 2 * math.pi), 1: (0, math.pi)}  # azimuth, zenith
    torch.manual_seed(0)
    good = output_range(ranges, model=ice.build_model(), batch=ice.make_batch, loss=ice.loss_fn)
    assert good.passed is True, good.headline
    torch.manual_seed(0)
    bad = output_range(ranges, model=ice.build_model(constrain_outputs=False), batch=ice.make_batch,
                       loss=ice.loss_fn)
    assert bad.passed is False
    assert bad.headline.startswith("expected output[:, ")


# ---------------------------------------------------------------------- example models: no alarm
EXAMPLES = ["icecube_deepsets", "genesis_dit", "pix2pixcc_gan", "vnet_unet", "fno", "vit3d", "swinir"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_default_numerics_checks_pass_on_example_models(name):
    mod = importlib.import_module(f"example_models.{name}")
    torch.manual_seed(0)
    model = mod.build_model()
    batch = mod.make_batch if name == "icecube_deepsets" else mod.make_batch(4)
    for check in (device_portable, dtype_stable, activations_healthy):
        r = check(model=model, batch=batch, loss=mod.loss_fn)
        assert r.passed is True, f"{check.__name__}: {r.headline}"


def test_dtype_stable_judges_by_the_parameters_not_a_float64_buffer():
    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.register_buffer("table", torch.ones(4, dtype=torch.float64))

        def forward(self, x):
            return self.proj(x) * self.table.to(x.dtype)  # the _to_copy makes float32

    r = dtype_stable(model=Table(), batch=_x())
    assert r.passed is True, r.headline
    assert r.metrics["param_dtype"] == "float32"
