"""Tokenizer reconstruction metrics on held-out clips: rFVD, PSNR and SSIM.

Design decisions:
- **PSNR and SSIM** are :mod:`videoar_common.pixel_metrics` (pixels in [0, 1] in float64, PSNR per clip
  with a floored MSE, SSIM per RGB channel and frame; its docstring says how and why), the same
  definition the tokenizer's own evaluation uses.
- **rFVD** uses the FVD machinery unchanged: the same extractor and float64 statistics over the real
  clips and over their reconstructions, merged across ranks by all-reduce.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.distributed as dist

from videoar_common.distributed import DistContext
from videoar_common.pixel_metrics import psnr_per_clip, ssim_per_clip
from videoar_megatron.evaluation.fvd import FeatureStats, fvd_from_stats
from videoar_megatron.evaluation.i3d import FeatureExtractor
from videoar_megatron.evaluation.protocols import RealClipSource, draw_clips, shard_bounds

ReconstructFn = Callable[[torch.Tensor], torch.Tensor]
"""float video ``(B, 3, T, H, W)`` in [-1, 1] → reconstruction of the same shape (about [-1, 1])."""

@dataclass(kw_only=True)
class ReconConfig:
    """Held-out reconstruction evaluation of the tokenizer."""

    num_clips: int = 0
    """Held-out clips to evaluate; 0 = all of them, else a seeded random subset."""
    seed: int = 0
    """Seed of the subset when num_clips > 0."""
    batch_size: int = 8
    """Clips per tokenizer call on each rank."""
    fd_method: Literal["sqrtm", "eigh"] = "sqrtm"
    """Matrix square root of the Fréchet distance."""

    def __post_init__(self) -> None:
        if self.num_clips < 0 or self.num_clips == 1:
            raise ValueError(f"recon.num_clips must be 0 (all) or >= 2, got {self.num_clips}")
        if self.batch_size < 1:
            raise ValueError(f"recon.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ReconResult:
    rfvd: float
    psnr: float
    ssim: float
    num_clips: int
    extractor: dict
    source: dict
    config: dict
    seconds: float
    world_size: int

    def to_dict(self) -> dict:
        return asdict(self)


class _Sums:
    """PSNR and SSIM sums plus the two feature statistics of one rank."""

    def __init__(self, dim: int):
        self.psnr = self.ssim = 0.0
        self.count = 0
        self.real, self.recon = FeatureStats(dim), FeatureStats(dim)

    def all_reduce(self, ctx: DistContext) -> None:
        self.real.all_reduce(ctx)
        self.recon.all_reduce(ctx)
        if ctx.world_size > 1 and dist.is_initialized():
            device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
            t = torch.tensor([self.psnr, self.ssim, float(self.count)], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            self.psnr, self.ssim, self.count = t[0].item(), t[1].item(), int(round(t[2].item()))


def _to_model_input(videos: torch.Tensor, device: torch.device) -> torch.Tensor:
    videos = videos.to(device)
    return videos.float() / 127.5 - 1.0 if videos.dtype == torch.uint8 else videos.float()


@torch.no_grad()
def _eval_batch(videos: torch.Tensor, reconstruct: ReconstructFn, extractor: FeatureExtractor,
                sums: _Sums) -> None:
    recon = reconstruct(_to_model_input(videos, extractor.device))
    if recon.shape != videos.shape:
        raise ValueError(f"the tokenizer returned {tuple(recon.shape)} for clips {tuple(videos.shape)}")
    if not torch.isfinite(recon).all():
        raise FloatingPointError("the tokenizer's reconstruction has non-finite values")
    real = videos.to(extractor.device)
    sums.psnr += psnr_per_clip(real, recon).sum().item()
    sums.ssim += ssim_per_clip(real, recon).sum().item()
    sums.count += videos.shape[0]
    sums.real.update(extractor(real))
    sums.recon.update(extractor(recon))


def heldout_indices(cfg: ReconConfig, num_available: int) -> np.ndarray:
    if cfg.num_clips == 0:
        return np.arange(num_available)
    return np.sort(draw_clips(num_available, cfg.num_clips, cfg.seed, stream=3))


def evaluate_reconstruction(cfg: ReconConfig, *, reconstruct: ReconstructFn, source: RealClipSource,
                            extractor: FeatureExtractor, ctx: DistContext, progress: bool = False) -> ReconResult:
    """rFVD, PSNR and SSIM of ``reconstruct`` on the held-out clips of ``source`` (all ranks return it)."""
    from tqdm import tqdm
    t0 = time.time()
    ids = heldout_indices(cfg, source.num_clips())
    lo, hi = shard_bounds(len(ids), ctx.rank, ctx.world_size)
    sums = _Sums(extractor.dim)
    with tqdm(total=hi - lo, desc="reconstruct", unit="clip", disable=not (progress and ctx.is_main)) as bar:
        for i in range(lo, hi, cfg.batch_size):
            chunk = ids[i:min(i + cfg.batch_size, hi)]
            _eval_batch(source.load(chunk), reconstruct, extractor, sums)
            bar.update(len(chunk))
    sums.all_reduce(ctx)
    if sums.count != len(ids):
        raise RuntimeError(f"evaluated {sums.count} held-out clips over all ranks, expected {len(ids)}")
    rfvd = fvd_from_stats(sums.recon, sums.real, cfg.fd_method) if sums.count >= 2 else math.nan
    return ReconResult(rfvd=rfvd, psnr=sums.psnr / sums.count, ssim=sums.ssim / sums.count,
                       num_clips=sums.count, extractor=extractor.identity(), source=source.identity(),
                       config=asdict(cfg), seconds=time.time() - t0, world_size=ctx.world_size)


def tokenizer_reconstruct(tokenizer) -> ReconstructFn:
    """Reconstruction through the quantizer, for a tokenizer with ``encode(video) -> latent_BdTHW``
    (continuous), ``quantizer`` (multi-scale BSQ over frames folded into the batch, returning
    ``quantized_NdHW``) and ``decode(latent_BdTHW) -> video``: what rFVD must measure is the video
    rebuilt from the tokens, not from the continuous latent."""

    @torch.no_grad()
    def reconstruct(video_BCTHW: torch.Tensor) -> torch.Tensor:
        latent_BdTHW = tokenizer.encode(video_BCTHW)
        b, d, t, h, w = latent_BdTHW.shape
        q = tokenizer.quantizer(latent_BdTHW.transpose(1, 2).reshape(b * t, d, h, w))
        quantized_BdTHW = q.quantized_NdHW.reshape(b, t, d, h, w).transpose(1, 2)
        return tokenizer.decode(quantized_BdTHW)

    return reconstruct
