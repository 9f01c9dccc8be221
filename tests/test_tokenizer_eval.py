"""Tokenizer evaluation: PSNR/SSIM values, bit usage per scale, eval.json and the reconstruction grid."""
from __future__ import annotations

import json
import math

import pytest
import torch

from data_prep.clip_dataset import ClipBatch
from tokenizer.config import TokenizerModelConfig
from tokenizer.evaluate import BitUsage, evaluate_tokenizer, psnr_per_clip, ssim_per_clip
from tokenizer.model import VideoTokenizer


def test_psnr_and_ssim_values():
    video = torch.zeros(2, 3, 3, 16, 16)
    recon = video.clone()
    recon[1] += 0.2  # 0.1 in [0, 1] units → MSE 0.01 → 20 dB
    psnr = psnr_per_clip(recon, video)
    assert psnr[0].item() == pytest.approx(100.0) and psnr[1].item() == pytest.approx(20.0, abs=1e-4)
    x = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    assert ssim_per_clip(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim_per_clip((x + 0.5 * torch.randn_like(x)).clamp(-1, 1), x).item() < 0.9
    assert ssim_per_clip(-x, x).item() < 0


def test_bit_usage_per_scale():
    usage = BitUsage(num_scales=2, dim=4)
    balanced = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool).view(2, 1, 1, 4)
    constant = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    usage.add([balanced, constant])
    m = usage.metrics()
    assert m["bits/scale1/entropy"] == pytest.approx(1.0) and m["bits/scale1/unique_codes"] == 1.0
    assert m["bits/scale2/entropy"] == pytest.approx(0.0, abs=1e-6) and m["bits/scale2/unique_codes"] == 0.5
    assert m["bits/scale2/ones"] == 1.0 and m["bits/entropy"] == pytest.approx(0.5, abs=1e-6)


def test_evaluate_writes_metrics_and_grid(tmp_path):
    from PIL import Image
    torch.manual_seed(0)
    cfg = TokenizerModelConfig(base_channels=8, channel_mult=[1, 1, 2], temporal_down_levels=[0, 1], norm_groups=4,
                               latent_dim=8, scale_schedule=[[1, 1], [2, 2], [4, 4]])
    model = VideoTokenizer(cfg)
    batches = [ClipBatch(torch.rand(2, 3, 5, 16, 16) * 2 - 1, ["a@0", "b@0"]) for _ in range(2)]
    m = evaluate_tokenizer(model, batches, out_dir=tmp_path, grid_clips=2, grid_frames=3, title="test")
    assert m["clips"] == 4 and math.isfinite(m["psnr"]) and m["psnr"] == pytest.approx(m["psnr_k3"])
    assert {"ssim", "psnr_k1", "bits/scale3/entropy", "bits/scale1/unique_codes"} <= set(m)
    assert json.loads((tmp_path / "eval.json").read_text())["clips"] == 4
    with Image.open(tmp_path / "recon_grid.png") as im:
        w, h = im.size
    # 2 clips x (original + 3 scales) rows of 96-px cells (16 px zoomed x6), 3 frame columns
    assert w == 120 + 3 * (96 + 2) and h >= 2 * 4 * 96
    assert model.training  # restored


def test_eval_reports_psnr_per_frame_with_frame0_apart():
    """Frame 0 goes through the causal tokenizer alone (its own latent frame): the report gives PSNR per
    frame, frame 0 per number of scales, and the later frames together, next to the clip average."""
    import numpy as np
    from tokenizer.evaluate import reconstruct_by_scales
    torch.manual_seed(0)
    cfg = TokenizerModelConfig(base_channels=8, channel_mult=[1, 1, 2], temporal_down_levels=[0, 1], norm_groups=4,
                               latent_dim=8, scale_schedule=[[1, 1], [2, 2], [4, 4]])
    model = VideoTokenizer(cfg).eval()
    batches = [ClipBatch(torch.rand(2, 3, 5, 16, 16) * 2 - 1, ["a@0", "b@0"]) for _ in range(2)]
    m = evaluate_tokenizer(model, batches)

    def psnr(real, recon):  # numpy, in [0, 1] units, per clip
        a = (np.clip(real.numpy(), -1, 1) + 1) / 2
        b = (np.clip(recon.numpy(), -1, 1) + 1) / 2
        return -10 * np.log10(((a - b) ** 2).reshape(len(a), -1).mean(1))

    videos = [b.video_BCTHW for b in batches]
    recons = [reconstruct_by_scales(model, v)[0] for v in videos]
    for t in range(5):
        expected = np.concatenate([psnr(v[:, :, t], r[-1][:, :, t]) for v, r in zip(videos, recons)]).mean()
        assert m[f"psnr_f{t}"] == pytest.approx(expected, abs=1e-6), t
    for k in range(3):
        expected = np.concatenate([psnr(v[:, :, 0], r[k][:, :, 0]) for v, r in zip(videos, recons)]).mean()
        assert m[f"psnr_k{k + 1}_frame0"] == pytest.approx(expected, abs=1e-6), k
    rest = np.concatenate([psnr(v[:, :, 1:], r[-1][:, :, 1:]) for v, r in zip(videos, recons)]).mean()
    assert m["psnr_frame0"] == m["psnr_f0"] and m["psnr_after_frame0"] == pytest.approx(rest, abs=1e-6)
