"""3D Pix2PixCC-style conditional GAN (seed 002): generator trained against its discriminator."""
import pytest
import torch

from example_models import pix2pixcc_gan as gan


@pytest.fixture
def model():
    torch.manual_seed(0)
    return gan.build_model()


@pytest.fixture
def batch():
    return gan.make_batch(4)


@pytest.fixture
def loss_fn():
    # generator_loss(output, target, model, inputs): LSGAN + feature matching + correlation
    return gan.generator_loss


@pytest.mark.grads_finite
@pytest.mark.shapes_consistent(out=("B", 1, "D", "H", "W"), inputs=("B", 1, "D", "H", "W"),
                               sizes={"D": [8, 16]})
@pytest.mark.model_overfits(lr=2e-3, target_ratio=0.3)
@pytest.mark.memory_under("256 MiB")
def test_pix2pixcc_generator_health():
    """All three generator terms are finite and reach every G and D parameter; G overfits."""


@pytest.mark.discriminator_scales(discriminator="discriminator", pairs=gan.make_pairs)
@pytest.mark.gan_pairs(pairs=gan.make_pairs)
def test_pix2pixcc_discriminator_scales_and_pairs():
    """Each PatchGAN scale responds to (cond, real) and (cond, generated) pairs: none constant or
    saturated (the per-scale comparison figure is in the HTML report); the real and fake pairs
    share one channel order and the fake pair holds no real target."""
