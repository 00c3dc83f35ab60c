"""data_sane and check_data: planted data bugs, healthy twins, loaders, train/val overlap, usage errors."""
import importlib

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from example_models import icecube_deepsets as ice
from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.data import data_sane
from pytest_modelcheck.core.datacheck import check_data

MODEL = torch.nn.Identity()
NAMES = ["time", "charge", "sensor_id", "auxiliary"]


def _pulses(time_offset):
    """IceCube pulses with time normalised as (t - offset) / 3e4 over a 0..30000 ns window."""
    batch = ice.make_batch(4)
    pulses = batch["pulse_features"].clone()
    pulses[:, 0] = (pulses[:, 0] - time_offset) / 3e4
    return dict(batch, pulse_features=pulses)


SPEC = {"pulse_features": {"feature_names": NAMES, "features": {"time": (0, 1)}}}


def test_seed_time_normalisation_fails_naming_the_feature():
    # seed 003: (time - 1e4) / 3e4 maps the first third of the window below zero
    r = data_sane(SPEC, model=MODEL, batch=_pulses(1e4))
    assert r.passed is False
    assert r.headline.startswith("expected feature 'time' (column 0) of input['pulse_features']"
                                 " within [0, 1], observed range [-0.")
    assert r.metrics["problems"] == 1


def test_fixed_time_normalisation_passes():
    r = data_sane(SPEC, model=MODEL, batch=_pulses(0.0))
    assert r.passed is True, r.headline


def _images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_nonfinite_input_fails_naming_the_index():
    x, y = _images()
    x[2, 1, 0, 3] = float("nan")
    r = data_sane(model=MODEL, batch=(x, y))
    assert r.passed is False
    assert r.headline == ("expected finite values in input[0], observed 1/384 non-finite values"
                          " (first at index (2, 1, 0, 3))")  # 8*3*4*4 = 384


def test_constant_channel_fails_and_can_be_allowed():
    x, y = _images()
    x[:, 1] = 0.5  # a dead channel: one value over every sample and pixel
    r = data_sane(model=MODEL, batch=(x, y))
    assert r.passed is False
    assert r.headline.startswith("expected channel 1 of input[0] to vary across the 8 samples,"
                                 " observed the constant 0.5")
    assert data_sane({"constant_channels": False}, model=MODEL, batch=(x, y)).passed is True
    # three samples are too few to call a channel constant
    assert data_sane(model=MODEL, batch=(x[:3], y[:3])).passed is True


class _MaskedMean(torch.nn.Module):
    def forward(self, x, mask):
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


def test_positions_padded_in_every_sample_are_not_dead_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 10, 3, generator=g)
    mask = torch.ones(8, 10)
    mask[:, 7:] = 0  # padded to a fixed length 10: positions 7..9 are zero in every sample
    x[:, 7:] = 0
    assert data_sane(model=_MaskedMean(), batch=((x, mask), None)).passed is True
    # True = padded (key_padding_mask convention): the minority value marks the padding
    assert data_sane(model=_MaskedMean(), batch=((x, mask == 0), None)).passed is True
    # a real position that is constant in every sample is still reported
    x[:, 2] = 0.5
    r = data_sane(model=_MaskedMean(), batch=((x, mask), None))
    assert r.passed is False
    assert r.headline.startswith("expected channel 2 of input[0] to vary across the 8 samples,"
                                 " observed the constant 0.5")


def test_a_loader_of_padded_batches_is_checked_the_same_way():
    # check_data (loaders) and data_sane (one batch) share the constant-channel rule
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 10, 3, generator=g)
    mask = torch.ones(16, 10)
    mask[:, 7:] = 0
    x[:, 7:] = 0
    def batches():  # dict batches, as a collate function of a set model yields them
        return [{"x": x[i:i + 8], "mask": mask[i:i + 8]} for i in (0, 8)]

    assert check_data(batches()).passed is True
    x[:, 2] = 0.5
    bad = check_data(batches())
    assert bad.passed is False and "channel 2" in bad.headline, bad.headline


def test_healthy_images_pass_a_full_spec():
    x, y = _images(64)
    spec = {0: {"shape": ("B", 3, "H", "W"), "dtype": "float32", "mean": 0.0, "std": 1.0,
                "tol": 0.2, "range": (-6, 6)},
            "target": {"shape": ("B",), "dtype": torch.int64, "classes": 3, "min_classes": 3,
                       "max_class_fraction": 0.6}}
    r = data_sane(spec, model=MODEL, batch=(x, y))
    assert r.passed is True, r.headline


@pytest.mark.parametrize("change, spec, headline", [
    (lambda x, y: (x[:, :2], y), {0: {"shape": ("B", 3, "H", "W")}},
     "expected input[0] of shape ('B', 3, 'H', 'W'), observed shape (64, 2, 4, 4): dim 1 is 2, expected 3"),
    (lambda x, y: (x.double(), y), {0: {"dtype": "float32"}},
     "expected input[0] of dtype float32, observed dtype float64"),
    (lambda x, y: (x * 255, y), {0: {"range": (-6, 6)}},
     "expected input[0] within [-6, 6], observed range [-"),
    (lambda x, y: (x + 3, y), {0: {"mean": 0.0, "tol": 0.2}},
     "expected input[0] mean 0 +/- 0.2, observed mean 2.998"),
    (lambda x, y: (x * 10, y), {0: {"std": 1.0, "tol": 0.2}},
     "expected input[0] std 1 +/- 20%, observed std 10.02"),
    (lambda x, y: (x, y + 1), {"target": {"classes": 3}},
     "expected target labels in [0, 1, 2], observed unexpected label(s) [3]"),
    (lambda x, y: (x, y * 0), {"target": {"max_class_fraction": 0.6}},
     "expected no class above 60% of target, observed class 0 is 100%"),
    (lambda x, y: (x, y * 0), {"target": {"min_classes": 2}},
     "expected at least 2 classes in target, observed 1 ([0])"),
    (lambda x, y: (x, y), {5: {"range": (0, 1)}}, "expected a tensor named 5 in the batch, observed none"),
])
def test_each_spec_entry_fails_when_violated(change, spec, headline):
    r = data_sane(spec, model=MODEL, batch=change(*_images(64)))
    assert r.passed is False
    assert r.headline.startswith(headline), r.headline


def _loader(x, y, batch_size=8):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def test_check_data_on_loaders_and_overlap():
    x, y = _images(64)
    train = _loader(x[:48], y[:48])
    clean_val = _loader(x[48:], y[48:])
    leaky_val = _loader(torch.cat([x[48:56], x[10:13]]), torch.cat([y[48:56], y[10:13]]))
    ok = check_data(train, {0: {"range": (-6, 6)}}, val=clean_val)
    assert ok.passed is True, ok.headline
    assert ok.metrics["batches"] == 5 and ok.metrics["samples"] == 40  # max_batches=5 of 8
    assert ok.metrics["duplicated_samples"] == 0
    bad = check_data(train, None, val=leaky_val, max_batches=6)
    assert bad.passed is False
    # validation samples 8, 9, 10 are training samples 10, 11, 12
    assert bad.headline == ("expected no validation sample among the training samples, observed 3"
                            " duplicated samples (e.g. validation sample 8 equals training sample 10)")
    assert bad.metrics["duplicate_example"] == [8, 10]


def test_check_data_reports_the_batch_of_a_problem():
    x, y = _images(32)
    x[20] = float("inf")
    r = check_data(_loader(x, y), {})
    assert r.passed is False
    # sample 20 is the 5th sample of batch 2 (batches of 8)
    # 3*4*4 = 48 infinite values out of 8*3*4*4 = 384 in that batch
    assert r.headline == ("expected finite values in input[0], observed 48/384 non-finite values"
                          " (first at index (4, 0, 0, 0)) in batch 2")


@pytest.mark.parametrize("spec, message", [
    ("x", "spec='x': expected a dict"),
    ({0: (0, 1)}, "spec[0]=(0, 1): expected a dict such as"),
    ({0: {"rnage": (0, 1)}}, "spec[0]: unknown key(s) rnage"),
    ({0: {"range": (1, 0)}}, "spec[0]['range']=(1, 0): expected a (lo, hi) pair"),
    ({0: {"dtype": "float33"}}, "spec[0]['dtype']='float33': expected a torch dtype"),
    ({0: {"features": {"time": (0, 1)}}}, "spec[0]['features']: column 'time' is not in feature_names"),
    ({"target": {"max_class_fraction": 2}}, "spec['target']['max_class_fraction']=2: expected a number in [0, 1]"),
    ({0: {"shape": ("B", 1.5)}}, "spec[0]['shape']=('B', 1.5): dimension 1.5"),
])
def test_usage_errors(spec, message):
    with pytest.raises(UsageError) as info:
        data_sane(spec, model=MODEL, batch=_images())
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_check_data_usage_errors():
    with pytest.raises(UsageError, match=r"^max_batches=0: expected a positive integer$"):
        check_data([_images()], max_batches=0)
    with pytest.raises(UsageError, match=r"^loader_or_batches=3: expected a DataLoader"):
        check_data(3)


@pytest.mark.parametrize("name", ["icecube_deepsets", "genesis_dit", "pix2pixcc_gan", "vnet_unet",
                                  "fno", "vit3d", "swinir"])
def test_example_models_pass_by_default(name):
    mod = importlib.import_module(f"example_models.{name}")
    batch = mod.make_batch if name == "icecube_deepsets" else mod.make_batch(4)
    r = data_sane(model=mod.build_model(), batch=batch)
    assert r.passed is True, r.headline


# -- the label shift of language models ----------------------------------------------------------
class _TokenLM(torch.nn.Module):
    """(B, T) token ids -> (B, T, V) logits; with ``labels`` it computes its own loss, shifting
    inside as Hugging Face causal LMs do (so labels == input_ids is right for it)."""

    def __init__(self, vocab=11, own_loss=False):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)
        self.own_loss = own_loss

    def forward(self, input_ids, labels=None):
        logits = self.head(self.emb(input_ids))
        if labels is None or not self.own_loss:
            return logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return {"loss": loss, "logits": logits}


def _ids():
    return torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(0))


def test_a_language_model_batch_without_the_label_shift_fails():
    ids = _ids()
    r = data_sane(model=_TokenLM(), batch=(ids, ids.clone()))
    assert r.passed is False
    assert r.headline.startswith("expected a target that is the next token of input[0]")
    assert "target[:, t] == input[0][:, t] at all 36 positions" in r.headline  # 4 x 9 tokens


def test_a_target_lagging_its_input_fails():
    ids = _ids()
    r = data_sane(model=_TokenLM(), batch=(ids[:, 1:], ids[:, :-1]))  # shifted the wrong way
    assert r.passed is False and "input[0][:, t-1] at all 28 positions" in r.headline  # 4 x 7


def test_the_shifted_language_model_batch_passes():
    ids = _ids()
    r = data_sane(model=_TokenLM(), batch=(ids[:, :-1], ids[:, 1:]))
    assert r.passed is True, r.headline


def test_ignored_positions_and_the_opt_out():
    ids = _ids()
    target = ids.clone()
    target[:, :2] = -100  # padding ignored: the rest still copies the input
    assert data_sane(model=_TokenLM(), batch=(ids, target)).passed is False
    assert data_sane({"label_shift": False}, model=_TokenLM(), batch=(ids, target)).passed is True


def test_labels_equal_to_input_ids_pass_when_the_model_computes_its_own_loss():
    ids = _ids()
    batch = {"input_ids": ids, "labels": ids.clone()}
    assert data_sane(model=_TokenLM(own_loss=True), batch=batch).passed is True
    # the same batch for a model that does not shift (no loss of its own) is the bug
    r = data_sane(model=_TokenLM(own_loss=False), batch=batch)
    assert r.passed is False and "input['input_ids'][:, t]" in r.headline


def test_float_inputs_reconstructed_by_an_autoencoder_pass():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    assert data_sane(model=torch.nn.Linear(6, 6), batch=(x, x.clone())).passed is True
