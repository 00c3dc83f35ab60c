"""discriminator_scales and gan_pairs: planted bugs fail naming the cause, healthy twins pass,
bad arguments are one-line usage errors."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_modelcheck.checks.gan import discriminator_scales, gan_pairs
from pytest_modelcheck.core.errors import UsageError


# ------------------------------------------------------------------------------ tiny 2D cGAN
class PatchD(nn.Module):
    """A 2D PatchGAN returning its feature maps; ``kill`` puts its output through a ReLU after a
    bias of -100 (every value 0), ``squash`` through a sigmoid of a huge logit."""

    def __init__(self, cin=2, kill=False, squash=False):
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(cin, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.2)),
            nn.Conv2d(4, 1, 3, padding=1)])
        self.kill, self.squash = kill, squash
        if kill:
            with torch.no_grad():
                self.blocks[1].bias.fill_(-100.0)

    def forward(self, x):
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        if self.kill:
            feats[-1] = F.relu(feats[-1])
        if self.squash:
            feats[-1] = torch.sigmoid(1e4 * feats[-1])
        return feats


class MultiD(nn.Module):
    def __init__(self, n_scales=2, logits_only=False, **bug):
        super().__init__()
        self.scales = nn.ModuleList(
            PatchD(**(bug if i == n_scales - 1 else {})) for i in range(n_scales))
        self.logits_only = logits_only

    def forward(self, x):
        outs = []
        for i, d in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 2)
            outs.append(d(x)[-1] if self.logits_only else d(x))
        return outs


class TinyGAN(nn.Module):
    def __init__(self, zero_last_conv=False, **disc):
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(4, 1, 3, padding=1))
        self.discriminator = MultiD(**disc)
        if zero_last_conv:
            with torch.no_grad():
                self.discriminator.scales[1].blocks[-1].weight.zero_()
                self.discriminator.scales[1].blocks[-1].bias.fill_(0.25)

    def forward(self, cond):
        return self.generator(cond)

    def judge(self, pair):
        return self.discriminator(pair)

    def make_pairs(self, cond, real, fake):
        return torch.cat([cond, real], 1), torch.cat([cond, fake], 1)


def _batch(n=4, size=16):
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(n, 1, size, size, generator=g)
    return cond, torch.tanh(cond) + 0.1 * torch.randn(n, 1, size, size, generator=g)


# ------------------------------------------------------------------------------ discriminator_scales
def test_scales_healthy_discriminator_passes_and_saves_the_plot(tmp_path):
    path = tmp_path / "d.png"
    r = discriminator_scales(plot=str(path), model=TinyGAN(), batch=_batch())
    assert r.passed is True, r.headline
    assert "observed 2 responding scales (output-map separation real/fake: scale 0 " in r.headline
    assert r.metrics["constant_scales"] == []
    assert [len(v) for v in r.metrics["separation"].values()] == [2, 2]
    assert all(v > 0 for seps in r.metrics["separation"].values() for v in seps)
    assert r.metrics["plot"] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scales_plot_defaults_to_a_file_per_test_in_the_temp_dir():
    r = discriminator_scales(model=TinyGAN(), batch=_batch())
    plot = r.metrics["plot"]
    assert os.path.isfile(plot) and plot.endswith(".png")
    assert "test_scales_plot_defaults_to_a_file_per_test" in os.path.basename(plot)
    assert "plot" not in discriminator_scales(plot=None, model=TinyGAN(), batch=_batch()).metrics


def test_scales_zero_weight_last_conv_fails_naming_the_dead_scale():
    r = discriminator_scales(plot=None, model=TinyGAN(zero_last_conv=True), batch=_batch())
    assert r.passed is False
    assert ("observed scale 1 (discriminator.scales.1) outputs a constant (0.25) on real and fake"
            " samples (its last layer): a dead scale") in r.headline
    assert r.metrics["constant_scales"] == ["scale 1"]


def test_scales_relu_that_kills_everything_fails_naming_the_dead_scale():
    r = discriminator_scales(plot=None, model=TinyGAN(kill=True), batch=_batch())
    assert r.passed is False
    assert "scale 1 (discriminator.scales.1) outputs a constant (0) on real and fake" in r.headline


def test_scales_saturated_sigmoid_fails():
    r = discriminator_scales(plot=None, model=TinyGAN(squash=True), batch=_batch())
    assert r.passed is False
    assert "scale 1 (discriminator.scales.1) is saturated (100% of its output map" in r.headline


def test_scales_min_separation_fails_a_scale_that_separates_too_little():
    r = discriminator_scales(min_separation=1e3, plot=None, model=TinyGAN(), batch=_batch())
    assert r.passed is False
    assert "separation >= 1000), observed scale 0 (discriminator.scales.0) separates real from" \
        " fake by" in r.headline
    assert "(and 1 more)" in r.headline


def test_scales_logits_per_scale_method_and_pair_builder():
    model = TinyGAN(logits_only=True, zero_last_conv=True)
    r = discriminator_scales("judge", pairs="make_pairs", generator="generator", plot=None,
                             model=model, batch=_batch())
    assert r.passed is False
    assert "observed scale 1 outputs a constant (0.25)" in r.headline  # no submodule to name
    healthy = discriminator_scales("judge", pairs=lambda c, v: torch.cat([c, v], 1), plot=None,
                                   model=TinyGAN(logits_only=True), batch=_batch())
    assert healthy.passed is True, healthy.headline
    assert healthy.metrics["scales"] == 2


def test_scales_skips_when_the_target_is_not_like_the_generated_sample():
    r = discriminator_scales(plot=None, model=TinyGAN(), batch=(_batch()[0], torch.zeros(4)))
    assert r.passed is None
    assert "differ in shape" in r.headline


def test_scales_missing_discriminator_is_a_usage_error_at_run_time():
    with pytest.raises(UsageError) as info:
        discriminator_scales("disc", plot=None, model=TinyGAN(), batch=_batch())
    assert str(info.value) == ("discriminator='disc': the model (TinyGAN) has no attribute 'disc';"
                               " expected the discriminator submodule or method, such as"
                               " 'discriminator'")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"discriminator": 3}, "discriminator=3: expected the name of a model attribute"),
    ({"discriminator": "a..b"}, "discriminator='a..b': expected the name of a model attribute"),
    ({"generator": ""}, "generator='': expected the name of a model attribute"),
    ({"pairs": 5}, "pairs=5: expected a pair builder"),
    ({"min_separation": -1}, "min_separation=-1: expected a number >= 0"),
    ({"plot": 3}, "plot=3: expected a file path for the PNG, 'auto'"),
])
def test_scales_bad_arguments(kwargs, fragment):
    with pytest.raises(UsageError) as info:
        discriminator_scales(**kwargs, model=TinyGAN(), batch=_batch())
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ gan_pairs
def _cat(*parts):
    return torch.cat(parts, 1)


def test_pairs_healthy_builders_pass():
    r = gan_pairs(lambda c, r, f: (_cat(c, r), _cat(c, f.detach())), model=TinyGAN(), batch=_batch())
    assert r.passed is True, r.headline
    assert r.headline.endswith("observed real pair (cond[0], real[0]), fake pair (cond[0], fake[0])")
    assert r.metrics == {"real_pair": ["cond[0]", "real[0]"], "fake_pair": ["cond[0]", "fake[0]"]}
    assert gan_pairs(lambda c, v: _cat(c, v), model=TinyGAN(), batch=_batch()).passed is True
    assert gan_pairs("make_pairs", model=TinyGAN(), batch=_batch()).passed is True


def test_pairs_swapped_channels_in_the_fake_pair_fail():
    r = gan_pairs(lambda c, r, f: (_cat(c, r), _cat(f, c)), model=TinyGAN(), batch=_batch())
    assert r.passed is False
    assert r.headline.endswith("observed the channel order differs: real pair (cond[0], real[0]),"
                               " fake pair (fake[0], cond[0])")


def test_pairs_real_sample_in_the_fake_pair_is_a_leak():
    r = gan_pairs(lambda c, r, f: (_cat(c, r), _cat(c, r)), model=TinyGAN(), batch=_batch())
    assert r.passed is False
    assert "observed the fake pair contains the real sample (channel 1 comes from real[0]): a" \
        " leak" in r.headline


def test_pairs_condition_where_the_generated_sample_should_be_fails():
    r = gan_pairs(lambda c, r, f: (_cat(c, r), _cat(c, c)), model=TinyGAN(), batch=_batch())
    assert r.passed is False
    assert "observed channel 1 of the fake pair comes from the condition (cond[0]) where the" \
        " generated sample (fake[0]) should be" in r.headline


def test_pairs_multichannel_order_and_scaled_copies():
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g))
    ok = gan_pairs(lambda c, r, f: (_cat(c, 2 * r - 1), _cat(c, 2 * f - 1)), model=TinyGAN(),
                   batch=batch)
    assert ok.passed is True, ok.headline
    assert "real pair (cond[0-1], real[0-2])" in ok.headline
    flipped = gan_pairs(lambda c, r, f: (_cat(c, r), _cat(c, f.flip(1))), model=TinyGAN(),
                        batch=batch)
    assert flipped.passed is False
    assert "fake pair (cond[0-1], fake[2], fake[1], fake[0])" in flipped.headline


def test_pairs_builder_that_raises_fails_naming_it():
    def broken(c, r, f):
        raise RuntimeError("boom")

    r = gan_pairs(broken, model=TinyGAN(), batch=_batch())
    assert r.passed is False
    assert "building the discriminator pairs with " in r.headline
    assert "broken raised RuntimeError: boom" in r.headline


@pytest.mark.parametrize("pairs, fragment", [
    (None, "pairs=None: expected a pair builder"),
    ("not a name", "pairs='not a name': expected a pair builder"),
    (int, "pairs=<class 'int'>: expected a pair builder"),
])
def test_pairs_bad_arguments(pairs, fragment):
    with pytest.raises(UsageError) as info:
        gan_pairs(pairs, model=TinyGAN(), batch=_batch())
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_markers_with_bad_arguments_fail_at_setup_in_one_line(pytester):
    pytester.makeconftest('''
        import pytest
        import torch

        @pytest.fixture
        def model():
            return torch.nn.Identity()

        @pytest.fixture
        def batch():
            return torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)
    ''')
    pytester.makepyfile(test_gan_markers='''
        import pytest

        @pytest.mark.discriminator_scales(discriminator=3)
        def test_scales(model, batch):
            pass

        @pytest.mark.gan_pairs(pairs="not a name")
        def test_pairs(model, batch):
            pass
    ''')
    result = pytester.runpytest("--modelcheck", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*@pytest.mark.discriminator_scales: discriminator=3: expected the name of a model"
        " attribute*",
        "*@pytest.mark.gan_pairs: pairs='not a name': expected a pair builder*"])
