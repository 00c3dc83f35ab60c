"""unet_skips, vit_patches, fno_modes, spectrum_matches: planted bugs fail, healthy twins pass."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from example_models import fno, vit3d, vnet_unet
from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.architecture import fno_modes, spectrum_matches, unet_skips, vit_patches


def _line(tag):
    with open(__file__) as f:
        return next(i for i, text in enumerate(f, 1) if f"# {tag}" in text)


# ----------------------------------------------------------------------------------- unet_skips
class Up(nn.Module):
    def __init__(self, ch, crop=False):
        super().__init__()
        self.up = nn.ConvTranspose2d(ch, ch, 2, stride=2)
        self.conv = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.crop = crop

    def forward(self, x, skip):
        x = self.up(x)
        if self.crop:  # silently drops the skip's extra rows/columns
            skip = skip[..., :x.shape[-2], :x.shape[-1]]
        return self.conv(torch.cat([x, skip], dim=1))  # LINE_CAT


class PlantedUNet(nn.Module):
    """Two max-pool downsamplings and no size check: odd sizes break the skips."""

    def __init__(self, crop=False):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.encoder = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(2)])
        self.decoder = nn.ModuleList([Up(4, crop) for _ in range(2)])
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for enc in self.encoder:
            skips.append(x)
            x = enc(F.max_pool2d(x, 2))
        for dec in self.decoder:
            x = dec(x, skips.pop())
        return self.head(x)


def _image(size=16):
    return torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0))


def test_unet_mismatch_names_the_cat_its_module_and_the_size_rule():
    r = unet_skips([16, 17], model=PlantedUNet(), batch=_image())
    # 17 -> pool 8 -> pool 4; decoder.0: up 4 -> 8 matches the skip 8; decoder.1: up 8 -> 16 vs 17.
    # The smallest map at the example size 16 is 4: 16 / 4 = 2**2
    assert r.passed is False
    assert r.headline == ("expected skip connections to match for sizes 16, 17, observed at size 17 a"
                          " mismatch in cat at module 'decoder.1' (16 vs 17 along dim 2) from"
                          f" test_architecture.py:{_line('LINE_CAT')} in forward; sizes must be"
                          " divisible by 2**2 = 4")
    assert r.metrics["depth"] == 2 and r.metrics["failed_sizes"] == ["size 17"]
    assert "[(2, 4, 16, 16), (2, 4, 17, 17)]" in r.details


def test_unet_silent_crop_is_caught_from_the_output_size():
    r = unet_skips([16, 18], model=PlantedUNet(crop=True), batch=_image())
    # 18 -> 9 -> 4; the decoders crop the skips to 8 and 16: the output is 16x16 for an 18x18 input
    assert r.passed is False
    assert "observed at size 18 an output of spatial size (16, 16) for an input of (18, 18)" in r.headline


def test_unet_healthy_at_divisible_sizes():
    r = unet_skips([(16, 16), (24, 32), 8], model=PlantedUNet(), batch=_image())
    assert r.passed is True, r.headline
    assert r.headline == ("expected skip connections to match for sizes (16, 16), (24, 32), 8, observed"
                          " 2 consistent cats at each of 4 sizes (sizes must be divisible by 2**2 = 4)")


def test_vnet_example_passes_on_valid_sizes_and_fails_with_its_own_message():
    model, batch = vnet_unet.build_model(base_channels=4), vnet_unet.make_batch(2)
    assert unet_skips([16, (8, 16, 24)], model=model, batch=batch).passed is True
    r = unet_skips([(16, 16, 16), (18, 18, 18)], model=model, batch=batch)
    assert r.passed is False
    assert r.headline.startswith(
        "expected skip connections to match for sizes (16, 16, 16), (18, 18, 18), observed at size 18"
        " forward raised ValueError in module 'VNetUNet3d' (VNetUNet3d): VNetUNet3d with depth=2")
    assert r.headline.endswith("; sizes must be divisible by 2**2 = 4")


@pytest.mark.parametrize("kwargs, fragment", [
    ({}, "sizes=None: expected the input sizes"),
    ({"sizes": []}, "sizes=[]: expected a non-empty list"),
    ({"sizes": [16, "x"]}, "size 'x' is not a positive int"),
    ({"sizes": [0]}, "size 0 is not a positive int"),
    ({"sizes": [16], "input_index": -1}, "input_index=-1: expected an int >= 0"),
])
def test_unet_bad_arguments(kwargs, fragment):
    with pytest.raises(UsageError) as info:
        unet_skips(**kwargs, model=PlantedUNet(), batch=_image())
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unet_input_index_that_is_not_a_tensor():
    with pytest.raises(UsageError, match="input_index=3: the model's positional input 3 is not a tensor"):
        unet_skips([16], input_index=3, model=PlantedUNet(), batch=_image())


# ----------------------------------------------------------------------------------- vit_patches
class InterpolatingViT(nn.Module):
    """2D patches 4x4, no CLS token, positional embedding resized to the grid."""

    def __init__(self, interpolate=True):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(1, 8, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 16, 8))  # 16x16 image: 4*4 = 16 tokens
        self.interpolate = interpolate
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        t = self.patch(x)
        pos = self.pos_embed
        if self.interpolate:
            grid = self.pos_embed.transpose(1, 2).reshape(1, 8, 4, 4)
            pos = F.interpolate(grid, size=t.shape[-2:], mode="bilinear").flatten(2).transpose(1, 2)
        return self.head((t.flatten(2).transpose(1, 2) + pos).mean(1))


def _vit():
    return vit3d.build_model(depth=1, embed_dim=16, num_heads=2), vit3d.make_batch(2)


def test_vit_example_passes_at_its_size():
    model, batch = _vit()
    r = vit_patches([16], model=model, batch=batch)
    assert r.passed is True, r.headline
    assert r.headline == ("expected ViT patches to tile sizes 16 and fit the positional embedding,"
                          " observed patch 4 of 'patch_embed.proj', 65 positions in 'pos_embed'"
                          " (1 extra tokens) fitting all 2 sizes")
    assert r.metrics["extra_tokens"] == 1  # 65 positions - (16/4)**3 = 64 patches


def test_vit_example_fails_on_a_size_it_cannot_take():
    model, batch = _vit()
    r = vit_patches([16, 24], model=model, batch=batch)
    # (24/4)**3 = 216 patch tokens + 1 CLS = 217 != 65
    assert r.passed is False
    assert r.headline == ("expected ViT patches to tile sizes 16, 24 and fit the positional embedding,"
                          " observed at size 24: 6x6x6 = 216 patch tokens + 1 extra = 217, but"
                          " 'pos_embed' has 65 positions (forward raised ValueError)")
    r = vit_patches([(16, 16, 18)], model=model, batch=batch)
    assert "observed at size (16, 16, 18): 18 is not divisible by patch 4 of 'patch_embed.proj'" in r.headline


def test_vit_that_interpolates_passes_and_says_so():
    r = vit_patches([16, 24], model=InterpolatingViT(), batch=_image(16))
    assert r.passed is True, r.headline
    assert r.metrics["interpolated"] == ["size 24"]
    assert "6x6 = 36 patch tokens, but 'pos_embed' has 16 positions; the forward ran" in r.details


def test_vit_planted_without_interpolation_fails():
    r = vit_patches([24], model=InterpolatingViT(interpolate=False), batch=_image(16))
    assert r.passed is False
    assert "observed at size 24: 6x6 = 36 patch tokens, but 'pos_embed' has 16 positions" in r.headline


def test_vit_bad_arguments():
    with pytest.raises(UsageError, match=r"sizes=\[\(16, -1\)\]: size \(16, -1\) is not"):
        vit_patches([(16, -1)], model=InterpolatingViT(), batch=_image())
    with pytest.raises(UsageError, match="sizes=None"):
        vit_patches(model=InterpolatingViT(), batch=_image())


# ----------------------------------------------------------------------------------- fno_modes
class NoCheckSpectral(fno.SpectralConv2d):
    """The example's spectral layer without its size check; ``bug='slice'`` misplaces the
    negative-frequency block."""

    bug = None

    def forward(self, x):
        batch, _, height, width = x.shape
        m1, m2 = self.modes1, self.modes2
        x_ft = torch.fft.rfft2(x)
        w_pos = torch.view_as_complex(self.weight_pos)
        w_neg = torch.view_as_complex(self.weight_neg)
        out = torch.zeros(batch, self.out_channels, height, width // 2 + 1, dtype=x_ft.dtype)
        out[:, :, :m1, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, :m1, :m2], w_pos)
        rows = slice(m1, 2 * m1) if self.bug == "slice" else slice(-m1, None)
        out[:, :, rows, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, -m1:, :m2], w_neg)
        return torch.fft.irfft2(out, s=(height, width))


class PlantedFNO(nn.Module):
    def __init__(self, modes1=6, modes2=6, bug=None):
        super().__init__()
        torch.manual_seed(0)
        self.lift = nn.Conv2d(1, 4, 1)
        self.spectral = NoCheckSpectral(4, 4, modes1, modes2)
        self.spectral.bug = bug
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.out(F.gelu(self.spectral(self.lift(x))))


def test_fno_example_passes_on_its_grid():
    model, batch = fno.build_model(n_layers=2), fno.make_batch(2)
    r = fno_modes(model=model, batch=batch)
    assert r.passed is True, r.headline
    assert r.headline == ("expected FNO modes within the Nyquist limit for grids (32, 32), observed 2"
                          " spectral layers with modes (6, 6) fitting every grid")
    assert r.metrics["max_energy_beyond"] < 1e-10


def test_fno_example_fails_on_a_coarse_grid():
    model, batch = fno.build_model(n_layers=2), fno.make_batch(2)
    r = fno_modes([32, 8], model=model, batch=batch)
    # 8x8 grid: modes1 6 > 8//2 = 4 and modes2 6 > 8//2+1 = 5
    assert r.passed is False
    assert r.headline == ("expected FNO modes within the Nyquist limit for grids (32, 32), (8, 8),"
                          " observed at grid (8, 8): layer 'spectral.0' keeps modes1=6 > 8//2 = 4"
                          " along dim -2 and modes2=6 > 8//2+1 = 5 along the rfft dim -1 (forward"
                          " raised ValueError)")
    # the rule's edges: 12x12 is the smallest grid for modes 6 (6 <= 12//2 and 6 <= 12//2+1 = 7)
    assert fno_modes([12], model=model, batch=batch).passed is True
    assert fno_modes([(12, 10)], model=model, batch=batch).passed is True  # 6 <= 10//2+1 = 6
    assert fno_modes([(12, 9)], model=model, batch=batch).passed is False  # 6 > 9//2+1 = 5


def test_fno_planted_modes_beyond_the_grid_run_silently_but_fail():
    r = fno_modes([8], model=PlantedFNO(modes1=5, modes2=4), batch=_image(8))
    assert r.passed is False
    assert r.headline == ("expected FNO modes within the Nyquist limit for grids (8, 8), observed at"
                          " grid (8, 8): layer 'spectral' keeps modes1=5 > 8//2 = 4 along dim -2 (the"
                          " forward ran: those weights are never used as intended)")


def test_fno_planted_slicing_bug_spills_energy_beyond_the_modes():
    r = fno_modes(model=PlantedFNO(bug="slice"), batch=_image(32))
    assert r.passed is False
    assert "observed at grid (32, 32): layer 'spectral' puts" in r.headline
    assert "of its output energy beyond its kept modes (tolerance 0.0001)" in r.headline
    assert fno_modes(model=PlantedFNO(), batch=_image(32)).passed is True
    assert fno_modes(energy_tol=None, model=PlantedFNO(bug="slice"), batch=_image(32)).passed is True


@pytest.mark.parametrize("kwargs, fragment", [
    ({"grid_sizes": "32"}, "grid_sizes='32': expected a non-empty list"),
    ({"energy_tol": 1.5}, "energy_tol=1.5: expected a fraction in"),
    ({"energy_tol": "x"}, "energy_tol='x'"),
])
def test_fno_bad_arguments(kwargs, fragment):
    with pytest.raises(UsageError) as info:
        fno_modes(**kwargs, model=PlantedFNO(), batch=_image(32))
    assert fragment in str(info.value)


# ----------------------------------------------------------------------------------- spectrum_matches
class Blur(nn.Module):
    """Returns its input smoothed by a 3x3 box filter: the high wavenumbers lose their power."""

    def forward(self, x):
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="circular"), 3, stride=1)


class Echo(nn.Module):
    """Returns its input plus small fixed noise (a near-perfect model)."""

    def forward(self, x):
        return x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))


def _fields(size=32, dims=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, *([size] * dims), generator=g)
    return x, x.clone()


def test_spectrum_blurring_model_fails_in_the_high_band():
    r = spectrum_matches(model=Blur(), batch=_fields())
    assert r.passed is False
    assert r.headline.startswith("expected P_pred/P_target within [0.5, 2] in every band, observed")
    assert "in the high band (k=11-16)" in r.headline  # bins 1..16 split at 16*i//3 = 0, 5, 10
    assert r.metrics["bands"]["high"] < 0.1 < r.metrics["bands"]["low"]


def test_spectrum_healthy_model_passes_and_saves_a_plot(tmp_path):
    path = tmp_path / "pk.png"
    r = spectrum_matches(plot=str(path), model=Echo(), batch=_fields())
    assert r.passed is True, r.headline
    assert all(abs(v - 1) < 1e-3 for v in r.metrics["bands"].values())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.metrics["plot"] == str(path)


def test_spectrum_3d_and_custom_bands():
    r = spectrum_matches(1.5, [(1, 2), (6, 8)], model=Echo(), batch=_fields(16, 3))
    assert r.passed is True, r.headline
    assert sorted(r.metrics["bands"]) == ["k=1-2", "k=6-8"]


def test_spectrum_skips_when_the_target_is_not_a_field():
    r = spectrum_matches(model=nn.Linear(4, 3), batch=(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)))
    assert r.passed is None
    assert "not fields of the same shape" in r.headline


@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_band_ratio": 1}, "max_band_ratio=1: expected a number > 1"),
    ({"bands": 0}, "bands=0: expected an int >= 1"),
    ({"bands": [(3, 1)]}, "bands=[(3, 1)]: expected an int >= 1"),
    ({"plot": 3}, "plot=3: expected a file path"),
])
def test_spectrum_bad_arguments(kwargs, fragment):
    with pytest.raises(UsageError) as info:
        spectrum_matches(**kwargs, model=Echo(), batch=_fields())
    assert fragment in str(info.value)


# ------------------------------------------- structural discovery: spectral layers, positional tables
class RenamedSpectral(nn.Module):
    """A spectral layer whose attributes are not called modes1/modes2 (k_rows, k_cols)."""

    def __init__(self, width, k_rows, k_cols):
        super().__init__()
        self.k_rows, self.k_cols = k_rows, k_cols
        self.w_lo = nn.Parameter(torch.randn(width, width, k_rows, k_cols, dtype=torch.cfloat) / width)
        self.w_hi = nn.Parameter(torch.randn(width, width, k_rows, k_cols, dtype=torch.cfloat) / width)

    def forward(self, x):
        spec = torch.fft.rfft2(x, norm="ortho")
        out = torch.zeros_like(spec)
        a, b = self.k_rows, self.k_cols
        out[..., :a, :b] = torch.einsum("bixy,ioxy->boxy", spec[..., :a, :b], self.w_lo)
        out[..., -a:, :b] = torch.einsum("bixy,ioxy->boxy", spec[..., -a:, :b], self.w_hi)
        return torch.fft.irfft2(out, s=x.shape[-2:], norm="ortho")  # LINE_RENAMED_IRFFT


class RenamedFNO(nn.Module):
    def __init__(self, k_rows=4, k_cols=4):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Conv2d(1, 4, 1)
        self.mix = nn.ModuleList([RenamedSpectral(4, k_rows, k_cols) for _ in range(2)])
        self.down = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        x = self.up(x)
        for layer in self.mix:
            x = F.gelu(layer(x) + x)
        return self.down(x)


class Spectral1d(nn.Module):
    """A 1D operator written as a plain function of the root module: rfft, keep ``n_keep``."""

    def __init__(self, n_keep):
        super().__init__()
        self.n_keep = n_keep
        self.scale = nn.Parameter(torch.ones(n_keep, dtype=torch.cfloat))

    def forward(self, x):
        f = torch.fft.rfft(x)
        out = torch.zeros_like(f)
        out[..., :self.n_keep] = f[..., :self.n_keep] * self.scale
        return torch.fft.irfft(out, n=x.shape[-1])


def test_fno_layers_are_found_by_their_ffts_whatever_their_attributes_are_called():
    r = fno_modes([16, 12], model=RenamedFNO(), batch=_image(16))
    assert r.passed is True, r.headline
    assert r.headline == ("expected FNO modes within the Nyquist limit for grids (16, 16), (12, 12),"
                          " observed 2 spectral layers with modes (4, 4) fitting every grid")
    assert r.metrics["layers"] == ["mix.0", "mix.1"]
    assert r.metrics["max_energy_beyond"] < 1e-10
    assert "'mix.0': FFT over dims [-2, -1] (one-sided rfft), modes (4, 4), grid (16, 16)" in r.details


def test_fno_renamed_planted_mode_overflow_is_caught():
    # k_rows 5 > 8//2 = 4: x_ft[..., :5, :] and [-5:, :] overlap on an 8-row spectrum; it runs
    r = fno_modes([16, 8], model=RenamedFNO(k_rows=5), batch=_image(16))
    assert r.passed is False
    assert r.headline == ("expected FNO modes within the Nyquist limit for grids (16, 16), (8, 8),"
                          " observed at grid (8, 8): layer 'mix.0' keeps modes1=5 > 8//2 = 4 along dim"
                          " -2 (the forward ran: those weights are never used as intended)")


def test_fno_one_dimensional_spectral_root_module():
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    r = fno_modes([16, 8], model=Spectral1d(5), batch=x)
    # 16: 5 <= 16//2+1 = 9; 8: 5 <= 8//2+1 = 5 (the rfft dim)
    assert r.passed is True, r.headline
    assert r.metrics["layers"] == ["Spectral1d"] and r.metrics["modes"] == [[5]]
    r = fno_modes([6], model=Spectral1d(5), batch=x)
    assert r.passed is False
    assert "layer 'Spectral1d' keeps modes1=5 > 6//2+1 = 4 along the rfft dim -1" in r.headline


def test_fno_skips_a_model_without_fft_and_one_that_keeps_every_mode():
    r = fno_modes(model=nn.Conv2d(1, 1, 3, padding=1), batch=_image(8))
    assert r.passed is None
    assert r.headline == "no spectral layer found: no FFT op ran in forward"

    class Filter(nn.Module):
        def forward(self, x):
            return torch.fft.irfft2(torch.fft.rfft2(x) * 0.5, s=x.shape[-2:])

    r = fno_modes(model=Filter(), batch=_image(8))
    assert r.passed is None
    assert r.headline == ("no spectral layer found: the FFTs in 'Filter' keep every mode (no slice of"
                          " their spectra truncates it)")


class OddlyNamedViT(nn.Module):
    """A ViT whose positional table is called ``where`` (and a decoy ``position_scale``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 4, stride=4)
        self.position_scale = nn.Parameter(torch.ones(1, 99, 8))  # named like one, never added
        self.where = nn.Parameter(torch.zeros(1, 16, 8))  # 16x16 image: 4*4 = 16 tokens
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head((t + self.where).mean(1))  # LINE_WHERE


def test_vit_positional_parameter_is_found_by_what_is_added_not_by_its_name():
    r = vit_patches([16], model=OddlyNamedViT(), batch=_image(16))
    assert r.passed is True, r.headline
    assert r.metrics["pos_embed"] == "where" and r.metrics["positions"] == 16
    assert (f"the positional embedding 'where' was added to the patch tokens at"
            f" tests/checks/test_architecture.py:{_line('LINE_WHERE')} in forward") in r.details
    r = vit_patches([24], model=OddlyNamedViT(), batch=_image(16))
    assert r.passed is False
    assert "observed at size 24: 6x6 = 36 patch tokens, but 'where' has 16 positions" in r.headline


def test_vit_skips_without_a_patch_embedding():
    r = vit_patches([16], model=nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), batch=_image(16))
    assert r.passed is None
    assert r.headline.startswith("no patch embedding found: no Conv1d/2d/3d with kernel_size ==")


@pytest.mark.parametrize("case, sizes", [("tv_vit_b_32", [64]), ("timm_vit_tiny_patch16_224", [64]),
                                         ("hf_vit", [32])])
def test_vit_public_architectures_pass(case, sizes):
    import importlib.util

    from pytest_modelcheck.core.batch import Batch
    from tests.conformance import zoo

    if importlib.util.find_spec(zoo.CASES[case].package) is None:
        pytest.skip(f"{zoo.CASES[case].package} is not installed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, batch, _ = zoo.build_case(case)
        batch = Batch(kwargs=batch) if isinstance(batch, dict) else batch
        r = vit_patches(sizes, model=model, batch=batch)
        assert r.passed is True, r.headline
        assert "was added to the patch tokens" in r.details  # found structurally
        assert r.metrics["extra_tokens"] == 1  # the CLS token
        bad = vit_patches([sizes[0] + sizes[0] // 2], model=model, batch=batch)
        assert bad.passed is False  # 1.5x the size: the table no longer fits
    finally:
        torch.set_num_threads(threads)


class LinearPatchViT(nn.Module):
    """Patches flattened by reshaping and embedded by a Linear (no convolution), table ``grid``."""

    def __init__(self, patch=4, size=16):
        super().__init__()
        torch.manual_seed(0)
        self.p = patch
        self.embed = nn.Linear(patch * patch, 8)
        self.grid = nn.Parameter(torch.zeros(1, (size // patch) ** 2, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.p
        t = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return self.head((self.embed(t) + self.grid).mean(1))


def test_vit_linear_patch_embedding_is_found_from_its_input_shape():
    r = vit_patches([16], model=LinearPatchViT(), batch=_image(16))
    assert r.passed is True, r.headline
    assert r.metrics["patch_module"] == "embed" and r.metrics["patch"] == [4, 4]
    assert r.metrics["pos_embed"] == "grid" and r.metrics["extra_tokens"] == 0
    r = vit_patches([16, 20], model=LinearPatchViT(), batch=_image(16))
    assert r.passed is False
    assert "observed at size 20: 5x5 = 25 patch tokens, but 'grid' has 16 positions" in r.headline


class ShiftedSpectral(nn.Module):
    """neuraloperator style: fftshift the full dim, keep a centred block of ``2 * half`` rows."""

    def __init__(self, half, cols):
        super().__init__()
        torch.manual_seed(0)
        self.n_modes = (half, cols)
        self.weight = nn.Parameter(torch.randn(1, 1, 2 * half, cols, dtype=torch.cfloat))

    def forward(self, x):
        half, cols = self.n_modes
        f = torch.fft.fftshift(torch.fft.rfft2(x), dim=-2)
        c = f.shape[-2] // 2
        out = torch.zeros_like(f)
        out[..., c - half:c + half, :cols] = f[..., c - half:c + half, :cols] * self.weight
        return torch.fft.irfft2(torch.fft.ifftshift(out, dim=-2), s=x.shape[-2:])


def test_fno_centred_modes_of_an_fftshifted_spectrum():
    r = fno_modes(model=ShiftedSpectral(3, 3), batch=_image(16))
    assert r.passed is True, r.headline
    assert r.metrics["modes"] == [[3, 3]]
    assert r.metrics["max_energy_beyond"] < 0.05  # the centred block is -3..2: one row of -3
    r = fno_modes([16, 4], model=ShiftedSpectral(3, 3), batch=_image(16))
    assert r.passed is False
    assert "observed at grid (4, 4): layer 'ShiftedSpectral' keeps modes1=3 > 4//2 = 2" in r.headline


def test_vit_relative_position_bias_table_is_not_a_positional_embedding():
    class SwinLike(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.patch = nn.Conv2d(1, 8, 4, stride=4)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(49, 2))  # (positions, heads)

        def forward(self, x):
            return self.patch(x).flatten(2).mean(-1) + self.relative_position_bias_table.sum()

    r = vit_patches([16, 24], model=SwinLike(), batch=_image(16))
    assert r.passed is True, r.headline
    assert r.metrics["pos_embed"] is None
    assert "observed patch 4 of 'patch', no positional embedding fitting" in r.headline


def test_unet_skips_without_any_cat_is_skipped_with_the_reason():
    """A declared architecture check that finds nothing to check skips; it never passes."""
    from pytest_modelcheck.checks import unet_skips

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    r = unet_skips(sizes=[16, 24], model=model, batch=torch.randn(2, 3, 16, 16))
    assert r.passed is None
    assert "no skip connection found: no torch.cat ran in forward" in r.headline
