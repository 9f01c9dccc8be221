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
per frame (Infinity's (t, h, w) volume of an image scale). A context-parallel rank computes its share
of the loss (its tokens' weighted sum over the whole sequence's weight sum), so the shares add up to
the unsplit loss (:func:`bit_loss`).
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
