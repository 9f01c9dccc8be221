"""Training throughput and memory of VideoAR at TP, PP, CP and DP layouts, at a shipped recipe's sequence.

Runs the real trainer (`videoar train`: Megatron DDP + distributed optimizer + schedules, bf16) under
torchrun on synthetic shards for each layout that fits the GPUs of this host, and prints tokens/s,
tokens/s per GPU, MFU (useful FLOPs, videoar_megatron/training/metrics.py) and peak memory (rank 0, the
first pipeline stage) next to the dry run's estimate for the same run (`videoar train --dry-run`'s
estimator, called in process) and next to the baseline measured in the same run: the layout with the
fewest GPUs that fits and ran (1 GPU, unless the estimate says the model does not fit one, e.g. 4B on an
80 GB GPU). Scaling efficiency = tokens/s per GPU / the baseline's (1.0 = perfect).

The sequence is a shipped recipe's (`--sequence`, one of benchmarks/ar_common.py's layouts: ucf =
recipes/ar/ucf101_L.yaml, 651 tokens; stage3 = recipes/ar/stage3.yaml, 23,059; stage3_65f, 43,499; ...):
each layout trains that recipe with the benchmark's parallel layout, batch and model size. A layout may
name another sequence (`cp2@stage3_65f`: CP=2 at 65 frames against the baseline at --sequence). Every
layout does the same work per GPU: a replica's micro-batch holds --micro samples x TP x CP, scaled by
the baseline sequence's length over its own (rounded, at least 1 sample), with --accumulation
micro-batches per step (default 2 x PP; `recipe`: the recipe's own number at its target size), and
one attention kernel for all (--flex-kernel, default triton).

After the table, for issue 27:
- each CP layout's tokens/s per GPU against the baseline (goal: CP=2 at 65 frames >= 0.85 of CP=1 at
  33 frames);
- each pure pipeline layout (PP only): its efficiency against the bubble bound 1 / (1 + (PP-1)/(v m)),
  v virtual stages, m micro-batches per step (goal: within 5%). Interleaved layouts (pp2v2) need
  parallel.virtual_pipeline_stages; a checkout without that knob skips them and says so.

    python benchmarks/bench_ar_train.py                    # VideoAR-L, UCF-101 layout, all layouts that fit
    python benchmarks/bench_ar_train.py --layouts 1gpu,tp2,pp2,dp2 --steps 30
    python benchmarks/bench_ar_train.py --sequence stage3 --micro 1 --layouts 1gpu,cp2@stage3_65f
    python benchmarks/bench_ar_train.py --sequence stage3 --micro 1 --accumulation recipe --layouts pp2,pp2v2
    python benchmarks/bench_ar_train.py --size XL --sequence stage3 --micro 1 --recompute full \\
        --layouts 1gpu,dp4,tp2dp2,tp2pp2,cp2tp2
    python benchmarks/bench_ar_train.py --device cpu --size tiny --layouts cp2 --steps 2   # smoke (no GPU)

benchmarks/gpu/multi_gpu_session.sh runs issue 27's three runs; results go to docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ar_common import LAYOUTS as SEQUENCES, layout_origin, layout_recipes  # noqa: E402
from benchmarks.train_common import (FIT_MARGIN, estimate_gib, run_layout, summarise,  # noqa: E402
                                     write_synthetic_shards)

CP_GOAL, PIPELINE_GOAL, SCALING_GOAL = 0.85, 0.95, 0.85
"""Issue 27: CP=2 at 65 frames per-GPU tokens/s / CP=1's at 33; measured / bubble-bound pipeline
efficiency ("within 5%"); scaling efficiency against the baseline."""


class Parallel(NamedTuple):
    tp: int
    pp: int
    cp: int
    gpus: int
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank (parallel.virtual_pipeline_stages; 1 = plain 1F1B)."""

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp * self.cp)


LAYOUTS = {"1gpu": Parallel(1, 1, 1, 1), "tp2": Parallel(2, 1, 1, 2), "pp2": Parallel(1, 2, 1, 2),
           "dp2": Parallel(1, 1, 1, 2), "cp2": Parallel(1, 1, 2, 2), "pp2v2": Parallel(1, 2, 1, 2, vpp=2),
           "tp2pp2": Parallel(2, 2, 1, 4), "tp2dp2": Parallel(2, 1, 1, 4), "pp2dp2": Parallel(1, 2, 1, 4),
           "dp4": Parallel(1, 1, 1, 4), "tp4": Parallel(4, 1, 1, 4), "cp2tp2": Parallel(2, 1, 2, 4),
           "cp2dp2": Parallel(1, 1, 2, 4), "cp4": Parallel(1, 1, 4, 4)}
CPU_MODEL = ("model.latent_dim=8",)
CPU_TEXT = ("model.condition.feature_dim=16", "model.condition.text_len=4")
"""Smoke mode (--device cpu): a small bit width and caption, so the tiny model runs in seconds."""


@dataclasses.dataclass
class Run:
    label: str
    """What the table calls it: the layout, with @sequence when not --sequence's."""
    name: str
    par: Parallel
    sequence: str
    sets: list[str] = dataclasses.field(default_factory=list)
    estimate: tuple[float, float] = (math.nan, math.nan)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="", help=f"comma list of LAYOUT[@SEQUENCE], LAYOUT one of {', '.join(LAYOUTS)} "
                                                 f"(default: all that fit; 1gpu is always added as the baseline)")
    p.add_argument("--sequence", default="ucf", choices=list(SEQUENCES),
                   help="the recipe whose sequence every layout trains (benchmarks/ar_common.py)")
    p.add_argument("--gpus", type=int, default=0,
                   help="GPUs to use (default: all on this host, at most 4; cpu: 2 gloo ranks)")
    p.add_argument("--size", default="L", help="VideoAR size (tiny, L, XL, 4B)")
    p.add_argument("--micro", type=int, default=16, help="micro-batch per data-parallel rank at --sequence "
                                                         "(x TP x CP for a replica spanning TP x CP GPUs)")
    p.add_argument("--accumulation", default="0",
                   help="micro-batches per step and data-parallel rank: a number, 0 = 2 x PP, or 'recipe' (the "
                        "--sequence recipe's own at its target size, e.g. 8 for stage III)")
    p.add_argument("--steps", type=int, default=30, help="steps per layout")
    p.add_argument("--warmup", type=int, default=10, help="steps excluded from the medians (compilation)")
    p.add_argument("--recompute", default="none", choices=["none", "full", "core_attn"])
    p.add_argument("--flex-kernel", default="triton", choices=["auto", "triton", "flash"],
                   help="model.flex_kernel for every layout of the call (one kernel, so ratios compare layouts; "
                        "FLASH has not been run with context parallelism's index tables: docs/training.md)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU for MFU")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test of this script")
    p.add_argument("--gpu-gib", type=float, default=0, help="memory per GPU for the fit check (default: this "
                                                             "GPU's; 80 with --plan)")
    p.add_argument("--plan", action="store_true", help="print the runs, batches and dry-run estimates, run nothing "
                                                       "(no GPU needed; --gpus default 4)")
    p.add_argument("--work-dir", default="", help="where shards and runs go (default: a temporary directory); "
                                                  "shards there are reused")
    args = p.parse_args(argv)
    if args.accumulation != "recipe" and not args.accumulation.isdigit():
        p.error(f"--accumulation must be a number or 'recipe', got {args.accumulation!r}")
    return args


def parse_runs(spec: str, sequence: str, gpus: int) -> list[Run]:
    """``--layouts`` → runs, the 1-GPU baseline at ``sequence`` first; an unknown name is an error naming it."""
    items = spec.split(",") if spec else [n for n, par in LAYOUTS.items() if par.gpus <= gpus]
    runs = []
    for item in items:
        name, _, seq = item.partition("@")
        seq = seq or sequence
        if name not in LAYOUTS:
            raise SystemExit(f"--layouts: unknown layout {name!r} (known: {', '.join(LAYOUTS)})")
        if seq not in SEQUENCES:
            raise SystemExit(f"--layouts: unknown sequence {seq!r} in {item!r} (known: {', '.join(SEQUENCES)})")
        runs.append(Run(item if seq != sequence else name, name, LAYOUTS[name], seq))
    if not any(r.name == "1gpu" and r.sequence == sequence for r in runs):
        runs.insert(0, Run("1gpu", "1gpu", LAYOUTS["1gpu"], sequence))
    return runs


def interleaving_supported() -> bool:
    """Whether this checkout has the interleaved pipeline's knob (parallel.virtual_pipeline_stages)."""
    from videoar_megatron.model.config import ParallelConfig
    return "virtual_pipeline_stages" in {f.name for f in dataclasses.fields(ParallelConfig)}


def runnable(runs: list[Run], gpus: int) -> list[Run]:
    """The runs this host and checkout can make; says why for each other one."""
    keep = []
    for run in runs:
        if run.par.gpus > gpus:
            print(f"  {run.label}: skipped, needs {run.par.gpus} GPUs (this host: {gpus})")
        elif run.par.vpp > 1 and not interleaving_supported():
            print(f"  {run.label}: skipped, parallel.virtual_pipeline_stages is not a config field of this checkout "
                  f"(the interleaved pipeline is not merged)")
        else:
            keep.append(run)
    return keep


def recipe_config(run: Run, extra: tuple[str, ...] = ()):
    from videoar_common.config import load_config
    from videoar_megatron.training.config import TrainConfig
    recipe, overrides = layout_recipes()[run.sequence]
    return load_config(TrainConfig, recipe, [*overrides, *extra])


def model_sets(args, run: Run) -> list[str]:
    """Model size, and the smoke mode's small widths (caption ones only for text-conditioned recipes)."""
    if args.device != "cpu":
        return [f"model.size={args.size}"]
    text = recipe_config(run).model.condition.kind == "text_features"
    return [f"model.size={args.size}", *CPU_MODEL, *(CPU_TEXT if text else ())]


def replica_micro(args, run: Run) -> int:
    """Samples per micro-batch of one replica: --micro x TP x CP samples of the baseline's sequence, in
    samples of this run's (so every GPU holds about as many tokens per micro-batch as the baseline's)."""
    scale = SEQUENCES[args.sequence].seq_len / SEQUENCES[run.sequence].seq_len
    return max(1, round(args.micro * run.par.tp * run.par.cp * scale))


def accumulation(args, run: Run) -> int:
    """Micro-batches per step: --accumulation, 2 x PP, or the --sequence recipe's at its target size (one
    number for every run of the call, whatever sequence a layout names)."""
    if args.accumulation == "recipe":
        cfg = recipe_config(Run("", "", run.par, args.sequence))
        return cfg.check_layout(cfg.target.world_size).accumulation
    return int(args.accumulation) or 2 * run.par.pp


def run_sets(args, run: Run, shards: Path) -> list[str]:
    """The ``--set`` items of one run: the recipe's data at synthetic shards, the benchmark's layout."""
    cpu, par = args.device == "cpu", run.par
    micro = replica_micro(args, run)
    _, overrides = layout_recipes()[run.sequence]
    return [*overrides, f"data.path={shards}", "data.mix=[]", "checkpoint.load=", *model_sets(args, run),
            f"model.flex_kernel={args.flex_kernel}",
            f"parallel.tensor_parallel={par.tp}", f"parallel.pipeline_parallel={par.pp}",
            f"parallel.context_parallel={par.cp}",
            *([f"parallel.virtual_pipeline_stages={par.vpp}"] if par.vpp > 1 else []),
            f"parallel.sequence_parallel={str(par.tp > 1 and not cpu).lower()}",
            f"parallel.recompute={'none' if cpu else args.recompute}", f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro * par.dp * accumulation(args, run)}", f"train.steps={args.steps}",
            f"optim.warmup_steps={min(1, args.steps - 1)}", f"metrics.peak_tflops={args.peak_tflops}",
            f"train.device={args.device}",
            f"train.precision={'fp32' if cpu else 'bf16'}", "data.num_canonical_nodes=1",
            f"data.num_workers={0 if cpu else 2}",
            f"target.gpus_per_node={par.gpus}", "target.nodes=1"]


def shards_for(args, run: Run, work: Path, samples: int) -> Path:
    """Synthetic shards of the run's sequence (frames and scales of the recipe; bit width and caption of
    the model as run), shared by every run at that sequence."""
    model = recipe_config(run, tuple(model_sets(args, run))).model
    lay = SEQUENCES[run.sequence]
    text = (model.condition.text_len, model.condition.feature_dim) if model.condition.kind == "text_features" \
        else None
    name = f"shards_{run.sequence}_d{model.latent_dim}" + (f"_text{text[0]}x{text[1]}" if text else "")
    return write_synthetic_shards(work / name, num=samples, frames=lay.frames, latent_dim=model.latent_dim,
                                  schedule=[list(s) for s in lay.scales], text=text)


def prepare(args, runs: list[Run], work: Path, gpu_gib: float) -> list[Run]:
    """Shards (not in --plan), ``--set`` items and dry-run estimate of every run, each printed; drops (and
    names) the runs whose estimate exceeds FIT_MARGIN of the GPU memory."""
    keep = []
    for run in runs:
        micro, acc = replica_micro(args, run), accumulation(args, run)
        batch = micro * run.par.dp * acc
        # Without shards the dry run reads the sequence from the recipe's num_frames / scale_schedule,
        # which the shards are made from: the same estimate.
        shards = work / "no-shards-in-plan" if args.plan else shards_for(args, run, work, samples=max(64, 8 * batch))
        run.sets = run_sets(args, run, shards)
        recipe, _ = layout_recipes()[run.sequence]
        run.estimate = estimate_gib(recipe, run.sets)
        fits = args.device == "cpu" or run.estimate[0] <= FIT_MARGIN * gpu_gib
        print(f"  {run.label}: {run.par.gpus} GPU(s), TPxCPxPPxDP {shape(run.par)}, {micro} x {acc} micro-batches "
              f"per step, {SEQUENCES[run.sequence].seq_len} tokens, dry-run estimate {run.estimate[0]:.1f} GiB per GPU"
              + ("" if fits else f": skipped, > {FIT_MARGIN:.0%} of {gpu_gib:.0f} GiB"))
        if fits:
            keep.append(run)
    return keep


def shape(par: Parallel) -> str:
    return f"{par.tp}x{par.cp}x{par.pp}{f'v{par.vpp}' if par.vpp > 1 else ''}x{par.dp}"


def main(argv=None) -> int:
    args = parse(argv)
    import torch
    cuda = args.device == "cuda" and not args.plan
    if cuda and not torch.cuda.is_available():
        print("bench_ar_train needs CUDA GPUs (or --device cpu for a smoke test, --plan for the plan)", file=sys.stderr)
        return 2
    gpus = args.gpus or (min(torch.cuda.device_count(), 4) if cuda else 4 if args.plan else 2)
    gpu_gib = args.gpu_gib or (torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 80.0)
    device = torch.cuda.get_device_name() if cuda else "plan only" if args.plan else "cpu (gloo ranks)"
    base_seq = SEQUENCES[args.sequence]
    print(f"device: {device} x {gpus}, torch {torch.__version__}; VideoAR-{args.size} at {args.sequence} "
          f"({layout_origin(args.sequence)}: {base_seq.seq_len} tokens), {'fp32' if args.device == 'cpu' else 'bf16'}, "
          f"recompute {args.recompute}, flex kernel {args.flex_kernel}, {args.steps} steps "
          f"(median after {args.warmup})")
    work = Path(args.work_dir or ("." if args.plan else tempfile.mkdtemp(prefix="bench_ar_train_")))
    runs = prepare(args, runnable(parse_runs(args.layouts, args.sequence, gpus), gpus), work, gpu_gib)
    if args.plan:
        return 0 if runs else 1
    run_root = work / time.strftime("runs-%Y%m%d-%H%M%S")
    print(HEADER)
    base = None
    for run in sorted(runs, key=lambda r: r.par.gpus):  # the baseline (fewest GPUs) first; rows print as they come
        recipe, _ = layout_recipes()[run.sequence]
        run_dir = run_root / run.label.replace("@", "_at_")
        rc, err = run_layout(recipe, run_dir, run.par.gpus, run.sets)
        if rc != 0:
            print(f"  {run.label}: FAILED (exit {rc})\n{err}")
            continue
        result = summarise(run_dir, args.warmup)
        base = base or (run, result["tokens_per_s_per_gpu"])
        report(args, run, result, *base)
    if base is None:
        return 1
    print(f"\nbaseline: {base[0].label} ({base[0].par.gpus} GPU(s), {base[1]:.0f} tokens/s per GPU); scaling "
          f"efficiency = tokens/s per GPU / the baseline's (goal >= {SCALING_GOAL} for issue 27's 4-GPU layouts). "
          f"'est.' = the dry run's estimate per GPU for the same recipe and --set items, 'w/o rt' without its "
          f"fixed runtime allowance, compared with the allocator peak of rank 0. 'data s' = reading + building "
          f"the step's batches inside 'step s'")
    return 0


HEADER = (f"\n{'layout':<16} {'GPUs':>4} {'TPxCPxPPxDP':>11} {'micro x acc':>11} {'tokens/s':>10} {'tok/s/GPU':>10} "
          f"{'MFU':>6} {'step s':>7} {'data s':>7} {'est. GiB':>9} {'est. w/o rt':>11} {'peak GiB':>9} "
          f"{'peak/est':>8} {'scaling eff.':>12}")


def report(args, run: Run, r: dict, base: Run, base_per_gpu: float) -> None:
    """The run's row under HEADER, then its issue-27 line: CP against the baseline, a pure pipeline
    against its bubble bound."""
    par, (total, core) = run.par, run.estimate
    eff = r["tokens_per_s_per_gpu"] / base_per_gpu
    micro_acc = f"{replica_micro(args, run)} x {accumulation(args, run)}"
    print(f"{run.label:<16} {par.gpus:>4} {shape(par):>11} {micro_acc:>11} {r['tokens_per_s']:>10.0f} "
          f"{r['tokens_per_s_per_gpu']:>10.0f} {r['mfu']:>6.3f} {r['step_time_s']:>7.3f} {r['data_time_s']:>7.3f} "
          f"{total:>9.2f} {core:>11.2f} {r['mem_peak_gib']:>9.2f} {r['mem_peak_gib'] / core:>8.3f} {eff:>12.3f}")
    if par.cp > 1:
        print(cp_line(run, base, eff))
    if par.pp > 1 and par.gpus == par.pp:
        print(pipeline_line(run, base, eff, accumulation(args, run)))
    sys.stdout.flush()


def verdict(value: float, goal: float) -> str:
    return f"goal >= {goal}: {'met' if value >= goal else 'NOT met'}"


def cp_line(run: Run, base: Run, ratio: float) -> str:
    seq, base_seq = SEQUENCES[run.sequence], SEQUENCES[base.sequence]
    return (f"=> {run.label} (CP={run.par.cp}, {run.sequence}: {seq.seq_len} tokens) vs {base.label} ({base.sequence}: "
            f"{base_seq.seq_len} tokens): tokens/s per GPU ratio {ratio:.3f} ({verdict(ratio, CP_GOAL)})")


def pipeline_line(run: Run, base: Run, efficiency: float, m: int) -> str:
    """Megatron's bubble: (PP-1)/(v m) of the compute time idle, so at best 1 / (1 + that) of the baseline."""
    p, v = run.par.pp, run.par.vpp
    bubble = (p - 1) / (v * m)
    bound = 1 / (1 + bubble)
    return (f"=> {run.label}: pipeline efficiency {efficiency:.3f} (tokens/s per GPU vs {base.label}) against the "
            f"bubble bound 1/(1 + (PP-1)/(v m)) = 1/(1 + {p - 1}/({v} x {m})) = {bound:.3f}: "
            f"{efficiency / bound:.3f} of the bound ({verdict(efficiency / bound, PIPELINE_GOAL)}); idle share "
            f"measured 1/efficiency - 1 = {1 / efficiency - 1:.3f}, bubble {bubble:.3f}")


if __name__ == "__main__":
    sys.exit(main())
