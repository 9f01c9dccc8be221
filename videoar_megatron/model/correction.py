"""Cross-Frame Error Correction (VideoAR Eq. 8): time-ramped bit flips with error inheritance.

Interpretation of what the paper leaves open (0-based latent frame index t, scales k = 0..K-1):

- Every (sample, frame, scale) draws its own flip ratio p ~ U(p_min + δt, p_max + δt); the paper speaks
  of "the final scale's flip ratio" and of initialising "the first scale", i.e. per-scale ratios, and the
  final scale is corrupted too (InfinityStar skips it; VideoAR needs it for the inheritance).
- Error inheritance: the first scale of frame t > 0 draws p ~ U(p_final(t-1), p_max + δt), where
  p_final(t-1) is the *ratio drawn* for the last scale of frame t-1 (not the realised fraction).
  Since p_final(t-1) <= p_max + δ(t-1), the range is never empty for δ >= 0. Ratios are clamped to [0, 1].
- Bits flip i.i.d. Bernoulli(p) (XOR). The flipped bits' codes enter the accumulation
  (``MultiScaleBSQ.requantize`` with a flip callback), and every later scale's target is the bits of
  the residual against that corrupted accumulation (Infinity's bitwise self-correction with
  re-quantization). Frames are quantized independently (temporal-independent BSQ), so one requantize
  call covers all frames of all samples (folded into N = B·T).
- The corrupted final accumulation of frame t is what feeds frame t+1's first-scale input (the
  sequence builder takes it from the returned accumulations).
- Ratios and flips come from an explicit ``torch.Generator``, so a resumed run can replay them.
  Training only; ``p_max = 0`` disables the correction.
"""
from __future__ import annotations

import torch

from tokenizer.quantizer import MultiScaleBSQ, RequantizedOutput
from videoar_megatron.model.config import CorrectionConfig
from videoar_megatron.model.rng import Generators, draw_device, rand_rows


def _uniform(low: torch.Tensor, high: torch.Tensor, generator: Generators) -> torch.Tensor:
    u = rand_rows(low.shape, generator, dtype=torch.float64, device=low.device)
    return low + (high - low) * u


def draw_flip_ratios(batch: int, frames: int, scales: int, cfg: CorrectionConfig,
                     generator: Generators = None) -> torch.Tensor:
    """Flip ratios ``p_BTK`` (float64, on the generator's device) following Eq. 8."""
    device = draw_device(generator, "cpu")
    p_BTK = torch.zeros(batch, frames, scales, dtype=torch.float64, device=device)
    if not cfg.enabled:
        return p_BTK
    for t in range(frames):
        low = torch.full((batch, scales), cfg.p_min + cfg.delta * t, dtype=torch.float64, device=device)
        high = torch.full_like(low, cfg.p_max + cfg.delta * t)
        if t > 0 and cfg.inherit:
            low[:, 0] = p_BTK[:, t - 1, -1]
        p_BTK[:, t] = _uniform(low, high, generator).clamp(0.0, 1.0)
    return p_BTK


def flip_bits(bits_Nhwd: torch.Tensor, p_N: torch.Tensor, generator: Generators) -> torch.Tensor:
    """XOR each bit with an i.i.d. Bernoulli(p_N[n]) draw."""
    u = rand_rows(bits_Nhwd.shape, generator, device=bits_Nhwd.device).to(bits_Nhwd.device)
    flips = u < p_N.to(bits_Nhwd.device, torch.float32).view(-1, 1, 1, 1)
    return bits_Nhwd ^ flips


def corrupt_and_requantize(quantizer: MultiScaleBSQ, latent_NdHW: torch.Tensor, p_NK: torch.Tensor,
                           generator: Generators = None) -> RequantizedOutput:
    """Requantize every frame with scale k's bits flipped at ratio ``p_NK[:, k]``.

    Returns the quantizer's output: ``target_bits`` (labels, re-quantized against the corrupted
    accumulation), ``input_bits`` (what the model is fed) and ``accum_NdHW`` (corrupted accumulations).
    """
    def flip(k: int, bits_Nhwd: torch.Tensor) -> torch.Tensor:
        return flip_bits(bits_Nhwd, p_NK[:, k], generator)
    return quantizer.requantize(latent_NdHW, flip)
