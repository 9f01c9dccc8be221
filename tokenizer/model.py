"""Causal 3D CNN video tokenizer (MAGVIT-v2 style) with temporal-independent multi-scale BSQ.

``(1+T)`` frames → ``1 + T/tau`` latent frames at 1/16 of the resolution; an image is the T = 0 case.
Design decision: causality is structural. Every temporal kernel is padded only on the past side
(the first frame is replicated in front of a clip), normalisation is per frame (GroupNorm over C×H×W,
never over time), and temporal down/upsampling keeps frame 0 on its own. So a latent frame depends
only on input frames up to it, and a clip can be encoded (or decoded) chunk by chunk with exactly the
same result as in one pass, by carrying each causal conv's last input frames in a :class:`StreamState`.
First chunk: 1 + tau·k frames; later chunks: tau·k frames (latent side: 1 + k, then k).

Layers that act only along time (temporal down/upsampling convs) start as the identity on their newest
frame, so a tokenizer inflated from a 2-D image tokenizer (``tokenizer.inflate``) reproduces the image
model on a single frame exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tokenizer.config import TokenizerModelConfig
from tokenizer.quantizer import MultiScaleBSQ, QuantizerOutput


class StreamState:
    """Per-conv cache of trailing input frames for chunk-by-chunk encoding/decoding."""

    def __init__(self):
        self.frames: dict[nn.Module, torch.Tensor] = {}
        self.started: set[nn.Module] = set()


class CausalConv3d(nn.Module):
    """Conv3d padded in time only on the past side; spatial padding is symmetric ("same")."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (3, 3, 3),
                 stride_t: int = 1, stride_s: int = 1):
        super().__init__()
        self.kt, kh, kw = kernel
        self.stride_t = stride_t
        if self.kt < stride_t:
            raise ValueError("temporal kernel must be >= temporal stride")
        self.conv = nn.Conv3d(cin, cout, kernel, stride=(stride_t, stride_s, stride_s),
                              padding=(0, kh // 2, kw // 2))

    def forward(self, x_BCTHW: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        cached = stream.frames.get(self) if stream is not None else None
        if cached is None:
            # Start of a clip: replicate the first frame into the past so frame 0 sees only itself.
            pad = x_BCTHW[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1)
        else:
            pad = cached
        x = self._cat_time(pad, x_BCTHW) if pad.shape[2] else x_BCTHW
        if stream is not None:
            # The next chunk's first window starts `stride` frames after this chunk's last window.
            keep = self.kt - self.stride_t
            stream.frames[self] = x[:, :, x.shape[2] - keep:] if keep else x[:, :, :0]
        return self.conv(x)

    def _cat_time(self, pad_BCtHW: torch.Tensor, x_BCTHW: torch.Tensor) -> torch.Tensor:
        """``[pad, x]`` along time, laid out like the conv weight. ``torch.cat`` returns NCDHW here (the
        expanded pad has no channels-last strides; on CUDA GroupNorm also returns NCDHW), so with
        channels_last_3d weights (``module.to(memory_format=torch.channels_last_3d)``) the conv would copy
        its input a second time; writing the concatenation in NDHWC makes this copy the only one."""
        if not _is_channels_last(self.conv.weight):
            return torch.cat([pad_BCtHW, x_BCTHW], dim=2)
        b, c, t, h, w = x_BCTHW.shape
        k = pad_BCtHW.shape[2]
        out = torch.empty((b, c, k + t, h, w), dtype=x_BCTHW.dtype, device=x_BCTHW.device,
                          memory_format=torch.channels_last_3d)
        out[:, :, :k].copy_(pad_BCtHW)
        out[:, :, k:].copy_(x_BCTHW)
        return out

    def init_identity_last_slice(self) -> None:
        """Make the conv the identity on its newest frame (needs cin == cout)."""
        w = self.conv.weight
        if w.shape[0] != w.shape[1]:
            raise ValueError("identity init needs equal in/out channels")
        with torch.no_grad():
            w.zero_()
            kh, kw = w.shape[3] // 2, w.shape[4] // 2
            w[torch.arange(w.shape[0]), torch.arange(w.shape[1]), -1, kh, kw] = 1.0
            if self.conv.bias is not None:
                self.conv.bias.zero_()


def _is_channels_last(weight: torch.Tensor) -> bool:
    """True for a Conv3d weight stored NDHWC (a 1x1x1 kernel is both layouts and counts as NCDHW)."""
    return weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (C, H, W) of each frame: statistics never mix frames."""

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        b = x_BCTHW.shape[0]
        x = rearrange(x_BCTHW, "b c t h w -> (b t) c h w")
        return rearrange(super().forward(x), "(b t) c h w -> b c t h w", b=b)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = FrameGroupNorm(groups, cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = CausalConv3d(cin, cout, kernel=(1, 1, 1)) if cin != cout else None

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), stream)
        h = self.conv2(F.silu(self.norm2(h)), stream)
        return h + (self.skip(x, stream) if self.skip is not None else x)


class TemporalDownsample(nn.Module):
    """Halve time causally: 1 + 2n frames → 1 + n (identity on the newest frame at init)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, kernel=(3, 1, 1), stride_t=2)
        self.conv.init_identity_last_slice()

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        return self.conv(x, stream)


class TemporalUpsample(nn.Module):
    """Double time causally: latent frame 0 → 1 frame, every later frame → 2 (repeat, then a causal
    conv that starts as the identity)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, kernel=(3, 1, 1))
        self.conv.init_identity_last_slice()

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        x = x.repeat_interleave(2, dim=2)
        if stream is None or self not in stream.started:
            x = x[:, :, 1:]  # frame 0 of a clip stays a single frame
            if stream is not None:
                stream.started.add(self)
        return self.conv(x, stream)


class SpatialDownsample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, kernel=(3, 3, 3), stride_s=2)

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        return self.conv(x, stream)


class SpatialUpsample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv3d(cin, cout)

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        b = x.shape[0]
        x = rearrange(x, "b c t h w -> (b t) c h w")
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(rearrange(x, "(b t) c h w -> b c t h w", b=b), stream)


class Level(nn.Module):
    """Residual blocks of one resolution, then the optional resampling to the next level."""

    def __init__(self, blocks: list[ResBlock], spatial: nn.Module | None, temporal: nn.Module | None,
                 temporal_first: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.spatial = spatial
        self.temporal = temporal
        self.temporal_first = temporal_first

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, stream)
        resamplers = [self.temporal, self.spatial] if self.temporal_first else [self.spatial, self.temporal]
        for module in resamplers:
            if module is not None:
                x = module(x, stream)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerModelConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = CausalConv3d(3, ch[0])
        levels = []
        for i, c in enumerate(ch):
            blocks = [ResBlock(c if j else (ch[i - 1] if i else c), c, g) for j in range(cfg.num_res_blocks)]
            last = i == len(ch) - 1
            spatial = None if last else SpatialDownsample(c, c)
            temporal = TemporalDownsample(c) if i in cfg.temporal_down_levels else None
            levels.append(Level(blocks, spatial, temporal, temporal_first=False))
        self.levels = nn.ModuleList(levels)
        self.mid = nn.ModuleList([ResBlock(ch[-1], ch[-1], g), ResBlock(ch[-1], ch[-1], g)])
        self.norm_out = FrameGroupNorm(g, ch[-1])
        self.conv_out = CausalConv3d(ch[-1], cfg.latent_dim)

    def forward(self, x_BCTHW: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        x = self.conv_in(x_BCTHW, stream)
        for level in self.levels:
            x = level(x, stream)
        for block in self.mid:
            x = block(x, stream)
        return self.conv_out(F.silu(self.norm_out(x)), stream)


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerModelConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = CausalConv3d(cfg.latent_dim, ch[-1])
        self.mid = nn.ModuleList([ResBlock(ch[-1], ch[-1], g), ResBlock(ch[-1], ch[-1], g)])
        levels = []
        for i in reversed(range(len(ch))):
            cin = ch[min(i + 1, len(ch) - 1)]
            blocks = [ResBlock(cin if j == 0 else ch[i], ch[i], g) for j in range(cfg.num_res_blocks + 1)]
            first = i == 0
            spatial = None if first else SpatialUpsample(ch[i], ch[i])
            temporal = TemporalUpsample(ch[i]) if (i - 1) in cfg.temporal_down_levels else None
            levels.append(Level(blocks, spatial, temporal, temporal_first=True))
        self.levels = nn.ModuleList(levels)
        self.norm_out = FrameGroupNorm(g, ch[0])
        self.conv_out = CausalConv3d(ch[0], 3)

    def forward(self, z_BdTHW: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        x = self.conv_in(z_BdTHW, stream)
        for block in self.mid:
            x = block(x, stream)
        for level in self.levels:
            x = level(x, stream)
        return self.conv_out(F.silu(self.norm_out(x)), stream)


class VideoTokenizer(nn.Module):
    """Encoder, multi-scale BSQ quantizer and decoder. Videos are ``(B, 3, 1+T, H, W)`` in [-1, 1]."""

    def __init__(self, cfg: TokenizerModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = MultiScaleBSQ(dim=cfg.latent_dim, scales=cfg.scale_schedule,
                                       entropy_inv_temperature=cfg.entropy_inv_temperature)
        self.content_hash = ""
        """Set by the checkpoint loader: hash of config + weights, recorded in shard manifests."""

    def quantizer_for(self, scales) -> MultiScaleBSQ:
        """The (parameter-free) quantizer for another scale schedule over the same latents."""
        return MultiScaleBSQ(dim=self.cfg.latent_dim, scales=scales,
                             entropy_inv_temperature=self.cfg.entropy_inv_temperature)

    def _check_video(self, video_BCTHW: torch.Tensor) -> None:
        if video_BCTHW.dim() != 5 or video_BCTHW.shape[1] != 3:
            raise ValueError(f"expected video (B, 3, 1+T, H, W), got {tuple(video_BCTHW.shape)}")
        self.cfg.latent_frames(video_BCTHW.shape[2])
        f = self.cfg.spatial_factor
        if video_BCTHW.shape[3] % f or video_BCTHW.shape[4] % f:
            raise ValueError(f"height and width must be multiples of {f}, got {tuple(video_BCTHW.shape[3:])}")

    def encode(self, video_BCTHW: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        """Continuous latent ``(B, d, 1+T/tau, H/16, W/16)`` (before quantization)."""
        if stream is None or not stream.frames:
            self._check_video(video_BCTHW)
        return self.encoder(video_BCTHW, stream)

    def quantize(self, latent_BdTHW: torch.Tensor, quantizer: MultiScaleBSQ | None = None) -> QuantizerOutput:
        """Quantize each latent frame independently; the output's tensors have frames folded in N."""
        q = quantizer or self.quantizer
        return q(rearrange(latent_BdTHW, "b d t h w -> (b t) d h w"))

    def decode(self, latent_BdTHW: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        return self.decoder(latent_BdTHW, stream)

    def forward(self, video_BCTHW: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        latent = self.encode(video_BCTHW)
        q = self.quantize(latent)
        quantized = rearrange(q.quantized_NdHW, "(b t) d h w -> b d t h w", b=latent.shape[0])
        return self.decode(quantized), q

    @torch.no_grad()
    def decode_bits(self, bits: list[torch.Tensor], batch: int, quantizer: MultiScaleBSQ | None = None) -> torch.Tensor:
        """Video from per-scale bits ``(B*T, h, w, d)`` (frames folded with batch)."""
        q = quantizer or self.quantizer
        latent = rearrange(q.decode_bits(bits), "(b t) d h w -> b d t h w", b=batch)
        return self.decode(latent.to(next(self.decoder.parameters()).dtype))
