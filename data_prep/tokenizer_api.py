"""What ``data_prep`` uses of a tokenizer, as a ``typing.Protocol``: the tokenizer is handed in.

Design decision: ``data_prep`` sits below ``tokenizer`` (the tokenizer's trainer reads clips through
``data_prep``), so it cannot import the tokenizer. Pre-tokenization and ``shards inspect`` receive it
from their caller instead: the entrypoints (``videoar_megatron/cli``, benchmarks, tests) pass
``tokenizer.load_tokenizer``, the one call that loads a tokenizer checkpoint. Pre-tokenization takes
the *loader* rather than a loaded model because the worker decides the device (its local GPU) and
the model is loaded straight onto it. The members below are exactly what the two use; the real
tokenizer (``tokenizer.model.VideoTokenizer`` and ``tokenizer.quantizer.MultiScaleBSQ``) satisfies
them, which tests/test_pretokenize.py checks; :func:`require` names what a stand-in lacks.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch


class BitQuantizer(Protocol):
    """The multi-scale BSQ quantizer of one scale schedule (parameter-free)."""

    scales: tuple[tuple[int, int], ...]
    """The validated schedule ``((h_1, w_1), ..., (h_K, w_K))``; the last entry is the latent grid."""

    @property
    def tokens_per_frame(self) -> int:
        """Sum of h_k·w_k over the schedule."""

    def to(self, device: torch.device) -> BitQuantizer: ...

    def latent_to_bits(self, latent_NdHW: torch.Tensor) -> list[torch.Tensor]:
        """Clean bits per scale, ``(N, h_k, w_k, d)`` each (frames folded into N)."""

    def flatten_bits(self, bits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale bits → ``(N, L, d)``, scales in order, row-major: the stored token layout."""

    def unflatten_bits(self, bits_NLd: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`flatten_bits`."""


class TokenizerGeometry(Protocol):
    """The fields of the tokenizer's config that fix clip and latent shapes."""

    latent_dim: int
    """Bits per token d (the latent's channels)."""
    scale_schedule: list[list[int]]
    """The tokenizer's own schedule (used when the pre-tokenization recipe sets none)."""

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along height and width."""

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a clip of ``num_frames``; ValueError naming the valid counts otherwise."""


class EncodingTokenizer(Protocol):
    """What pre-tokenization uses: encode clips, quantize latents into bits, identify the tokenizer."""

    cfg: TokenizerGeometry
    content_hash: str
    """Hash of config + weights; recorded in the shard manifest (the AR trainer checks it)."""
    encoder: torch.nn.Module
    """The encoder alone (``encoder_memory_format`` converts its weights)."""

    def encode(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Video ``(B, 3, 1+T, H, W)`` in [-1, 1] → continuous latent ``(B, d, T', H/f, W/f)``."""

    def quantizer_for(self, scales: Sequence[Sequence[int]]) -> BitQuantizer:
        """The quantizer for ``scales``; ValueError saying what is wrong with an invalid schedule (empty,
        non-positive, shrinking): the schedule check lives with the quantizer."""


class DecodingTokenizer(Protocol):
    """What ``shards inspect`` uses to turn stored latents and bits back into pixels."""

    content_hash: str

    def quantizer_for(self, scales: Sequence[Sequence[int]]) -> BitQuantizer: ...

    def decode_bits(self, bits: list[torch.Tensor], batch: int, quantizer: BitQuantizer) -> torch.Tensor:
        """Per-scale bits ``(B*T, h, w, d)`` → video, through ``quantizer``'s schedule."""


class TokenizerLoader(Protocol):
    """``tokenizer.load_tokenizer``: a tokenizer checkpoint directory → the model on ``device``."""

    def __call__(self, directory: str, device: torch.device) -> EncodingTokenizer: ...


def members(protocol: type) -> list[str]:
    """The attributes and methods a protocol asks for."""
    names = set(vars(protocol).get("__annotations__", {}))
    names |= {n for n, v in vars(protocol).items()
              if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return sorted(names)


def require(tokenizer: object, protocol: type, what: str) -> None:
    """TypeError naming the members ``tokenizer`` lacks, if it does not provide ``protocol``."""
    missing = [m for m in members(protocol) if not hasattr(tokenizer, m)]
    if missing:
        raise TypeError(f"{what}: a {type(tokenizer).__name__} does not provide {protocol.__name__} (missing "
                        f"{', '.join(missing)}); pass tokenizer.load_tokenizer")
