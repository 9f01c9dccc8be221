"""The AR training loop over Megatron-core primitives (the shape of Megatron's
``run_simple_mcore_train_loop.py`` and torchtitan's ``Trainer``): built from a :class:`TrainConfig`,
``restore()`` then ``train()`` then ``close()``.

One step, every rank in the same order (each numbered line is collective):

1. read this replica's step batch, build its micro-batches (all TP/CP/PP ranks of a replica build the
   same ones; randomness from (seed, step, sample id); a CP rank's model keeps its share of each);
2. forward/backward over the micro-batches, gradients reduced over DP x CP (and SP norms over TP) — the
   engine ``train.engine`` picks (:mod:`.engine`: Megatron DDP + schedules, the default on GPU; a
   plain loop on CPU);
3. loss and per-scale metrics summed over all ranks, so every rank holds the same numbers;
4. gradient norm → numerics guard verdict (any rank bad ⇒ all skip) → clip → update → LR schedule
   (:func:`.optim.guarded_step`); a bad step changes nothing and is never checkpointed;
5. sample ids gathered on rank 0 (``sample_ids.jsonl``, the audit trail), metrics logged;
6. a checkpoint written in the background is committed once every rank's writer is done (polled);
7. stop decision (signal on any rank, wall-clock limit) all-reduced; save if due or stopping;
   on a stop, wait for the save's commit, write the requeue marker and return :data:`REQUEUE_EXIT_CODE`.

Saves (``checkpoint.async_save``, default on): the loop stalls while the save is planned and copied to
host memory, a forked writer writes the files, and the commit marker follows once every rank's files
are whole (:class:`.dist_ckpt.AsyncCheckpointer`); a stop and the end of the run wait for that commit.
"""
from __future__ import annotations

import datetime
import gc
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from videoar_common.atomic import step_dir_name
from videoar_common.compile_cache import CompileCache, configure_compile_cache
from videoar_common.config import config_to_dict, save_resolved_config
from videoar_common.distributed import DistContext, init_distributed, shutdown_distributed
from videoar_common.exit_codes import REQUEUE_EXIT_CODE
from videoar_common.lr_schedule import schedule_changes
from videoar_common.numerics import NumericsError, NumericsGuard
from videoar_common.preemption import PreemptionWatcher, clear_requeue, request_requeue
from videoar_common.run_logging import METRICS_FILE, RunLogger, get_logger, plot_metrics
from videoar_megatron.model.context_parallel import sequence_multiple
from videoar_megatron.model.model import build_model_chunks
from videoar_megatron.model.parallel import REPLICA_CONSECUTIVE_ORDER, destroy_model_parallel, init_model_parallel
from videoar_megatron.training import checkpoint as ckpt
from videoar_megatron.training import dist_ckpt
from videoar_megatron.training.audit import SAMPLE_IDS_FILE
from videoar_megatron.training.config import TrainConfig
from videoar_megatron.training.data import TrainData, check_replicas_are_consecutive
from videoar_megatron.training.engine import LocalEngine, MegatronEngine, select_engine
from videoar_megatron.training.metrics import memory_stats, step_flops_per_sample, throughput
from videoar_megatron.training.optim import (build_host_optimizer, build_megatron_optimizer, build_scheduler,
                                             current_lr, guarded_step)

LOSS_CURVES_FILE = "loss_curves.png"
PLOT_KEYS = ("loss", "bit_accuracy", "grad_norm", "lr", "tokens_per_s", "mfu")


def configure_flight_recorder(cfg: TrainConfig, run_dir: Path) -> None:
    """NCCL flight recorder and async error handling, set before the process group exists (GPU only).
    Values already in the environment (a site file) win."""
    if cfg.train.device == "cpu" or not torch.cuda.is_available() or not cfg.comm.flight_recorder_entries:
        return
    dump = run_dir / "flight_recorder"
    dump.mkdir(parents=True, exist_ok=True)
    entries = str(cfg.comm.flight_recorder_entries)
    for key, value in (("TORCH_FR_BUFFER_SIZE", entries), ("TORCH_NCCL_TRACE_BUFFER_SIZE", entries),
                       ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"), ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3"),
                       ("TORCH_FR_DUMP_TEMP_FILE", str(dump / "rank_")),
                       ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(dump / "rank_"))):
        os.environ.setdefault(key, value)


def build_trainer(cfg: TrainConfig, run_dir: str | Path) -> "Trainer":
    """Initialise torch.distributed from the launcher's environment and build the trainer."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    configure_flight_recorder(cfg, run_dir)
    cache = configure_compile_cache(cfg.compile, run_dir)  # before anything compiles
    ctx = init_distributed(device=cfg.train.device, timeout_s=cfg.comm.init_timeout_s)
    return Trainer(cfg, run_dir, ctx, compile_cache=cache, started=started)


def describe_phases(seconds: dict[str, float]) -> str:
    """``state dict 1.20s, plan 0.30s, ...``: a save's seconds by phase (:attr:`Trainer.last_save_phases`)."""
    return ", ".join(f"{name.replace('_', ' ')} {s:.2f}s" for name, s in seconds.items())


class Trainer:
    """Model, engine, optimizer, schedule, data and guards of one rank; see the module docstring."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, ctx: DistContext, *, compile_cache: CompileCache | None = None,
                 started: float | None = None):
        self.cfg, self.run_dir, self.ctx = cfg, Path(run_dir), ctx
        self.compile_cache, self.started = compile_cache, time.perf_counter() if started is None else started
        self.log = get_logger()
        self.layout = cfg.check_layout(ctx.world_size, "this launch")
        self._check_device()
        self.engine_name = select_engine(cfg.train.engine, ctx.device, cfg.parallel)
        self.groups = init_model_parallel(ctx, cfg.parallel, seed=cfg.train.seed, order=REPLICA_CONSECUTIVE_ORDER)
        check_replicas_are_consecutive(self.groups)
        self.model_chunks = self._build_model()
        self.engine, self.optimizer = self._build_engine()
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.decay_steps)
        self.guard = NumericsGuard(cfg.numerics)
        self.data = TrainData(cfg.data, cfg.model, self.layout, seed=cfg.train.seed, device=ctx.device,
                              pad_to_multiple=sequence_multiple(cfg.parallel))
        self.step = self.consumed_samples = self.skipped_steps = self.steps_this_job = 0
        self.last_saved = -1
        self.last_save_phases: dict[str, float] = {}
        """Seconds of the last save by phase: ``state_dict`` (the sharded state built), then for a synchronous
        save ``write_and_commit``, for an asynchronous one what the step loop waited for besides
        (:attr:`.dist_ckpt.AsyncCheckpointer.last_stall`)."""
        self.checkpointer = (dist_ckpt.AsyncCheckpointer(ctx, write_delay_s=cfg.debug.slow_async_save_s,
                                                         worker=cfg.checkpoint.async_worker)
                             if cfg.checkpoint.async_save else None)
        self._last_skipped = False
        self.run_id: str | None = None
        self.logger: RunLogger | None = None
        self._flops_per_sample: dict = {}
        self._log_start()

    # --- construction -------------------------------------------------------------------------
    def _log_start(self) -> None:
        """Rank 0: the compile cache, the step's schedule, and the attention kernel of each data source's
        sequence."""
        if not self.ctx.is_main:
            return
        self.log.info("step schedule: %s", self.engine.schedule)
        if self.compile_cache is not None:
            self.log.info("%s", self.compile_cache.describe())
        model = self.model_chunks[0]  # every chunk has the same attention settings
        backend = model.backend(self.ctx.device)
        for source in self.data.sources:
            layout = source.sequence_layout
            kernel = model.flex_kernel_for(layout.seq_len)
            what = "dense-mask SDPA" if backend == "sdpa" else f"FlexAttention, {kernel.name} kernel ({kernel.reason})"
            self.log.info("attention for data source %s (%d tokens): %s", source.cfg.name, layout.seq_len, what)

    def _check_device(self) -> None:
        if self.ctx.device.type != "cuda" and self.cfg.train.precision == "bf16":
            raise ValueError("train.precision=bf16 needs CUDA; on CPU set train.precision=fp32")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32

    def _build_model(self) -> list:
        # Same seed on every rank: replicated weights agree across TP/DP ranks; TP-split weights come
        # from Megatron's per-TP-rank CUDA streams (GPU) or from full host weights split (CPU).
        torch.manual_seed(self.cfg.train.seed)
        return build_model_chunks(self.cfg.model, self.cfg.parallel, self.groups, device=self.ctx.device,
                                  params_dtype=self.dtype)

    @property
    def model(self):
        """This rank's model: the one chunk, or the list of virtual-pipeline chunks."""
        return self.model_chunks[0] if len(self.model_chunks) == 1 else self.model_chunks

    def _build_engine(self):
        cfg = self.cfg
        if self.engine_name == "megatron":
            engine = MegatronEngine(self.model_chunks, cfg.model.loss,
                                    distributed_optimizer=cfg.optim.distributed_optimizer)
            optimizer = build_megatron_optimizer(engine.model_chunks, cfg.optim, bf16=cfg.train.precision == "bf16")
            engine.attach_optimizer(optimizer)
            return engine, optimizer
        engine = LocalEngine(self.model, cfg.model.loss, self.groups, sequence_parallel=cfg.parallel.sequence_parallel)
        return engine, build_host_optimizer(self.model, cfg.optim)

    # --- restore ------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / dist_ckpt.CHECKPOINT_DIR

    def restore(self) -> str:
        """Resume from the newest committed checkpoint of the run, else load initial weights
        (``checkpoint.load``), else start fresh. Returns what happened and on which engine (for the log)."""
        latest = dist_ckpt.find_resume_checkpoint(self.checkpoint_root)
        if latest is not None and not self.cfg.checkpoint.resume:
            # A fresh run here would restart step numbers among the old, higher ones: keep-last-k would
            # prune its new saves as the oldest, and equal step numbers would overwrite old checkpoints.
            raise ckpt.ResumeError(f"checkpoint.resume=false but {self.checkpoint_root} already holds committed "
                                   f"checkpoints (newest: {latest.name}); start the new run in another --run-dir "
                                   f"(with checkpoint.load={latest} for its weights), or resume this one")
        if latest is not None:
            what = self._resume(latest)
        elif self.cfg.checkpoint.load:
            path = ckpt.resolve_weights_path(self.cfg.checkpoint.load)
            ckpt.load_initial_weights(path, self.model, self.optimizer, self.cfg, self.data.main.manifest, self.ctx)
            what = f"initial weights from {path}"
        else:
            what = "fresh start"
        self._open_run(latest is not None)
        return f"{what} (train.engine: {self.engine_name})"

    def _resume(self, path: Path) -> str:
        saved = dist_ckpt.read_train_state(path)
        ckpt.check_resumable(saved, cfg=self.cfg, manifests=self.data.manifests(), optimizer=self.optimizer)
        same = ckpt.same_layout(saved, self.layout)
        template = ckpt.sharded_state(self.model, self.optimizer, self.ctx, is_loading=True, with_rng=same)
        state, _ = dist_ckpt.load_checkpoint(path, template)
        dist_ckpt.apply_model_state(self.model, state, path)
        ckpt.load_optimizer_state(self.optimizer, state[dist_ckpt.OPTIMIZER_KEY])
        if same:
            ckpt.set_rng_state(state["rng_state"], self.ctx.device)
        changed = schedule_changes(saved["scheduler"], self.scheduler)
        if changed:
            self.log.warning("the LR schedule differs from the checkpoint's; continuing with the recipe's: %s",
                             ", ".join(changed))
        self.scheduler.load_state_dict(saved["scheduler"])
        self.guard.load_state_dict(saved["numerics"])
        self.data.load_state_dict(saved["data_state"])
        self.step = self.last_saved = saved["step"]
        self.consumed_samples, self.skipped_steps = saved["consumed_samples"], saved["skipped_steps"]
        self.run_id = saved["logger_run_id"]
        s = saved["layout"]
        cp = f" cp={s.get('cp', 1)}" if max(s.get("cp", 1), self.layout.cp) > 1 else ""
        moved = "" if same else f" (saved at tp={s['tp']}{cp} pp={s['pp']} dp={s['dp']}, resharded)"
        return f"resumed from {path} at step {self.step}{moved}"

    def _open_run(self, resumed: bool) -> None:
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clear_requeue(self.run_dir)
            save_resolved_config(self.cfg, self.run_dir)
            if self.cfg.metrics.audit_sample_ids:
                with open(self.run_dir / SAMPLE_IDS_FILE, "a") as f:
                    f.write(json.dumps({"start_step": self.step, "resumed": resumed}) + "\n")
        self.logger = RunLogger(self.run_dir, self.cfg.logging, rank=self.ctx.rank, run_id=self.run_id,
                                config_dict=config_to_dict(self.cfg))
        self.run_id = self.logger.run_id if self.ctx.is_main else self.run_id
        self.run_id = _broadcast_object(self.run_id, self.ctx)

    # --- one step -----------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step (collective); returns its metrics (identical on every rank)."""
        cfg, step = self.cfg, self.step + 1
        t0 = time.perf_counter()
        batch = self.data.next_step(step)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()  # attribute batch building (CFEC requantization) to data_time_s
        data_seconds = time.perf_counter() - t0
        if self.steps_this_job == 0:
            self._check_replica_batch(batch.sample_ids)
        inject = step in cfg.debug.nan_at_steps and cfg.debug.nan_rank in (-1, self.ctx.rank)
        outs = self.engine.forward_backward(batch.microbatches, inject_nan=inject)
        losses = self._reduce_losses(outs, batch.microbatches[0].layout.num_scales, batch.source)
        lr = current_lr(self.optimizer)
        outcome = guarded_step(self.optimizer, self.scheduler, self.guard, losses["loss"], cfg.optim.clip_grad,
                               self.ctx)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.step, self.steps_this_job = step, self.steps_this_job + 1
        self.consumed_samples += self.layout.global_batch_size
        self.skipped_steps += outcome.skipped is not None
        self._audit(batch.sample_ids, batch.source)
        record = {**losses, "lr": lr, "grad_norm": outcome.grad_norm, "skipped": int(outcome.skipped is not None),
                  "consumed_samples": self.consumed_samples, "step_time_s": seconds, "data_time_s": data_seconds,
                  **self._throughput(batch.microbatches[0].layout, seconds), **memory_stats(self.ctx.device)}
        if outcome.skipped:
            record["skip_reason"] = outcome.skipped
            self.log.warning("step %d skipped on every rank: %s", step, outcome.skipped)
        return record

    def _reduce_losses(self, outs, K: int, source: str) -> dict:
        """Mean loss / bit accuracy / per-scale metrics over all micro-batches of all replicas (per-scale
        keys and a per-source loss carry the source name when the run mixes sources)."""
        device = self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")
        vec = torch.zeros(3 + 2 * K, dtype=torch.float64, device=device)
        if outs and self.groups.tp.rank() == 0:  # last pipeline stage, one rank per TP group
            for o in outs:
                # Context-parallel ranks hold shares of one micro-batch's values: summed, counted once.
                vec[0] += o.loss.double().to(device)
                vec[1] += o.bit_accuracy.double().to(device)
                vec[2:2 + K] += o.per_scale_loss_K.double().to(device)
                vec[2 + K:2 + 2 * K] += o.per_scale_acc_K.double().to(device)
                vec[-1] += self.groups.cp.rank() == 0
        if dist.is_initialized() and self.ctx.world_size > 1:
            dist.all_reduce(vec)
        vec = (vec / vec[-1]).tolist()
        out = {"loss": vec[0], "bit_accuracy": vec[1]}
        tag = f"{source}/" if len(self.data.sources) > 1 else ""
        if tag:
            out.update({"source": source, f"loss_{source}": vec[0]})
        out.update({f"{tag}loss_scale{k}": vec[2 + k] for k in range(K)})
        out.update({f"{tag}acc_scale{k}": vec[2 + K + k] for k in range(K)})
        return out

    def _throughput(self, layout, seconds: float) -> dict:
        if layout not in self._flops_per_sample:
            self._flops_per_sample[layout] = step_flops_per_sample(self.cfg.model, layout)
        samples = self.layout.global_batch_size
        peak = self.cfg.metrics.peak_tflops if self.ctx.device.type == "cuda" else None
        return throughput(flops_per_sample=self._flops_per_sample[layout], samples=samples,
                          tokens=samples * (layout.prefix_len + layout.video_len), seconds=seconds,
                          world_size=self.ctx.world_size, peak_tflops=peak)

    def _check_replica_batch(self, sample_ids: list[str]) -> None:
        """Collective, once per job: every rank of a model replica read the same samples (the reader's
        replica-aware sharding is what TP/PP correctness rests on; fail loudly, not with garbage)."""
        for group in (self.groups.mp, self.groups.cp):  # TP x PP, then CP: together the whole replica
            if group.size() == 1:
                continue
            seen = [None] * group.size()
            dist.all_gather_object(seen, sample_ids, group=group)
            if any(s != seen[0] for s in seen):
                raise RuntimeError(f"ranks of one model replica read different samples at step {self.step + 1}: "
                                   f"{[s[:2] for s in seen]}; the shard reader's replication must equal "
                                   f"TP x CP x PP")

    def _audit(self, sample_ids: list[str], source: str) -> None:
        """Rank 0 appends every replica's sample ids of this step to ``sample_ids.jsonl``."""
        if not self.cfg.metrics.audit_sample_ids:
            return
        first = self.groups.tp.rank() == 0 and self.groups.cp.rank() == 0 and self.groups.pp.rank() == 0
        mine = sample_ids if first else None  # one record per replica
        gathered = [None] * self.ctx.world_size if self.ctx.is_main else None
        if dist.is_initialized() and self.ctx.world_size > 1:
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if self.ctx.is_main:
            with open(self.run_dir / SAMPLE_IDS_FILE, "a") as f:
                f.write(json.dumps({"step": self.step, "source": source,
                                    "ids": [g for g in gathered if g is not None]}) + "\n")

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> int:
        """Train to ``train.steps``; returns the process exit code (0, or REQUEUE_EXIT_CODE after a stop)."""
        cfg = self.cfg
        bar = self._progress()
        try:
            with PreemptionWatcher(cfg.preemption) as watcher:
                while self.step < cfg.train.steps:
                    record = self.train_step()
                    self._after_step(record, bar)
                    self._poll_saves()
                    stop = watcher.should_stop(self.ctx)
                    if not record["skipped"] and (stop or self._save_due()):
                        self.save()
                    if stop:
                        self.wait_for_saves()
                        return self._stop(watcher.local_reason() or "a signal or time limit on another rank",
                                          saved=not record["skipped"])
            if cfg.checkpoint.save_at_end and self.last_saved != self.step and not self._last_skipped:
                self.save()
            self.wait_for_saves()
        except NumericsError:
            # Every rank gives up at the same step (the guard's verdict is collective): commit the save
            # of the last good step that is still being written, as a synchronous save would have.
            self.wait_for_saves()
            raise
        finally:
            if bar is not None:
                bar.close()
        self._plot()
        return 0

    def _after_step(self, record: dict, bar) -> None:
        self._last_skipped = bool(record["skipped"])
        if self.logger is not None and (self.step % self.cfg.logging.log_every == 0 or record["skipped"]):
            self.logger.log(self.step, record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['bit_accuracy']:.3f}",
                            lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if self.steps_this_job == 1:
            self._shorten_timeouts()
            if self.ctx.is_main:
                self.log.info("time to the first step: %.1f s from start (the step itself %.1f s, compilation "
                              "included; %s)", time.perf_counter() - self.started, record["step_time_s"],
                              self.compile_cache.describe() if self.compile_cache else "compile cache not set")
        if self.cfg.debug.signal_at_step == self.step and self.ctx.rank == self.cfg.debug.signal_rank:
            os.kill(os.getpid(), signal.SIGUSR1)

    def _save_due(self) -> bool:
        every = self.cfg.checkpoint.save_every
        return bool(every) and self.step % every == 0

    def _stop(self, reason: str, saved: bool) -> int:
        if self.ctx.is_main:
            if saved:
                request_requeue(self.run_dir, self.step, reason)
            self.log.warning("stopping at step %d (%s): %s; exit code %d asks for a requeue", self.step, reason,
                             f"checkpoint step {self.step} committed" if saved
                             else f"step was skipped, nothing saved; the newest checkpoint is step {self.last_saved}",
                             REQUEUE_EXIT_CODE)
        self._plot()
        return REQUEUE_EXIT_CODE

    def save(self) -> Path:
        """Collective: write and commit the checkpoint of the current step. Asynchronously: hand it to the
        background writer (after the previous one's commit); the loop's :meth:`_poll_saves` or
        :meth:`wait_for_saves` commits it."""
        self.wait_for_saves()
        t0 = time.perf_counter()
        state = ckpt.sharded_state(self.model, self.optimizer, self.ctx, is_loading=False)
        state_s = time.perf_counter() - t0
        meta = ckpt.train_state(step=self.step, consumed_samples=self.consumed_samples, cfg=self.cfg,
                                layout=self.layout, data_state=self.data.state_dict(),
                                manifests=self.data.manifests(), schedule=self.data.main.schedule,
                                run_id=self.run_id, scheduler=self.scheduler, guard=self.guard,
                                optimizer=self.optimizer, skipped_steps=self.skipped_steps)
        hook = _crash_before_commit if self.cfg.debug.crash_in_save_at_step == self.step else None
        keep = self.cfg.checkpoint.keep_last
        if self.checkpointer is None:
            path = dist_ckpt.save_checkpoint(self.checkpoint_root, self.step, state, meta, self.ctx, keep_last=keep,
                                             before_commit=hook)
            self.last_save_phases = {"state_dict": state_s, "write_and_commit": time.perf_counter() - t0 - state_s}
            self.log.info("saved %s in %.1fs", path, time.perf_counter() - t0)
        else:
            path = self.checkpointer.save(self.checkpoint_root, self.step, state, meta, keep_last=keep,
                                          before_commit=hook)
            self.last_save_phases = {"state_dict": state_s, **self.checkpointer.last_stall}
            self.log.info("checkpoint %s: the step loop stalled %.2fs (%s); the files are written in the background "
                          "and committed once every rank's are whole", path.name, time.perf_counter() - t0,
                          describe_phases(self.last_save_phases))
        self.last_saved = self.step
        return path

    def _poll_saves(self) -> None:
        """Collective, once per step: commit the background save if every rank's writer is done."""
        if self.checkpointer is None:
            return
        crash_at = self.cfg.debug.crash_in_async_save_at_step
        pending = self.checkpointer.in_flight
        if crash_at and pending is not None and pending.name == step_dir_name(crash_at) and self.step > crash_at:
            _kill_job(f"debug.crash_in_async_save_at_step: killing the job at step {self.step} while {pending} is "
                      f"written in the background (not committed)")
        self._log_commits(self.checkpointer.poll())

    def wait_for_saves(self) -> None:
        """Collective: block until the background save (if any) is committed (the loop does this before
        a requeue exit and at the end; a caller of :meth:`save` outside :meth:`train` does it itself)."""
        if self.checkpointer is not None:
            self._log_commits(self.checkpointer.wait())

    def _log_commits(self, committed) -> None:
        for path, seconds in committed:
            self.log.info("committed %s (%.1fs after it went to the background writer)", path, seconds)

    def save_seed(self) -> Path:
        """Write the initial weights (model only) as ``<run_dir>/seed/step_00000000``: runs at other
        layouts start from identical weights with ``checkpoint.load`` (torchtitan's seed checkpoint)."""
        state = ckpt.sharded_state(self.model, self.optimizer, self.ctx, is_loading=False, with_optimizer=False,
                                   with_rng=False)
        meta = {"step": 0, "model_config": config_to_dict(self.cfg.model), "layout": self.layout.as_dict(),
                "seed": self.cfg.train.seed, "config": config_to_dict(self.cfg)}
        return dist_ckpt.save_checkpoint(self.run_dir / "seed", 0, state, meta, self.ctx)

    # --- helpers ------------------------------------------------------------------------------
    def _progress(self):
        if not (self.ctx.is_main and self.cfg.logging.progress_bar):
            return None
        import sys

        from tqdm import tqdm
        # Batch logs (SLURM) get a line every 30 s instead of a carriage return per step.
        return tqdm(total=self.cfg.train.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def _shorten_timeouts(self) -> None:
        """After the first step (compilation, loading done): the step timeout, behind a barrier so that
        a rank still finishing the first step is not killed by it (torchtitan's pattern)."""
        self.ctx.barrier()
        timeout = datetime.timedelta(seconds=self.cfg.comm.step_timeout_s)
        setter = getattr(dist, "set_timeout", None) or getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        try:
            if setter is None:
                raise NotImplementedError(f"torch {torch.__version__} cannot change a group's timeout")
            setter(timeout)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            self.log.warning("could not shorten the collective timeout (%s); it stays %ss", e,
                             self.cfg.comm.init_timeout_s)

    def _plot(self) -> None:
        path = self.run_dir / METRICS_FILE
        if not self.ctx.is_main or not path.is_file():
            return
        from videoar_common.run_logging import read_metrics
        have = {k for r in read_metrics(path) for k in r}
        keys = [k for k in PLOT_KEYS if k in have] + sorted(k for k in have if k.startswith("loss_")
                                                              or "loss_scale" in k)
        if keys:
            plot_metrics(path, self.run_dir / LOSS_CURVES_FILE, keys=keys, title=f"{self.run_dir.name}")

    def close(self) -> None:
        """Not collective: a background save still in flight (an exception other than the numerics guard's
        collective stop ended the loop) is left uncommitted, the previous checkpoint stays the newest; the
        background writer is stopped (a persistent worker exits)."""
        if self.checkpointer is not None:
            if self.checkpointer.in_flight is not None:
                self.log.warning("%s was still being written and is not committed", self.checkpointer.in_flight)
            self.checkpointer.close()
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        self.data = None  # streaming keeps shared memory per dataset: release it before teardown
        gc.collect()
        destroy_model_parallel(self.ctx)
        shutdown_distributed()


def _crash_before_commit(path: Path) -> None:
    _kill_job(f"debug.crash_in_save_at_step: killing the job before {path} is committed")


def _kill_job(reason: str) -> None:
    """Fault injection: die at once, as a job killed by the scheduler does. Our child processes (a
    background checkpoint writer, Megatron's results-queue manager) die with us, as they would in the
    job's cgroup, rather than writing on as orphans."""
    get_logger().error(reason)
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(17)


def _broadcast_object(obj, ctx: DistContext):
    if not dist.is_initialized() or ctx.world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
