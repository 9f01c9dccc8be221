"""Training batch building: one pass per micro-batch (per-sample generators) vs sample by sample.

What the trainer does before every step (``SourceData._build``): cross-frame error correction
(flip ratios, bit flips, re-quantization of every scale), Eq. 6 inputs, the Random Frame Mask draw and
condition dropout, each sample from its own seeded generator. The baseline, timed in the same run on
the same samples, builds each sample alone and concatenates (the trainer's way until session 4); the
batched build must give the identical batch, which this script checks before timing.

    python benchmarks/bench_ar_data.py                       # CUDA if present: UCF-101 and stage-III layouts
    python benchmarks/bench_ar_data.py --device cpu --layouts ucf --micro 4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ar_common import LAYOUTS, row, time_ms  # noqa: E402
from tokenizer.quantizer import MultiScaleBSQ  # noqa: E402
from videoar_common.config import build_dataclass  # noqa: E402
from videoar_megatron.model.config import ModelConfig  # noqa: E402
from videoar_megatron.model.sequence import VideoARBatch, build_batch, concat_batches  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="ucf,stage3", help="comma list of: " + ", ".join(LAYOUTS))
    p.add_argument("--micro", default="ucf=16,stage3=1", help="samples per micro-batch per layout")
    p.add_argument("--latent-dim", type=int, default=48, help="bits per token d (paper 48)")
    p.add_argument("--p-mask", type=float, default=0.1, help="Random Frame Mask drop probability")
    p.add_argument("--iters", type=int, default=10, help="timed builds (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    return p.parse_args(argv)


def model_config(args, layout) -> ModelConfig:
    return build_dataclass(ModelConfig, {
        "size": "tiny", "latent_dim": args.latent_dim, "max_scales": max(16, layout.num_scales),
        "condition": {"kind": "class", "num_classes": 101, "dropout": 0.1},
        "mask": {"rfm_window": 0, "rfm_p_mask": args.p_mask}})


def assert_identical(a: VideoARBatch, b: VideoARBatch) -> None:
    for name in ("inputs_BNd", "targets_BNd", "frame_visible_BTT", "cond_drop_B", "flip_p_BTK", "class_B"):
        if not torch.equal(getattr(a, name), getattr(b, name)):
            raise SystemExit(f"batched build differs from the per-sample build in {name}")


def bench_layout(name: str, micro: int, args, device: torch.device) -> None:
    layout = LAYOUTS[name]
    cfg = model_config(args, layout)
    q = MultiScaleBSQ(dim=args.latent_dim, scales=layout.scales)
    H, W = layout.scales[-1]
    latent_BdTHW = torch.randn(micro, args.latent_dim, layout.frames, H, W, device=device)
    labels_B = torch.arange(micro, device=device) % 101

    def gens():
        return [torch.Generator(device).manual_seed(1000 + i) for i in range(micro)]

    def per_sample():
        return concat_batches([build_batch(q, cfg, latent_BdTHW=latent_BdTHW[i:i + 1], cond=labels_B[i:i + 1],
                                           training=True, generator=g) for i, g in enumerate(gens())])

    def batched():
        return build_batch(q, cfg, latent_BdTHW=latent_BdTHW, cond=labels_B, training=True, generator=gens())

    assert_identical(batched(), per_sample())
    base_ms = time_ms(per_sample, device, args.iters)
    ours_ms = time_ms(batched, device, args.iters)
    print(f"\n[{name}] {layout.frames} latent frames x {layout.num_scales} scales ({layout.video_len} video "
          f"tokens), micro-batch {micro}, d={args.latent_dim}, {device.type}; batched == per-sample: yes")
    print(row("micro-batch build, batched", ours_ms, base_ms))
    print(f"  => per-sample / batched = {base_ms / ours_ms:.2f}x", flush=True)


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu", file=sys.stderr)
        return 2
    micro = dict(item.split("=") for item in args.micro.split(","))
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    for name in args.layouts.split(","):
        bench_layout(name, int(micro.get(name, 1)), args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
