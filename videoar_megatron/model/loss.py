"""Bitwise cross-entropy over the video tokens, with per-scale loss and bit accuracy.

The head emits one logit per bit (d per token). Binary cross-entropy on logit z equals Infinity's
2-class cross-entropy on logits (z0, z1) with z = z1 - z0, at half the head width. A token's loss is the
mean over its d bits (Infinity's ``bitloss_type == 'mean'``); tokens are averaged with per-scale weights
(``loss.scale_weighting``, n_k = h_k·w_k tokens of scale k in one frame, K the last scale):

- ``none``: every token weighs the same;
- ``infinity``: sqrt(n_K / n_k), Infinity's ``reweight_loss_by_scale`` (``trainer.py`` of
  FoundationVision/Infinity, lines 205-215: ``sqrt(last area) / sqrt(this area)`` per token);
- ``infinitystar``: min(cap, (n_K / n_k)^(1/(1+r))), InfinityStar's (``infinity/trainer/sft_trainer.py``
  lines 194-198),

times the optional explicit ``scale_weights``, normalised to sum to one per sample (Infinity normalises
over the sequence, InfinityStar over the packed batch: the same when all samples share one layout, as
ours do); the batch loss is the mean over samples. Every frame has the same pyramid, so n_k is
per frame (Infinity's (t, h, w) volume of an image scale).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from videoar_megatron.model.config import LossConfig
from videoar_megatron.model.layout import TokenLayout


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Weighted bitwise cross-entropy (scalar, differentiable)."""
    per_scale_loss_K: torch.Tensor
    """Mean bit cross-entropy of each scale's tokens (over frames and samples), detached."""
    per_scale_acc_K: torch.Tensor
    """Bit accuracy of each scale, detached."""
    bit_accuracy: torch.Tensor
    """Bit accuracy over all video tokens, detached."""


def token_weights(layout: TokenLayout, cfg: LossConfig, device=None) -> torch.Tensor:
    """Per-token weights ``(N,)`` of the video tokens, summing to one."""
    weights = None if cfg.scale_weights is None else tuple(cfg.scale_weights)
    r, cap = cfg.infinitystar_r_cap
    return _token_weights(layout, cfg.scale_weighting, r, cap, weights, str(device or "cpu"))


def scale_multipliers(sizes_K: torch.Tensor, weighting: str, r: int = 4, cap: float = 40.0) -> torch.Tensor:
    """Weight of one token of each scale ``(K,)`` before normalisation; ``sizes_K`` = n_k."""
    ratio_K = sizes_K[-1] / sizes_K
    if weighting == "none":
        return torch.ones_like(sizes_K)
    if weighting == "infinity":
        return ratio_K.sqrt()
    if weighting == "infinitystar":
        return ratio_K.pow(1.0 / (1 + r)).clamp(max=cap)
    raise ValueError(f"loss.scale_weighting must be none, infinity or infinitystar, got {weighting!r}")


@functools.lru_cache(maxsize=32)
def _token_weights(layout: TokenLayout, weighting: str, r: int, cap: float, scale_weights,
                   device: str) -> torch.Tensor:
    sizes = torch.tensor([h * w for h, w in layout.scales], dtype=torch.float64)
    per_scale = scale_multipliers(sizes, weighting, r, cap)
    if scale_weights is not None:
        if len(scale_weights) != len(sizes):
            raise ValueError(f"loss.scale_weights has {len(scale_weights)} entries, the schedule "
                             f"has {len(sizes)} scales")
        per_scale = per_scale * torch.tensor(scale_weights, dtype=torch.float64)
    per_token = torch.repeat_interleave(per_scale, sizes.long()).repeat(layout.frames)
    return (per_token / per_token.sum()).float().to(device)


@functools.lru_cache(maxsize=32)
def video_scale_ids(layout: TokenLayout, device: str = "cpu") -> torch.Tensor:
    """Scale index of each video token ``(N,)``."""
    sizes = torch.tensor([h * w for h, w in layout.scales])
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes).repeat(layout.frames).to(device)


def bit_loss(logits_BNd: torch.Tensor, targets_BNd: torch.Tensor, layout: TokenLayout,
             cfg: LossConfig) -> LossOutput:
    """Bitwise cross-entropy of logits ``(B, N, d)`` against bool targets ``(B, N, d)``."""
    logits = logits_BNd.float()
    target = targets_BNd.to(logits.dtype)
    bce_BN = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
    w_N = token_weights(layout, cfg, logits.device)
    loss = (bce_BN * w_N).sum(-1).mean()
    with torch.no_grad():
        correct_BN = ((logits > 0) == targets_BNd.bool()).float().mean(-1)
        scale_N = video_scale_ids(layout, str(logits.device))
        K = layout.num_scales
        # Static counts (no bincount: its data-dependent size would sync the host every step).
        sizes = [h * w * layout.frames * logits.shape[0] for h, w in layout.scales]
        count_K = torch.tensor(sizes, dtype=torch.float32).to(logits.device, non_blocking=True)
        per_loss = torch.zeros(K, device=logits.device).index_add_(0, scale_N, bce_BN.sum(0)) / count_K
        per_acc = torch.zeros(K, device=logits.device).index_add_(0, scale_N, correct_BN.sum(0)) / count_K
    return LossOutput(loss=loss, per_scale_loss_K=per_loss, per_scale_acc_K=per_acc,
                      bit_accuracy=correct_BN.mean())
