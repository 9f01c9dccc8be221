"""Tokenizer training with DeepSpeed: two engines (autoencoder, discriminator), exact resume.

Design decisions:
- **Two engines**, each with its own AdamW, LR schedule and ZeRO (1 or 2) partitioning. The
  generator's GAN term runs the discriminator with frozen parameters, so the autoencoder's backward
  never produces discriminator gradients; the discriminator sees detached reconstructions.
- **One optimizer step = a window of ``grad_accum_steps`` micro-batches.** Before any backward, every
  micro-batch's losses are checked and the verdict is all-reduced, so all ranks act together. A bad
  window is finished with NaN-poisoned backward passes: DeepSpeed's ZeRO optimizer then sees a
  non-finite gradient norm and drops the step on every rank (no update, no LR step, gradients
  cleared), which keeps its micro-step bookkeeping in phase. We assert that it did. Our step counter
  only counts applied steps, so a bad step is never checkpointed.
- **Exact resume**: a checkpoint holds both engines (weights, ZeRO optimizer partitions, LR
  schedulers), LeCAM EMAs, RNG states, each rank's data position and the logger run id. The
  COMMITTED marker is written last; start-up resumes from the newest committed step directory.
  On CPU (fp32, gloo) the resumed losses equal the uninterrupted run's bit for bit.
- Precision: bf16 engines on GPU (fp32 master weights inside ZeRO), fp32 on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data_prep.clip_dataset import (REJECTS_FILE, ClipStream, RejectLog, VideoSource, read_sources,
                                    source_for)
from tokenizer.checkpoint import TOKENIZER_EXPORT_DIR, load_tokenizer, save_tokenizer
from tokenizer.discriminator import Discriminator3D
from tokenizer.evaluate import evaluate_tokenizer, psnr_per_clip
from tokenizer.inflate import inflate_from_file, reinflate
from tokenizer.losses import TokenizerLoss
from tokenizer.model import VideoTokenizer
from tokenizer.train_config import OptimConfig, TokenizerTrainConfig, resolve_batch
from videoar_common.atomic import (atomic_write_bytes, atomic_write_json, is_committed, latest_committed,
                                            mark_committed, prune_keep_last, step_dir_name)
from videoar_common.config import config_to_dict, save_resolved_config
from videoar_common.distributed import DistContext
from videoar_common.run_logging import METRICS_FILE, RunLogger, get_logger, plot_metrics

PREEMPTED_EXIT_CODE = 75
"""Exit code after a signal-triggered save (EX_TEMPFAIL): the launcher should requeue the job."""
CHECKPOINT_DIR = "checkpoints"
NONFINITE_LOG = "nonfinite.jsonl"
AE_TAG, DISC_TAG = "autoencoder", "discriminator"
PLOT_KEYS = ("g_total", "rec", "psnr", "commit", "entropy", "d_total", "gan_g", "lr")


class NonFiniteError(RuntimeError):
    """Training stopped because of non-finite losses (numerics.on_nonfinite / max_nonfinite)."""


class ResumeRefused(RuntimeError):
    """The run directory's checkpoint cannot continue under this job (world size, recipe, data sources,
    or an init source that does not fit): nothing was trained or written."""


class AutoencoderForTraining(nn.Module):
    """What the autoencoder engine wraps: returns plain tensors, so DeepSpeed hooks every output."""

    def __init__(self, tokenizer: VideoTokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, video_BCTHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        recon, q = self.tokenizer(video_BCTHW)
        return recon, q.commitment_loss, q.entropy_loss


def lr_multiplier(cfg: OptimConfig, total_steps: int, offset: int = 0):
    """Engine step → LR factor: linear warm-up over the engine's own first ``warmup_steps`` steps, then
    constant / cosine / linear decay to ``min_lr_ratio`` by global step (= engine step + ``offset``; the
    discriminator's engine starts at loss.disc_start_step). Schedulers only advance on applied steps."""
    def fn(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.schedule == "constant":
            return warm
        start = max(cfg.warmup_steps, offset)
        progress = min(1.0, max(0, step + offset - start) / max(1, total_steps - start))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)
    return fn


def resolve_precision(cfg: TokenizerTrainConfig, ctx: DistContext) -> str:
    if cfg.deepspeed.precision == "bf16" and ctx.device.type != "cuda":
        raise ValueError("deepspeed.precision=bf16 needs CUDA; use fp32 (or auto) on CPU")
    if cfg.deepspeed.precision == "auto":
        return "bf16" if ctx.device.type == "cuda" else "fp32"
    return cfg.deepspeed.precision


def deepspeed_config(cfg: TokenizerTrainConfig, precision: str, micro_batch: int, world: int) -> dict:
    return {
        "train_batch_size": micro_batch * cfg.grad_accum_steps * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage,
                              "reduce_bucket_size": cfg.deepspeed.reduce_bucket_size,
                              "allgather_bucket_size": cfg.deepspeed.reduce_bucket_size},
        # check_grad_overflow: a non-finite gradient norm drops the step (our skip relies on it).
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def _append_jsonl(path: Path, record: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class DataPaths:
    video_manifest: str
    image_manifest: str
    eval_manifest: str


def prepare_data(cfg: TokenizerTrainConfig, run_dir: Path, ctx: DistContext) -> DataPaths:
    """Manifests to train and evaluate on; writes the synthetic corpus first when the recipe asks."""
    if not cfg.data.synth.enabled:
        return DataPaths(cfg.data.manifest, cfg.data.image_manifest, cfg.eval.manifest)
    s, clip = cfg.data.synth, cfg.data.clip
    out = {}
    for split, num, seed in (("train", s.num_train, s.seed), ("eval", s.num_eval, s.seed + 1000)):
        root = run_dir / "synth" / split
        if ctx.is_main and not is_committed(root):
            from data_prep.synth import make_corpus
            get_logger().info("writing synthetic %s corpus (%d videos) to %s", split, num, root)
            make_corpus(root, num=num, classes=s.classes, codec=s.codec, frames=s.frames,
                        size=(clip.height, clip.width), seed=seed)
            mark_committed(root, {"num": num, "seed": seed})
        out[split] = str(root / "metadata.csv")
    ctx.barrier()
    return DataPaths(out["train"], out["train"] if cfg.data.image_every else "", out["eval"])


class TokenizerTrainer:
    """Builds the engines, data streams and sinks for one job and runs it (see module docstring)."""

    def __init__(self, cfg: TokenizerTrainConfig, ctx: DistContext, run_dir: str | Path):
        import deepspeed
        import logging as _logging
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(_logging.WARNING)
        # DeepSpeed insists on launcher variables even when torch.distributed is already set up
        # (single-process runs without torchrun); the context knows the values.
        for key, value in (("LOCAL_RANK", ctx.local_rank), ("RANK", ctx.rank), ("WORLD_SIZE", ctx.world_size)):
            os.environ.setdefault(key, str(value))
        cfg = resolve_batch(cfg, ctx.world_size)
        self.cfg, self.ctx, self.run_dir = cfg, ctx, Path(run_dir)
        self.log = get_logger()
        self.ckpt_root = self.run_dir / CHECKPOINT_DIR
        self.precision = resolve_precision(cfg, ctx)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.step, self.samples, self.bad_steps, self.steps_this_job = 0, 0, 0, 0
        self._injected, self._signal = False, None
        self.paths = prepare_data(cfg, self.run_dir, ctx)

        torch.manual_seed(cfg.seed)  # same init on every rank (DeepSpeed also broadcasts rank 0's)
        self.tokenizer = VideoTokenizer(cfg.model)
        self.discriminator = Discriminator3D(cfg.discriminator)
        self.resume_from = self._agreed_latest()
        if self.resume_from is None:
            self._init_weights()  # before the engines copy the weights into their master partitions
        self.loss = TokenizerLoss(cfg.loss).to(ctx.device, self.dtype)
        self.ae = self._engine(deepspeed, AutoencoderForTraining(self.tokenizer), cfg.optim.lr, 0)
        self.disc = self._engine(deepspeed, self.discriminator, cfg.optim.disc_lr, cfg.loss.disc_start_step)
        self.tokenizer = self.ae.module.tokenizer  # engine may have cast/moved it
        self.rejects = RejectLog(self.run_dir / REJECTS_FILE, ctx.rank)
        self.video_stream, self.image_stream = self._streams()
        self.logger: RunLogger | None = None

    # --- construction -------------------------------------------------------------------------
    def _engine(self, deepspeed, module: nn.Module, lr: float, offset: int):
        o = self.cfg.optim
        opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=tuple(o.betas), eps=o.eps,
                                weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(o, self.cfg.steps, offset))
        micro = self.cfg.data.micro_batch_size
        engine, *_ = deepspeed.initialize(model=module.to(self.ctx.device), optimizer=opt, lr_scheduler=sched,
                                          config=deepspeed_config(self.cfg, self.precision, micro,
                                                                  self.ctx.world_size),
                                          dist_init_required=False)
        return engine

    def _decode_device(self) -> str:
        want = self.cfg.data.decode_device
        return ("gpu" if self.ctx.device.type == "cuda" else "cpu") if want == "auto" else want

    def _streams(self) -> tuple[ClipStream | None, ClipStream | None]:
        d, ctx = self.cfg.data, self.ctx
        dev, dev_id = self._decode_device(), max(ctx.device.index or 0, 0)
        common = dict(rank=ctx.rank, world_size=ctx.world_size, seed=d.seed, rejects=self.rejects)
        video = image = None
        if self.paths.video_manifest:
            src = VideoSource(d.clip, device=dev, device_id=dev_id, num_threads=d.decode_threads,
                              batch_size=d.micro_batch_size)
            video = ClipStream(read_sources(self.paths.video_manifest), src, batch_size=d.micro_batch_size,
                               name="video", origin=self.paths.video_manifest, **common)
        if self.paths.image_manifest:
            records = read_sources(self.paths.image_manifest)
            src = source_for(records, dataclasses.replace(d.clip, num_frames=1), device=dev, device_id=dev_id,
                             num_threads=d.decode_threads, batch_size=d.image_micro_batch_size,
                             origin=self.paths.image_manifest)
            image = ClipStream(records, src, batch_size=d.image_micro_batch_size,
                               name="image", origin=self.paths.image_manifest, **common)
        return video, image

    def _init_weights(self) -> None:
        init = self.cfg.init
        if init.from_recipe:
            raise ValueError("init.from_recipe must be resolved by the entry point (run_with_init_stage)")
        if init.from_tokenizer:
            src = load_tokenizer(init.from_tokenizer)
            # The quantizer is parameter-free: a new resolution may bring its own scale schedule.
            free = {"scale_schedule", "entropy_inv_temperature"}
            a, b = config_to_dict(src.cfg), config_to_dict(self.cfg.model)
            diff = sorted(k for k in b if k not in free and a.get(k) != b[k])
            if diff:
                raise ValueError(f"init.from_tokenizer: {init.from_tokenizer} differs from this recipe in "
                                 f"model.{diff[0]} ({a.get(diff[0])} vs {b[diff[0]]})")
            self.tokenizer.load_state_dict(src.state_dict())
            self.log.info("initialised the autoencoder from %s", init.from_tokenizer)
            if init.reinflate:
                report = reinflate(self.tokenizer)
                self.log.info("reinflated: folded the temporal taps of %d causal kernels into their last slice",
                              len(report.inflated))
        elif init.inflate_from:
            report = inflate_from_file(self.tokenizer, init.inflate_from)
            self.log.info("inflated from %s: %s", init.inflate_from, report.summary())
            if self.ctx.is_main:
                atomic_write_json(self.run_dir / "inflation_report.json", report.to_dict())


    # --- one optimizer step -------------------------------------------------------------------
    def _is_image_step(self) -> bool:
        if self.video_stream is None:
            return True
        if self.image_stream is None:
            return False
        k = self.cfg.data.image_every
        return k > 0 and self.step % k == k - 1

    def _poison(self, engine) -> None:
        """A NaN-gradient backward + step: DeepSpeed drops the step at the window's boundary."""
        surrogate = sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * float("nan")
        engine.backward(surrogate)
        engine.step()

    def _forward(self, video: torch.Tensor, gan: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        recon, commit, entropy = self.ae(video)
        g_loss, terms = self.loss.generator_loss(video, recon, commit, entropy,
                                                 self.disc.module if gan else None)
        d_loss = None
        if gan:
            d_loss, d_terms = self.loss.discriminator_loss(self.disc, video, recon)
            terms.update(d_terms)
        terms["psnr"] = psnr_per_clip(video, recon.detach()).mean()
        return g_loss, d_loss, terms

    def _finite(self, g_loss: torch.Tensor, d_loss: torch.Tensor | None) -> bool:
        if (self.step == self.cfg.numerics.inject_nonfinite_step and not self._injected
                and self.ctx.rank == self.cfg.numerics.inject_nonfinite_rank):
            self._injected = True
            g_loss.data.fill_(float("nan"))  # the drill: this rank's loss is NaN, the others are fine
        local_ok = bool(torch.isfinite(g_loss).item()) and (d_loss is None or bool(torch.isfinite(d_loss).item()))
        return not self.ctx.any(not local_ok)

    def _window(self) -> tuple[bool, str, dict[str, float]]:
        """Run one optimizer step; returns (applied, reason if not, mean terms on this rank)."""
        image_step = self._is_image_step()
        stream = self.image_stream if image_step else self.video_stream
        gan = self.loss.gan_active(self.step)
        sums: dict[str, float] = defaultdict(float)
        poisoned, reason, clips = False, "", 0
        for _ in range(self.cfg.grad_accum_steps):
            batch = stream.next_batch()
            clips += batch.video_BCTHW.shape[0]
            if poisoned:
                self._poison(self.ae)
                if gan:
                    self._poison(self.disc)
                continue
            video = batch.video_BCTHW.to(self.ctx.device, self.dtype, non_blocking=True)
            g_loss, d_loss, terms = self._forward(video, gan)
            if not self._finite(g_loss, d_loss):
                poisoned, reason = True, "non-finite loss"
                self._poison(self.ae)
                if gan:
                    self._poison(self.disc)
                continue
            self.ae.backward(g_loss)
            self.ae.step()
            if gan:
                self.disc.backward(d_loss)
                self.disc.step()
            for k, v in terms.items():
                sums[k] += v.item()
        self.samples += clips * self.ctx.world_size
        applied = self.ae.was_step_applied()
        if poisoned and applied:
            raise RuntimeError("DeepSpeed applied an optimizer step with NaN gradients; refusing to continue")
        if not poisoned and not applied:
            reason = "non-finite gradient norm (autoencoder)"
        if gan and applied and not self.disc.was_step_applied():
            self.log.warning("step %d: discriminator step dropped (non-finite gradient norm)", self.step)
        means = {k: v / self.cfg.grad_accum_steps for k, v in sums.items()}
        means["image_step"] = float(image_step)
        means["clips"] = float(clips)
        return applied, reason, means

    def _reduce_terms(self, terms: dict[str, float]) -> dict[str, float]:
        keys = sorted(terms)
        dev = self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")
        vec = torch.tensor([terms[k] for k in keys], dtype=torch.float64, device=dev)
        if self.ctx.world_size > 1:
            dist.all_reduce(vec)
            vec /= self.ctx.world_size
        return dict(zip(keys, vec.tolist()))

    # --- bad steps ----------------------------------------------------------------------------
    def _handle_bad(self, reason: str) -> None:
        """Called on every rank together (the verdict was all-reduced)."""
        self.bad_steps += 1
        policy = self.cfg.numerics.on_nonfinite
        self.log.warning("step %d: %s on some rank; policy %s (bad steps this job: %d)", self.step, reason,
                         policy, self.bad_steps)
        _append_jsonl(self.run_dir / NONFINITE_LOG, {"rank": self.ctx.rank, "step": self.step, "reason": reason,
                                                      "policy": policy, "samples": self.samples})
        if self.logger is not None:
            self.logger.log(self.step, {"nonfinite": 1, "bad_steps": self.bad_steps})
        if policy == "stop":
            raise NonFiniteError(f"step {self.step}: {reason} (numerics.on_nonfinite=stop); nothing was saved "
                                 "after the last good step")
        if self.bad_steps > self.cfg.numerics.max_nonfinite:
            raise NonFiniteError(f"{self.bad_steps} bad steps in this job exceed numerics.max_nonfinite="
                                 f"{self.cfg.numerics.max_nonfinite}")
        if policy == "rollback":
            latest = self._agreed_latest()
            if latest is None:
                raise NonFiniteError(f"step {self.step}: {reason}; numerics.on_nonfinite=rollback but no "
                                     "committed checkpoint exists yet")
            self._load(latest, restore_data=False)
            self.log.warning("rolled back to %s; the data consumed since then is skipped", latest.name)

    # --- checkpoints --------------------------------------------------------------------------
    def _rank_state(self) -> dict:
        return {"step": self.step, "samples": self.samples, "lecam": self.loss.lecam.state_dict(),
                "rng": _rng_state(), "world_size": self.ctx.world_size, "rank": self.ctx.rank,
                "video_stream": self.video_stream.state_dict() if self.video_stream else None,
                "image_stream": self.image_stream.state_dict() if self.image_stream else None}

    def save(self) -> Path:
        """Collective: every rank writes its part; rank 0 commits once all are on disk."""
        target = self.ckpt_root / step_dir_name(self.step)
        if self.ctx.is_main and target.exists():
            shutil.rmtree(target)  # an uncommitted leftover or an earlier save of this step
        self.ctx.barrier()
        self.ae.save_checkpoint(str(target), tag=AE_TAG, save_latest=False)
        self.disc.save_checkpoint(str(target), tag=DISC_TAG, save_latest=False)
        import io
        buf = io.BytesIO()
        torch.save(self._rank_state(), buf)
        atomic_write_bytes(target / f"trainer_rank{self.ctx.rank:05d}.pt", buf.getvalue())
        if self.ctx.is_main:
            save_resolved_config(self.cfg, target)
            atomic_write_json(target / "trainer_state.json", {
                "step": self.step, "samples": self.samples, "world_size": self.ctx.world_size,
                "precision": self.precision, "zero_stage": self.cfg.deepspeed.zero_stage,
                "logger_run_id": self.logger.run_id if self.logger else "", "time": time.time()})
        self.ctx.barrier()
        if self.ctx.is_main:
            mark_committed(target, {"step": self.step})
            prune_keep_last(self.ckpt_root, self.cfg.checkpoint.keep_last)
        self.ctx.barrier()
        self.log.info("saved checkpoint %s", target)
        return target

    def _agreed_latest(self) -> Path | None:
        """Rank 0's view of the newest committed checkpoint, broadcast (file systems can disagree)."""
        found = [str(latest_committed(self.ckpt_root) or "")]
        if self.ctx.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        return Path(found[0]) if found[0] else None

    def _check_compatible(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state["world_size"] != self.ctx.world_size:
            raise ResumeRefused(f"{ckpt} was written by {state['world_size']} ranks, this job has "
                               f"{self.ctx.world_size}: ZeRO partitions and data positions cannot be resharded")
        from videoar_common.config import load_config
        from tokenizer.train_config import TokenizerTrainConfig as _Cfg
        saved = config_to_dict(load_config(_Cfg, ckpt / "config.yaml"))
        now = config_to_dict(self.cfg)
        for section in ("model", "discriminator"):
            diff = sorted(k for k in now[section] if now[section][k] != saved[section].get(k))
            if diff:
                raise ResumeRefused(f"{ckpt}: recipe changed {section}.{diff[0]} (and {len(diff) - 1} more) since "
                                   "the checkpoint was written; start a new run directory")

    def _load(self, ckpt: Path, restore_data: bool = True) -> None:
        for engine, tag in ((self.ae, AE_TAG), (self.disc, DISC_TAG)):
            path, _ = engine.load_checkpoint(str(ckpt), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"{ckpt}: DeepSpeed could not load the {tag} engine")
        state = torch.load(ckpt / f"trainer_rank{self.ctx.rank:05d}.pt", map_location="cpu", weights_only=False)
        self.step = state["step"]
        self.loss.lecam.load_state_dict(state["lecam"])
        _set_rng_state(state["rng"])
        if restore_data:
            self.samples = state["samples"]
            for stream, key in ((self.video_stream, "video_stream"), (self.image_stream, "image_stream")):
                if (stream is None) != (state[key] is None):
                    raise ResumeRefused(f"{ckpt}: the data sources changed ({key}) since the checkpoint")
                if stream is not None:
                    stream.load_state_dict(state[key])

    def resume(self) -> bool:
        """Load the newest committed checkpoint found at start-up; False for a fresh run."""
        latest = self.resume_from
        if latest is None:
            return False
        self._check_compatible(latest)
        self._load(latest)
        self.log.info("resumed from %s (step %d)", latest, self.step)
        return True

    # --- export and evaluation ----------------------------------------------------------------
    def full_tokenizer_state(self) -> dict[str, torch.Tensor]:
        """fp32 weights of the tokenizer (collective under bf16: masters are gathered from ZeRO)."""
        from deepspeed.utils import safe_get_full_fp32_param
        state = {}
        prefix = "tokenizer."
        for name, p in self.ae.module.named_parameters():
            full = safe_get_full_fp32_param(p) if self.precision == "bf16" else None
            state[name.removeprefix(prefix)] = (full if full is not None else p.detach()).float().cpu().clone()
        for name, b in self.ae.module.named_buffers():
            state[name.removeprefix(prefix)] = b.detach().float().cpu().clone()
        return state

    def export(self) -> Path:
        """Write ``<run_dir>/tokenizer`` (a self-describing tokenizer directory) for downstream stages."""
        state = self.full_tokenizer_state()
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
            from data_prep.clip_dataset import eval_batches
            e, d = self.cfg.eval, self.cfg.data
            records = read_sources(self.paths.eval_manifest)
            source = source_for(records, d.clip, device=self._decode_device(),
                                device_id=max(self.ctx.device.index or 0, 0), num_threads=d.decode_threads,
                                batch_size=e.batch_size, origin=self.paths.eval_manifest)
            batches = eval_batches(records, source, batch_size=e.batch_size, limit=e.num_clips, rejects=self.rejects)
            result = evaluate_tokenizer(self.tokenizer, batches, device=self.ctx.device,
                                        out_dir=self.run_dir / "eval" / tag, grid_clips=e.grid_clips,
                                        grid_frames=e.grid_frames, title=f"{self.run_dir.name} {tag}")
            self.log.info("eval %s: PSNR %.2f dB, SSIM %.4f, bit entropy %.3f (%d clips)", tag, result["psnr"],
                          result["ssim"], result["bits/entropy"], result["clips"])
            if self.logger is not None:
                self.logger.log(self.step, {f"eval/{k}": v for k, v in result.items()})
        self.ctx.barrier()
        return result

    # --- the loop -----------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._signal = signum
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)

    def _log_step(self, terms: dict[str, float], step_time: float) -> None:
        if self.logger is None or self.step % self.cfg.logging.log_every:
            return
        record = dict(terms)
        clips = record.pop("clips") * self.ctx.world_size  # mean over ranks x ranks
        record.update(lr=self.ae.get_lr()[0], disc_lr=self.disc.get_lr()[0], samples=self.samples,
                      step_time=step_time, bad_steps=self.bad_steps, clips_per_s=clips / max(step_time, 1e-9))
        norm = self.ae.get_global_grad_norm()
        if norm is not None:
            record["grad_norm"] = float(norm)
        self.logger.log(self.step, record)

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

    def train(self) -> int:
        """Run to ``steps`` (or until stopped); returns the process exit code."""
        cfg, ctx = self.cfg, self.ctx
        resumed = self.resume()
        self.logger = RunLogger(self.run_dir, cfg.logging, rank=ctx.rank, config_dict=config_to_dict(cfg))
        if ctx.is_main:
            save_resolved_config(cfg, self.run_dir)
        if not resumed:
            self.evaluate(step_dir_name(0))
        self._install_signal_handlers()
        bar = self._progress()
        saved_at = self.step if resumed else -1
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            applied, reason, terms = self._window()
            if not applied:
                self._handle_bad(reason)
                if bar is not None:
                    bar.n = self.step  # a rollback moves the step back
                    bar.refresh()
                continue
            terms = self._reduce_terms(terms)
            self._after_good_step(terms, time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{terms.get('g_total', float('nan')):.4f}", psnr=f"{terms.get('psnr', 0):.2f}")
            if self.step % cfg.checkpoint.every == 0 or self.step == cfg.steps:
                self.save()
                saved_at = self.step
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.steps:
                self.evaluate(step_dir_name(self.step))
            stop = cfg.stop_after and self.steps_this_job >= cfg.stop_after and self.step < cfg.steps
            if ctx.any(self._signal is not None) or stop:
                if saved_at != self.step:
                    self.save()
                if bar is not None:
                    bar.close()
                if stop:
                    self.log.info("stopped after %d steps in this job (stop_after); rerun to resume",
                                  self.steps_this_job)
                    return 0
                self.log.warning("signal received: saved step %d, exiting with %d for requeue", self.step,
                                 PREEMPTED_EXIT_CODE)
                return PREEMPTED_EXIT_CODE
        if bar is not None:
            bar.close()
        if saved_at != self.step:
            self.save()
        self.export()
        self.evaluate(step_dir_name(self.step))
        if ctx.is_main:
            self._plot()
        return 0

    def _progress(self):
        # A bar only on a terminal: in SLURM/pipe logs tqdm's carriage returns make one endless line;
        # there, _after_good_step logs a plain line every 5% of the run instead.
        if not (self.ctx.is_main and self.cfg.logging.progress_bar and sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.steps, initial=self.step, desc="tokenizer", unit="step", dynamic_ncols=True)

    def _plot(self) -> None:
        metrics = self.run_dir / METRICS_FILE
        from videoar_common.run_logging import read_metrics
        present = {k for r in read_metrics(metrics) for k in r} if metrics.is_file() else set()
        keys = [k for k in PLOT_KEYS if k in present]
        if keys:
            plot_metrics(metrics, self.run_dir / "loss_curves.png", keys=keys, title=self.run_dir.name)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None


def run_with_init_stage(cfg: TokenizerTrainConfig, ctx: DistContext, run_dir: Path, recipe_dir: Path) -> int:
    """Train ``cfg`` in ``run_dir``; when init.from_recipe is set and the run has no checkpoint yet, first
    train that recipe in ``run_dir/init/<name>`` (resumable, skipped once exported) and start from its
    export. Returns the exit code (a stopped or preempted first stage returns its code)."""
    from videoar_common.config import load_config
    if cfg.init.from_recipe and latest_committed(run_dir / CHECKPOINT_DIR) is None:
        recipe = Path(cfg.init.from_recipe)
        recipe = recipe if recipe.is_absolute() else recipe_dir / recipe
        stage_dir = run_dir / "init" / recipe.stem
        if not is_committed(stage_dir / TOKENIZER_EXPORT_DIR):
            get_logger().info("init.from_recipe: training %s in %s first", recipe, stage_dir)
            stage = TokenizerTrainer(load_config(TokenizerTrainConfig, recipe), ctx, stage_dir)
            try:
                code = stage.train()
            finally:
                stage.close()
            if code:
                return code
        ctx.barrier()
        cfg = dataclasses.replace(cfg, init=dataclasses.replace(
            cfg.init, from_recipe="", from_tokenizer=str(stage_dir / TOKENIZER_EXPORT_DIR)))
    elif cfg.init.from_recipe:
        cfg = dataclasses.replace(cfg, init=dataclasses.replace(cfg.init, from_recipe="", reinflate=False))  # resuming
    trainer = TokenizerTrainer(cfg, ctx, run_dir)
    try:
        return trainer.train()
    finally:
        trainer.close()
