"""Fourier Neural Operator (seed 002): resolution-independent operator on a 2D grid."""
import pytest
import torch

from example_models import fno


@pytest.fixture
def model():
    torch.manual_seed(0)
    return fno.build_model()


@pytest.fixture
def batch():
    return fno.make_batch(4)


@pytest.mark.fno_modes(grid_sizes=[32, 48])
@pytest.mark.mode_sweep(modes=(2, 4, 8))
@pytest.mark.no_aliasing(scale=2)
@pytest.mark.memory_under("128 MiB", phase="inference")
@pytest.mark.throughput_at_least("1 samples/s")
def test_fno_default_checks(modelcheck):
    """The default set through the fixture, declaring the operator's output shape and grid sizes."""
    report = modelcheck.check_model(out=("B", 1, "H", "W"), inputs=("B", 1, "H", "W"),
                                    sizes={"H": [32, 48], "W": [32, 40]}, loss="mse")
    assert report.passed
