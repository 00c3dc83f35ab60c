"""radial_power_spectrum, band_edges, band_ratios against hand-derived values; the PNG plots."""
import math
import sys

import pytest
import torch

from pytest_modelcheck import UsageError
from pytest_modelcheck.core.plots import save_power_spectrum, save_slices
from pytest_modelcheck.core.spectra import band_edges, band_ratios, radial_power_spectrum

PNG = b"\x89PNG\r\n\x1a\n"


def _sine(n, k0, dims, axis=-1, amplitude=1.0):
    x = torch.arange(n, dtype=torch.float64)
    wave = amplitude * torch.sin(2 * math.pi * k0 * x / n)
    shape = [1] * dims
    shape[axis] = n
    return wave.view(shape).expand(*([n] * dims))


def test_1d_sine_power_sits_in_its_bin_with_the_hand_derived_value():
    k, p = radial_power_spectrum(_sine(16, 3, 1, amplitude=2.0), ndim=1)
    # a sin(2 pi k0 x / n): |FFT| = a n / 2 at +-k0, so |F|^2 / n^2 = a^2 / 4 = 1 for each of the
    # two modes of the k0 = 3 shell; bins are 1 .. 16 // 2 = 8
    assert k.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert p[2].item() == pytest.approx(1.0)
    assert float(p.sum() - p[2]) < 1e-20


@pytest.mark.parametrize("dims, axis", [(2, -1), (2, 0), (3, 1), (3, -1)])
def test_sine_along_any_axis_in_2d_and_3d_lands_in_bin_k0(dims, axis):
    k, p = radial_power_spectrum(_sine(12, 4, dims, axis), ndim=dims)
    assert k.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert int(p.argmax()) == 3  # bin k = 4
    assert float(p.sum() - p[3]) < 1e-20


def test_leading_dims_are_averaged_and_the_mean_is_left_out():
    a = _sine(8, 1, 2)
    b = _sine(8, 2, 2) + 5.0  # the constant is the DC mode: not in any bin
    field = torch.stack([a, b]).unsqueeze(1)  # (B=2, C=1, 8, 8)
    k, p = radial_power_spectrum(field)
    single_a = radial_power_spectrum(a, ndim=2)[1]
    single_b = radial_power_spectrum(b - 5.0, ndim=2)[1]
    assert torch.allclose(p, (single_a + single_b) / 2)


def test_white_noise_has_a_flat_spectrum():
    x = torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    _, p = radial_power_spectrum(x)
    # unit variance: E|F|^2 / N^2 = N / N^2 = 1 / 1024 per mode, in every shell
    assert torch.allclose(p, torch.full_like(p, 1 / 1024), rtol=0.15)


def test_bad_fields():
    with pytest.raises(UsageError, match="ndim=4: expected 1, 2 or 3"):
        radial_power_spectrum(torch.zeros(2, 2, 4, 4, 4, 4), ndim=4)
    with pytest.raises(UsageError, match="need at least 2 points"):
        radial_power_spectrum(torch.zeros(4, 1), ndim=2)


def test_band_edges_and_ratios():
    k = torch.arange(1.0, 11.0)  # 10 bins split at 10*i//3 = 0, 3, 6: 1-3, 4-6, 7-10
    assert band_edges(k) == [("low", 1.0, 3.0), ("mid", 4.0, 6.0), ("high", 7.0, 10.0)]
    assert band_edges(k, 2) == [("k=1-5", 1.0, 5.0), ("k=6-10", 6.0, 10.0)]
    with pytest.raises(UsageError, match="bands=11: only 10 wavenumber bins"):
        band_edges(k, 11)
    target = torch.ones(10)
    pred = torch.tensor([1.0, 1, 1, 2, 2, 2, 0, 0, 0, 0])
    ratios = band_ratios(k, pred, target)
    assert [(n, r) for n, _, _, r in ratios] == [("low", 1.0), ("mid", 2.0), ("high", 0.0)]
    zero = band_ratios(k, torch.ones(10), torch.zeros(10), [(1, 2)])
    assert zero == [("k=1-2", 1.0, 2.0, math.inf)]


# ----------------------------------------------------------------------------------- plots
def test_save_slices_3d_and_2d(tmp_path):
    vol = torch.rand(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    p3 = save_slices(vol, vol * 0.5, tmp_path / "vol.png", axis=0, log=True)
    p2 = save_slices(vol[:, :, 0], vol[:, :, 1], tmp_path / "img.png")
    for path in (p3, p2):
        with open(path, "rb") as f:
            assert f.read(8) == PNG


def test_save_slices_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="expected the same shape"):
        save_slices(torch.zeros(4, 4), torch.zeros(4, 5), tmp_path / "x.png")
    with pytest.raises(UsageError, match="index=9: outside 0..5"):
        save_slices(torch.zeros(6, 6, 6), torch.zeros(6, 6, 6), tmp_path / "x.png", index=9)
    assert not (tmp_path / "x.png").exists()


def test_save_power_spectrum(tmp_path):
    k = torch.arange(1.0, 9.0)
    path = save_power_spectrum(k, {"target": k ** -2, "prediction": k ** -3}, tmp_path / "pk.png",
                               title="P(k)", bands=band_ratios(k, k ** -3, k ** -2))
    with open(path, "rb") as f:
        assert f.read(8) == PNG
    with pytest.raises(UsageError, match="expected a dict of label"):
        save_power_spectrum(k, [], tmp_path / "none.png")


def test_missing_matplotlib_warns_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.warns(RuntimeWarning, match="matplotlib is not available"):
        assert save_slices(torch.zeros(4, 4), torch.zeros(4, 4), tmp_path / "s.png") is None
    with pytest.warns(RuntimeWarning, match="no plot was saved"):
        assert save_power_spectrum(torch.ones(3), {"a": torch.ones(3)}, tmp_path / "p.png") is None
    assert list(tmp_path.iterdir()) == []
