"""Reconstruction evaluation of a tokenizer: PSNR/SSIM on held-out clips, bit usage per scale, and a
PNG grid of original vs reconstruction from the first k scales (k = 1..K).

PSNR and SSIM are the project's reference ones, :mod:`videoar_common.pixel_metrics` (pixels in
[0, 1], float64; SSIM with an 11x11 Gaussian window, sigma 1.5, per RGB channel and frame), so the
tokenizer's numbers are those of ``videoar eval rfvd``.

Reconstruction from k scales decodes the accumulated codes of scales 1..k
(``MultiScaleBSQ.accumulate``): it shows what the AR model's coarse-to-fine prefix looks like.

PSNR is also reported per frame (``psnr_f<t>``), for frame 0 per number of scales
(``psnr_k<k>_frame0``) and for the frames after it together (``psnr_after_frame0``): frame 0 is the
causal tokenizer's image path (a latent frame of its own, the only frame the image pre-training stage
saw), so it can be better or worse than the rest for its own reasons (docs/tokenizer.md).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from einops import rearrange

from tokenizer.model import VideoTokenizer
from videoar_common.pixel_metrics import psnr_per_clip, ssim_per_clip, to_unit_interval


@torch.no_grad()
def reconstruct_by_scales(model: VideoTokenizer, video_BCTHW: torch.Tensor
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Reconstructions from the first k scales (k = 1..K) and the bits of every scale."""
    dtype = next(model.parameters()).dtype
    b = video_BCTHW.shape[0]
    latent = model.encode(video_BCTHW.to(dtype))
    q = model.quantize(latent)
    recons = []
    for accum_NdHW in model.quantizer.accumulate(q.bits):
        latent_k = rearrange(accum_NdHW, "(b t) d h w -> b d t h w", b=b).to(dtype)
        recons.append(model.decode(latent_k).float())
    return recons, q.bits


class BitUsage:
    """Per-scale statistics of the emitted bits: how balanced each bit is and how many codes are used."""

    def __init__(self, num_scales: int, dim: int):
        self.dim = dim
        self.ones = [torch.zeros(dim, dtype=torch.float64) for _ in range(num_scales)]
        self.tokens = [0] * num_scales
        self.codes: list[set[bytes]] = [set() for _ in range(num_scales)]

    def add(self, bits: list[torch.Tensor]) -> None:
        for k, b in enumerate(bits):
            flat = b.reshape(-1, self.dim).cpu()
            self.ones[k] += flat.sum(0, dtype=torch.float64)
            self.tokens[k] += flat.shape[0]
            packed = np.packbits(flat.numpy().astype(np.uint8), axis=1)
            self.codes[k].update(row.tobytes() for row in packed)

    def metrics(self) -> dict[str, float]:
        out = {}
        entropies = []
        for k, (ones, n) in enumerate(zip(self.ones, self.tokens)):
            p = (ones / max(n, 1)).clamp(1e-12, 1 - 1e-12)
            h = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
            entropies.append(h.mean().item())
            out[f"bits/scale{k + 1}/entropy"] = entropies[-1]
            out[f"bits/scale{k + 1}/ones"] = (ones.sum() / max(n * self.dim, 1)).item()
            out[f"bits/scale{k + 1}/unique_codes"] = len(self.codes[k]) / max(n, 1)
        out["bits/entropy"] = float(np.mean(entropies))
        return out


def evaluate_tokenizer(model: VideoTokenizer, batches: Iterable, *, device: torch.device | str = "cpu",
                       out_dir: str | Path | None = None, grid_clips: int = 3, grid_frames: int = 5,
                       title: str = "") -> dict:
    """PSNR/SSIM (all scales and per k), bit usage; writes eval.json and recon_grid.png to ``out_dir``."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    usage = BitUsage(len(model.quantizer.scales), model.cfg.latent_dim)
    n, grid = 0, None
    try:
        for batch in batches:
            video = batch.video_BCTHW.to(device)
            recons, bits = reconstruct_by_scales(model, video)
            usage.add(bits)
            for k, r in enumerate(recons):
                sums[f"psnr_k{k + 1}"] += psnr_per_clip(video, r).sum().item()
                sums[f"psnr_k{k + 1}_frame0"] += psnr_per_clip(video[:, :, :1], r[:, :, :1]).sum().item()
            sums["psnr"] += psnr_per_clip(video, recons[-1]).sum().item()
            _add_per_frame(sums, video, recons[-1])
            sums["ssim"] += ssim_per_clip(video, recons[-1]).sum().item()
            n += video.shape[0]
            if grid is None:
                grid = (video[:grid_clips].float().cpu(), [r[:grid_clips].cpu() for r in recons])
    finally:
        model.train(was_training)
    metrics = {k: v / max(n, 1) for k, v in sums.items()}
    metrics.update(usage.metrics())
    metrics["clips"] = n
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        from videoar_common.atomic import atomic_write_json
        atomic_write_json(out_dir / "eval.json", metrics)
        if grid is not None:
            save_recon_grid(out_dir / "recon_grid.png", grid[0], grid[1], model.quantizer.scales,
                            frames=grid_frames, title=title)
    return metrics


def _add_per_frame(sums: dict[str, float], video_BCTHW: torch.Tensor, recon_BCTHW: torch.Tensor) -> None:
    """Summed per-clip PSNR of every frame, of frame 0 and of the frames after it."""
    for t in range(video_BCTHW.shape[2]):
        sums[f"psnr_f{t}"] += psnr_per_clip(video_BCTHW[:, :, t:t + 1], recon_BCTHW[:, :, t:t + 1]).sum().item()
    sums["psnr_frame0"] += psnr_per_clip(video_BCTHW[:, :, :1], recon_BCTHW[:, :, :1]).sum().item()
    if video_BCTHW.shape[2] > 1:
        sums["psnr_after_frame0"] += psnr_per_clip(video_BCTHW[:, :, 1:], recon_BCTHW[:, :, 1:]).sum().item()


def _frame_image(x_CHW: torch.Tensor) -> np.ndarray:
    return (to_unit_interval(x_CHW).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_recon_grid(path: str | Path, video_BCTHW: torch.Tensor, recons: list[torch.Tensor],
                    scales, *, frames: int = 5, title: str = "") -> Path:
    """Rows per clip: original, then the reconstruction from the first k scales (k = 1..K);
    columns: ``frames`` evenly spaced frames. Small frames are upscaled (nearest) to stay readable."""
    from PIL import Image, ImageDraw
    b, _, t, h, w = video_BCTHW.shape
    idx = sorted(set(np.linspace(0, t - 1, min(frames, t)).round().astype(int).tolist()))
    zoom = max(1, math.ceil(96 / max(h, w)))
    cell_h, cell_w, label_w, pad = h * zoom, w * zoom, 120, 2
    rows = [("original", video_BCTHW)] + [(f"k={k + 1} ({sh}x{sw})", r)
                                          for k, ((sh, sw), r) in enumerate(zip(scales, recons))]
    head = 18 if title else 0
    canvas = Image.new("RGB", (label_w + len(idx) * (cell_w + pad), head + b * (len(rows) * (cell_h + pad) + 6)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill=(0, 0, 0))
    y = head
    for clip in range(b):
        for label, source in rows:
            draw.text((4, y + cell_h // 2 - 6), f"clip {clip} {label}", fill=(0, 0, 0))
            for j, f in enumerate(idx):
                img = Image.fromarray(_frame_image(source[clip, :, f])).resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(img, (label_w + j * (cell_w + pad), y))
            y += cell_h + pad
        y += 6
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path
