"""Shared pieces of the AR benchmarks: the two sequence layouts, CUDA timing, attention FLOPs.

Layouts (tokens per latent frame × frames + prefix):
- ``ucf``: UCF-101 class-conditional, 17 frames at 128² → 5 latent frames of 8×8, scales 1,2,3,4,6,8
  (130 tokens per frame, 650 video tokens, 30 AR steps) plus a 16-token prompt prefix.
- ``stage3``: stage III, 384×672 at 8 fps, 33 frames → 9 latent frames of 24×42; an 8-scale pyramid of
  1,523 tokens per frame (13,707 video tokens) plus a 64-token caption prefix.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from videoar_megatron.model.layout import TokenLayout

LAYOUTS: dict[str, TokenLayout] = {
    "ucf": TokenLayout(16, ((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)), 5),
    "stage3": TokenLayout(64, ((1, 2), (2, 4), (3, 5), (4, 7), (6, 11), (9, 16), (12, 21), (24, 42)), 9),
}


def cuda_time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_ms(fn: Callable[[], object], device: torch.device, iters: int = 10) -> float:
    """Median time of ``fn`` in milliseconds: CUDA events on a GPU (:func:`cuda_time_ms`), wall clock on
    the CPU (one warm-up call)."""
    if device.type == "cuda":
        return cuda_time_ms(fn, warmup=3, iters=iters)
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def attended_pairs(mask_B1SS: torch.Tensor) -> float:
    """Mean number of (query, key) pairs per sample that the mask lets through."""
    return mask_B1SS.float().sum().item() / mask_B1SS.shape[0]


def attention_flops(pairs: float, heads: int, head_dim: int, backward: bool = True) -> float:
    """Useful attention FLOPs per sample and layer: QKᵀ and PV are 2·d each per attended pair;
    backward counted as twice the forward (the usual MFU convention; no recompute credit)."""
    forward = 4.0 * pairs * heads * head_dim
    return forward * (3.0 if backward else 1.0)


def row(label: str, value: float, baseline: float, unit: str = "ms", lower_is_better: bool = True) -> str:
    ratio = value / baseline if baseline else float("nan")
    better = "faster" if lower_is_better else "higher"
    return f"  {label:<34} {value:>10.3f} {unit:<8} vs baseline {baseline:>10.3f} {unit:<8} ratio {ratio:6.3f} " \
           f"({'<1' if lower_is_better else '>1'} = {better})"
