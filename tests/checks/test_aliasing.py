"""no_aliasing and core.spectra's resampling: a coarse-grid shortcut upsampled with nearest
neighbours fails naming the upsampling; a healthy (resolution-invariant) FNO passes."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from example_models import fno
from pytest_modelcheck import UsageError
from pytest_modelcheck.checks import no_aliasing
from pytest_modelcheck.core.spectra import detrended, fourier_upsample, power_beyond


def _small_fno():
    torch.manual_seed(0)
    return fno.build_model(modes1=4, modes2=4, n_layers=2, width=8)


class CoarseShortcut(nn.Module):
    """The planted bug: to save compute the FNO runs on a half-resolution grid (average pooling)
    and its output is brought back with nearest-neighbour upsampling, whose blocky steps put
    power above the input grid's Nyquist."""

    def __init__(self, mode="nearest"):
        super().__init__()
        self.inner = _small_fno()
        self.up = nn.Upsample(scale_factor=2, mode=mode)

    def forward(self, x):
        return self.up(self.inner(F.avg_pool2d(x, 2)))


def _batch(size=16):
    return fno.make_batch(2, size=size)


def test_planted_nearest_upsampling_fails_naming_the_module(tmp_path):
    r = no_aliasing(plot=str(tmp_path / "a.png"), model=CoarseShortcut(), batch=_batch())
    assert r.passed is False
    assert r.headline.startswith(
        "expected at most 0.005 of the output's power above the example grid's Nyquist on a 2x"
        " finer grid (16x16 -> 32x32), observed ")
    assert ("the model adds high-frequency content when the grid is refined; first seen in the"
            " output of 'up' (Upsample)") in r.headline
    assert r.metrics["fraction_above_nyquist"] > 4 * 5e-3
    assert r.metrics["plot"] == str(tmp_path / "a.png")


def test_healthy_fno_twin_passes_with_matching_spectra():
    r = no_aliasing(plot=None, model=_small_fno(), batch=_batch())
    assert r.passed is True, r.headline
    assert r.metrics["fraction_above_nyquist"] < 1e-3
    assert all(0.8 < v < 1.25 for v in r.metrics["bands"].values()), r.metrics["bands"]
    assert r.metrics["grids"] == [[16, 16], [32, 32]] and "plot" not in r.metrics


def test_a_healthy_fno_on_a_full_band_input_passes():
    """White noise fills the grid up to its Nyquist; the FNO's pointwise nonlinearity makes
    harmonics beyond it, which the finer grid resolves. Without band-limiting the input first,
    this healthy model read as aliasing (0.049 of its power above the Nyquist)."""
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    r = no_aliasing(plot=None, model=_small_fno(), batch=(x, x))
    assert r.passed is True, r.headline
    assert r.metrics["fraction_above_nyquist"] < 1e-3
    planted = no_aliasing(plot=None, model=CoarseShortcut(), batch=(x, x))
    assert planted.passed is False and "'up' (Upsample)" in planted.headline


def test_band_limited_keeps_the_low_modes_and_removes_the_rest():
    from pytest_modelcheck.core.spectra import band_limited

    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    low = band_limited(x, 0.5)
    assert power_beyond(low, (4, 4), window=False) < 1e-12
    assert torch.allclose(band_limited(low, 0.5), low, atol=1e-6)


def test_a_coarse_shortcut_with_bilinear_upsampling_changes_the_spectrum_with_the_grid():
    r = no_aliasing(plot=None, model=CoarseShortcut("bilinear"), batch=_batch())
    assert r.passed is False
    assert "the output changes with the grid" in r.headline
    assert no_aliasing(plot=None, max_band_ratio=None, model=CoarseShortcut("bilinear"),
                       batch=_batch()).passed is True


def test_default_plot_is_a_temporary_png_and_scale_three():
    r = no_aliasing(3, model=_small_fno(), batch=_batch(12))
    assert r.passed is True, r.headline
    assert r.metrics["grids"] == [[12, 12], [36, 36]]
    with open(r.metrics["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_skips_when_the_output_does_not_follow_the_grid():
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    r = no_aliasing(plot=None, model=nn.AdaptiveAvgPool2d(4), batch=_batch())
    assert r.passed is None and "is not a field whose grid follows the input's" in r.headline
    r = no_aliasing(plot=None, model=model, batch=(torch.arange(6).view(2, 3), torch.zeros(2)))
    assert r.passed is None and "is not a floating (B, C, *spatial) field" in r.headline


@pytest.mark.parametrize("kwargs, fragment", [
    ({"scale": 1}, "scale=1: expected an int from 2 to 8"),
    ({"scale": 2.5}, "scale=2.5: expected an int"),
    ({"max_ratio": 0}, "max_ratio=0: expected a fraction in (0, 1)"),
    ({"max_band_ratio": 1}, "max_band_ratio=1: expected a number > 1"),
    ({"plot": 1.5}, "plot=1.5: expected True"),
    ({"input_index": -1}, "input_index=-1: expected an int >= 0"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(UsageError) as info:
        no_aliasing(**kwargs, model=_small_fno(), batch=_batch())
    assert fragment in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- core.spectra helpers
@pytest.mark.parametrize("n", [7, 8])
def test_fourier_upsample_is_exact_on_the_coarse_points_and_band_limited(n):
    x = torch.randn(3, n, n, n, generator=torch.Generator().manual_seed(0))
    y = fourier_upsample(x, 2, ndim=3)
    assert y.shape == (3, 2 * n, 2 * n, 2 * n) and y.dtype == x.dtype
    assert torch.allclose(y[:, ::2, ::2, ::2], x, atol=1e-5)
    assert power_beyond(y, (n // 2,) * 3, ndim=3, window=False) < 1e-12


def test_power_beyond_counts_any_axis_beyond_its_limit_and_ignores_the_mean():
    i = torch.arange(16.0)
    low = torch.sin(2 * math.pi * 2 * i / 16)
    high = torch.sin(2 * math.pi * 7 * i / 16)
    field = 5.0 + low[:, None] * low[None, :] + high[:, None] * low[None, :]
    assert power_beyond(field, (4, 4), window=False) == pytest.approx(0.5)
    assert power_beyond(field, (8, 8), window=False) == 0.0
    assert power_beyond(torch.ones(8, 8), (2, 2)) == 0.0
    with pytest.raises(UsageError, match="expected one limit per spatial axis"):
        power_beyond(field, (4,), ndim=2)
    assert detrended(field).dtype == torch.float64
