"""Tokenizer losses: perceptual weights only from a local path, hinge + LeCAM, 3D discriminator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


@pytest.fixture(scope="module")
def lin_file(tmp_path_factory):
    """Random non-negative LPIPS heads in the lpips package's layout (lin{i}.model.1 after a Dropout)."""
    g = torch.Generator().manual_seed(1)
    state = {f"lin{i}.model.1.weight": torch.rand(1, ch, 1, 1, generator=g)
             for i, ch in enumerate((64, 128, 256, 512, 512))}
    path = tmp_path_factory.mktemp("lpips") / "vgg.pth"
    torch.save(state, path)
    return path


def lpips_by_definition(vgg_path, lin_path, x_NCHW, y_NCHW):
    """LPIPS from its definition (Zhang et al. 2018; the lpips package's conventions), independent of
    tokenizer.losses: ScalingLayer on [-1, 1] inputs, VGG16 split into its five relu stages, features
    divided by (channel norm + 1e-10), squared difference through each head as a 1x1 convolution (all
    ones = the lpips=False baseline), spatial mean, sum over stages; one value per image."""
    from torchvision.models import vgg16
    net = vgg16(weights=None)
    missing, unexpected = net.load_state_dict(torch.load(vgg_path, weights_only=True), strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)  # every feature weight
    stages = [net.features[a:b].eval() for a, b in ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))]
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    heads = torch.load(lin_path, weights_only=True) if lin_path else None
    fx, fy = (x_NCHW - shift) / scale, (y_NCHW - shift) / scale
    total = torch.zeros(x_NCHW.shape[0])
    with torch.no_grad():
        for i, stage in enumerate(stages):
            fx, fy = stage(fx), stage(fy)
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = heads[f"lin{i}.model.1.weight"] if heads else torch.ones(1, fx.shape[1], 1, 1)
            total += F.conv2d((nx - ny) ** 2, w).mean(dim=(1, 2, 3))
    return total


@pytest.mark.parametrize("with_heads", [True, False], ids=["lpips", "baseline"])
def test_perceptual_loss_equals_lpips_by_definition(vgg_file, lin_file, with_heads):
    """Random VGG16 and heads saved as local files (no network): the loss equals LPIPS computed from its
    definition, averaged over the clip's frames."""
    lin = str(lin_file) if with_heads else ""
    loss = VGGPerceptualLoss(str(vgg_file), lin)
    assert loss.variant.startswith("lpips-baseline") != with_heads
    x = clip(b=2, t=2, s=32, seed=3)
    y = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(-1, 1)
    frames = lambda v: v.transpose(1, 2).flatten(0, 1)
    want = lpips_by_definition(vgg_file, lin, frames(x), frames(y)).mean()
    with torch.no_grad():
        got = loss(x, y)
    assert want > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_lpips_heads_file_is_checked(tmp_path, vgg_file):
    with pytest.raises(FileNotFoundError, match=r"loss.perceptual_lin_path.*weights/v0.1/vgg.pth"):
        VGGPerceptualLoss(str(vgg_file), str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, bad)
    with pytest.raises(ValueError, match="lacks lin1.model.1.weight of 128 channels"):
        VGGPerceptualLoss(str(vgg_file), str(bad))


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


def test_generator_total_weighs_commitment_and_entropy_as_documented():
    """loss += commit_weight · L_commit + entropy_weight · L_entropy on the quantizer's values as given."""
    x = clip(b=1, t=1)
    recon = x + 0.1
    loss = TokenizerLoss(TokenizerLossConfig(rec="l1", commit_weight=0.25, entropy_weight=0.1, gan_weight=0.0))
    total, terms = loss.generator_loss(x, recon, torch.tensor(0.4), torch.tensor(-0.03), None)
    rec = (recon - x).abs().mean().item()
    assert total.item() == pytest.approx(rec + 0.25 * 0.4 + 0.1 * -0.03, rel=1e-6)
    assert terms["entropy"].item() == pytest.approx(-0.03)
