"""Multi-scale BSQ: exact bit round trips, shrinking residuals, self-correction semantics."""
from __future__ import annotations

import pytest
import torch

from tokenizer.quantizer import MultiScaleBSQ

SCHEDULE = [(1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)]


def make(dim=16, scales=SCHEDULE):
    return MultiScaleBSQ(dim=dim, scales=scales)


def latent(n=3, dim=16, hw=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    # a latent a trained encoder might give: a few unit-ish vectors' worth of magnitude
    return torch.randn(n, dim, *hw, generator=g) * 0.6


def test_bits_codes_accumulation_is_exact_for_the_quantized_part():
    q = make()
    x = latent()
    out = q(x)
    decoded = q.decode_bits(out.bits)
    torch.testing.assert_close(decoded, out.quantized_NdHW, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(q.latent_to_bits(x), out.bits))
    # codes are on the sphere: each token of each scale has unit norm
    for b in out.bits:
        codes = q.bits_to_codes(b)
        torch.testing.assert_close(codes.norm(dim=1), torch.ones(codes.shape[0], *codes.shape[2:]))
    # packing round trip
    flat = q.flatten_bits(out.bits)
    assert flat.shape == (3, q.tokens_per_frame, 16)
    assert all(torch.equal(a, b) for a, b in zip(q.unflatten_bits(flat), out.bits))


def test_residual_error_shrinks_as_scales_are_added():
    q = make()
    x = latent(n=8)
    accums = q.accumulate(q.latent_to_bits(x))
    errors = [(x - a).pow(2).mean().item() for a in accums]
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]


def test_requantization_after_flipping_scale_k_changes_only_later_scales():
    q = make()
    x = latent(n=4)
    clean = q.requantize(x)
    k = 2
    g = torch.Generator().manual_seed(1)

    def flip(scale, bits):
        if scale != k:
            return bits
        return bits ^ (torch.rand(bits.shape, generator=g) < 0.3)

    noisy = q.requantize(x, flip)
    for s in range(len(SCHEDULE)):
        same = torch.equal(clean.target_bits[s], noisy.target_bits[s])
        assert same == (s <= k), f"scale {s}"
    assert not torch.equal(noisy.input_bits[k], noisy.target_bits[k])     # the flip happened
    for s in range(k):
        assert torch.equal(clean.accum_NdHW[s], noisy.accum_NdHW[s])


def test_requantized_targets_correct_the_error():
    """After corrupting scale 1, re-quantized later targets reconstruct the latent better than the
    clean targets stacked on the corrupted accumulation would."""
    q = make()
    x = latent(n=16)
    g = torch.Generator().manual_seed(2)
    flip = lambda s, b: b ^ (torch.rand(b.shape, generator=g) < 0.25) if s == 1 else b
    noisy = q.requantize(x, flip)
    clean_bits = q.latent_to_bits(x)
    naive = q.accumulate([noisy.input_bits[0], noisy.input_bits[1], *clean_bits[2:]])[-1]
    corrected = noisy.accum_NdHW[-1]
    assert (x - corrected).pow(2).mean() < (x - naive).pow(2).mean()


def test_gradients_pass_straight_through():
    q = make()
    x = latent().requires_grad_(True)
    out = q(x)
    (out.quantized_NdHW.sum() + out.commitment_loss + 0.1 * out.entropy_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("scales,match", [([], "empty"), ([(2, 2), (1, 1)], "monotonic"),
                                          ([(0, 1)], ">= 1")])
def test_bad_schedules_are_refused(scales, match):
    with pytest.raises(ValueError, match=match):
        MultiScaleBSQ(dim=4, scales=scales)


def test_latent_grid_must_match_last_scale():
    with pytest.raises(ValueError, match="does not match the last scale"):
        make().latent_to_bits(torch.zeros(1, 16, 4, 4))
