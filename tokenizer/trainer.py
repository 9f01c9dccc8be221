"""Tokenizer training with DeepSpeed: two engines (autoencoder, discriminator), exact resume.

The loop, with the run infrastructure it shares with the AR trainer (``videoar_common``): preemption
(signals, wall-clock limit, requeue marker, exit codes), the numerics guard, the LR schedule, the
checkpoint commit protocol and the run logger. The parts of a step live beside it:

- :mod:`tokenizer.train_data`: manifests or the synthetic corpus, clip streams, held-out batches;
- :mod:`tokenizer.train_engines`: initial weights, the two DeepSpeed engines and their LR schedules;
- :mod:`tokenizer.train_step`: one optimizer step (a window of micro-batches) and its loss check;
- :mod:`tokenizer.train_checkpoint`: step directories, compatibility checks, exact resume.

Design decisions:
- **Our step counter counts applied steps only**: a window that the numerics guard rejects (non-finite
  loss or gradient norm on any rank, decided on all ranks together) changes no weight, schedule or
  counter, and is never checkpointed. ``numerics.on_nonfinite`` then skips its data, rolls back to the
  newest checkpoint, or stops (exit 3).
- **Exact resume**: a checkpoint holds both engines, the LeCAM EMAs, RNG states, each rank's data
  position and the logger run id; on CPU (fp32, gloo) the resumed losses equal the uninterrupted run's
  bit for bit.
- **Stopping**: ``stop_after`` saves and exits 0; a signal or ``preemption.time_limit_minutes`` on any
  rank saves on every rank, writes ``REQUEUE_REQUESTED`` and exits 75, as ``videoar train`` does.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from data_prep.clip_dataset import REJECTS_FILE, RejectLog
from tokenizer.checkpoint import TOKENIZER_EXPORT_DIR, save_tokenizer
from tokenizer.discriminator import Discriminator3D
from tokenizer.evaluate import evaluate_tokenizer
from tokenizer.losses import TokenizerLoss
from tokenizer.model import VideoTokenizer
from tokenizer.train_checkpoint import CHECKPOINT_DIR, ResumeRefused, TrainCheckpoints, rng_state, set_rng_state
from tokenizer.train_config import TokenizerTrainConfig, resolve_batch
from tokenizer.train_data import DataSourcesChanged, TrainStreams, held_out_batches, prepare_data
from tokenizer.train_engines import build_engines, fp32_tokenizer_state, init_weights, resolve_precision
from tokenizer.train_step import Window, WindowRunner, reduce_terms
from videoar_common.atomic import is_committed, latest_committed, step_dir_name
from videoar_common.config import config_to_dict, save_resolved_config
from videoar_common.distributed import DistContext
from videoar_common.exit_codes import REQUEUE_EXIT_CODE
from videoar_common.numerics import NumericsError, NumericsGuard
from videoar_common.preemption import PreemptionWatcher, clear_requeue, request_requeue
from videoar_common.run_logging import METRICS_FILE, RunLogger, get_logger, plot_metrics, read_metrics

NONFINITE_LOG = "nonfinite.jsonl"
PLOT_KEYS = ("g_total", "rec", "psnr", "commit", "entropy", "d_total", "gan_g", "lr")


class TokenizerTrainer:
    """Engines, data streams, guard and sinks of one job, and its loop (see the module docstring)."""

    def __init__(self, cfg: TokenizerTrainConfig, ctx: DistContext, run_dir: str | Path):
        cfg = resolve_batch(cfg, ctx.world_size)
        self.cfg, self.ctx, self.run_dir = cfg, ctx, Path(run_dir)
        self.log = get_logger()
        self.precision = resolve_precision(cfg, ctx)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.paths = prepare_data(cfg, self.run_dir, ctx)
        self.checkpoints = TrainCheckpoints(self.run_dir, cfg, ctx)
        torch.manual_seed(cfg.seed)  # same init on every rank (DeepSpeed also broadcasts rank 0's)
        tokenizer, discriminator = VideoTokenizer(cfg.model), Discriminator3D(cfg.discriminator)
        self.resume_from = self.checkpoints.agreed_latest()
        if self.resume_from is None:
            init_weights(tokenizer, cfg, self.run_dir, ctx)  # before the engines copy the weights
        self.loss = TokenizerLoss(cfg.loss).to(ctx.device, self.dtype)
        self.engines = build_engines(cfg, ctx, tokenizer, discriminator, self.precision)
        self.rejects = RejectLog(self.run_dir / REJECTS_FILE, ctx.rank)
        self.streams = TrainStreams(cfg, self.paths, ctx, self.rejects)
        self.runner = WindowRunner(cfg, ctx, self.engines, self.loss, self.dtype)
        self.guard = NumericsGuard(cfg.numerics.guard_config())
        self.step = self.samples = self.steps_this_job = 0
        self.saved_at = -1
        self.logger: RunLogger | None = None

    @property
    def tokenizer(self) -> VideoTokenizer:
        return self.engines.tokenizer

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> int:
        """Run to ``steps`` (or until stopped); returns the process exit code."""
        resumed = self.resume()
        self._open_run()
        if not resumed:
            self.evaluate(step_dir_name(0))
        bar = self._progress()
        try:
            with PreemptionWatcher(self.cfg.preemption) as watcher:
                while self.step < self.cfg.steps:
                    if self._train_step(bar):
                        self._save_and_evaluate_when_due()
                        if self._stop_after_reached():
                            return self._stop_after()
                    if watcher.should_stop(self.ctx):
                        return self._preempted(watcher.local_reason() or "a signal or time limit on another rank")
                return self._finish()
        finally:
            if bar is not None:
                bar.close()

    def _train_step(self, bar) -> bool:
        """Collective: one optimizer step; returns whether it was applied."""
        t0 = time.perf_counter()
        stream, image_step = self.streams.for_step(self.step)
        window = self.runner.run(stream, image_step=image_step, gan=self.loss.gan_active(self.step), step=self.step)
        self.samples += int(window.terms["clips"]) * self.ctx.world_size
        reason = self._verdict(window)
        if reason is not None:
            self._on_bad_step(reason)
            if bar is not None:
                bar.n = self.step  # a rollback moves the step back
                bar.refresh()
            return False
        terms = reduce_terms(window.terms, self.ctx)
        self._after_good_step(terms, time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{terms.get('g_total', float('nan')):.4f}", psnr=f"{terms.get('psnr', 0):.2f}")
        return True

    def _save_and_evaluate_when_due(self) -> None:
        cfg = self.cfg
        if self.step % cfg.checkpoint.every == 0 or self.step == cfg.steps:
            self.save()
        if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.steps:
            self.evaluate(step_dir_name(self.step))

    def _stop_after_reached(self) -> bool:
        cfg = self.cfg
        return bool(cfg.stop_after) and self.steps_this_job >= cfg.stop_after and self.step < cfg.steps

    def _stop_after(self) -> int:
        self._save_unless_saved()
        self.log.info("stopped after %d steps in this job (stop_after); rerun to resume", self.steps_this_job)
        return 0

    def _preempted(self, reason: str) -> int:
        """Every rank: save the current step, ask for a requeue (rank 0, after the commit), exit 75."""
        self._save_unless_saved()
        if self.ctx.is_main:
            request_requeue(self.run_dir, self.step, reason)
        self.log.warning("stopping at step %d (%s): saved, exiting with %d for requeue", self.step, reason,
                         REQUEUE_EXIT_CODE)
        return REQUEUE_EXIT_CODE

    def _finish(self) -> int:
        self._save_unless_saved()
        self.export()
        self.evaluate(step_dir_name(self.step))
        if self.ctx.is_main:
            self._plot()
        return 0

    # --- after a step ---------------------------------------------------------------------------
    def _verdict(self, window: Window) -> str | None:
        """Collective: the shared guard's reason to reject this step (same on every rank), or None.
        Raises NumericsError past numerics.max_nonfinite bad steps in this job."""
        try:
            reason = self.guard.check(window.loss, window.grad_norm, self.ctx)
        except NumericsError as err:
            message = f"step {self.step}: {err} (numerics.max_nonfinite={self.cfg.numerics.max_nonfinite})"
            self._record_bad(message)
            raise NumericsError(message) from None
        if (reason is None) != window.applied:
            # The guard's inputs make it reject exactly the windows DeepSpeed dropped; anything else means a
            # step with NaN gradients was applied, or a good one dropped.
            raise RuntimeError(f"step {self.step}: DeepSpeed {'applied' if window.applied else 'dropped'} the "
                               f"optimizer step but the numerics guard says {reason or 'good'}; refusing to continue")
        return reason

    def _on_bad_step(self, reason: str) -> None:
        """Every rank together: record the bad step, then apply numerics.on_nonfinite."""
        self._record_bad(reason)
        policy = self.cfg.numerics.on_nonfinite
        if policy == "stop":
            raise NumericsError(f"step {self.step}: {reason} (numerics.on_nonfinite=stop); nothing was saved "
                                "after the last good step")
        if policy == "rollback":
            self._rollback(reason)

    def _record_bad(self, reason: str) -> None:
        policy = self.cfg.numerics.on_nonfinite
        self.log.warning("step %d: %s; policy %s (bad steps this job: %d)", self.step, reason, policy,
                         self.guard.total)
        _append_jsonl(self.run_dir / NONFINITE_LOG, {"rank": self.ctx.rank, "step": self.step, "reason": reason,
                                                      "policy": policy, "samples": self.samples})
        if self.logger is not None:
            self.logger.log(self.step, {"nonfinite": 1, "bad_steps": self.guard.total})

    def _rollback(self, reason: str) -> None:
        latest = self.checkpoints.agreed_latest()
        if latest is None:
            raise NumericsError(f"step {self.step}: {reason}; numerics.on_nonfinite=rollback but no committed "
                                "checkpoint exists yet")
        self._load(latest, restore_data=False)
        self.log.warning("rolled back to %s; the data consumed since then is skipped", latest.name)

    def _after_good_step(self, terms: dict[str, float], step_time: float) -> None:
        if "logits_real" in terms:
            self.loss.lecam.update(terms["logits_real"], terms["logits_fake"])
        self.step += 1
        self.steps_this_job += 1
        self._log_step(terms, step_time)
        if not sys.stderr.isatty() and self.step % max(1, self.cfg.steps // 20) == 0:
            self.log.info("step %d/%d: loss %.4f rec %.4f psnr %.2f dB, %.2f s/step", self.step, self.cfg.steps,
                          terms.get("g_total", float("nan")), terms.get("rec", float("nan")),
                          terms.get("psnr", float("nan")), step_time)

    def _log_step(self, terms: dict[str, float], step_time: float) -> None:
        if self.logger is None or self.step % self.cfg.logging.log_every:
            return
        record = dict(terms)
        clips = record.pop("clips") * self.ctx.world_size  # mean over ranks x ranks
        ae, disc = self.engines.ae, self.engines.disc
        record.update(lr=ae.get_lr()[0], disc_lr=disc.get_lr()[0], samples=self.samples, step_time=step_time,
                      bad_steps=self.guard.total, clips_per_s=clips / max(step_time, 1e-9))
        norm = ae.get_global_grad_norm()
        if norm is not None:
            record["grad_norm"] = float(norm)
        self.logger.log(self.step, record)

    # --- checkpoints --------------------------------------------------------------------------
    def save(self) -> Path:
        """Collective: write and commit the checkpoint of the current step."""
        rank_state = {"step": self.step, "samples": self.samples, "lecam": self.loss.lecam.state_dict(),
                      "rng": rng_state(), "world_size": self.ctx.world_size, "rank": self.ctx.rank,
                      **self.streams.state_dict()}
        trainer_state = {"step": self.step, "samples": self.samples, "world_size": self.ctx.world_size,
                         "precision": self.precision, "zero_stage": self.cfg.deepspeed.zero_stage,
                         "logger_run_id": self.logger.run_id if self.logger else ""}
        path = self.checkpoints.save(self.step, self.engines, rank_state, trainer_state)
        self.saved_at = self.step
        return path

    def _save_unless_saved(self) -> None:
        if self.saved_at != self.step:
            self.save()

    def resume(self) -> bool:
        """Load the newest committed checkpoint found at start-up; False for a fresh run."""
        latest = self.resume_from
        if latest is None:
            return False
        self.checkpoints.check_compatible(latest)
        self._load(latest)
        self.log.info("resumed from %s (step %d)", latest, self.step)
        return True

    def _load(self, ckpt: Path, restore_data: bool = True) -> None:
        state = self.checkpoints.load(ckpt, self.engines)
        self.step = self.saved_at = state["step"]
        self.loss.lecam.load_state_dict(state["lecam"])
        set_rng_state(state["rng"])
        if restore_data:
            self.samples = state["samples"]
            try:
                self.streams.load_state_dict(state)
            except DataSourcesChanged as err:
                raise ResumeRefused(f"{ckpt}: {err}") from None

    # --- export and evaluation ----------------------------------------------------------------
    def export(self) -> Path:
        """Write ``<run_dir>/tokenizer`` (a self-describing tokenizer directory) for downstream stages."""
        state = fp32_tokenizer_state(self.engines, self.precision)
        out = self.run_dir / TOKENIZER_EXPORT_DIR
        if self.ctx.is_main:
            model = VideoTokenizer(self.cfg.model)
            model.load_state_dict(state)
            digest = save_tokenizer(model, out, extra_meta={"step": self.step, "run_dir": str(self.run_dir)})
            self.log.info("exported tokenizer %s (content hash %s)", out, digest[:12])
        self.ctx.barrier()
        return out

    def evaluate(self, tag: str) -> dict | None:
        """Held-out evaluation on rank 0 (others wait); writes ``<run_dir>/eval/<tag>/``."""
        result = None
        if self.ctx.is_main and self.paths.eval_manifest:
            batches = held_out_batches(self.cfg, self.paths.eval_manifest, self.ctx, self.rejects)
            e = self.cfg.eval
            result = evaluate_tokenizer(self.tokenizer, batches, device=self.ctx.device,
                                        out_dir=self.run_dir / "eval" / tag, grid_clips=e.grid_clips,
                                        grid_frames=e.grid_frames, title=f"{self.run_dir.name} {tag}")
            self.log.info("eval %s: PSNR %.2f dB, SSIM %.4f, bit entropy %.3f (%d clips)", tag, result["psnr"],
                          result["ssim"], result["bits/entropy"], result["clips"])
            if self.logger is not None:
                self.logger.log(self.step, {f"eval/{k}": v for k, v in result.items()})
        self.ctx.barrier()
        return result

    # --- sinks --------------------------------------------------------------------------------
    def _open_run(self) -> None:
        self.logger = RunLogger(self.run_dir, self.cfg.logging, rank=self.ctx.rank,
                                config_dict=config_to_dict(self.cfg))
        if self.ctx.is_main:
            clear_requeue(self.run_dir)  # this job is the requeued one
            save_resolved_config(self.cfg, self.run_dir)

    def _progress(self):
        # A bar only on a terminal: in SLURM/pipe logs tqdm's carriage returns make one endless line;
        # there, _after_good_step logs a plain line every 5% of the run instead.
        if not (self.ctx.is_main and self.cfg.logging.progress_bar and sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.steps, initial=self.step, desc="tokenizer", unit="step", dynamic_ncols=True)

    def _plot(self) -> None:
        metrics = self.run_dir / METRICS_FILE
        present = {k for r in read_metrics(metrics) for k in r} if metrics.is_file() else set()
        keys = [k for k in PLOT_KEYS if k in present]
        if keys:
            plot_metrics(metrics, self.run_dir / "loss_curves.png", keys=keys, title=self.run_dir.name)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None


def _append_jsonl(path: Path, record: dict) -> None:
    """One line appended with O_APPEND: ranks writing the same file never interleave within a line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def run_with_init_stage(cfg: TokenizerTrainConfig, ctx: DistContext, run_dir: Path, recipe_dir: Path,
                        recipe_name: str = "the recipe") -> int:
    """Train ``cfg`` in ``run_dir``; when init.from_recipe is set and the run has no checkpoint yet, first
    train that recipe in ``run_dir/init/<name>`` (resumable, skipped once exported) and start from its
    export. Says the plan (stages, steps, directories) before anything is built. Returns the exit code (a
    stopped or preempted first stage returns its code)."""
    from videoar_common.config import load_config
    if cfg.init.from_recipe and latest_committed(run_dir / CHECKPOINT_DIR) is None:
        recipe = Path(cfg.init.from_recipe)
        recipe = recipe if recipe.is_absolute() else recipe_dir / recipe
        stage_dir = run_dir / "init" / recipe.stem
        first = load_config(TokenizerTrainConfig, recipe)
        done = is_committed(stage_dir / TOKENIZER_EXPORT_DIR)
        _announce_stages(first, recipe, stage_dir, done, cfg, recipe_name, run_dir)
        if not done:
            code = _train_once(first, ctx, stage_dir)
            if code:
                return code
        ctx.barrier()
        cfg = dataclasses.replace(cfg, init=dataclasses.replace(
            cfg.init, from_recipe="", from_tokenizer=str(stage_dir / TOKENIZER_EXPORT_DIR)))
    elif cfg.init.from_recipe:  # resuming: the checkpoint holds the weights
        cfg = dataclasses.replace(cfg, init=dataclasses.replace(cfg.init, from_recipe="", reinflate=False))
    return _train_once(cfg, ctx, run_dir)


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _announce_stages(first: TokenizerTrainConfig, first_recipe: Path, first_dir: Path, first_done: bool,
                     cfg: TokenizerTrainConfig, recipe_name: str, run_dir: Path) -> None:
    """Up front, what a two-stage run will train: a quick try with ``--set steps=1`` must not find out
    after minutes that the image stage (with its own step count; --set does not reach it) ran first."""
    log = get_logger()
    resumed = latest_committed(first_dir / CHECKPOINT_DIR)
    first_what = ("done earlier (its export exists), skipped" if first_done else
                  f"{_steps(first.steps)} in {first_dir}" + (f", resuming from {resumed.name}" if resumed else ""))
    log.info("stage 1 of 2: init.from_recipe=%s: %s (its own recipe: --set applies to stage 2 only; "
             "--set init.from_recipe= skips this stage)", first_recipe, first_what)
    how = ", re-inflated" if cfg.init.reinflate else ""
    log.info("stage 2 of 2: %s: %s in %s, starting from stage 1's export%s", recipe_name, _steps(cfg.steps),
             run_dir, how)


def _train_once(cfg: TokenizerTrainConfig, ctx: DistContext, run_dir: Path) -> int:
    trainer = TokenizerTrainer(cfg, ctx, run_dir)
    try:
        return trainer.train()
    finally:
        trainer.close()
