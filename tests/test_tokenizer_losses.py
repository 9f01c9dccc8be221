"""Tokenizer losses: perceptual weights only from a local path, hinge + LeCAM, 3D discriminator."""
from __future__ import annotations

import pytest
import torch

from tokenizer.config import TokenizerModelConfig
from tokenizer.discriminator import Discriminator3D, DiscriminatorConfig
from tokenizer.losses import LeCAM, LossConfig, TokenizerLoss, VGGPerceptualLoss, hinge_d_loss
from tokenizer.model import VideoTokenizer
from videoar_common.config import ConfigError, load_config

TINY_DISC = DiscriminatorConfig(base_channels=4, channel_mult=[1, 2], temporal_down_blocks=[0])


def clip(b=2, t=5, s=32, seed=0):
    return torch.rand(b, 3, t, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_perceptual_enabled_without_path_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="loss.perceptual_vgg_path"):
        load_config(LossConfig, None, ["perceptual_weight=0.1"])


def test_perceptual_missing_file_names_the_key_and_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"loss.perceptual_vgg_path.*vgg16-397923af.pth"):
        TokenizerLoss(LossConfig(perceptual_weight=0.1, perceptual_vgg_path=str(tmp_path / "nope.pth")))


def test_perceptual_off_by_default():
    assert TokenizerLoss(LossConfig()).perceptual is None


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    from torchvision.models import vgg16
    torch.manual_seed(0)
    features = vgg16(weights=None).features
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def test_perceptual_loss_from_local_weights(vgg_file):
    loss = VGGPerceptualLoss(str(vgg_file))
    x = clip(b=1, t=2)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    d = loss(y, x)
    assert d.item() > 0
    d.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.parameters())


def test_hinge_and_lecam():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    lecam = LeCAM(decay=0.9)
    assert lecam.penalty(real, fake).item() == pytest.approx((4 + 0.25) / 2 + (4 + 0) / 2)
    lecam.update(1.0, -1.0)
    assert (lecam.ema_real, lecam.ema_fake) == pytest.approx((0.1, -0.1))
    state = lecam.state_dict()
    other = LeCAM(decay=0.9)
    other.load_state_dict(state)
    assert (other.ema_real, other.ema_fake) == (lecam.ema_real, lecam.ema_fake)


def test_discriminator_scores_videos_and_images():
    disc = Discriminator3D(TINY_DISC)
    assert disc(clip(t=9)).shape == (2, 1, 4, 8, 8)
    assert disc(clip(t=1)).shape == (2, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="multiples of 4"):
        disc(clip(s=30))


def test_generator_loss_leaves_discriminator_gradients_alone():
    torch.manual_seed(0)
    cfg = TokenizerModelConfig(base_channels=8, channel_mult=[1, 1, 2], temporal_down_levels=[0, 1],
                               norm_groups=4, latent_dim=8, scale_schedule=[[1, 1], [2, 2], [8, 8]])
    model, disc = VideoTokenizer(cfg), Discriminator3D(TINY_DISC)
    loss = TokenizerLoss(LossConfig(disc_start_step=10))
    x = clip()
    assert not loss.gan_active(9) and loss.gan_active(10)
    recon, q = model(x)
    g, terms = loss.generator_loss(x, recon, q.commitment_loss, q.entropy_loss, disc)
    assert {"rec", "commit", "entropy", "gan_g", "g_total"} <= set(terms)
    g.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again
    assert model.encoder.conv_in.conv.weight.grad is not None
    d, dterms = loss.discriminator_loss(disc, x, recon)
    d.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert {"d_hinge", "lecam", "logits_real", "logits_fake", "d_total"} <= set(dterms)


def test_generator_total_weighs_commitment_and_entropy_as_documented():
    """loss += commit_weight · L_commit + entropy_weight · L_entropy on the quantizer's values as given."""
    x = clip(b=1, t=1)
    recon = x + 0.1
    loss = TokenizerLoss(LossConfig(rec="l1", commit_weight=0.25, entropy_weight=0.1, gan_weight=0.0))
    total, terms = loss.generator_loss(x, recon, torch.tensor(0.4), torch.tensor(-0.03), None)
    rec = (recon - x).abs().mean().item()
    assert total.item() == pytest.approx(rec + 0.25 * 0.4 + 0.1 * -0.03, rel=1e-6)
    assert terms["entropy"].item() == pytest.approx(-0.03)
