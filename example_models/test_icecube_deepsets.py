"""IceCube hierarchical DeepSets + event transformer (seed 003): the fixed pipeline."""
import pytest
import torch

from example_models import icecube_deepsets as icecube


@pytest.fixture
def model():
    torch.manual_seed(0)
    return icecube.build_model()


@pytest.fixture
def batch():
    # Pulses are packed across events, so checks that need other batch sizes call the factory.
    return icecube.make_batch


@pytest.fixture
def loss_fn():
    return icecube.angular_distance_loss


@pytest.mark.grads_finite
@pytest.mark.shapes_consistent(out=("B", 2))
@pytest.mark.model_overfits(lr=2e-3, chance_level=icecube.CHANCE_LEVEL)
@pytest.mark.memory_under("256 MiB")
@pytest.mark.throughput_at_least("100 samples/s")
def test_icecube_model_health():
    """Finite gradients, (B, 2) angles, leaves chance level in 100 steps, fits and runs fast."""


def test_icecube_angles_in_range(model, modelcheck):
    """The constrained head keeps azimuth in [0, 2pi] and zenith in [0, pi]."""
    batch = icecube.make_batch(8)
    with torch.no_grad():
        out = model.eval()(batch)
    assert out.shape == (8, 2)
    assert float(out[:, 0].min()) >= 0 and float(out[:, 0].max()) <= 2 * torch.pi
    assert float(out[:, 1].min()) >= 0 and float(out[:, 1].max()) <= torch.pi
    modelcheck.grads_finite(batch=batch)
