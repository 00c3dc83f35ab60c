"""3D V-Net-style UNet (seed 002): regression with identity output."""
import pytest
import torch

from example_models import vnet_unet


@pytest.fixture
def model():
    torch.manual_seed(0)
    return vnet_unet.build_model()


@pytest.fixture
def batch():
    return vnet_unet.make_batch(4)


@pytest.mark.grads_finite
@pytest.mark.shapes_consistent(out=("B", 1, "D", "H", "W"), inputs=("B", 1, "D", "H", "W"),
                               sizes={"D": [8, 16], "H": [16, 24]})
@pytest.mark.unet_skips(sizes=[16, 24, (8, 16, 24)])
@pytest.mark.model_overfits(loss="mse")
@pytest.mark.memory_under("256 MiB")
@pytest.mark.throughput_at_least("1 samples/s")
@pytest.mark.norm_stats(affine=True)
@pytest.mark.head_range(loss="mse", steps=10)
def test_vnet_health():
    """Skip connections line up for every size divisible by 2**depth; overfits one batch."""
