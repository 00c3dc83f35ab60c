"""ViT3D (seed 002): 3D patches, CLS token, learned positional embedding."""
import pytest
import torch

from example_models import vit3d


@pytest.fixture
def model():
    torch.manual_seed(0)
    return vit3d.build_model()


@pytest.fixture
def batch():
    return vit3d.make_batch(4)


@pytest.fixture
def model_any_size():
    """ViT3D whose positional embedding is interpolated to the token grid of any input size."""
    torch.manual_seed(0)
    return vit3d.build_model(interpolate_pos=True)


@pytest.mark.grads_finite
@pytest.mark.shapes_consistent(out=("B", 3), batch_sizes=(1, 2, 5))
@pytest.mark.vit_patches(sizes=[16])
@pytest.mark.model_overfits
@pytest.mark.memory_under("128 MiB")
@pytest.mark.throughput_at_least("2 samples/s")
@pytest.mark.attention_maps
@pytest.mark.token_capacity(513, memory_budget="8 GiB", model_fixture="model_any_size")
def test_vit3d_health():
    """Regression head (B, 3); learns its batch; fits and runs fast; no attention layer
    collapsed (maps drawn for the report); with an interpolated positional embedding it runs
    up to 513 tokens (32^3 volumes) and the tokens fitting 8 GiB are estimated."""
