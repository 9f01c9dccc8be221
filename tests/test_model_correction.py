"""Cross-frame error correction (Eq. 8): ramped ratios, inheritance, realised flips, re-quantized targets."""
from __future__ import annotations

import torch

from tokenizer.quantizer import MultiScaleBSQ
from videoar_megatron.model.config import CorrectionConfig
from videoar_megatron.model.correction import corrupt_and_requantize, draw_flip_ratios, flip_bits

PAPER = CorrectionConfig(p_min=0.0, p_max=0.25, delta=0.01)


def within(x: torch.Tensor, want: float, std: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(x.mean().item() - want) < sigmas * std / n ** 0.5


def test_ratios_follow_the_time_ramp():
    B, T, K = 20000, 5, 4
    p = draw_flip_ratios(B, T, K, PAPER, torch.Generator().manual_seed(0))
    for t in range(T):
        lo, hi = PAPER.p_min + PAPER.delta * t, PAPER.p_max + PAPER.delta * t
        later = p[:, t, 1:]                                      # scales after the first
        assert later.min() >= lo and later.max() <= hi
        assert within(later, (lo + hi) / 2, (hi - lo) / 12 ** 0.5, later.numel())
    first0 = p[:, 0, 0]                                          # frame 0 has nothing to inherit
    assert within(first0, 0.125, 0.25 / 12 ** 0.5, B)


def test_first_scale_inherits_previous_final_ratio():
    B, T, K = 20000, 4, 3
    p = draw_flip_ratios(B, T, K, PAPER, torch.Generator().manual_seed(1))
    for t in range(1, T):
        prev_final, first = p[:, t - 1, -1], p[:, t, 0]
        hi = PAPER.p_max + PAPER.delta * t
        assert (first >= prev_final).all() and (first <= hi).all()
        u = (first - prev_final) / (hi - prev_final)             # uniform on [0, 1] given prev_final
        assert within(u, 0.5, 1 / 12 ** 0.5, B)
        assert abs(torch.quantile(u.float(), 0.1).item() - 0.1) < 0.02
    # Inheritance raises the first scale's mean above the un-inherited one.
    assert p[:, 1:, 0].mean() > p[:, 1:, 1:].mean() + 0.03


def test_without_inheritance_first_scale_draws_like_the_others():
    cfg = CorrectionConfig(p_min=0.0, p_max=0.25, delta=0.01, inherit=False)
    p = draw_flip_ratios(20000, 3, 3, cfg, torch.Generator().manual_seed(2))
    assert within(p[:, 2, 0], 0.145, 0.25 / 12 ** 0.5, 20000)


def test_disabled_correction_draws_zero():
    p = draw_flip_ratios(4, 3, 2, CorrectionConfig(p_min=0.0, p_max=0.0, delta=0.01))
    assert not p.any()


def test_realised_flip_fraction_matches_the_ratio():
    bits = torch.rand(64, 8, 8, 32, generator=torch.Generator().manual_seed(3)) > 0.5
    p_N = torch.linspace(0.0, 0.4, 64, dtype=torch.float64)
    flipped = flip_bits(bits, p_N, torch.Generator().manual_seed(4))
    rate_N = (flipped != bits).float().mean(dim=(1, 2, 3))
    n = 8 * 8 * 32
    assert (rate_N - p_N.float()).abs().max() < 5 * (0.25 / n) ** 0.5
    assert rate_N[0] == 0


def test_requantize_reports_flips_at_the_drawn_ratio():
    q = MultiScaleBSQ(dim=16, scales=[(1, 1), (2, 2), (4, 4), (8, 8)])
    latent = torch.randn(32, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    p_NK = torch.full((32, 4), 0.2, dtype=torch.float64)
    out = corrupt_and_requantize(q, latent, p_NK, torch.Generator().manual_seed(6))
    bits_per_scale = 32 * 16
    for k, (h, w) in enumerate(q.scales):
        n = bits_per_scale * h * w
        rate = (out.input_bits[k] != out.target_bits[k]).float().mean().item()
        assert abs(rate - 0.2) < 5 * (0.16 / n) ** 0.5, (k, rate)
    # The accumulation is built from the fed (flipped) bits.
    torch.testing.assert_close(out.accum_NdHW[-1], q.accumulate(out.input_bits)[-1])


def test_requantized_targets_reconstruct_the_clean_latent_better():
    """Corrupt early scales; a model that then predicts the re-quantized targets ends closer to the
    latent than one that predicts the clean (un-requantized) bits on top of the corrupted ones."""
    q = MultiScaleBSQ(dim=16, scales=[(1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)])
    latent = torch.randn(64, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    clean = q.latent_to_bits(latent)
    for ratio in (0.1, 0.2, 0.3):
        gen = torch.Generator().manual_seed(8)
        corrupted_scales = 3
        p_NK = torch.zeros(64, 6, dtype=torch.float64)
        p_NK[:, :corrupted_scales] = ratio
        out = corrupt_and_requantize(q, latent, p_NK, gen)
        requant = out.accum_NdHW[-1]                                   # fed corrupted + re-quantized rest
        plain_bits = out.input_bits[:corrupted_scales] + clean[corrupted_scales:]
        plain = q.accumulate(plain_bits)[-1]
        err_requant = (requant - latent).pow(2).mean().item()
        err_plain = (plain - latent).pow(2).mean().item()
        err_clean = (q.decode_bits(clean) - latent).pow(2).mean().item()
        assert err_requant < err_plain, (ratio, err_requant, err_plain)
        assert err_clean <= err_requant
