"""Reconstruction metrics: PSNR of a known MSE, SSIM against a scipy.ndimage reference, rFVD
through the FVD machinery, and reconstruction through the quantizer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from eval_helpers import ProjectionExtractor, real_clips
from tokenizer.quantizer import MultiScaleBSQ
from videoar_common.distributed import DistContext
from videoar_megatron.evaluation.protocols import TensorClipSource
from videoar_common.pixel_metrics import psnr_per_clip, ssim_per_clip
from videoar_megatron.evaluation.recon import ReconConfig, evaluate_reconstruction, tokenizer_reconstruct

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                     backend="gloo")


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. SSIM of one channel in [0, 1] with scipy's Gaussian filter (σ 1.5, truncated at
    radius 5 = an 11-tap window), keeping only pixels whose window lies inside the image."""
    blur = lambda x: scipy.ndimage.gaussian_filter(x, sigma=1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim.mean())


def test_psnr_of_a_known_mse():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(60, 190, (3, 3, 9, 32, 32), generator=g, dtype=torch.uint8)   # away from clamping
    deltas = torch.tensor([0.01, 0.05, 0.1], dtype=torch.float64)                      # in [0, 1] units
    recon = real.double() / 127.5 - 1 + 2 * deltas.view(3, 1, 1, 1, 1)                 # same shift in [-1, 1]
    expected = -10 * torch.log10(deltas ** 2)                                          # MSE = delta²
    torch.testing.assert_close(psnr_per_clip(real, recon), expected, rtol=1e-9, atol=1e-9)
    assert psnr_per_clip(real, real).tolist() == [100.0] * 3                          # MSE floored at 1e-10


def test_ssim_of_identical_clips_is_one():
    clips, _ = real_clips(2)
    torch.testing.assert_close(ssim_per_clip(clips, clips), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_ssim_matches_a_scipy_ndimage_reference():
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (2, 3, 2, 24, 20), generator=g, dtype=torch.uint8)
    recon = (real.double() / 127.5 - 1 + 0.15 * torch.randn(real.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    a, b = real.double().numpy() / 255.0, (recon.numpy() + 1) / 2
    expected = [np.mean([reference_ssim(a[i, c, t], b[i, c, t]) for c in range(3) for t in range(2)])
                for i in range(2)]
    torch.testing.assert_close(ssim_per_clip(real, recon), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)
    assert all(0.0 < s < 1.0 for s in expected)


def test_evaluation_of_a_perfect_and_a_noisy_reconstruction():
    clips, labels = real_clips(24)
    source = TensorClipSource(clips, labels)
    kwargs = dict(source=source, extractor=ProjectionExtractor(), ctx=SINGLE)
    perfect = evaluate_reconstruction(ReconConfig(batch_size=5), reconstruct=lambda v: v.clone(), **kwargs)
    assert perfect.num_clips == 24 and perfect.psnr == 100.0 and perfect.ssim == pytest.approx(1.0, abs=1e-12)
    assert abs(perfect.rfvd) < 1e-8

    g = torch.Generator().manual_seed(2)
    noisy = lambda v: v + 0.1 * torch.randn(v.shape, generator=g)  # noqa: E731
    result = evaluate_reconstruction(ReconConfig(batch_size=5, num_clips=20, seed=3), reconstruct=noisy, **kwargs)
    assert result.num_clips == 20
    assert result.rfvd > 1e-3 and 15 < result.psnr < 30 and result.ssim < 0.95
    assert math.isfinite(result.rfvd)


def test_config_refuses_a_single_clip():
    with pytest.raises(ValueError, match="recon.num_clips"):
        ReconConfig(num_clips=1)


class FrameIdentityTokenizer:
    """encode/decode are identities on (B, 3, T, H, W); the quantizer is the real multi-scale BSQ.
    Enough to check that reconstruction folds frames into the quantizer's batch correctly."""

    def __init__(self, scales):
        self.quantizer = MultiScaleBSQ(dim=3, scales=scales)

    def encode(self, video):
        return video

    def decode(self, latent):
        return latent


def test_reconstruction_goes_through_the_quantizer_frame_by_frame():
    tok = FrameIdentityTokenizer([(1, 1), (2, 2), (4, 4)])
    video = torch.randn(2, 3, 5, 4, 4, generator=torch.Generator().manual_seed(4))
    recon = tokenizer_reconstruct(tok)(video)
    per_frame = torch.stack([tok.quantizer(video[:, :, t]).quantized_NdHW for t in range(5)], dim=2)
    torch.testing.assert_close(recon, per_frame)
    assert not torch.allclose(recon, video)
