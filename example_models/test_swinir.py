"""SwinIR-style restoration transformer (seed 004), upscale 2."""
import pytest
import torch

from example_models import swinir


@pytest.fixture
def model():
    torch.manual_seed(0)
    return swinir.build_model()


@pytest.fixture
def batch():
    return swinir.make_batch(4)


@pytest.fixture
def loss_fn():
    return swinir.loss_fn


@pytest.mark.grads_finite
@pytest.mark.shapes_consistent(out=("B", 3, "H2", "W2"), inputs=("B", 3, "H", "W"),
                               sizes={"H": [16, 20], "W": [16, 24]}, batch_sizes=(1, 3))
@pytest.mark.model_overfits(lr=2e-3)
@pytest.mark.memory_under("256 MiB")
@pytest.mark.throughput_at_least("1 samples/s", phase="train")
def test_swinir_health():
    """Restores at 2x for window-aligned and padded sizes; trains at a usable rate."""
