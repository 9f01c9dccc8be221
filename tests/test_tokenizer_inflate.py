"""Inflation: a 3-D tokenizer built from a 2-D image tokenizer reproduces it on a single frame."""
from __future__ import annotations

import pytest
import torch

from tokenizer.config import TokenizerModelConfig
from tokenizer.image2d import ImageTokenizer2D
from tokenizer.inflate import InflationError, inflate_from_2d, inflate_from_file
from tokenizer.model import VideoTokenizer

SMALL = dict(base_channels=8, channel_mult=[1, 1, 2, 2, 2], norm_groups=4, latent_dim=8)


def _random_2d(cfg: TokenizerModelConfig, seed: int = 1) -> ImageTokenizer2D:
    torch.manual_seed(seed)
    model = ImageTokenizer2D(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so copying them is actually tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def test_inflated_model_reproduces_the_2d_model_on_one_frame():
    cfg = TokenizerModelConfig(**SMALL)
    model2d = _random_2d(cfg)
    torch.manual_seed(2)
    model3d = VideoTokenizer(cfg).eval()
    report = inflate_from_2d(model3d, model2d.state_dict())

    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent2d = model2d.encode(image)
    latent3d = model3d.encode(image[:, :, None])
    assert latent3d.shape == (2, 8, 1, 4, 4)
    torch.testing.assert_close(latent3d[:, :, 0], latent2d, rtol=1e-4, atol=1e-5)

    recon2d, q2d = model2d(image)
    recon3d, q3d = model3d(image[:, :, None])
    for b2, b3 in zip(q2d.bits, q3d.bits):
        assert torch.equal(b2, b3)
    torch.testing.assert_close(recon3d[:, :, 0], recon2d, rtol=1e-4, atol=1e-5)

    # Every 2-D tensor was used; only temporal-only layers were left at init.
    assert set(report.mapped) == set(model2d.state_dict())
    assert report.left_at_init and all(".temporal." in k for k in report.left_at_init)
    assert len(report.inflated) == sum(1 for k in report.mapped if k.endswith("conv.weight"))


@torch.no_grad()
def test_inflated_kernels_live_in_the_last_temporal_slice(tmp_path):
    cfg = TokenizerModelConfig(**SMALL)
    model2d = _random_2d(cfg)
    path = tmp_path / "image_tok.pt"
    torch.save({"state_dict": model2d.state_dict()}, path)
    model3d = VideoTokenizer(cfg)
    report = inflate_from_file(model3d, path)
    w3 = model3d.state_dict()["encoder.conv_in.conv.weight"]
    w2 = model2d.state_dict()["encoder.conv_in.conv.weight"]
    assert w3.shape == (*w2.shape[:2], 3, *w2.shape[2:])
    assert torch.equal(w3[:, :, -1], w2) and not w3[:, :, :-1].any()
    assert "encoder.conv_in.conv.weight" in report.inflated


def test_mismatched_image_checkpoint_is_an_error_naming_keys():
    cfg = TokenizerModelConfig(**SMALL)
    other = ImageTokenizer2D(TokenizerModelConfig(**{**SMALL, "base_channels": 16, "norm_groups": 4}))
    with pytest.raises(InflationError, match="shape mismatches"):
        inflate_from_2d(VideoTokenizer(cfg), other.state_dict())
    state = {**ImageTokenizer2D(cfg).state_dict(), "encoder.extra.weight": torch.zeros(1)}
    with pytest.raises(InflationError, match="encoder.extra.weight"):
        inflate_from_2d(VideoTokenizer(cfg), state)


@torch.no_grad()
def test_reinflation_keeps_single_frames_and_separates_video_frames():
    from tokenizer.image2d import ImageTokenizer2D
    from tokenizer.inflate import deflate_to_2d, reinflate
    cfg = TokenizerModelConfig(**SMALL)
    torch.manual_seed(4)
    model = VideoTokenizer(cfg).eval()
    image = torch.rand(2, 3, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # deflation: the 2-D twin computes what the 3-D model computes on one frame (temporal layers at init)
    twin = ImageTokenizer2D(cfg).eval()
    twin.load_state_dict(deflate_to_2d(model))
    torch.testing.assert_close(twin(image[:, :, 0])[0], model(image)[0][:, :, 0], rtol=1e-3, atol=1e-4)
    with torch.no_grad():  # as after image training: temporal layers no longer the identity
        for name, p in model.named_parameters():
            if ".temporal." in name:
                p.add_(0.05 * torch.randn_like(p))
    before = model(image)[0]
    report = reinflate(model)
    torch.testing.assert_close(model(image)[0], before, rtol=1e-3, atol=1e-4)
    assert all(not m.conv.weight[:, :, :-1].any() for m in model.modules() if hasattr(m, "kt") and m.kt > 1)
    assert any(".temporal." in k for k in report.inflated)
    # frames are processed independently now: frame t of a clip of repeated frame t equals the image
    video = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lat = model.encode(video)
    torch.testing.assert_close(lat[:, :, 1], model.encode(video[:, :, 4:5])[:, :, 0], rtol=1e-4, atol=1e-5)
