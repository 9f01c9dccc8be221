"""Training throughput of VideoAR-L (UCF-101 layout, 651 tokens) at TP, PP and DP layouts.

Runs the real trainer (`videoar train`, Megatron DDP + distributed optimizer + schedules, bf16) on
synthetic shards for each layout that fits the GPUs of this host, and prints tokens/s, tokens/s per
GPU, MFU (useful FLOPs, see videoar_megatron/training/metrics.py) and peak memory (rank 0) next to the
1-GPU baseline measured in the same run. Ratio = scaling efficiency = tokens/s / (GPUs x baseline
tokens/s). Every layout does the same work per GPU: micro-batch --micro per data-parallel rank (x TP
for tensor-parallel replicas), global batch = 2 x --micro x GPUs.

    python benchmarks/bench_ar_train.py                       # all layouts that fit this host (1/2/4 GPUs)
    python benchmarks/bench_ar_train.py --layouts 1gpu,tp2,pp2,dp2 --steps 30
    python benchmarks/bench_ar_train.py --device cpu --size tiny --layouts 1gpu --steps 3   # smoke (no GPU)
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.train_common import REPO, run_layout, summarise, write_synthetic_shards  # noqa: E402

# name → (TP, PP, GPUs)
LAYOUTS = {"1gpu": (1, 1, 1), "tp2": (2, 1, 2), "pp2": (1, 2, 2), "dp2": (1, 1, 2),
           "tp2pp2": (2, 2, 4), "tp2dp2": (2, 1, 4), "pp2dp2": (1, 2, 2 * 2), "dp4": (1, 1, 4), "tp4": (4, 1, 4)}
UCF_SCHEDULE = [[1, 1], [2, 2], [3, 3], [4, 4], [6, 6], [8, 8]]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="", help=f"comma list of {', '.join(LAYOUTS)} (default: all that fit)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs to use (default: all on this host, at most 4)")
    p.add_argument("--size", default="L", help="VideoAR size (tiny, L, XL, 4B)")
    p.add_argument("--micro", type=int, default=16, help="micro-batch per data-parallel rank (x TP for TP replicas)")
    p.add_argument("--steps", type=int, default=30, help="steps per layout")
    p.add_argument("--warmup", type=int, default=10, help="steps excluded from the medians (compilation)")
    p.add_argument("--recompute", default="none", choices=["none", "full", "core_attn"])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU for MFU")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test of this script")
    p.add_argument("--work-dir", default="", help="where shards and runs go (default: a temporary directory)")
    return p.parse_args(argv)


def layout_sets(args, tp: int, pp: int, n: int, shards: Path) -> list[str]:
    micro = args.micro * tp  # a TP replica spans tp GPUs: same samples per GPU as the baseline
    cpu = args.device == "cpu"
    return [f"data.path={shards}", f"model.size={args.size}", f"parallel.tensor_parallel={tp}",
            f"parallel.pipeline_parallel={pp}", f"parallel.sequence_parallel={str(tp > 1 and not cpu).lower()}",
            f"parallel.recompute={'none' if cpu else args.recompute}", f"train.micro_batch_size={micro}",
            f"train.global_batch_size={2 * args.micro * n}",
            f"train.steps={args.steps}", "optim.warmup_steps=1", f"metrics.peak_tflops={args.peak_tflops}",
            f"train.device={args.device}", f"train.precision={'fp32' if cpu else 'bf16'}",
            "data.num_canonical_nodes=1", "data.num_workers=2", f"target.gpus_per_node={n}", "target.nodes=1",
            *(["model.latent_dim=8"] if cpu else [])]


def main(argv=None) -> int:
    args = parse(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_ar_train needs CUDA GPUs (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    gpus = args.gpus or (min(torch.cuda.device_count(), 4) if args.device == "cuda" else 1)
    names = [n for n in (args.layouts.split(",") if args.layouts else LAYOUTS) if LAYOUTS[n][2] <= gpus]
    if "1gpu" not in names:
        names.insert(0, "1gpu")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_ar_train_"))
    latent_dim = 8 if args.device == "cpu" else 48
    shards = write_synthetic_shards(work / f"shards_ucf_d{latent_dim}", num=1024, frames=5, schedule=UCF_SCHEDULE,
                                    latent_dim=latent_dim)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device} x {gpus}, torch {torch.__version__}, VideoAR-{args.size} on the UCF-101 layout "
          f"(651 tokens), {'fp32' if args.device == 'cpu' else 'bf16'}, recompute {args.recompute}, {args.steps} steps (median after {args.warmup})")
    results, runs = {}, work / time.strftime("runs-%Y%m%d-%H%M%S")
    for name in names:
        tp, pp, n = LAYOUTS[name]
        rc, err = run_layout(REPO / "recipes/ar/ucf101_L.yaml", runs / name, n, layout_sets(args, tp, pp, n, shards))
        if rc != 0:
            print(f"  {name}: FAILED (exit {rc})\n{err}")
            continue
        results[name] = summarise(runs / name, args.warmup)
    report(results, names)
    return 0 if "1gpu" in results else 1


def report(results: dict, names: list[str]) -> None:
    base = results.get("1gpu")
    print(f"\n{'layout':<8} {'GPUs':>4} {'tokens/s':>11} {'tok/s/GPU':>10} {'MFU':>7} {'step s':>8} {'data s':>7} "
          f"{'peak GiB':>9}   {'vs 1 GPU: tokens/s ratio':>24} {'scaling eff.':>12}")
    for name in names:
        r = results.get(name)
        if r is None:
            continue
        n = LAYOUTS[name][2]
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else math.nan
        print(f"{name:<8} {n:>4} {r['tokens_per_s']:>11.0f} {r['tokens_per_s_per_gpu']:>10.0f} {r['mfu']:>7.3f} "
              f"{r['step_time_s']:>8.3f} {r['data_time_s']:>7.3f} {r['mem_peak_gib']:>9.2f}   {ratio:>24.3f} "
              f"{ratio / n:>12.3f}")
    if base:
        print(f"\nbaseline (1gpu): {base['tokens_per_s']:.0f} tokens/s, MFU {base['mfu']:.3f}; scaling efficiency "
              f"= tokens/s / (GPUs x baseline); 1.0 = perfect. 'data s' = reading + building the step's batches "
              f"(error-correction requantization, one pass per micro-batch) inside 'step s'")


if __name__ == "__main__":
    sys.exit(main())
