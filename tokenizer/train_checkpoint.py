"""Training checkpoints of the tokenizer: both engines plus each rank's trainer state, for exact resume.

Layout (docs/checkpoints.md, "Tokenizer checkpoints")::

    <run>/checkpoints/step_XXXXXXXX/
        autoencoder/ discriminator/   DeepSpeed engine checkpoints: weights, ZeRO partitions, LR schedule
        trainer_rankNNNNN.pt          this rank's step, samples, LeCAM EMAs, RNG states, data positions
        trainer_state.json            rank 0: step, samples, world size, precision, ZeRO stage, logger run id
        config.yaml                   the resolved recipe
        COMMITTED                     written last

Design decisions:
- Written with the save protocol of the AR trainer (:func:`videoar_common.atomic.save_committed_step`):
  every rank writes its part, rank 0 commits once all are on disk, then prunes to ``keep_last``.
- Resume uses the newest committed step *as rank 0 sees it*, broadcast: file systems can disagree for a
  moment, and every rank must load the same step.
- A checkpoint is bound to its world size (ZeRO partitions and data positions cannot be resharded) and to
  the ``model`` / ``discriminator`` recipe sections; anything else is refused with the reason, before
  anything is trained or written (:class:`ResumeRefused`).
"""
from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tokenizer.train_config import TokenizerTrainConfig
from tokenizer.train_engines import Engines
from videoar_common.atomic import atomic_write_bytes, atomic_write_json, latest_committed, save_committed_step
from videoar_common.config import (config_changes, config_to_dict, describe_changes, load_config,
                                   save_resolved_config)
from videoar_common.distributed import DistContext
from videoar_common.exit_codes import InputError
from videoar_common.lr_schedule import schedule_changes
from videoar_common.run_logging import get_logger

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"


class ResumeRefused(InputError, RuntimeError):
    """The run directory's checkpoint cannot continue under this job (world size, recipe, data sources,
    or an init source that does not fit): nothing was trained or written."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"trainer_rank{rank:05d}.pt"


class TrainCheckpoints:
    """Save, find, check and load the step directories under ``<run_dir>/checkpoints``."""

    def __init__(self, run_dir: Path, cfg: TokenizerTrainConfig, ctx: DistContext):
        self.root, self.cfg, self.ctx = Path(run_dir) / CHECKPOINT_DIR, cfg, ctx

    def agreed_latest(self) -> Path | None:
        """Collective: rank 0's view of the newest committed checkpoint, on every rank."""
        found = [str(latest_committed(self.root) or "")]
        if self.ctx.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        return Path(found[0]) if found[0] else None

    def save(self, step: int, engines: Engines, rank_state: dict, trainer_state: dict) -> Path:
        """Collective: both engines, this rank's ``rank_state`` and rank 0's ``trainer_state`` (JSON)."""
        def write(target: Path) -> None:
            for engine, tag in engines.tagged():
                engine.save_checkpoint(str(target), tag=tag, save_latest=False)
            buf = io.BytesIO()
            torch.save(rank_state, buf)
            atomic_write_bytes(rank_file(target, self.ctx.rank), buf.getvalue())
            if self.ctx.is_main:
                save_resolved_config(self.cfg, target)
                atomic_write_json(target / TRAINER_STATE_FILE, {**trainer_state, "time": time.time()})

        target = save_committed_step(self.root, step, self.ctx, write, keep_last=self.cfg.checkpoint.keep_last)
        get_logger().info("saved checkpoint %s", target)
        return target

    def check_compatible(self, ckpt: Path) -> None:
        """:class:`ResumeRefused` when ``ckpt`` was written by another world size or another model recipe."""
        state = json.loads((ckpt / TRAINER_STATE_FILE).read_text())
        if state["world_size"] != self.ctx.world_size:
            raise ResumeRefused(f"{ckpt} was written by {state['world_size']} ranks, this job has "
                                f"{self.ctx.world_size}: ZeRO partitions and data positions cannot be resharded")
        saved = config_to_dict(load_config(type(self.cfg), ckpt / "config.yaml"))
        for section in ("model", "discriminator"):
            changes = config_changes(saved[section], getattr(self.cfg, section), f"{section}.", sources=self.cfg)
            if changes:  # the knob the recipe changed first, then what follows from it
                raise ResumeRefused(f"{ckpt}: recipe changed since the checkpoint was written "
                                    f"({describe_changes(changes)}); start a new run directory")

    def load(self, ckpt: Path, engines: Engines) -> dict:
        """Load both engines (weights, ZeRO partitions, schedules) and return this rank's trainer state."""
        for engine, tag in engines.tagged():
            path, _ = engine.load_checkpoint(str(ckpt), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"{ckpt}: DeepSpeed could not load the {tag} engine")
            _apply_schedule(engine.lr_scheduler, tag)
        return torch.load(rank_file(ckpt, self.ctx.rank), map_location="cpu", weights_only=False)


def _apply_schedule(scheduler, tag: str) -> None:
    """After a load, the recipe's schedule at the restored step sets the learning rate: DeepSpeed loads the
    ZeRO optimizer state (with the saved param-group lr) after the scheduler."""
    changed = schedule_changes(scheduler.loaded_state or {}, scheduler)
    if changed:
        get_logger().warning("the %s LR schedule differs from the checkpoint's; continuing with the recipe's: %s",
                             tag, ", ".join(changed))
    scheduler.step(0)
