"""Sequence builder: Eq. 6 inputs, targets, <SOS>, previous-frame inputs, error correction wiring, and the
one-pass build with per-sample generators equal to sample-by-sample builds."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenizer.quantizer import MultiScaleBSQ
from videoar_common.config import build_dataclass
from videoar_megatron.model.config import ModelConfig
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.sequence import build_batch, concat_batches

SCALES = [(1, 1), (2, 2), (3, 3), (4, 4)]
D = 8


def setup(frames=3, batch=2, seed=0):
    q = MultiScaleBSQ(dim=D, scales=SCALES)
    latent = torch.randn(batch, D, frames, 4, 4, generator=torch.Generator().manual_seed(seed))
    cfg = ModelConfig(size="tiny", latent_dim=D)
    return q, latent, cfg


def expected_inputs(q, accum_per_frame):
    """Loops over frames and scales, straight from Eq. 6 and the <SOS>/previous-frame rule."""
    rows = []
    for t, accum in enumerate(accum_per_frame):
        for k, (h, w) in enumerate(SCALES):
            if k > 0:
                x = q.scale_input(accum[k - 1], k)
            elif t == 0:
                x = torch.zeros(accum[0].shape[0], D, h, w)            # <SOS> placeholder
            else:
                x = q.scale_input(accum_per_frame[t - 1][-1], 0)
            rows.append(x.flatten(2).transpose(1, 2))
    return torch.cat(rows, dim=1)


def test_clean_inputs_and_targets_follow_eq6():
    q, latent, cfg = setup()
    batch = build_batch(q, cfg, latent_BdTHW=latent, cond=torch.tensor([1, 2]), training=False)
    bits = [q.latent_to_bits(latent[:, :, t]) for t in range(3)]
    accum = [q.accumulate(b) for b in bits]
    torch.testing.assert_close(batch.inputs_BNd, expected_inputs(q, accum))
    want_targets = torch.cat([q.flatten_bits(b) for b in bits], dim=1)
    assert torch.equal(batch.targets_BNd, want_targets)
    assert batch.layout == TokenLayout(1, tuple(SCALES), 3)
    assert batch.flip_p_BTK is None and not batch.cond_drop_B.any()
    assert batch.frame_visible_BTT.shape == (2, 3, 3)


def test_stored_bits_give_the_same_batch_as_the_latent():
    q, latent, cfg = setup()
    bits_BTLd = torch.stack([q.flatten_bits(q.latent_to_bits(latent[:, :, t])) for t in range(3)], dim=1)
    a = build_batch(q, cfg, latent_BdTHW=latent, cond=torch.tensor([1, 2]), training=False)
    b = build_batch(q, cfg, bits_BTLd=bits_BTLd, cond=torch.tensor([1, 2]), training=False)
    torch.testing.assert_close(a.inputs_BNd, b.inputs_BNd)
    assert torch.equal(a.targets_BNd, b.targets_BNd)


def test_images_are_one_frame_videos():
    q, latent, cfg = setup(frames=1)
    batch = build_batch(q, cfg, latent_BdTHW=latent, cond=torch.tensor([0, 0]), training=True,
                        generator=torch.Generator().manual_seed(0))
    assert batch.layout.frames == 1 and batch.inputs_BNd.shape == (2, 30, D)
    assert not batch.inputs_BNd[:, 0].any()                              # <SOS>


def test_error_correction_feeds_the_corrupted_accumulation_forward():
    q, latent, cfg = setup(frames=3, batch=4, seed=1)
    gen = torch.Generator().manual_seed(0)
    batch = build_batch(q, cfg, latent_BdTHW=latent, cond=torch.arange(4), training=True, generator=gen)
    assert batch.flip_p_BTK.shape == (4, 3, 4) and batch.flip_p_BTK.max() > 0
    # Replay the draws: the same generator sequence reproduces the batch bit for bit.
    again = build_batch(q, cfg, latent_BdTHW=latent, cond=torch.arange(4), training=True,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch.targets_BNd, again.targets_BNd) and torch.equal(batch.inputs_BNd, again.inputs_BNd)
    clean = torch.cat([q.flatten_bits(q.latent_to_bits(latent[:, :, t])) for t in range(3)], dim=1)
    assert not torch.equal(batch.targets_BNd, clean)                     # targets were re-quantized
    L = q.tokens_per_frame
    assert torch.equal(batch.targets_BNd[:, 0], clean[:, 0])              # frame 0 scale 0: nothing before it
    # Frame 1's first-scale input is the *corrupted* final accumulation of frame 0.
    clean_prev = q.scale_input(q.accumulate(q.latent_to_bits(latent[:, :, 0]))[-1], 0).flatten(2).transpose(1, 2)
    assert not torch.allclose(batch.inputs_BNd[:, L:L + 1], clean_prev)


def brute_force_corrupted_sequence(latent_BdTHW: torch.Tensor, flip) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BNd, targets_BNd) by hand, one sample, frame and scale at a time, from the definitions:
    scale k's target is the sign of the residual (latent minus the accumulation of the bits *fed* at
    scales < k) area-downsampled to scale k; ``flip(target)`` is fed and its codes ±1/sqrt(d) are
    bilinearly upsampled into the accumulation; Eq. 6 inputs are the accumulation resized to scale k,
    and scale 0 of frame t > 0 sees the previous frame's final (corrupted) accumulation."""
    B, d, T, H, W = latent_BdTHW.shape
    inputs, targets = [], []
    for b in range(B):
        prev_final = None
        rows_in, rows_target = [], []
        for t in range(T):
            x = latent_BdTHW[b:b + 1, :, t].float()
            accum = torch.zeros_like(x)
            for k, (h, w) in enumerate(SCALES):
                seen = accum if k > 0 else prev_final            # None: frame 0's <SOS> (zeros)
                seen_dhw = (torch.zeros(d, h, w) if seen is None else
                            F.interpolate(seen, (h, w), mode="bilinear", align_corners=False)[0])
                rows_in.append(seen_dhw.flatten(1).T)
                z = F.normalize(F.interpolate(x - accum, (h, w), mode="area"), dim=1)
                target_dhw = z[0] > 0
                rows_target.append(target_dhw.flatten(1).T)
                codes = flip(target_dhw).float() * (2 / d ** 0.5) - 1 / d ** 0.5
                accum = accum + F.interpolate(codes[None], (H, W), mode="bilinear", align_corners=False)
            prev_final = accum
        inputs.append(torch.cat(rows_in))
        targets.append(torch.cat(rows_target))
    return torch.stack(inputs), torch.stack(targets)


def test_error_correction_with_every_bit_flipped_equals_a_brute_force_build():
    """Flip ratio 1 (p_min = p_max = 1, no ramp) flips every bit, so the corrupted sequence is fixed and
    can be rebuilt by hand without the correction module or its random draws."""
    q, latent, _ = setup(frames=3, batch=2, seed=4)
    cfg = build_dataclass(ModelConfig, {"latent_dim": D, "correction": {"p_min": 1.0, "p_max": 1.0, "delta": 0.0}})
    batch = build_batch(q, cfg, latent_BdTHW=latent, cond=torch.tensor([1, 2]), training=True,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch.flip_p_BTK, torch.ones(2, 3, len(SCALES), dtype=torch.float64))
    inputs, targets = brute_force_corrupted_sequence(latent, flip=lambda bits: ~bits)
    assert torch.equal(batch.targets_BNd, targets)
    torch.testing.assert_close(batch.inputs_BNd, inputs, rtol=1e-5, atol=1e-6)
    # the clean build is not it (the check can tell corrupted from clean)
    clean_inputs, clean_targets = brute_force_corrupted_sequence(latent, flip=lambda bits: bits)
    clean = build_batch(q, cfg, latent_BdTHW=latent, cond=torch.tensor([1, 2]), training=False)
    assert torch.equal(clean.targets_BNd, clean_targets) and not torch.equal(clean_targets, targets)
    torch.testing.assert_close(clean.inputs_BNd, clean_inputs, rtol=1e-5, atol=1e-6)


def test_correction_needs_the_latent_and_eval_is_clean():
    q, latent, cfg = setup()
    bits = torch.stack([q.flatten_bits(q.latent_to_bits(latent[:, :, t])) for t in range(3)], dim=1)
    with pytest.raises(ValueError, match="continuous latent"):
        build_batch(q, cfg, bits_BTLd=bits, cond=torch.tensor([1, 2]), training=True)
    off = build_dataclass(ModelConfig, {"latent_dim": D, "correction": {"p_max": 0.0}})
    assert build_batch(q, off, bits_BTLd=bits, cond=torch.tensor([1, 2]), training=True).flip_p_BTK is None


def test_condition_dropout_and_padding():
    q, latent, cfg = setup(batch=2)
    cfg = build_dataclass(ModelConfig, {"latent_dim": D, "condition": {"dropout": 0.5}, "pad_to_multiple": 8})
    drops = []
    for seed in range(200):
        b = build_batch(q, cfg, latent_BdTHW=latent, cond=torch.tensor([3, 4]), training=True,
                        generator=torch.Generator().manual_seed(seed))
        drops.append(b.cond_drop_B)
    rate = torch.stack(drops).float().mean().item()
    assert abs(rate - 0.5) < 0.1
    assert b.layout.seq_len % 8 == 0 and b.layout.pad == (-(1 + 90)) % 8


def test_bad_inputs_name_the_knob():
    q, latent, _ = setup()
    with pytest.raises(ValueError, match="latent_dim"):
        build_batch(q, ModelConfig(size="tiny", latent_dim=4), latent_BdTHW=latent, cond=torch.tensor([1, 2]),
                    training=False)
    with pytest.raises(ValueError, match="num_classes"):
        build_batch(q, ModelConfig(size="tiny", latent_dim=D), latent_BdTHW=latent, cond=torch.tensor([1, 500]),
                    training=False)


@pytest.mark.parametrize("condition", [{"kind": "class", "dropout": 0.5},
                                       {"kind": "text_features", "text_len": 5, "feature_dim": 6, "dropout": 0.5}])
def test_per_sample_generators_build_the_batch_of_one_sample_builds(condition):
    """The trainer's one-pass micro-batch: every random part (flip ratios, flips and requantized targets,
    Random Frame Mask, condition dropout) equals building each sample alone from its generator."""
    B = 5
    q, latent, _ = setup(frames=4, batch=B, seed=3)
    cfg = build_dataclass(ModelConfig, {"latent_dim": D, "condition": condition, "pad_to_multiple": 8,
                                        "mask": {"rfm_window": 3, "rfm_p_mask": 0.5},
                                        "correction": {"p_min": 0.1, "p_max": 0.4, "delta": 0.05}})
    if condition["kind"] == "class":
        cond, text_len = torch.arange(B), None
    else:
        cond, text_len = torch.randn(B, 5, 6), torch.tensor([5, 1, 3, 2, 4])

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(B)]

    one_pass = build_batch(q, cfg, latent_BdTHW=latent, cond=cond, text_len_B=text_len, training=True,
                           generator=gens())
    alone = concat_batches([build_batch(q, cfg, latent_BdTHW=latent[i:i + 1], cond=cond[i:i + 1],
                                        text_len_B=None if text_len is None else text_len[i:i + 1],
                                        training=True, generator=g) for i, g in enumerate(gens())])
    assert one_pass.layout == alone.layout
    for name in ("inputs_BNd", "targets_BNd", "frame_visible_BTT", "cond_drop_B", "flip_p_BTK", "text_len_B"):
        assert torch.equal(getattr(one_pass, name), getattr(alone, name)), name
    # the draws really are random and per sample (an equality of constants would prove nothing)
    assert one_pass.cond_drop_B.any() and not one_pass.cond_drop_B.all()
    assert not one_pass.frame_visible_BTT.all()
    assert len(set(one_pass.flip_p_BTK[:, 0, 0].tolist())) == B
    with pytest.raises(ValueError, match="4 per-sample generators for a batch of 5 samples"):
        build_batch(q, cfg, latent_BdTHW=latent, cond=cond, text_len_B=text_len, training=True, generator=gens()[:4])
