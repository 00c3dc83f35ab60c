"""batch_independent, params_learn, eval_deterministic, stateless_forward, state_roundtrip:
planted-bug models that fail, healthy twins that pass, usage errors, and the example models."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.behaviour import (
    batch_independent,
    eval_deterministic,
    params_learn,
    state_roundtrip,
    stateless_forward,
)
from pytest_modelcheck.core.state import fingerprints_equal, model_fingerprint


def _x(n=4, features=6, seed=0):
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# batch_independent
# ------------------------------------------------------------------------------------------------
class MixNet(nn.Module):
    """Linear -> (planted bug) -> Linear; ``bug`` picks how samples get mixed."""

    def __init__(self, bug=None):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8, track_running_stats=(bug != "batch_stats"))
        self.head = nn.Linear(8, 3)
        self.bug = bug

    def forward(self, x):
        h = self.body(x)
        b, c = h.shape
        if self.bug == "view_t":
            h = h.view(-1, c).t().reshape(b, c)  # channels and samples interleaved
        elif self.bug == "mean_dim0":
            h = h - h.mean(0)
        return self.head(self.norm(h))


class SeqNet(nn.Module):
    """Attention over (B, T, C) tokens; without batch_first it attends across the batch."""

    def __init__(self, batch_first=True):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("bug", ["view_t", "mean_dim0", "batch_stats"])
def test_batch_independent_catches_mixing(bug):
    r = batch_independent(model=MixNet(bug), batch=_x())
    assert r.passed is False
    assert r.headline.startswith("expected output of sample 0 to depend only on input sample 0,"
                                 " observed a gradient from sample ")
    assert "(input[0], max |grad| " in r.headline
    assert r.metrics["input"] == "input[0]" and r.metrics["max_cross_grad"] > 0


def test_batch_independent_names_the_first_mixing_module():
    r = batch_independent(model=MixNet("batch_stats"), batch=_x())
    # body is per-sample; the BatchNorm without running statistics is where samples meet
    assert "first mixing in module 'norm' (BatchNorm1d)" in r.headline
    assert r.metrics["module"] == "norm"


def test_batch_independent_attention_across_the_batch():
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(1))
    bad = batch_independent(model=SeqNet(batch_first=False), batch=x)
    assert bad.passed is False and "first mixing in module 'attn'" in bad.headline
    assert batch_independent(model=SeqNet(batch_first=True), batch=x).passed is True


def test_batch_independent_healthy_twin_passes_and_train_mode_sees_batchnorm():
    assert batch_independent(model=MixNet(), batch=_x()).passed is True
    # in train mode BatchNorm legitimately uses the batch's statistics
    r = batch_independent(mode="train", model=MixNet(), batch=_x())
    assert r.passed is False and "'norm'" in r.headline


def test_batch_independent_tiles_a_small_batch():
    r = batch_independent(model=MixNet("mean_dim0"), batch=_x(n=1))
    assert r.passed is False and r.metrics["samples"] == 3


def test_batch_independent_skips_integer_and_packed_inputs():
    # token ids are checked by changing them (tests/checks/test_token_inputs.py); integers that
    # are neither looked up in an embedding nor 0/1 masks (here: counts) are left alone
    class Counts(nn.Module):
        def forward(self, counts):
            return counts.float() * 2

    r = batch_independent(model=Counts(), batch=torch.randint(2, 10, (4, 3)))
    assert r.passed is None and "no floating input" in r.headline

    class Packed(nn.Module):
        def forward(self, batch):
            return torch.zeros(batch["targets"].shape).index_add(0, batch["owner"], batch["pulses"])

    packed = {"pulses": torch.randn(7, 2), "owner": torch.tensor([0, 0, 1, 2, 2, 2, 3]),
              "targets": torch.zeros(4, 2)}
    r = batch_independent(model=Packed(), batch=packed)
    assert r.passed is None
    assert r.headline.startswith("packed or ragged batch: input[0]['pulses'] has first dimension 7"
                                 " for 4 samples")


@pytest.mark.parametrize("kwargs, text", [
    ({"atol": -1}, "atol=-1: expected a number >= 0"),
    ({"atol": "x"}, "atol='x'"),
    ({"mode": "test"}, "mode='test': expected 'eval' or 'train'"),
])
def test_batch_independent_usage_errors(kwargs, text):
    with pytest.raises(UsageError) as err:
        batch_independent(**kwargs, model=MixNet(), batch=_x())
    assert text in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# params_learn
# ------------------------------------------------------------------------------------------------
class Head(nn.Module):
    def __init__(self, dead_aux):
        super().__init__()
        self.main = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)
        self.dead_aux = dead_aux

    def forward(self, h):
        aux = self.aux(h)
        return self.main(h) + (0.0 if self.dead_aux else 1.0) * aux  # * 0.0: zero gradient


class LearnNet(nn.Module):
    def __init__(self, bug=None):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
        self.head = Head(dead_aux=(bug == "dead_branch"))
        self.bug = bug

    def forward(self, x):
        h = torch.tanh(self.encoder(x))
        if self.bug == "detach":
            h = h.detach()
        return self.head(h)


class FrozenEncoderNet(LearnNet):
    """Encoder frozen the right way: no grad, and kept in eval by train()."""

    def __init__(self, keep_eval=True):
        super().__init__()
        self.encoder.requires_grad_(False)
        self.keep_eval = keep_eval

    def train(self, mode=True):
        super().train(mode)
        if self.keep_eval:
            self.encoder.eval()
        return self


class SpectralConv1d(nn.Module):
    """FNO layer; with modes > n//2 + 1 the weights of the higher modes are never used."""

    def __init__(self, channels, modes):
        super().__init__()
        self.modes = modes
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(channels, channels, modes, dtype=torch.cfloat,
                                               generator=g) / channels)

    def forward(self, x):
        x_ft = torch.fft.rfft(x)
        k = min(self.modes, x_ft.shape[-1])  # silently drops the modes the grid cannot hold
        out_ft = torch.zeros_like(x_ft)
        out_ft[..., :k] = torch.einsum("bik,iok->bok", x_ft[..., :k], self.weight[..., :k])
        return torch.fft.irfft(out_ft, n=x.shape[-1])


def test_params_learn_names_a_dead_branch():
    r = params_learn(model=LearnNet("dead_branch"), batch=_x())
    assert r.passed is False
    # 1 step, then 3 more given for zero-initialised parts to open: a branch times 0.0 never does
    assert r.headline == ("expected every trainable parameter to change within 4 steps, observed"
                          " 'head.aux.weight' (Linear 'head.aux') unchanged (zero gradient)"
                          " and 1 more")
    assert "nor in 3 more given for zero-initialised parts to open" in r.details
    assert "head.aux.bias" in r.details


def test_params_learn_names_a_detached_encoder():
    r = params_learn(model=LearnNet("detach"), batch=_x())
    assert r.passed is False
    # encoder.0.weight, encoder.0.bias, encoder.1.weight, encoder.1.bias: 1 named + 3 more
    assert ("observed 'encoder.0.weight' (Linear 'encoder.0') unchanged (no gradient) and 3 more"
            in r.headline)


def test_params_learn_reports_fourier_weights_never_reached():
    x = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(0))
    # a 16-point grid holds 16//2 + 1 = 9 modes; with 16 weights, 7/16 = 44% never move
    r = params_learn(model=SpectralConv1d(2, 16), batch=x)
    assert r.passed is False
    # (1 step, then 3 more in case zero-initialised parts held them: the high modes never move)
    assert r.headline == ("expected every element of every trainable parameter to change within 4"
                          " steps, observed 44% of 'weight' (SpectralConv1d '<root>') unchanged"
                          " (28/64 elements)")  # 2*2*7 = 28 of 2*2*16 = 64
    assert params_learn(model=SpectralConv1d(2, 9), batch=x).passed is True
    assert params_learn(min_fraction=0.5, model=SpectralConv1d(2, 16), batch=x).passed is True


def test_params_learn_healthy_and_frozen_the_right_way():
    assert params_learn(model=LearnNet(), batch=_x()).passed is True
    r = params_learn(frozen=["encoder.*"], model=FrozenEncoderNet(), batch=_x(), steps=2)
    assert r.passed is True, r.headline
    assert r.metrics["frozen"] == 4


def test_params_learn_frozen_by_name_but_still_trained():
    r = params_learn(frozen=["head.main.*"], model=LearnNet(), batch=_x())
    assert r.passed is False
    assert r.headline.startswith("expected frozen parameter 'head.main.weight' (Linear 'head.main')"
                                 " unchanged after 1 step, observed 24/24 elements changed (it"
                                 " requires grad")  # 3*8 = 24 weights


def test_params_learn_frozen_batchnorm_statistics_still_updated():
    r = params_learn(frozen=["encoder.*"], model=FrozenEncoderNet(keep_eval=False), batch=_x())
    assert r.passed is False
    assert r.headline == ("expected buffers of frozen modules unchanged after 1 step, observed"
                          " 'encoder.1.running_mean' (BatchNorm1d 'encoder.1') changed and 2 more")


@pytest.mark.parametrize("kwargs, text", [
    ({"steps": 0}, "steps=0: expected an int >= 1"),
    ({"lr": 0}, "lr=0: expected a learning rate > 0"),
    ({"optimizer": "lbfgs"}, "optimizer='lbfgs'"),
    ({"frozen": 3}, "frozen=3: expected a list of names or glob patterns"),
    ({"min_fraction": 1.5}, "min_fraction=1.5: expected a fraction in (0, 1]"),
])
def test_params_learn_usage_errors(kwargs, text):
    with pytest.raises(UsageError) as err:
        params_learn(**kwargs, model=LearnNet(), batch=_x())
    assert text in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# eval_deterministic
# ------------------------------------------------------------------------------------------------
class NoisyNet(nn.Module):
    def __init__(self, bug=None):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)
        self.bug = bug

    def forward(self, x):
        h = self.body(x)
        if self.bug == "functional_dropout":
            h = F.dropout(h, 0.1)  # training defaults to True
        elif self.bug == "noise":
            h = h + 0.01 * torch.randn_like(h)
        else:
            h = F.dropout(h, 0.1, training=self.training)
        return self.head(self.drop(h))


@pytest.mark.parametrize("bug", ["functional_dropout", "noise"])
def test_eval_deterministic_catches_randomness_in_eval(bug):
    r = eval_deterministic(model=NoisyNet(bug), batch=_x())
    assert r.passed is False
    assert r.headline.startswith("expected identical eval outputs under different seeds, observed"
                                 " output differs by up to ")
    # the noise enters in forward's own code between body and drop: drop is the first module
    # whose output differs
    assert r.headline.endswith("; first differing module 'drop' (Dropout)")


def test_eval_deterministic_healthy_twin_passes():
    r = eval_deterministic(model=NoisyNet(), batch=_x())
    assert r.passed is True and r.metrics["outputs"] == 1


# ------------------------------------------------------------------------------------------------
# stateless_forward
# ------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, bug):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.bug = bug
        self.cache = []
        self.calls = 0
        self.last = torch.zeros(())
        self.table = None
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x):
        h = self.lin(x)
        if self.bug == "cache":
            self.cache.append(h)
        elif self.bug == "counter":
            self.calls += 1
        elif self.bug == "last":
            self.last = h.mean()
        elif self.bug == "buffer":
            self.seen += x.shape[0]
        elif self.bug == "input":
            x.mul_(2)
        if self.table is None:  # built once, lazily: tolerated
            self.table = torch.arange(8.0)
        return h + self.table


class StatefulNet(nn.Module):
    def __init__(self, bug=None):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = Encoder(bug)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


@pytest.mark.parametrize("bug, observed", [
    ("cache", "attribute 'cache' of module 'encoder' changed (list length 0 -> 1)"),
    ("counter", "attribute 'calls' of module 'encoder' changed (0 -> 1)"),
    ("last", "attribute 'last' of module 'encoder' changed (tensor values)"),
    ("buffer", "buffer 'encoder.seen' changed"),
])
def test_stateless_forward_names_the_changed_state(bug, observed):
    r = stateless_forward(model=StatefulNet(bug), batch=_x())
    assert r.passed is False
    assert r.headline == f"expected forward to leave the model unchanged, observed {observed}"


def test_stateless_forward_catches_an_input_changed_in_place():
    r = stateless_forward(model=StatefulNet("input"), batch=_x())
    assert r.headline == ("expected forward to leave its inputs unchanged, observed input[0]"
                          " modified in place")


def test_stateless_forward_healthy_lazy_and_ignored():
    r = stateless_forward(model=StatefulNet(), batch=_x())
    assert r.passed is True and r.metrics["lazily_set"] == 1
    assert "encoder.table" in r.details
    assert stateless_forward(ignore=["encoder.cal*"], model=StatefulNet("counter"),
                             batch=_x()).passed is True


def test_stateless_forward_usage_error():
    with pytest.raises(UsageError, match=r"ignore=\[1\]: expected a list of names"):
        stateless_forward(ignore=[1], model=StatefulNet(), batch=_x())


# ------------------------------------------------------------------------------------------------
# state_roundtrip
# ------------------------------------------------------------------------------------------------
class ScaledNet(nn.Module):
    def __init__(self, kind="buffer"):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        scale = torch.rand(3) + 0.5  # randomised at construction
        if kind == "plain":
            self.scale = scale
        else:
            self.register_buffer("scale", scale, persistent=(kind == "buffer"))

    def forward(self, x):
        return self.lin(x) * self.scale


class RoundtripNet(nn.Module):
    def __init__(self, kind="buffer"):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
        self.scaled = ScaledNet(kind)

    def forward(self, x):
        return self.scaled(self.body(x))


class MetadataNet(RoundtripNet):
    """neuraloperator's habit: the constructor's arguments, a function among them, saved in the
    state_dict, which torch.load(weights_only=True) then refuses."""

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        state["_metadata"] = {"width": 6, "non_linearity": torch.nn.functional.gelu}
        return state

    def load_state_dict(self, state, *args, **kwargs):
        state = {k: v for k, v in state.items() if k != "_metadata"}
        return super().load_state_dict(state, *args, **kwargs)


class ExtraStateNet(RoundtripNet):
    """Plain-typed extra state (torch's get_extra_state): a non-tensor state_dict entry that
    weights_only loading accepts."""

    def get_extra_state(self):
        return {"version": "0.1.0", "width": 6}

    def set_extra_state(self, state):
        self.loaded_state = state


def test_state_roundtrip_passes_with_plain_extra_state():
    model = ExtraStateNet()
    assert not isinstance(model.state_dict()["_extra_state"], torch.Tensor)
    r = state_roundtrip(model=model, batch=_x())
    assert r.passed is True, r.headline


def test_state_roundtrip_names_metadata_that_weights_only_loading_refuses():
    r = state_roundtrip(model=MetadataNet(), batch=_x())
    assert r.passed is False
    assert ("observed entry '_metadata' (dict) of the state_dict references"
            " torch._C._nn.gelu, which weights_only loading") in r.headline
    assert "add_safe_globals" in r.details and "\x1b" not in r.headline
    assert state_roundtrip(model=RoundtripNet(), batch=_x()).passed is True


def test_state_roundtrip_names_a_plain_tensor_attribute():
    torch.manual_seed(0)
    r = state_roundtrip(model=RoundtripNet("plain"), batch=_x())
    assert r.passed is False
    assert r.headline.startswith("expected a reloaded state_dict to reproduce the outputs, observed"
                                 " plain tensor attribute 'scale' of module 'scaled' (not in"
                                 " state_dict) changes them, output by up to ")
    assert r.metrics["attribute"] == "scaled.scale"


def test_state_roundtrip_non_persistent_buffer_with_a_factory():
    torch.manual_seed(0)
    r = state_roundtrip(factory=lambda: RoundtripNet("non_persistent"),
                        model=RoundtripNet("non_persistent"), batch=_x())
    assert r.passed is False
    assert r.headline.startswith("expected a reloaded state_dict to reproduce the outputs, observed"
                                 " output differs by up to ")


class Standardized(nn.Module):
    def __init__(self, fitted=True):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        # a deterministic non-persistent buffer: a fresh instance re-creates it identically
        self.register_buffer("freq", torch.linspace(0.5, 1.5, 6), persistent=False)
        self.register_buffer("mean", torch.zeros(6), persistent=False)

    def forward(self, x):
        return self.lin((x - self.mean) * self.freq)


def test_state_roundtrip_non_persistent_buffer_changed_after_construction():
    torch.manual_seed(0)
    model = Standardized()
    with torch.no_grad():
        model.mean.fill_(2.0)  # fitted on the data after construction: not saved by state_dict
    r = state_roundtrip(model=model, batch=_x())
    assert r.passed is False
    assert r.headline.startswith("expected a reloaded state_dict to reproduce the outputs, observed"
                                 " non-persistent buffer 'mean' of the model (not in state_dict)"
                                 " was changed after construction; a fresh instance changes output"
                                 " by up to ")
    assert r.metrics["attribute"] == "mean"


def test_state_roundtrip_non_persistent_buffer_built_in_init_passes():
    torch.manual_seed(0)
    r = state_roundtrip(model=Standardized(), batch=_x())
    assert r.passed is True, r.headline
    assert r.metrics["nonpersistent_buffers_lost"] == 0


def test_state_roundtrip_healthy_twins_pass():
    torch.manual_seed(0)
    assert state_roundtrip(model=RoundtripNet("buffer"), batch=_x()).passed is True
    torch.manual_seed(0)
    r = state_roundtrip(factory=RoundtripNet, model=RoundtripNet("buffer"), batch=_x())
    assert r.passed is True and r.metrics["factory"] is True


def test_state_roundtrip_factory_of_another_architecture():
    r = state_roundtrip(factory=lambda: nn.Linear(6, 3), model=RoundtripNet(), batch=_x())
    assert r.passed is False
    assert r.headline.startswith("expected the saved state_dict to load into a fresh instance,"
                                 " observed RuntimeError: Error(s) in loading state_dict for Linear")


def test_state_roundtrip_usage_error():
    with pytest.raises(UsageError, match=r"factory=3: expected None or a callable"):
        state_roundtrip(factory=3, model=RoundtripNet(), batch=_x())


# ------------------------------------------------------------------------------------------------
# every check leaves the caller's model alone; the example models pass
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run", [
    lambda m, b: batch_independent(model=m, batch=b),
    lambda m, b: params_learn(model=m, batch=b),
    lambda m, b: eval_deterministic(model=m, batch=b),
    lambda m, b: stateless_forward(model=m, batch=b),
    lambda m, b: state_roundtrip(model=m, batch=b),
], ids=["batch_independent", "params_learn", "eval_deterministic", "stateless_forward",
        "state_roundtrip"])
def test_checks_leave_the_model_untouched(run):
    model, x = StatefulNet("cache"), _x()
    model.train()
    before, x_before = model_fingerprint(model), x.clone()
    run(model, x)
    assert fingerprints_equal(before, model_fingerprint(model)) == []
    assert torch.equal(x, x_before) and model.encoder.cache == []


EXAMPLES = ["icecube_deepsets", "genesis_dit", "pix2pixcc_gan", "vnet_unet", "fno", "vit3d",
            "swinir"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_models_pass(name):
    mod = importlib.import_module(f"example_models.{name}")
    torch.manual_seed(0)
    model = mod.build_model()
    # the packed IceCube batch needs its factory to change size
    batch = mod.make_batch if name == "icecube_deepsets" else mod.make_batch(4)
    for check in (batch_independent, params_learn, eval_deterministic, stateless_forward,
                  state_roundtrip):
        r = check(model=model, batch=batch, loss=mod.loss_fn)
        if name == "icecube_deepsets" and check is batch_independent:
            assert r.passed is None and "packed or ragged batch" in r.headline
        else:
            assert r.passed is True, f"{check.__name__}: {r.headline}"
