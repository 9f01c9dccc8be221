"""Pixel reconstruction metrics, PSNR and SSIM per clip: the project's one definition, used by the
tokenizer's own evaluation and by ``videoar eval rfvd`` (``videoar_megatron.evaluation.recon``), so both
report the same numbers.

Design decisions (stated because papers differ):
- Pixels are compared in [0, 1] (data range 1), in float64: the real clip as decoded (uint8 / 255) and
  the reconstruction clamped to [-1, 1] and mapped to [0, 1], *not* rounded to uint8 (as LARP's and
  most tokenizer evaluations do).
- **PSNR** is per clip, ``10·log10(1 / MSE)`` with the MSE over all frames, pixels and channels of
  the clip, then averaged over clips (LARP's ``psnr_given_mse``). MSE is floored at 1e-10, so a
  perfect reconstruction reads 100 dB instead of infinity.
- **SSIM** is Wang et al. 2004 with an 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, 'valid'
  filtering (no padding, as the reference MATLAB code and pytorch-msssim), computed per frame **on
  each RGB channel** and averaged over channels, frames and clips (skimage ``channel_axis``,
  torchmetrics and pytorch-msssim do the same; some papers use luminance only and get other values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
MSE_FLOOR = 1e-10


def to_unit_interval(videos: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → /255; float [-1, 1] → clamp, (x + 1) / 2. float64 out."""
    if videos.dtype == torch.uint8:
        return videos.double() / 255.0
    return (videos.double().clamp(-1.0, 1.0) + 1.0) / 2.0


def psnr_per_clip(real_BCTHW: torch.Tensor, recon_BCTHW: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each clip ``(B,)``; inputs uint8 or float [-1, 1]."""
    a, b = to_unit_interval(real_BCTHW), to_unit_interval(recon_BCTHW.to(real_BCTHW.device))
    mse = (a - b).square().flatten(1).mean(1).clamp_min(MSE_FLOOR)
    return -10.0 * torch.log10(mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x_NCHW: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter per channel, 'valid' (output shrinks by window - 1)."""
    c = x_NCHW.shape[1]
    x = F.conv2d(x_NCHW, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim_per_frame(a_NCHW: torch.Tensor, b_NCHW: torch.Tensor) -> torch.Tensor:
    """Mean SSIM map of each frame and channel, ``(N, C)``; inputs float64 in [0, 1]."""
    if min(a_NCHW.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a_NCHW.shape[-2:])}")
    g = gaussian_window().to(a_NCHW.device)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data range 1
    mu_a, mu_b = _filter_valid(a_NCHW, g), _filter_valid(b_NCHW, g)
    var_a = _filter_valid(a_NCHW * a_NCHW, g) - mu_a.square()
    var_b = _filter_valid(b_NCHW * b_NCHW, g) - mu_b.square()
    cov = _filter_valid(a_NCHW * b_NCHW, g) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(2, 3))


def ssim_per_clip(real_BCTHW: torch.Tensor, recon_BCTHW: torch.Tensor) -> torch.Tensor:
    """SSIM of each clip ``(B,)``: per-frame, per-RGB-channel SSIM averaged."""
    a, b = to_unit_interval(real_BCTHW), to_unit_interval(recon_BCTHW.to(real_BCTHW.device))
    bsz, c, t, h, w = a.shape
    frames_a = a.transpose(1, 2).reshape(bsz * t, c, h, w)
    frames_b = b.transpose(1, 2).reshape(bsz * t, c, h, w)
    return ssim_per_frame(frames_a, frames_b).reshape(bsz, t * c).mean(1)
