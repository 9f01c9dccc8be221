"""Checkpoint saves: how long the step loop stalls for an asynchronous save, next to a synchronous save of
the same state, in the same run.

The real trainer (one process, the engine ``train.engine`` picks: Megatron on CUDA) at a recipe's model
and sequence (``--layout``, read from the recipe by benchmarks/ar_common.py; default ``stage3``:
recipes/ar/stage3.yaml, 23,059 tokens = 64 text tokens + 9 latent frames x 2,555; bf16, full recompute,
distributed optimizer) on synthetic shards trains a few steps, so the optimizer state exists, then for
each round: a synchronous save (``checkpoint.async_save=false``: the
loop waits for the whole write) and an asynchronous one (the loop waits to plan the save and copy the
state to host memory; a forked process writes the files), after which the benchmark trains on while
the writer works and times the commit. Both go through ``Trainer.save``, the trainer's own path.

A first round pays one-time costs and is printed apart. Printed per round and as medians: the
synchronous save time (the baseline), the stall of the
asynchronous save and its ratio to the baseline, the seconds until the asynchronous save was committed,
the step time while the writer works against the step time without a save, and the checkpoint's size.

    python benchmarks/bench_checkpoint.py --size 4B --layout stage3   # one H200 (4B does not fit 80 GB)
    python benchmarks/bench_checkpoint.py --size XL --layout stage3   # one 80 GB H100: the largest that fits
    python benchmarks/bench_checkpoint.py --device cpu --size tiny --layout ucf --rounds 1 --frames 2   # smoke
    python benchmarks/bench_checkpoint.py --device cpu --size L --set model.num_layers=4 --frames 2   # CPU, 0.2B
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ar_common import LAYOUTS, layout_origin, layout_recipes  # noqa: E402
from benchmarks.train_common import write_synthetic_shards  # noqa: E402

CPU_SCHEDULE = [[1, 1], [2, 3]]
"""The CPU smoke's pyramid (the recipe's would take minutes per step on 2 cores)."""


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="4B", help="VideoAR size (tiny, L, XL, 4B); 4B needs an H200, XL fits 80 GB")
    p.add_argument("--layout", default="stage3", choices=sorted(LAYOUTS),
                   help="the recipe whose model settings and sequence are saved (benchmarks/ar_common.py)")
    p.add_argument("--frames", type=int, default=0, help="latent frames per sample (0: the recipe's)")
    p.add_argument("--rounds", type=int, default=3, help="synchronous + asynchronous save pairs")
    p.add_argument("--steps-while-writing", type=int, default=3,
                   help="train steps after each asynchronous save before waiting for its commit")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test of this script")
    p.add_argument("--work-dir", default="", help="shards and checkpoints (default: a temporary directory; put "
                                                  "it on the file system the runs write to, with room for one "
                                                  "checkpoint: about 14 bytes per parameter, 4B: 57 GB)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key after the benchmark's own (e.g. model.num_layers=8), repeatable")
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args(argv)


def recipe_sets(args, shards: Path, steps: int) -> list[str]:
    cpu = args.device == "cpu"
    return [f"data.path={shards}", "data.mix=[]", "data.num_frames=0", "data.resolution=null",
            "data.scale_schedule=null", "data.num_canonical_nodes=1", "checkpoint.load=", f"model.size={args.size}",
            "parallel.tensor_parallel=1", "parallel.sequence_parallel=false", "parallel.context_parallel=1",
            f"parallel.recompute={'none' if cpu else 'full'}", "train.micro_batch_size=1", "train.global_batch_size=1",
            f"train.steps={steps}", "optim.warmup_steps=1", f"train.device={args.device}",
            f"train.precision={'fp32' if cpu else 'bf16'}", "target.nodes=1", "target.gpus_per_node=1",
            "checkpoint.save_every=0", "checkpoint.save_at_end=false", "checkpoint.keep_last=0",
            "checkpoint.async_save=true", "logging.progress_bar=false", "logging.wandb=false",
            "metrics.audit_sample_ids=false",
            *(["model.latent_dim=8", "model.condition.feature_dim=16", "model.condition.text_len=4"] if cpu else [])]


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed(fn) -> float:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measured_and_removed(trainer) -> int:
    """Bytes of the trainer's last checkpoint, which must be committed and is then deleted (a 4B checkpoint
    is about 57 GB: one at a time on disk)."""
    path = trainer.checkpoint_root / f"step_{trainer.last_saved:08d}"
    if not (path / "COMMITTED").is_file():
        raise RuntimeError(f"{path} is not committed after the save returned (synchronous) or was waited for")
    size = directory_bytes(path)
    shutil.rmtree(path)
    return size


def one_round(trainer, async_checkpointer, args) -> dict:
    """A synchronous save, a step, an asynchronous save, steps while it is written, its commit."""
    trainer.checkpointer = None  # checkpoint.async_save=false: Trainer.save writes and commits in full
    sync_s = timed(trainer.save)
    sync_phases = dict(trainer.last_save_phases)
    size = measured_and_removed(trainer)
    step_s = timed(trainer.train_step)
    trainer.checkpointer = async_checkpointer
    t0 = time.perf_counter()
    stall_s = timed(trainer.save)
    stall_phases = dict(trainer.last_save_phases)
    during = [timed(trainer.train_step) for _ in range(args.steps_while_writing)]
    trainer.wait_for_saves()
    commit_s = time.perf_counter() - t0
    async_size = measured_and_removed(trainer)
    return {"sync_save_s": sync_s, "async_stall_s": stall_s, "stall_over_sync": stall_s / sync_s,
            "async_commit_s": commit_s, "step_s": step_s, "step_while_writing_s": statistics.median(during),
            "checkpoint_gib": size / 2**30, "async_checkpoint_gib": async_size / 2**30,
            "sync_phases_s": sync_phases, "stall_phases_s": stall_phases}


def main(argv=None) -> int:
    args = parse(argv)
    import torch
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("bench_checkpoint needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    from videoar_common.config import load_config
    from videoar_megatron.training.config import TrainConfig
    from videoar_megatron.training.trainer import build_trainer, describe_phases
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    recipe, overrides = layout_recipes()[args.layout]
    layout = LAYOUTS[args.layout]
    frames = args.frames or layout.frames
    schedule = CPU_SCHEDULE if cpu else [list(hw) for hw in layout.scales]
    shards_dir = work / f"shards_{args.layout}_f{frames}{'_cpu' if cpu else ''}"
    steps_needed = 2 + (args.rounds + 1) * (1 + args.steps_while_writing)
    sets = [*overrides, *recipe_sets(args, shards_dir, steps_needed + 1), *args.set]
    model = load_config(TrainConfig, recipe, sets).model  # the shards follow the model's condition
    cond = model.condition
    text = (cond.text_len, cond.feature_dim) if cond.kind == "text_features" else None
    write_synthetic_shards(shards_dir, num=8, frames=frames, schedule=schedule, latent_dim=model.latent_dim,
                           classes=cond.num_classes, text=text)
    cfg = load_config(TrainConfig, recipe, sets)
    run = work / time.strftime("run-%Y%m%d-%H%M%S")
    device = torch.cuda.get_device_name() if not cpu else "cpu"
    from videoar_megatron.model.params import count_parameters
    params = count_parameters(cfg.model)["total"]
    print(f"device: {device}, torch {torch.__version__}; VideoAR-{args.size} ({params / 1e9:.2f}B parameters"
          f"{', ' + ' '.join(args.set) if args.set else ''}) at {layout_origin(args.layout)}: "
          f"{cfg.model.condition.prefix_len} prefix + {frames} latent frames x {sum(h * w for h, w in schedule)} "
          f"tokens; run dir {run}")
    trainer = build_trainer(cfg, run)
    rows = []
    try:
        print(trainer.restore())
        warm = [timed(trainer.train_step) for _ in range(2)]  # compilation, optimizer state
        print(f"warm-up steps: {', '.join(f'{s:.2f}s' for s in warm)} (train.engine: {trainer.engine_name})")
        async_checkpointer = trainer.checkpointer
        first = one_round(trainer, async_checkpointer, args)
        print(f"first round, not counted (one-time costs: the first asynchronous save starts Megatron's results-queue "
              f"manager, a spawned process): synchronous save {first['sync_save_s']:.2f}s, asynchronous stall "
              f"{first['async_stall_s']:.2f}s, committed after {first['async_commit_s']:.2f}s")
        for i in range(args.rounds):
            row = one_round(trainer, async_checkpointer, args)
            rows.append(row)
            print(f"round {i + 1}: synchronous save {row['sync_save_s']:.2f}s | asynchronous: stall "
                  f"{row['async_stall_s']:.2f}s = {row['stall_over_sync']:.3f} of the synchronous save, committed "
                  f"after {row['async_commit_s']:.2f}s | step {row['step_s']:.2f}s, while writing "
                  f"{row['step_while_writing_s']:.2f}s | checkpoint {row['checkpoint_gib']:.2f} GiB")
            print(f"  where the time went: synchronous ({describe_phases(row['sync_phases_s'])}); asynchronous "
                  f"stall ({describe_phases(row['stall_phases_s'])})")
    finally:
        trainer.close()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if not k.endswith("_phases_s")}
    print(f"\nmedian of {len(rows)} round(s): synchronous save {med['sync_save_s']:.2f}s (baseline) | asynchronous "
          f"save stalls the loop {med['async_stall_s']:.2f}s => stall / synchronous = {med['stall_over_sync']:.3f}; "
          f"committed after {med['async_commit_s']:.2f}s; step {med['step_s']:.2f}s without a save, "
          f"{med['step_while_writing_s']:.2f}s while the writer works; {med['checkpoint_gib']:.2f} GiB per checkpoint")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "size": args.size, "layout": args.layout,
                                               "frames": frames,
                                               "first_round": first, "rounds": rows, "median": med}, indent=1))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
