"""Videos of any length: one window, or window after window; video-to-video and image-to-video.

The model decodes windows of at most W latent frames (the ``latent_frames`` it was trained on; W = 5
is 17 pixel frames at τ = 4). Longer videos and continuations use frame re-encoding (paper §4.2):

1. take the last ``1 + τ·(c − 1)`` pixel frames of the video so far (c = ``context_latent_frames``,
   at most W − 1 and at most what the video has);
2. re-encode them with the causal tokenizer (the clip starts at an "image" frame, as every training
   clip did) and quantize them with the AR scale schedule: the bits of c known latent frames;
3. teacher-force those bits into a fresh KV cache after the condition and decode frames c … W − 1;
4. decode the window's latent with the tokenizer and append its frames after the first
   ``1 + τ·(c − 1)`` (the re-encoded context) to the video.

Promises (tested): the output has exactly the requested number of frames, and everything before the
new frames (the given video or image, bit for bit, and every earlier window) is never modified.
Image-to-video is the same with a one-frame context (c = 1). Each window draws its bits from the
stream keyed by (seed, sample id, window index).
"""
from __future__ import annotations

import math

import torch

from tokenizer.model import VideoTokenizer
from tokenizer.quantizer import MultiScaleBSQ
from videoar_megatron.sampling.bits import sample_key
from videoar_megatron.sampling.sampler import Conditions, VideoARSampler


def window_keys(seed: int, sample_ids, window: int) -> torch.Tensor:
    return torch.tensor([sample_key(seed, int(i), window) for i in sample_ids], dtype=torch.int64)


@torch.no_grad()
def encode_known_bits(tokenizer: VideoTokenizer, quantizer: MultiScaleBSQ, clip_BCTHW: torch.Tensor) -> torch.Tensor:
    """Bits ``(B, c, L, d)`` of a ``1 + τ(c − 1)``-frame clip in [-1, 1] under the AR scale schedule."""
    dtype = next(tokenizer.encoder.parameters()).dtype
    latent = tokenizer.encode(clip_BCTHW.to(dtype)).float()
    B, d, c, H, W = latent.shape
    bits = quantizer.latent_to_bits(latent.permute(0, 2, 1, 3, 4).reshape(B * c, d, H, W))
    return quantizer.flatten_bits(bits).reshape(B, c, quantizer.tokens_per_frame, d)


@torch.no_grad()
def decode_latent(tokenizer: VideoTokenizer, latent_BdTHW: torch.Tensor) -> torch.Tensor:
    """Pixels ``(B, 3, 1 + τ(T − 1), H, W)`` float32 in [-1, 1]."""
    dtype = next(tokenizer.decoder.parameters()).dtype
    return tokenizer.decode(latent_BdTHW.to(dtype)).float().clamp_(-1, 1)


def _check_context(context: torch.Tensor, B: int, size: tuple[int, int]) -> torch.Tensor:
    if context.dim() != 5 or context.shape[1] != 3:
        raise ValueError(f"the video to extend must be (B, 3, frames, H, W), got {tuple(context.shape)}")
    if tuple(context.shape[-2:]) != tuple(size):
        raise ValueError(f"the video to extend is {tuple(context.shape[-2:])} pixels; this checkpoint makes "
                         f"{tuple(size)} (resize/crop it first)")
    if context.shape[0] not in (1, B):
        raise ValueError(f"{context.shape[0]} videos to extend for {B} samples")
    return context.expand(B, *context.shape[1:])


@torch.no_grad()
def generate_videos(sampler: VideoARSampler, tokenizer: VideoTokenizer, cond: Conditions, sample_ids, *,
                    seed: int, frames: int = 0, context: torch.Tensor | None = None,
                    context_latent_frames: int = 2) -> torch.Tensor:
    """Videos ``(B, 3, frames, H, W)`` float32 in [-1, 1] on the sampler's device.

    ``context``: a video ``(B or 1, 3, F0, H, W)`` in [-1, 1] to continue (F0 = 1: image-to-video);
    its frames are the first F0 frames of the output, unchanged. ``frames`` counts all output frames;
    0 means one window (without context) or the context plus one window of new frames.
    """
    tau, W = tokenizer.cfg.temporal_factor, sampler.window
    f = tokenizer.cfg.spatial_factor
    size = (sampler.latent_hw[0] * f, sampler.latent_hw[1] * f)
    B = cond.count
    window = 0
    if context is None:
        frames = frames or 1 + tau * (W - 1)
        first = min(W, 1 + math.ceil((frames - 1) / tau))
        res = sampler.generate(cond, window_keys(seed, sample_ids, 0), frames=first)
        out = decode_latent(tokenizer, res.latent_BdTHW)
    else:
        out = _check_context(context.to(sampler.device, torch.float32), B, size)
        c0 = min(context_latent_frames, W - 1, 1 + (out.shape[2] - 1) // tau)
        frames = frames or out.shape[2] + tau * (W - c0)
        if frames <= out.shape[2]:
            raise ValueError(f"frames={frames} asks for no new frames after the {out.shape[2]} given ones")
        window = -1
    if frames > out.shape[2] and W < 2:
        raise ValueError("this checkpoint decodes one latent frame per window (latent_frames=1): it cannot extend")
    while out.shape[2] < frames:
        window += 1
        c = min(context_latent_frames, W - 1, 1 + (out.shape[2] - 1) // tau)
        keep = 1 + tau * (c - 1)
        known = encode_known_bits(tokenizer, sampler.quantizer, out[:, :, out.shape[2] - keep:])
        T = min(W, c + math.ceil((frames - out.shape[2]) / tau))
        res = sampler.generate(cond, window_keys(seed, sample_ids, window), frames=T, known_bits_BTLd=known)
        out = torch.cat([out, decode_latent(tokenizer, res.latent_BdTHW)[:, :, keep:]], dim=2)
    return out[:, :, :frames]
