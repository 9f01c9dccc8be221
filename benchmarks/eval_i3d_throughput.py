"""I3D feature throughput for FVD on this device, TF32 off (the reference setting, baseline) next to
TF32 on, with how far TF32 moves the features and an FVD between the two feature sets.

    python benchmarks/eval_i3d_throughput.py [--clips 64] [--batch 16] [--frames 17] [--res 128]

Random weights (init keeping activations alive) and random clips: the speed is the real network's;
the TF32 deviation is indicative only (trained weights have other activation statistics).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_eval_i3d import random_i3d  # noqa: E402

from videoar_megatron.evaluation.fvd import FeatureStats, fvd_from_stats  # noqa: E402
from videoar_megatron.evaluation.i3d import FeatureExtractor, FeatureExtractorConfig  # noqa: E402


def timed(extractor: FeatureExtractor, clips: torch.Tensor) -> tuple[torch.Tensor, float]:
    extractor(clips[: extractor.cfg.batch_size])  # warm-up: cuDNN autotuning, allocator
    if clips.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    feats = extractor(clips)
    if clips.is_cuda:
        torch.cuda.synchronize()
    return feats, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--res", type=int, default=128)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (args.clips, 3, args.frames, args.res, args.res), generator=g,
                          dtype=torch.uint8).to(device)
    net = random_i3d()
    results = {}
    for tf32 in (False, True):
        cfg = FeatureExtractorConfig(batch_size=args.batch, allow_tf32=tf32)
        results[tf32] = timed(FeatureExtractor(net, backend="module", cfg=cfg, weights_sha256="", device=device), clips)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; {args.clips} clips of {args.frames}x{args.res}² → 224², batch {args.batch}")
    base = args.clips / results[False][1]
    for tf32, (feats, secs) in results.items():
        rate = args.clips / secs
        print(f"  tf32={'on ' if tf32 else 'off'}: {rate:8.1f} clips/s  ({rate / base:.2f}x the fp32 baseline)")
    f32, t32 = results[False][0], results[True][0]
    rel = ((t32 - f32).norm(dim=1) / f32.norm(dim=1)).max().item()
    s_off, s_on = FeatureStats(f32.shape[1]), FeatureStats(f32.shape[1])
    s_off.update(f32)
    s_on.update(t32)
    print(f"  TF32 vs fp32 features: max relative L2 deviation {rel:.2e}; FVD(fp32, tf32) = "
          f"{fvd_from_stats(s_on, s_off, 'eigh'):.3e}")
    print(f"  NBP protocol (40k generated + 40k real clips) at fp32: {80_000 / base / 60:.1f} GPU-minutes of I3D")


if __name__ == "__main__":
    main()
