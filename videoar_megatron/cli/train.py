"""``videoar train``: train the VideoAR transformer from a recipe (parse → build → train → close)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from videoar_common.exit_codes import EXIT_NUMERICS, InputError
from videoar_megatron.cli._recipe_args import add_recipe_args, load_recipe


def build_parser(prog: str) -> argparse.ArgumentParser:
    from videoar_megatron.training.config import TrainConfig
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the VideoAR transformer on token shards with Megatron-core (TP x PP x DP; "
                    "Megatron DDP, distributed optimizer and pipeline schedules on GPU; a CPU path for "
                    "PP=1). Launch with torchrun (one process per GPU) or slurm/train_ar.sbatch. Re-running "
                    "the same command resumes from the newest committed checkpoint of the run directory. "
                    "Writes config.yaml, metrics.jsonl, sample_ids.jsonl, loss_curves.png and checkpoints/. "
                    "Exit codes: 0 done; 75 saved after a signal or the wall-clock limit, requeue me "
                    "(REQUEUE_REQUESTED is written too); 2 bad recipe or checkpoint; 3 too many non-finite "
                    "steps (nothing saved after them).")
    add_recipe_args(p, TrainConfig, recipe_help="recipe YAML (see recipes/ar/)", set_example="train.steps=200")
    p.add_argument("--run-dir", default=None,
                   help="run directory (default runs/ar/<recipe name>); never deleted, resumed if it holds checkpoints")
    p.add_argument("--load", default=None, metavar="CKPT",
                   help="initial weights when there is nothing to resume (= checkpoint.load): a committed step "
                        "directory or a run's checkpoint root, any TP/PP layout (the previous stage)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe at its target world size, print parameters per stage and the "
                        "memory estimate per GPU, exit 0 (fits), 1 (does not fit) or 2 (invalid); builds nothing")
    p.add_argument("--seed-checkpoint", action="store_true",
                   help="write the initial weights (model only) to <run dir>/seed/step_00000000 and exit; runs "
                        "at other layouts then start from identical weights with --load <run dir>/seed")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str], prog: str = "videoar train") -> int:
    from videoar_megatron.training.config import TrainConfig
    args = build_parser(prog).parse_args(argv)
    cfg = load_recipe(args, TrainConfig, extra_overrides=[f"checkpoint.load={args.load}"] if args.load else [])
    if args.print_config:
        from videoar_common.config import dump_config
        print(dump_config(cfg), end="")
        return 0
    if args.dry_run:
        return _dry_run(cfg, prog)
    run_dir = Path(args.run_dir or Path("runs/ar") / Path(args.recipe).stem)
    return _train(cfg, run_dir, prog, seed_only=args.seed_checkpoint)


def _dry_run(cfg, prog: str) -> int:
    from videoar_megatron.training.dry_run import dry_run
    try:
        fits, report = dry_run(cfg)
    except ValueError as e:
        raise InputError(f"recipe invalid at its target size: {e}") from e
    print(report)
    return 0 if fits else 1


def _train(cfg, run_dir: Path, prog: str, seed_only: bool) -> int:
    """Refusals (resume, shards, checkpoint.load; a sample the recipe cannot train on, found mid-run) are
    InputErrors: the dispatcher exits 2 on them, after ``trainer.close()``."""
    from videoar_common.distributed import read_launch_env
    from videoar_common.numerics import NumericsError
    from videoar_common.run_logging import setup_console_logging
    from videoar_megatron.training.trainer import build_trainer
    log = setup_console_logging(read_launch_env()[0])
    trainer = None
    try:
        try:
            trainer = build_trainer(cfg, run_dir)
            if seed_only:
                log.info("seed checkpoint written to %s", trainer.save_seed())
                return 0
            what = trainer.restore()
            every = cfg.checkpoint.save_every
            log.info("%s: %s; training steps %d to %d (train.steps), %s, metrics in %s", run_dir, what,
                     trainer.step + 1, cfg.train.steps, f"a checkpoint every {every}" if every else
                     "checkpoint.save_every=0", run_dir / "metrics.jsonl")
        except ValueError as e:  # a recipe that cannot run at this world size / on these shards
            raise InputError(str(e)) from e
        code = trainer.train()
        log.info("%s at step %d of %d", "stopped" if code else "done", trainer.step, cfg.train.steps)
        return code
    except NumericsError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_NUMERICS
    finally:
        if trainer is not None:
            trainer.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
