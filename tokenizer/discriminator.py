"""3D discriminator for tokenizer GAN training (MAGVIT-v2 style: StyleGAN-like residual blocks in 3D).

Design decision: the discriminator judges whole clips (space and time), so flicker and temporal
incoherence are penalised, not only per-frame texture. It is a training-only module: it may look at
the future (plain symmetric 3D convolutions), and it is always trained from scratch (VideoAR supp. A:
inflation fills the tokenizer only). It returns a patch map of logits, so one forward scores many
space-time patches; images (one frame) go through the same network with no temporal downsampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class DiscriminatorConfig:
    """3D residual discriminator (trained from scratch)."""

    base_channels: int = 64
    """Channels after the input convolution (MAGVIT-v2: 64)."""
    channel_mult: list[int] = field(default_factory=lambda: [2, 4, 4, 4])
    """Channel multiplier per residual down-block; every block halves height and width."""
    temporal_down_blocks: list[int] = field(default_factory=lambda: [1, 2])
    """Blocks (0-based) that also halve time (skipped while a clip has a single frame)."""
    negative_slope: float = 0.2
    """LeakyReLU slope."""

    def __post_init__(self) -> None:
        if self.base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {self.base_channels}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be non-empty and positive, got {self.channel_mult}")
        bad = [b for b in self.temporal_down_blocks if not 0 <= b < len(self.channel_mult)]
        if bad:
            raise ValueError(f"temporal_down_blocks must index channel_mult (0..{len(self.channel_mult) - 1}), "
                             f"got {self.temporal_down_blocks}")

    @property
    def spatial_factor(self) -> int:
        return 2 ** len(self.channel_mult)


class ResBlockDown3d(nn.Module):
    """Two 3x3x3 convs and a 1x1x1 skip, averaged-pooled down; output scaled by 1/sqrt(2)."""

    def __init__(self, cin: int, cout: int, down_t: bool, slope: float):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1, bias=False)
        self.down_t = down_t
        self.slope = slope

    def _down(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        kt = 2 if self.down_t and x_BCTHW.shape[2] > 1 else 1
        return F.avg_pool3d(x_BCTHW, kernel_size=(kt, 2, 2))

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x_BCTHW), self.slope)
        h = self._down(F.leaky_relu(self.conv2(h), self.slope))
        return (h + self.skip(self._down(x_BCTHW))) / math.sqrt(2.0)


class Discriminator3D(nn.Module):
    """Video ``(B, 3, T, H, W)`` in [-1, 1] → patch logits ``(B, 1, t, h, w)``."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        chans = [cfg.base_channels] + [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv3d(3, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            ResBlockDown3d(chans[i], chans[i + 1], i in cfg.temporal_down_blocks, cfg.negative_slope)
            for i in range(len(cfg.channel_mult)))
        self.conv_mid = nn.Conv3d(chans[-1], chans[-1], 3, padding=1)
        self.conv_out = nn.Conv3d(chans[-1], 1, 1)

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        f = self.cfg.spatial_factor
        if video_BCTHW.shape[-1] % f or video_BCTHW.shape[-2] % f:
            raise ValueError(f"discriminator input H, W must be multiples of {f} (discriminator.channel_mult "
                             f"has {len(self.cfg.channel_mult)} down-blocks), got {tuple(video_BCTHW.shape[-2:])}")
        x = F.leaky_relu(self.conv_in(video_BCTHW), self.cfg.negative_slope)
        for block in self.blocks:
            x = block(x)
        x = F.leaky_relu(self.conv_mid(x), self.cfg.negative_slope)
        return self.conv_out(x)
