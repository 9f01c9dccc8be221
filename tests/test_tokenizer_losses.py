"""Tokenizer losses: perceptual weights only from a local path, hinge + LeCAM, 3D discriminator."""
from __future__ import annotations

import pytest
import torch

from tokenizer.config import TokenizerModelConfig
from tokenizer.discriminator import Discriminator3D, DiscriminatorConfig
from tokenizer.losses import LeCAM, TokenizerLossConfig, TokenizerLoss, VGGPerceptualLoss, hinge_d_loss
from tokenizer.model import VideoTokenizer
from videoar_common.config import ConfigError, load_config

TINY_DISC = DiscriminatorConfig(base_channels=4, channel_mult=[1, 2], temporal_down_blocks=[0])


def clip(b=2, t=5, s=32, seed=0):
    return torch.rand(b, 3, t, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_perceptual_enabled_without_path_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="loss.perceptual_vgg_path"):
        load_config(TokenizerLossConfig, None, ["perceptual_weight=0.1"])


def test_perceptual_missing_file_names_the_key_and_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"loss.perceptual_vgg_path.*vgg16-397923af.pth"):
        TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.1, perceptual_vgg_path=str(tmp_path / "nope.pth")))


def test_perceptual_off_by_default():
    assert TokenizerLoss(TokenizerLossConfig()).perceptual is None


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
    loss = TokenizerLoss(TokenizerLossConfig(disc_start_step=10))
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


@pytest.mark.parametrize("rec", ["l1", "l2"])
def test_generator_and_discriminator_totals_weight_each_term_as_configured(vgg_file, rec):
    """Eq. 4's weighting: each total equals the configured weights times terms computed here by hand
    (reconstruction, hinge, LeCAM) or by the modules tested above (perceptual, discriminator); the
    weights are all different, so a swapped or dropped weight shows."""
    torch.manual_seed(0)
    cfg = TokenizerLossConfig(rec=rec, rec_weight=0.7, perceptual_weight=0.3, perceptual_vgg_path=str(vgg_file),
                     commit_weight=0.11, entropy_weight=0.05, gan_weight=0.2, lecam_weight=0.37, lecam_decay=0.5,
                     disc_start_step=0)
    loss, disc = TokenizerLoss(cfg), Discriminator3D(TINY_DISC)
    loss.lecam.update(0.4, -0.6)                    # EMAs 0.2 and -0.3: the penalty's two sides differ
    x = clip(t=5)
    recon = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    commitment, entropy = torch.tensor(0.9), torch.tensor(-1.3)  # as the quantizer hands them over
    g, terms = loss.generator_loss(x, recon, commitment, entropy, disc)

    rec_term = (recon - x).abs().mean() if rec == "l1" else (recon - x).pow(2).mean()
    perceptual = VGGPerceptualLoss(str(vgg_file))(recon, x)
    with torch.no_grad():
        gan_g = -disc(recon).mean()
    want = 0.7 * rec_term + 0.3 * perceptual + 0.11 * 0.9 + 0.05 * -1.3 + 0.2 * gan_g
    for name, value in (("rec", rec_term), ("perceptual", perceptual), ("gan_g", gan_g)):
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-6), name
    assert g.item() == pytest.approx(want.item(), rel=1e-6) and terms["g_total"].item() == pytest.approx(g.item())
    assert min(abs(w * v.item()) for w, v in ((0.7, rec_term), (0.3, perceptual), (0.2, gan_g))) > 1e-3

    d, dterms = loss.discriminator_loss(disc, x, recon)
    with torch.no_grad():
        real, fake = disc(x), disc(recon)
    hinge = 0.5 * ((1 - real).clamp_min(0).mean() + (1 + fake).clamp_min(0).mean())
    lecam = (real - -0.3).clamp_min(0).pow(2).mean() + (0.2 - fake).clamp_min(0).pow(2).mean()
    assert dterms["d_hinge"].item() == pytest.approx(hinge.item(), rel=1e-6)
    assert dterms["lecam"].item() == pytest.approx(lecam.item(), rel=1e-5)
    assert d.item() == pytest.approx((hinge + 0.37 * lecam).item(), rel=1e-6) and 0.37 * lecam > 1e-3 * d
