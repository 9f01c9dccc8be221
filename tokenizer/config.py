"""Tokenizer model configuration (architecture and quantizer); training knobs live with the trainer."""
from __future__ import annotations

from dataclasses import dataclass, field

from tokenizer.quantizer import check_schedule


@dataclass(kw_only=True)
class TokenizerModelConfig:
    """Causal 3D CNN encoder/decoder with temporal-independent multi-scale BSQ (VideoAR §4.1)."""

    latent_dim: int = 16
    """Bits per token d (paper: 48). The encoder's output width and the quantizer's code width."""
    base_channels: int = 32
    """Channels of the first encoder level (MAGVIT-v2 uses 128)."""
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4, 4])
    """Channel multiplier per level; len - 1 spatial 2x downsamples, so 5 levels give 16x."""
    num_res_blocks: int = 1
    """Residual blocks per level (the decoder uses one more per level)."""
    temporal_down_levels: list[int] = field(default_factory=lambda: [2, 3])
    """Levels (0-based, < len(channel_mult) - 1) whose downsample also halves time: two give tau = 4."""
    norm_groups: int = 8
    """GroupNorm groups. Normalisation is per frame (spatial only): nothing mixes time non-causally."""
    scale_schedule: list[list[int]] = field(
        default_factory=lambda: [[1, 1], [2, 2], [3, 3], [4, 4]])
    """Multi-scale schedule [[h, w], ...] of the quantizer; the last entry is the latent grid of the
    training resolution (e.g. 64x64 pixels / 16 = 4x4)."""
    entropy_inv_temperature: float = 100.0
    """Inverse temperature tau of the soft bit probabilities sigmoid(4·tau·z/sqrt(d)) in the entropy
    penalty; the penalty is divided by it (Infinity's convention, docs/tokenizer.md#quantizer-losses)."""

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if len(self.channel_mult) < 1 or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be non-empty and positive, got {self.channel_mult}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        downs = len(self.channel_mult) - 1
        bad = [lvl for lvl in self.temporal_down_levels if not 0 <= lvl < downs]
        if bad or len(set(self.temporal_down_levels)) != len(self.temporal_down_levels):
            raise ValueError(f"temporal_down_levels must be distinct levels in [0, {downs}), "
                             f"got {self.temporal_down_levels}")
        for c in self.channels:
            if c % self.norm_groups:
                raise ValueError(f"norm_groups={self.norm_groups} must divide every level's channels {self.channels}")
        check_schedule(self.scale_schedule)
        if self.entropy_inv_temperature <= 0:
            raise ValueError(f"entropy_inv_temperature must be > 0, got {self.entropy_inv_temperature}")

    @property
    def channels(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mult]

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** len(self.temporal_down_levels)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` input frames (1 + T/tau); raises if T is not a multiple."""
        tau = self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % tau:
            raise ValueError(f"clips need 1 + {tau}k frames (1, {1 + tau}, {1 + 2 * tau}, ...), got {num_frames}")
        return 1 + (num_frames - 1) // tau
