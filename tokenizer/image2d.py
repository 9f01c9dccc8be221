"""The 2-D image twin of :class:`tokenizer.model.VideoTokenizer`: same layers with 2-D convolutions.

Its state-dict keys are exactly the video tokenizer's minus the temporal-only layers
(``...temporal.conv.conv.*``), and each ``Conv2d`` weight ``(o, i, kh, kw)`` corresponds to a causal
``Conv3d`` weight ``(o, i, kt, kh, kw)``. It is what "a 2-D image tokenizer state dict" means for
:func:`tokenizer.inflate.inflate_from_2d`: an image tokenizer of this architecture (or any checkpoint
whose keys were mapped onto it) inflates into the video tokenizer, and on a single frame the
inflated video tokenizer reproduces this model's output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.config import TokenizerModelConfig
from tokenizer.quantizer import MultiScaleBSQ, QuantizerOutput


class Conv2dTwin(nn.Module):
    """2-D counterpart of ``CausalConv3d`` (same ``.conv`` attribute, "same" spatial padding)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(x_BCHW)


class ResBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = Conv2dTwin(cin, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = Conv2dTwin(cout, cout)
        self.skip = Conv2dTwin(cin, cout, kernel=1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.skip(x) if self.skip is not None else x)


class SpatialDownsample2D(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = Conv2dTwin(cin, cout, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SpatialUpsample2D(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = Conv2dTwin(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level2D(nn.Module):
    def __init__(self, blocks: list[ResBlock2D], spatial: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.spatial = spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.spatial(x) if self.spatial is not None else x


class Encoder2D(nn.Module):
    def __init__(self, cfg: TokenizerModelConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = Conv2dTwin(3, ch[0])
        self.levels = nn.ModuleList(
            Level2D([ResBlock2D(c if j else (ch[i - 1] if i else c), c, g) for j in range(cfg.num_res_blocks)],
                    None if i == len(ch) - 1 else SpatialDownsample2D(c, c))
            for i, c in enumerate(ch))
        self.mid = nn.ModuleList([ResBlock2D(ch[-1], ch[-1], g), ResBlock2D(ch[-1], ch[-1], g)])
        self.norm_out = nn.GroupNorm(g, ch[-1])
        self.conv_out = Conv2dTwin(ch[-1], cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for module in [*self.levels, *self.mid]:
            x = module(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder2D(nn.Module):
    def __init__(self, cfg: TokenizerModelConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = Conv2dTwin(cfg.latent_dim, ch[-1])
        self.mid = nn.ModuleList([ResBlock2D(ch[-1], ch[-1], g), ResBlock2D(ch[-1], ch[-1], g)])
        levels = []
        for i in reversed(range(len(ch))):
            cin = ch[min(i + 1, len(ch) - 1)]
            blocks = [ResBlock2D(cin if j == 0 else ch[i], ch[i], g) for j in range(cfg.num_res_blocks + 1)]
            levels.append(Level2D(blocks, None if i == 0 else SpatialUpsample2D(ch[i], ch[i])))
        self.levels = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, ch[0])
        self.conv_out = Conv2dTwin(ch[0], 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for module in [*self.mid, *self.levels]:
            x = module(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class ImageTokenizer2D(nn.Module):
    """Image ``(B, 3, H, W)`` in [-1, 1] → latent ``(B, d, H/16, W/16)`` → multi-scale BSQ → image."""

    def __init__(self, cfg: TokenizerModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder2D(cfg)
        self.decoder = Decoder2D(cfg)
        self.quantizer = MultiScaleBSQ(dim=cfg.latent_dim, scales=cfg.scale_schedule,
                                       entropy_inv_temperature=cfg.entropy_inv_temperature)

    def encode(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        return self.encoder(image_BCHW)

    def decode(self, latent_BdHW: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent_BdHW)

    def forward(self, image_BCHW: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        q = self.quantizer(self.encode(image_BCHW))
        return self.decode(q.quantized_NdHW), q
