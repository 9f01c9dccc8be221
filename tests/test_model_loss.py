"""Bitwise cross-entropy: equals 2-class CE, weights follow the reweighting rule, per-scale metrics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from videoar_megatron.model.config import LossConfig
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.loss import bit_loss, token_weights

LAYOUT = TokenLayout(1, ((1, 1), (2, 2), (4, 4)), 2)  # 21 tokens per frame, N = 42


def test_uniform_loss_is_mean_bce_and_equals_two_class_ce():
    logits = torch.randn(3, 42, 8)
    targets = torch.rand(3, 42, 8) > 0.5
    out = bit_loss(logits, targets, LAYOUT, LossConfig())
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(logits, targets.float()))
    two_class = torch.stack([torch.zeros_like(logits), logits], dim=-1)  # (z0, z1) = (0, z)
    ce = F.cross_entropy(two_class.reshape(-1, 2), targets.long().reshape(-1))
    torch.testing.assert_close(out.loss, ce)


def test_per_scale_metrics_by_hand():
    logits = torch.randn(2, 42, 4)
    targets = torch.rand(2, 42, 4) > 0.5
    out = bit_loss(logits, targets, LAYOUT, LossConfig())
    bce = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").mean(-1)
    correct = ((logits > 0) == targets).float().mean(-1)
    scale_of = [0] + [1] * 4 + [2] * 16
    scale_N = torch.tensor(scale_of * 2)
    for k in range(3):
        torch.testing.assert_close(out.per_scale_loss_K[k], bce[:, scale_N == k].mean())
        torch.testing.assert_close(out.per_scale_acc_K[k], correct[:, scale_N == k].mean())
    perfect = bit_loss(torch.where(targets, 20.0, -20.0), targets, LAYOUT, LossConfig())
    assert perfect.loss < 1e-6 and perfect.bit_accuracy == 1


def test_infinitystar_reweighting_and_explicit_scale_weights():
    w = token_weights(LAYOUT, LossConfig(scale_reweight=1, max_reweight=3.0))
    raw = torch.tensor([min(3.0, (16 / 1) ** 0.5)] + [(16 / 4) ** 0.5] * 4 + [1.0] * 16).repeat(2)
    torch.testing.assert_close(w, raw / raw.sum())
    w2 = token_weights(LAYOUT, LossConfig(scale_weights=[0.0, 1.0, 2.0]))
    raw2 = torch.tensor([0.0] + [1.0] * 4 + [2.0] * 16).repeat(2)
    torch.testing.assert_close(w2, raw2 / raw2.sum())
    assert abs(token_weights(LAYOUT, LossConfig()).sum().item() - 1) < 1e-6
