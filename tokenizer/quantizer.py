"""Temporal-independent multi-scale Binary Spherical Quantization (BSQ), shared by tokenizer and AR stack.

Method (VideoAR §4.1, Infinity's multi-scale BSQ): every latent frame is quantized on its own (frames are
folded into the batch), over a scale schedule ``[(h_1, w_1), ..., (h_K, w_K)]`` whose last entry is the
latent grid ``(H, W)``. At scale k the residual (latent minus what earlier scales reconstructed) is
area-downsampled to ``(h_k, w_k)``, normalised onto the unit sphere along the channel axis and binarised:
``code = sign(z) / sqrt(d)`` (d bits per token, straight-through gradients). The code is bilinearly
upsampled back to ``(H, W)`` and subtracted from the residual. The quantized latent is the sum of the
upsampled codes.

Auxiliary losses (Infinity's BSQ convention; formulas and sources in docs/tokenizer.md#quantizer-losses):
commitment = mean over scales of ``mse(z, code)``; entropy = mean over scales of
``(H_sample - gamma * H_codebook) / inv_temperature``, with bit probabilities
``sigmoid(4 * inv_temperature * z / sqrt(d))``. Dividing by the inverse temperature is Infinity's
(``aux_loss`` in its BSQ), so ``loss.entropy_weight`` means what Infinity's ``entropy_weight`` means.

What the AR stack uses (one implementation, no copies):
- :meth:`latent_to_bits` — clean bits per scale (the training targets).
- :meth:`bits_to_codes`, :meth:`upsample`, :meth:`accumulate` — codes and accumulated features
  ``F_k`` after each scale (Eq. 2 / 6 inputs come from these through :meth:`scale_input`).
- :meth:`requantize` — bitwise self-correction: bits fed to the model are corrupted by a flip function,
  the accumulation uses the corrupted codes, and every later scale's target bits are re-quantized against
  that corrupted accumulation (Infinity's ``noise_apply_requant``).

Tensor names carry their shapes: N = frames folded with batch, d = bits per token, H×W = latent grid,
h×w = one scale's grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Scale = tuple[int, int]
# Residuals go down with area averaging; codes come up bilinearly (Infinity: area / (tri)linear).
DOWN_MODE = "area"
UP_MODE = "bilinear"

FlipFn = Callable[[int, torch.Tensor], torch.Tensor]
"""(scale index k, clean bits_Nhwd) → bits actually fed to the model at scale k."""


def check_schedule(scales: Sequence[Sequence[int]]) -> tuple[Scale, ...]:
    """Validate a scale schedule: non-empty, positive, non-decreasing in both axes."""
    sched = tuple((int(h), int(w)) for h, w in scales)
    if not sched:
        raise ValueError("scale schedule is empty")
    for (h0, w0), (h1, w1) in zip(sched, sched[1:]):
        if h1 < h0 or w1 < w0:
            raise ValueError(f"scale schedule must grow monotonically, got {list(sched)}")
    if min(min(s) for s in sched) < 1:
        raise ValueError(f"scale sizes must be >= 1, got {list(sched)}")
    return sched


def resize(x_NdHW: torch.Tensor, size: Scale, mode: str) -> torch.Tensor:
    if tuple(x_NdHW.shape[-2:]) == tuple(size):
        return x_NdHW
    if mode == "area":
        return F.interpolate(x_NdHW, size=size, mode="area")
    return F.interpolate(x_NdHW, size=size, mode=mode, align_corners=False)


@dataclass
class QuantizerOutput:
    quantized_NdHW: torch.Tensor
    """Sum of the upsampled codes of all scales (straight-through to the latent)."""
    bits: list[torch.Tensor]
    """Per scale k: bool ``(N, h_k, w_k, d)``."""
    commitment_loss: torch.Tensor
    entropy_loss: torch.Tensor
    """Mean over scales of (per-sample entropy - gamma x codebook entropy) / inv_temperature (BSQ's
    factorised, analytical form, scaled as in Infinity)."""


@dataclass
class RequantizedOutput:
    target_bits: list[torch.Tensor]
    """Per scale: bits of the residual against the (possibly corrupted) accumulation — the labels."""
    input_bits: list[torch.Tensor]
    """Per scale: bits actually accumulated (targets after the flip function)."""
    accum_NdHW: list[torch.Tensor]
    """Per scale k: accumulated features after scales 1..k (at the latent grid), from ``input_bits``."""


class MultiScaleBSQ(nn.Module):
    """Parameter-free multi-scale BSQ over one frame's latent ``(N, d, H, W)``."""

    def __init__(self, *, dim: int, scales: Sequence[Sequence[int]], entropy_inv_temperature: float = 100.0,
                 entropy_gamma: float = 1.0):
        super().__init__()
        if dim < 1:
            raise ValueError(f"latent dim must be >= 1, got {dim}")
        if entropy_inv_temperature <= 0:
            raise ValueError(f"entropy_inv_temperature must be > 0, got {entropy_inv_temperature}")
        self.dim = dim
        self.scales = check_schedule(scales)
        self.inv_temperature = entropy_inv_temperature
        self.entropy_gamma = entropy_gamma
        self.code_scale = 1.0 / math.sqrt(dim)

    @property
    def latent_hw(self) -> Scale:
        return self.scales[-1]

    @property
    def tokens_per_frame(self) -> int:
        return sum(h * w for h, w in self.scales)

    def _check_latent(self, latent_NdHW: torch.Tensor) -> None:
        if latent_NdHW.dim() != 4 or latent_NdHW.shape[1] != self.dim:
            raise ValueError(f"expected a latent (N, {self.dim}, H, W), got {tuple(latent_NdHW.shape)}")
        if tuple(latent_NdHW.shape[-2:]) != self.latent_hw:
            raise ValueError(f"latent grid {tuple(latent_NdHW.shape[-2:])} does not match the last scale "
                             f"{self.latent_hw} of the schedule {list(self.scales)}")

    # --- primitives ---------------------------------------------------------------------------
    def bits_to_codes(self, bits_Nhwd: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Bits ``(N, h, w, d)`` → codes ``(N, d, h, w)`` on the sphere: ±1/sqrt(d)."""
        codes = bits_Nhwd.to(dtype) * (2 * self.code_scale) - self.code_scale
        return codes.permute(0, 3, 1, 2)

    def upsample(self, codes_Ndhw: torch.Tensor) -> torch.Tensor:
        return resize(codes_Ndhw, self.latent_hw, UP_MODE)

    def scale_input(self, accum_NdHW: torch.Tensor, k: int) -> torch.Tensor:
        """Eq. 6: accumulated features downsampled to scale k's grid ``(N, d, h_k, w_k)``."""
        return resize(accum_NdHW, self.scales[k], UP_MODE)

    def _sphere(self, residual_NdHW: torch.Tensor, k: int) -> torch.Tensor:
        """Scale-k residual, downsampled and normalised onto the unit sphere along d."""
        z = resize(residual_NdHW.float(), self.scales[k], DOWN_MODE)
        return F.normalize(z, dim=1)

    def _binarize(self, z_Ndhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bits_Nhwd = (z_Ndhw > 0).permute(0, 2, 3, 1)
        hard = self.bits_to_codes(bits_Nhwd, z_Ndhw.dtype)
        return z_Ndhw + (hard - z_Ndhw).detach(), bits_Nhwd  # straight-through estimator

    # --- tokenizer training -------------------------------------------------------------------
    def forward(self, latent_NdHW: torch.Tensor) -> QuantizerOutput:
        self._check_latent(latent_NdHW)
        latent = latent_NdHW.float()
        residual = latent
        quantized = torch.zeros_like(latent)
        bits, commit, entropy = [], latent.new_zeros(()), latent.new_zeros(())
        for k in range(len(self.scales)):
            z = self._sphere(residual, k)
            code, b = self._binarize(z)
            commit = commit + F.mse_loss(z, code.detach())
            entropy = entropy + self._entropy_penalty(z)
            up = self.upsample(code)
            residual = residual - up.detach()
            quantized = quantized + up
            bits.append(b)
        k = len(self.scales)
        return QuantizerOutput(quantized_NdHW=quantized.to(latent_NdHW.dtype), bits=bits,
                               commitment_loss=commit / k, entropy_loss=entropy / k)

    def _entropy_penalty(self, z_Ndhw: torch.Tensor) -> torch.Tensor:
        """Per-sample bit entropy (want confident) minus codebook bit entropy (want uniform usage),
        divided by the inverse temperature as Infinity's BSQ does: the gradient of the soft bits grows
        with the inverse temperature, so the division keeps the term's gradient independent of it."""
        p1 = torch.sigmoid(4 * self.inv_temperature * self.code_scale * z_Ndhw)
        probs = torch.stack([p1, 1 - p1], dim=-1)
        per_sample = -(probs * torch.log(probs + 1e-8)).sum(-1).sum(1).mean()
        avg = probs.mean(dim=(0, 2, 3))
        codebook = -(avg * torch.log(avg + 1e-8)).sum(-1).sum()
        return (per_sample - self.entropy_gamma * codebook) / self.inv_temperature

    # --- AR stack -----------------------------------------------------------------------------
    @torch.no_grad()
    def latent_to_bits(self, latent_NdHW: torch.Tensor) -> list[torch.Tensor]:
        """Clean bits per scale: bool ``(N, h_k, w_k, d)``."""
        return self.requantize(latent_NdHW).target_bits

    def accumulate(self, bits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Accumulated features ``(N, d, H, W)`` after each of the given scales."""
        accum, out = None, []
        for b in bits:
            up = self.upsample(self.bits_to_codes(b))
            accum = up if accum is None else accum + up
            out.append(accum)
        return out

    def decode_bits(self, bits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Quantized latent ``(N, d, H, W)`` from the bits of all scales."""
        if len(bits) != len(self.scales):
            raise ValueError(f"need bits for all {len(self.scales)} scales, got {len(bits)}")
        return self.accumulate(bits)[-1]

    @torch.no_grad()
    def requantize(self, latent_NdHW: torch.Tensor, flip: FlipFn | None = None,
                   start_accum_NdHW: torch.Tensor | None = None) -> RequantizedOutput:
        """Residual quantization where scale k's bits pass through ``flip`` before accumulating.

        With ``flip=None`` this is plain quantization (targets == inputs). With a flip function the
        accumulation drifts from the clean one and each later target is the bits of the residual
        against the corrupted accumulation, so the model learns to correct earlier errors.
        """
        self._check_latent(latent_NdHW)
        latent = latent_NdHW.float()
        accum = torch.zeros_like(latent) if start_accum_NdHW is None else start_accum_NdHW.float()
        targets, inputs, accums = [], [], []
        for k in range(len(self.scales)):
            z = self._sphere(latent - accum, k)
            bits_Nhwd = (z > 0).permute(0, 2, 3, 1)
            fed = bits_Nhwd if flip is None else flip(k, bits_Nhwd)
            accum = accum + self.upsample(self.bits_to_codes(fed))
            targets.append(bits_Nhwd)
            inputs.append(fed)
            accums.append(accum)
        return RequantizedOutput(target_bits=targets, input_bits=inputs, accum_NdHW=accums)

    # --- flat token layout --------------------------------------------------------------------
    def flatten_bits(self, bits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale bits → ``(N, L, d)`` with L = sum of h_k·w_k, scales in order, row-major."""
        return torch.cat([b.reshape(b.shape[0], -1, self.dim) for b in bits], dim=1)

    def unflatten_bits(self, bits_NLd: torch.Tensor) -> list[torch.Tensor]:
        if bits_NLd.shape[1] != self.tokens_per_frame:
            raise ValueError(f"expected {self.tokens_per_frame} tokens per frame, got {bits_NLd.shape[1]}")
        out, start = [], 0
        for h, w in self.scales:
            out.append(bits_NLd[:, start:start + h * w].reshape(-1, h, w, self.dim))
            start += h * w
        return out
