"""Multi-scale BSQ: exact bit round trips, shrinking residuals, self-correction semantics."""
from __future__ import annotations

import math

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


def _infinity_entropy_by_hand(tokens, d, tau, gamma=1.0):
    """Infinity's BSQ entropy term for one scale, in plain Python, from its definition
    (InfinityStar multiscale_bsq_tp.py: soft_entropy_loss, and aux_loss = (gamma0·H_sample - gamma·H_cb)
    / inv_temperature with gamma0 = zeta = 1): p is the soft probability of the -1 code."""
    def h(p):
        return -(p * math.log(p + 1e-8) + (1 - p) * math.log(1 - p + 1e-8))
    unit = []
    for v in tokens:
        n = math.sqrt(sum(x * x for x in v))
        unit.append([x / n for x in v])
    probs = [[1 / (1 + math.exp(4 * z / math.sqrt(d) * tau)) for z in u] for u in unit]  # sigmoid(-4 z/√d τ)
    per_sample = sum(sum(h(p) for p in row) for row in probs) / len(probs)
    avg = [sum(row[i] for row in probs) / len(probs) for i in range(d)]
    codebook = sum(h(p) for p in avg)
    return (per_sample - gamma * codebook) / tau


def test_entropy_loss_equals_infinitys_formula_by_hand():
    """Two scales over a 1x2 grid of 2-bit tokens, near the decision boundary so that the soft bits are
    not saturated at tau = 100; the second scale's residual is computed by hand too (area down to 1x1,
    code sign(z)/sqrt(2), bilinear up to 1x2 = the same code at both tokens)."""
    d, tau = 2, 100.0
    a, b = [0.71, 0.7081], [0.705, -0.7061]   # mean (0.7075, 0.001); residual of b: (-0.0021, -1.4132)
    q = MultiScaleBSQ(dim=d, scales=[(1, 1), (1, 2)], entropy_inv_temperature=tau)
    x = torch.tensor([[a, b]], dtype=torch.float64).permute(0, 2, 1)[:, :, None, :].float()  # (1, 2, 1, 2)
    mean = [(a[i] + b[i]) / 2 for i in range(d)]
    code = [math.copysign(1 / math.sqrt(d), m) if m != 0 else -1 / math.sqrt(d) for m in mean]
    res_a, res_b = [a[i] - code[i] for i in range(d)], [b[i] - code[i] for i in range(d)]
    scale0 = _infinity_entropy_by_hand([mean], d, tau)
    scale1 = _infinity_entropy_by_hand([res_a, res_b], d, tau)
    want = (scale0 + scale1) / 2                                      # mean over scales (torch.mean(all_loss))
    got = q(x).entropy_loss.item()
    assert scale0 == 0 and abs(scale1) > 1e-3   # one token: H_sample = H_codebook; scale 1 is not saturated
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="entropy_inv_temperature"):
        MultiScaleBSQ(dim=d, scales=[(1, 1)], entropy_inv_temperature=0.0)
