"""Bitwise cross-entropy: equals 2-class CE, weights follow the reweighting rule, per-scale metrics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from videoar_megatron.model.config import LossConfig
from videoar_megatron.model.layout import TokenLayout
from videoar_common.config import build_dataclass
from videoar_megatron.model.loss import bit_loss, token_weights, video_scale_ids

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


def infinity_rule_by_hand(scales, frames):
    """Infinity's trainer.py rule, per token in sequence order: sqrt(last area) / sqrt(this area), then
    divided by the sum over the sequence; every frame repeats the pyramid."""
    last = math.sqrt(scales[-1][0] * scales[-1][1])
    raw = [last / math.sqrt(h * w) for _ in range(frames) for h, w in scales for _ in range(h * w)]
    return [x / sum(raw) for x in raw]


def test_infinity_weighting_follows_infinitys_rule_and_sums_as_documented():
    """'infinity': per-sample weights sum to one and scale k carries sqrt(n_k) / sum_j sqrt(n_j)."""
    layout = TokenLayout(0, ((1, 1), (2, 3), (4, 6)), 3)             # n_k = 1, 6, 24
    w = token_weights(layout, LossConfig(scale_weighting="infinity")).double()
    torch.testing.assert_close(w, torch.tensor(infinity_rule_by_hand(layout.scales, 3), dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    share = torch.zeros(3, dtype=torch.float64).index_add_(0, video_scale_ids(layout), w)
    roots = [1.0, math.sqrt(6), math.sqrt(24)]
    torch.testing.assert_close(share, torch.tensor([r / sum(roots) for r in roots], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    # the loss with these weights: a per-token bce that is 1 on scale 0 and 0 elsewhere gives scale 0's share
    targets = torch.zeros(1, layout.video_len, 2, dtype=torch.bool)
    logits = torch.full((1, layout.video_len, 2), -30.0)
    logits[0, video_scale_ids(layout) == 0] = math.log(math.e - 1)    # bce(z, 0) = log(1 + e^z) = 1
    out = bit_loss(logits, targets, layout, LossConfig(scale_weighting="infinity"))
    assert out.loss.item() == pytest.approx(roots[0] / sum(roots), rel=1e-5)


def test_uniform_weighting_sums_to_one_with_equal_tokens():
    w = token_weights(LAYOUT, LossConfig(scale_weighting="none"))
    torch.testing.assert_close(w, torch.full((42,), 1 / 42))


def test_infinitystar_reweighting_and_explicit_scale_weights():
    w = token_weights(LAYOUT, LossConfig(scale_weighting="infinitystar", scale_reweight=1, max_reweight=3.0))
    raw = torch.tensor([min(3.0, (16 / 1) ** 0.5)] + [(16 / 4) ** 0.5] * 4 + [1.0] * 16).repeat(2)
    torch.testing.assert_close(w, raw / raw.sum())
    w4 = token_weights(LAYOUT, LossConfig(scale_weighting="infinitystar"))  # InfinityStar's r = 4, cap 40
    raw4 = torch.tensor([16 ** 0.2] + [4 ** 0.2] * 4 + [1.0] * 16).repeat(2)
    torch.testing.assert_close(w4, raw4 / raw4.sum())
    w2 = token_weights(LAYOUT, LossConfig(scale_weights=[0.0, 1.0, 2.0]))
    raw2 = torch.tensor([0.0] + [1.0] * 4 + [2.0] * 16).repeat(2)
    torch.testing.assert_close(w2, raw2 / raw2.sum())
    assert abs(token_weights(LAYOUT, LossConfig()).sum().item() - 1) < 1e-6


@pytest.mark.parametrize("raw,match", [
    ({"scale_reweight": 4}, "loss.scale_reweight applies to loss.scale_weighting=infinitystar only"),
    ({"scale_weighting": "infinity", "max_reweight": 4.0}, "loss.max_reweight applies"),
    ({"scale_weighting": "infinitystar", "scale_reweight": 0}, "loss.scale_reweight must be >= 1"),
    ({"scale_weighting": "sqrt"}, "scale_weighting"),
])
def test_weighting_knobs_are_checked(raw, match):
    with pytest.raises(ValueError, match=match):
        build_dataclass(LossConfig, raw)
