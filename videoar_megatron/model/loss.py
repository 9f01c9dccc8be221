"""Bitwise cross-entropy over the video tokens, with per-scale loss and bit accuracy.

The head emits one logit per bit (d per token). Binary cross-entropy on logit z equals Infinity's
2-class cross-entropy on logits (z0, z1) with z = z1 - z0, at half the head width. A token's loss is the
mean over its d bits; tokens are averaged with weights (uniform by default, or InfinityStar's
per-scale reweighting: a token of scale k weighs min(cap, (n_K/n_k)^(1/(1+r))), n_k = h_k·w_k),
normalised to sum to one per sample; the batch loss is the mean over samples. A context-parallel rank
computes its share of that (its tokens' weighted sum over the whole sequence's weight sum), so the
shares add up to the unsplit loss (:func:`bit_loss`).
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
    return _token_weights(layout, cfg.scale_reweight, cfg.max_reweight, weights, str(device or "cpu"))


@functools.lru_cache(maxsize=32)
def _token_weights(layout: TokenLayout, reweight: int, cap: float, scale_weights, device: str) -> torch.Tensor:
    sizes = torch.tensor([h * w for h, w in layout.scales], dtype=torch.float64)
    per_scale = torch.ones_like(sizes)
    if reweight > 0:
        per_scale = (sizes[-1] / sizes).pow(1.0 / (1 + reweight)).clamp(max=cap)
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
             cfg: LossConfig, video_index_n: torch.Tensor | None = None) -> LossOutput:
    """Bitwise cross-entropy of logits ``(B, n, d)`` against bool targets ``(B, N, d)``.

    ``video_index_n``: which of the N video tokens the n logits are (a context-parallel rank's share;
    None: all N in order). Every term is then this share's part of the whole sequence's value: the
    weighted sum over its tokens divided by the weight sum of all N tokens, per-scale sums divided by
    whole-sequence counts; summed over the shares they are the unsplit values, for any token weights.
    """
    logits = logits_BNd.float()
    w_N = token_weights(layout, cfg, logits.device)
    scale_n = video_scale_ids(layout, str(logits.device))
    w_n = w_N
    if video_index_n is not None:
        targets_BNd, w_n, scale_n = targets_BNd[:, video_index_n], w_N[video_index_n], scale_n[video_index_n]
    target = targets_BNd.to(logits.dtype)
    bce_Bn = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
    # Divided by the whole sequence's weight sum, not this share's: a split loss sums to the unsplit one.
    loss = ((bce_Bn * w_n).sum(-1) / w_N.sum()).mean()
    with torch.no_grad():
        correct_Bn = ((logits > 0) == targets_BNd.bool()).float().mean(-1)
        K, B = layout.num_scales, logits.shape[0]
        # Static counts (no bincount: its data-dependent size would sync the host every step).
        sizes = [h * w * layout.frames * B for h, w in layout.scales]
        count_K = torch.tensor(sizes, dtype=torch.float32).to(logits.device, non_blocking=True)
        per_loss = torch.zeros(K, device=logits.device).index_add_(0, scale_n, bce_Bn.sum(0)) / count_K
        per_acc = torch.zeros(K, device=logits.device).index_add_(0, scale_n, correct_Bn.sum(0)) / count_K
    return LossOutput(loss=loss, per_scale_loss_K=per_loss, per_scale_acc_K=per_acc,
                      bit_accuracy=correct_Bn.sum() / (B * layout.video_len))
