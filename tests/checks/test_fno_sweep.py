"""mode_sweep: a spectral layer that reads its mode count from the wrong dim of its weight fails
with that cause; its healthy twin passes and plots the truncation curve."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from example_models import fno
from pytest_modelcheck import UsageError
from pytest_modelcheck.checks import mode_sweep


class WrongModesSpectral(fno.SpectralConv2d):
    """The planted bug: the mode count is read from the last dim of the real-stored weight
    ``(in, out, modes1, modes2, 2)``, the real/imaginary pair, so only modes 0..1 are used;
    the weight is sliced to match, so the forward runs silently."""

    def forward(self, x):
        batch, _, height, width = x.shape
        m1 = m2 = self.weight_pos.shape[-1]  # BUG: 2, not modes1/modes2
        x_ft = torch.fft.rfft2(x)
        w_pos = torch.view_as_complex(self.weight_pos)[:, :, :m1, :m2]
        w_neg = torch.view_as_complex(self.weight_neg)[:, :, :m1, :m2]
        out = torch.zeros(batch, self.out_channels, height, width // 2 + 1, dtype=x_ft.dtype)
        out[:, :, :m1, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, :m1, :m2], w_pos)
        out[:, :, -m1:, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, -m1:, :m2], w_neg)
        return torch.fft.irfft2(out, s=(height, width))


class TinyFNO(nn.Module):
    def __init__(self, spectral=fno.SpectralConv2d, modes=6):
        super().__init__()
        torch.manual_seed(0)
        self.lift = nn.Conv2d(1, 4, 1)
        self.spectral = spectral(4, 4, modes, modes)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.out(F.gelu(self.spectral(self.lift(x))))


def _batch(teacher=None, size=16):
    """Smooth fields; the target is the healthy model's output (a perfectly trained model)."""
    x, t = fno.make_batch(2, size=size)
    if teacher is not None:
        with torch.no_grad():
            t = teacher(x)
    return x, t


def test_planted_wrong_mode_count_fails_with_the_cause(tmp_path):
    teacher, buggy = TinyFNO(), TinyFNO(WrongModesSpectral)
    buggy.load_state_dict(teacher.state_dict())
    r = mode_sweep((2, 4, 8), max_rel_l2=0.05, plot=str(tmp_path / "s.png"), model=buggy,
                   batch=_batch(teacher))
    assert r.passed is False
    assert r.headline.startswith("expected every truncation below the layers' modes to change the"
                                 " output and a relative L2 to the target <= 0.05, observed"
                                 " truncating to 2 modes changes the output by 0 (<= dead_tol 1e-06):"
                                 " modes 2 and above never reach it ('spectral' slices (2, 2) but"
                                 " declares (6, 6): a mode count read or sliced wrong); relative L2"
                                 " to the target"), r.headline
    assert "> max_rel_l2 0.05 at the model's modes" in r.headline
    # adding modes does not improve fidelity: the curve is flat
    assert max(r.metrics["rel_l2_target"]) - min(r.metrics["rel_l2_target"]) < 1e-6
    assert r.metrics["rel_l2_target"][0] > 0.05


def test_healthy_twin_passes_and_plots_fidelity_over_modes(tmp_path):
    teacher = TinyFNO()
    path = tmp_path / "sweep.png"
    r = mode_sweep((2, 4, 8), max_rel_l2=0.05, plot=str(path), model=TinyFNO(),
                   batch=_batch(teacher))
    assert r.passed is True, r.headline
    assert r.metrics["modes"] == [2, 4, 8] and r.metrics["model_modes"] == 6
    full, target = r.metrics["rel_l2_full"], r.metrics["rel_l2_target"]
    assert full[0] > full[1] > full[2] == 0.0  # truncation hurts less as modes are added
    assert target[0] > target[1] > target[2] == r.metrics["full_rel_l2_target"] < 1e-6
    assert r.metrics["plot"] == str(path) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "declares modes (6, 6), slices its spectrum to (6, 6)" in r.details
    assert "(>= the model's modes: no truncation)" in r.details


def test_without_max_rel_l2_only_dead_modes_fail_and_the_default_plot_is_a_temp_png():
    r = mode_sweep((2, 4), model=TinyFNO(), batch=_batch())
    assert r.passed is True, r.headline
    assert r.metrics["plot"].endswith(".png")
    r = mode_sweep((2, 4), plot=None, model=TinyFNO(WrongModesSpectral), batch=_batch())
    assert r.passed is False and "modes 2 and above never reach it" in r.headline
    assert "plot" not in r.metrics
    assert mode_sweep((2, 4), dead_tol=None, plot=None, model=TinyFNO(WrongModesSpectral),
                      batch=_batch()).passed is True


def test_skips_without_spectral_layers_and_max_rel_l2_without_a_target():
    r = mode_sweep(model=nn.Conv2d(1, 1, 3, padding=1), batch=_batch())
    assert r.passed is None and "no spectral layer found" in r.headline
    x, _ = _batch()
    r = mode_sweep(max_rel_l2=0.1, plot=None, model=TinyFNO(), batch=(x, torch.zeros(2)))
    assert r.passed is None and "max_rel_l2 needs a batch target" in r.headline


def test_the_user_model_is_not_changed():
    model = TinyFNO()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mode_sweep((2,), plot=None, model=model, batch=_batch())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, fragment", [
    ({"modes": ()}, "modes=(): expected a non-empty list of mode counts >= 1"),
    ({"modes": (2, 0)}, "modes=(2, 0): expected"),
    ({"modes": "4"}, "modes='4': expected"),
    ({"max_rel_l2": 0}, "max_rel_l2=0: expected a number > 0"),
    ({"dead_tol": 1.5}, "dead_tol=1.5: expected a fraction in [0, 1)"),
    ({"plot": 3}, "plot=3: expected True (a temporary PNG), a file path"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(UsageError) as info:
        mode_sweep(**kwargs, model=TinyFNO(), batch=_batch())
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_bad_marker_argument_is_one_line_at_setup_naming_the_marker(pytester):
    pytester.makeconftest("""
import pytest, torch
@pytest.fixture
def model():
    return torch.nn.Identity()
@pytest.fixture
def batch():
    return torch.zeros(1, 1, 4, 4)
""")
    pytester.makepyfile("""
import pytest
@pytest.mark.mode_sweep(modes=(0,))
def test_a():
    pass
@pytest.mark.no_aliasing(scale=1)
def test_b():
    pass
""")
    result = pytester.runpytest_subprocess("--modelcheck", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*@pytest.mark.mode_sweep: modes=(0,): expected a non-empty list of mode counts*",
        "*@pytest.mark.no_aliasing: scale=1: expected an int from 2 to 8*"])
