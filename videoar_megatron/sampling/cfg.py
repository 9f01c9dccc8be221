"""Temporal-spatial classifier-free guidance (paper §4.2): γ per (latent frame, scale), applied to logits.

``guided = γ·cond + (1 − γ)·uncond`` (Infinity's convention, CFG on logits). Written this way, not as
``uncond + γ·(cond − uncond)``, because γ = 1 then gives exactly the conditional logits (``1·c + 0·u``
is ``c`` in floating point for finite ``u``), which the sampler relies on.

Schedules (T latent frames of a window, K scales; frames and scales 0-based):

- ``constant``: γ(t, k) = gamma.
- ``ucf101``: γ(t, 0) = a + (b − a)·t/(T − 1) with (a, b) = first_scale (paper: 1 → 5 across frames),
  then γ(t, k) = γ(t, 0) + (last_scale − γ(t, 0))·k/(K − 1) (paper: "linear increase within each frame
  up to γ = 10").
- ``t2v``: γ(t, k) = a + (b − a)·s/(T·K − 1), s = t·K + k the decoding order (paper: "reduce the CFG
  from γ = 5 → 3 along each temporal-spatial dimension together"; one ramp over both is our reading).
- ``table``: given per (t, k); rows beyond the table repeat its last row.

A frame/scale count of 1 makes the corresponding ramp fraction 0 (the start value).
"""
from __future__ import annotations

import torch

from videoar_megatron.sampling.config import GuidanceConfig


def _frac(i: int, n: int) -> float:
    return i / (n - 1) if n > 1 else 0.0


def guidance_table(cfg: GuidanceConfig, frames: int, scales: int) -> torch.Tensor:
    """γ for every (latent frame, scale) of a window: ``(T, K)`` float64."""
    T, K = frames, scales
    out = torch.empty(T, K, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            out[t, k] = _gamma(cfg, t, k, T, K)
    return out


def _gamma(cfg: GuidanceConfig, t: int, k: int, T: int, K: int) -> float:
    if cfg.schedule == "constant":
        return cfg.gamma
    if cfg.schedule == "ucf101":
        a, b = cfg.first_scale
        first = a + (b - a) * _frac(t, T)
        return first + (cfg.last_scale - first) * _frac(k, K)
    if cfg.schedule == "t2v":
        a, b = cfg.ramp
        return a + (b - a) * _frac(t * K + k, T * K)
    row = cfg.table[min(t, len(cfg.table) - 1)]
    if len(row) != K:
        raise ValueError(f"guidance.table rows have {len(row)} values but the scale schedule has {K} scales")
    return float(row[k])


def uses_unconditional(table_TK: torch.Tensor) -> bool:
    """Whether any step needs the unconditional branch (γ ≠ 1)."""
    return bool((table_TK != 1.0).any())


def combine(cond: torch.Tensor, uncond: torch.Tensor, gamma) -> torch.Tensor:
    """``γ·cond + (1 − γ)·uncond`` in float32 (γ a float or a 0-d tensor)."""
    cond, uncond = cond.float(), uncond.float()
    return gamma * cond + (1.0 - gamma) * uncond
