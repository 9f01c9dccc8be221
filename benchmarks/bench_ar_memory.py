"""Memory per GPU of VideoAR-L, -XL and -4B at the stage-III sequence length, measured vs the dry run.

Stage III (recipes/ar/stage3.yaml): 33 frames at 384x672 → 9 latent frames of 24x42, 8 scales (2,555
tokens per frame) + 64 text tokens = 23,059 tokens per sample (23,060 padded for sequence parallelism),
bf16, full activation recompute, micro-batch 1, distributed optimizer. For each size the benchmark
runs the real trainer for a few steps on synthetic shards at the smallest layout of this host that
the dry run says fits (L, XL: 1 GPU; 4B: TP=2 + SP on 2 GPUs), and prints the measured peak
(allocator peak on rank 0, and reserved) next to the baseline from the same run's analytic estimate
(`videoar train --dry-run`), with the ratio measured / estimate. Also tokens/s and MFU at that length.

    python benchmarks/bench_ar_memory.py                        # L, XL, 4B
    python benchmarks/bench_ar_memory.py --sizes L --steps 3
    python benchmarks/bench_ar_memory.py --device cpu --sizes tiny --steps 2 --frames 2   # smoke (no GPU)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.train_common import (FIT_MARGIN, REPO, estimate_gib, run_layout, summarise,  # noqa: E402
                                     write_synthetic_shards)

STAGE3_SCHEDULE = [[1, 1], [2, 3], [4, 7], [8, 14], [12, 21], [16, 28], [20, 35], [24, 42]]
TEXT = (64, 2048)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="L,XL,4B", help="comma list of VideoAR sizes")
    p.add_argument("--steps", type=int, default=4, help="steps per size (the first is excluded from medians)")
    p.add_argument("--frames", type=int, default=9, help="latent frames (9 = 33 video frames, stage III)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs available (default: all on this host)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU for MFU")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test of this script")
    p.add_argument("--work-dir", default="", help="where shards and runs go (default: a temporary directory)")
    return p.parse_args(argv)


def sets_for(args, size: str, tp: int, shards: Path, gpu_gib: float) -> list[str]:
    cpu = args.device == "cpu"
    return [f"data.path={shards}", "data.mix=[]", "data.num_frames=0", "data.resolution=null",
            "data.scale_schedule=null", "data.num_canonical_nodes=1", "checkpoint.load=", f"model.size={size}",
            f"parallel.tensor_parallel={tp}", f"parallel.sequence_parallel={str(tp > 1 and not cpu).lower()}",
            f"parallel.recompute={'none' if cpu else 'full'}", "train.micro_batch_size=1",
            "train.global_batch_size=1", f"train.steps={args.steps}", "optim.warmup_steps=1",
            f"train.device={args.device}", f"train.precision={'fp32' if cpu else 'bf16'}", "target.nodes=1",
            f"target.gpus_per_node={tp}", f"target.gpu_memory_gib={gpu_gib}", f"metrics.peak_tflops={args.peak_tflops}",
            *(["model.latent_dim=8", "model.condition.feature_dim=16", "model.condition.text_len=4"] if cpu else [])]


def main(argv=None) -> int:
    args = parse(argv)
    import torch
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("bench_ar_memory needs CUDA GPUs (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    gpus = args.gpus or (torch.cuda.device_count() if not cpu else 1)
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if not cpu else 64.0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_ar_memory_"))
    latent_dim, text = (8, (4, 16)) if cpu else (48, TEXT)
    schedule = STAGE3_SCHEDULE if not cpu else [[1, 1], [2, 3]]
    shards = write_synthetic_shards(work / f"shards_stage3_f{args.frames}_d{latent_dim}", num=16, frames=args.frames,
                                    schedule=schedule, latent_dim=latent_dim, text=text)
    device = torch.cuda.get_device_name() if not cpu else "cpu"
    print(f"device: {device} x {gpus} ({gpu_gib:.0f} GiB), torch {torch.__version__}; stage-III sequence: "
          f"{args.frames} latent frames x {sum(h * w for h, w in schedule)} tokens + {text[0]} text")
    runs, rows = work / time.strftime("runs-%Y%m%d-%H%M%S"), []
    for size in args.sizes.split(","):
        row = measure(args, size, gpus, gpu_gib, shards, runs)
        if row:
            rows.append(row)
    print(f"\n{'size':<5} {'layout':<9} {'estimate GiB':>12} {'est. w/o runtime':>16} {'measured peak':>13} "
          f"{'reserved':>9} {'peak / estimate w/o runtime':>28} {'tokens/s':>9} {'MFU':>6}")
    for r in rows:
        print(f"{r['size']:<5} {r['layout']:<9} {r['estimate']:>12.1f} {r['estimate_core']:>16.1f} "
              f"{r['mem_peak_gib']:>13.1f} {r['mem_reserved_gib']:>9.1f} {r['ratio']:>28.3f} "
              f"{r['tokens_per_s']:>9.0f} {r['mfu']:>6.3f}")
    print("\nbaseline = the dry run's analytic estimate (weights + grads + optimizer + activations; the "
          "'w/o runtime' column drops its fixed CUDA/NCCL allowance, comparable to the allocator peak)")
    return 0 if rows else 1


def measure(args, size: str, gpus: int, gpu_gib: float, shards: Path, runs: Path) -> dict | None:
    for tp in (1, 2, 4, 8):
        if tp > gpus:
            break
        sets = sets_for(args, size, tp, shards, gpu_gib)
        total, core = estimate_gib(REPO / "recipes/ar/stage3.yaml", sets)
        if total > FIT_MARGIN * gpu_gib:
            print(f"  {size} at TP={tp}: estimate {total:.1f} GiB > {FIT_MARGIN:.0%} of {gpu_gib:.0f} GiB, "
                  "trying more GPUs")
            continue
        run = runs / f"{size}_tp{tp}"
        rc, err = run_layout(REPO / "recipes/ar/stage3.yaml", run, tp, sets)
        if rc != 0:
            print(f"  {size} at TP={tp}: FAILED (exit {rc}; estimate {total:.1f} GiB), trying more GPUs\n{err}")
            continue
        r = summarise(run, skip=1)
        peak = r["mem_peak_gib"]
        return {"size": size, "layout": f"TP={tp}" + ("+SP" if tp > 1 else ""), "estimate": total,
                "estimate_core": core, **r, "ratio": peak / core if core else float("nan")}
    print(f"  {size}: no layout up to {gpus} GPU(s) of {gpu_gib:.0f} GiB fits or runs; skipped")
    return None


if __name__ == "__main__":
    sys.exit(main())
