"""The two DeepSpeed engines of tokenizer training (autoencoder, discriminator) and their initial weights.

Design decisions:
- **Two engines**, each with its own AdamW, learning-rate schedule and ZeRO (1 or 2) partitioning, so the
  discriminator's optimizer state never mixes with the autoencoder's buckets.
- **The schedule is the AR trainer's** (:mod:`videoar_common.lr_schedule`, Megatron's
  ``OptimizerParamScheduler``), handed to DeepSpeed as its ``lr_scheduler``: DeepSpeed steps it only after
  an applied update and saves / loads it with the engine. The discriminator's first update is global
  step ``loss.disc_start_step``, so its warm-up starts there and its decay ends at the same last step.
- Initial weights (inflation, an earlier tokenizer) are loaded before the engines copy the weights into
  their fp32 master partitions; on resume the checkpoint provides them instead.
- Precision: bf16 engines on GPU (fp32 master weights inside ZeRO), fp32 on CPU.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenizer.checkpoint import load_tokenizer
from tokenizer.inflate import inflate_from_file, reinflate
from tokenizer.model import VideoTokenizer
from tokenizer.train_config import TokenizerOptimConfig, TokenizerTrainConfig
from videoar_common.atomic import atomic_write_json
from videoar_common.config import ConfigError, config_to_dict
from videoar_common.distributed import DistContext
from videoar_common.lr_schedule import LRScheduler, build_lr_scheduler
from videoar_common.run_logging import get_logger

AE_TAG, DISC_TAG = "autoencoder", "discriminator"
"""DeepSpeed checkpoint tags (sub-directories of a step directory)."""


class AutoencoderForTraining(nn.Module):
    """What the autoencoder engine wraps: returns plain tensors, so DeepSpeed hooks every output."""

    def __init__(self, tokenizer: VideoTokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, video_BCTHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        recon_BCTHW, q = self.tokenizer(video_BCTHW)
        return recon_BCTHW, q.commitment_loss, q.entropy_loss


def resolve_precision(cfg: TokenizerTrainConfig, ctx: DistContext) -> str:
    if cfg.deepspeed.precision == "bf16" and ctx.device.type != "cuda":
        raise ValueError("deepspeed.precision=bf16 needs CUDA; use fp32 (or auto) on CPU")
    if cfg.deepspeed.precision == "auto":
        return "bf16" if ctx.device.type == "cuda" else "fp32"
    return cfg.deepspeed.precision


def deepspeed_config(cfg: TokenizerTrainConfig, precision: str, world: int) -> dict:
    micro = cfg.data.micro_batch_size
    return {
        "train_batch_size": micro * cfg.grad_accum_steps * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage,
                              "reduce_bucket_size": cfg.deepspeed.reduce_bucket_size,
                              "allgather_bucket_size": cfg.deepspeed.reduce_bucket_size},
        # check_grad_overflow: a non-finite gradient norm drops the step (the trainer's skip relies on it).
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def lr_schedule(optimizer: torch.optim.Optimizer, o: TokenizerOptimConfig, *, peak_lr: float, first_step: int,
                steps: int) -> LRScheduler:
    """The schedule of an engine whose first update is global step ``first_step`` of a ``steps``-step run:
    warm-up over its own first ``optim.warmup_steps`` updates, decay to ``peak_lr * optim.min_lr_ratio`` at
    global step ``steps``. When the run ends before the warm-up does (or before ``first_step``: a
    discriminator that never trains) the decay end is put just after the warm-up, so the schedule stays in
    its warm-up until the run ends."""
    decay_steps = max(steps - first_step, o.warmup_steps + 1)
    return build_lr_scheduler(optimizer, peak_lr=peak_lr, min_lr=peak_lr * o.min_lr_ratio,
                              warmup_steps=o.warmup_steps, decay_steps=decay_steps, decay_style=o.schedule,
                              weight_decay=o.weight_decay)


def adamw(module: nn.Module, o: TokenizerOptimConfig, lr: float) -> torch.optim.AdamW:
    # Every parameter is decayed (norms included), as this trainer always did; the schedule writes the
    # same weight_decay back every step.
    return torch.optim.AdamW(module.parameters(), lr=lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay)


@dataclass
class Engines:
    """The autoencoder and discriminator engines (``deepspeed.DeepSpeedEngine``)."""

    ae: object
    disc: object

    def tagged(self) -> tuple[tuple[object, str], ...]:
        return (self.ae, AE_TAG), (self.disc, DISC_TAG)

    @property
    def tokenizer(self) -> VideoTokenizer:
        return self.ae.module.tokenizer  # the engine may have cast or moved it


def build_engines(cfg: TokenizerTrainConfig, ctx: DistContext, tokenizer: VideoTokenizer,
                  discriminator: nn.Module, precision: str) -> Engines:
    """Wrap both modules in DeepSpeed engines (each with its AdamW and schedule)."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed insists on launcher variables even when torch.distributed is already set up
    # (single-process runs without torchrun); the context knows the values.
    for key, value in (("LOCAL_RANK", ctx.local_rank), ("RANK", ctx.rank), ("WORLD_SIZE", ctx.world_size)):
        os.environ.setdefault(key, str(value))
    o, ds_config = cfg.optim, deepspeed_config(cfg, precision, ctx.world_size)

    def engine(module: nn.Module, peak_lr: float, first_step: int):
        opt = adamw(module, o, peak_lr)
        sched = lr_schedule(opt, o, peak_lr=peak_lr, first_step=first_step, steps=cfg.steps)
        wrapped, *_ = deepspeed.initialize(model=module.to(ctx.device), optimizer=opt, lr_scheduler=sched,
                                           config=ds_config, dist_init_required=False)
        return wrapped

    return Engines(ae=engine(AutoencoderForTraining(tokenizer), o.lr, 0),
                   disc=engine(discriminator, o.disc_lr, cfg.loss.disc_start_step))


def init_weights(tokenizer: VideoTokenizer, cfg: TokenizerTrainConfig, run_dir: Path, ctx: DistContext) -> None:
    """Initial autoencoder weights of a fresh run: init.from_tokenizer (+ reinflate) or init.inflate_from."""
    init, log = cfg.init, get_logger()
    if init.from_recipe:
        raise ValueError("init.from_recipe must be resolved by the entry point (run_with_init_stage)")
    if init.from_tokenizer:
        src = load_tokenizer(init.from_tokenizer)
        # The quantizer is parameter-free: a new resolution may bring its own scale schedule.
        free = {"scale_schedule", "entropy_inv_temperature"}
        a, b = config_to_dict(src.cfg), config_to_dict(cfg.model)
        diff = sorted(k for k in b if k not in free and a.get(k) != b[k])
        if diff:
            raise ConfigError(f"init.from_tokenizer: {init.from_tokenizer} differs from this recipe in "
                             f"model.{diff[0]} ({a.get(diff[0])} vs {b[diff[0]]})")
        tokenizer.load_state_dict(src.state_dict())
        log.info("initialised the autoencoder from %s", init.from_tokenizer)
        if init.reinflate:
            report = reinflate(tokenizer)
            log.info("reinflated: folded the temporal taps of %d causal kernels into their last slice",
                     len(report.inflated))
    elif init.inflate_from:
        report = inflate_from_file(tokenizer, init.inflate_from)
        log.info("inflated from %s: %s", init.inflate_from, report.summary())
        if ctx.is_main:
            atomic_write_json(run_dir / "inflation_report.json", report.to_dict())


def fp32_tokenizer_state(engines: Engines, precision: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the tokenizer (collective under bf16: masters are gathered from ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param
    state, prefix = {}, "tokenizer."
    for name, p in engines.ae.module.named_parameters():
        full = safe_get_full_fp32_param(p) if precision == "bf16" else None
        state[name.removeprefix(prefix)] = (full if full is not None else p.detach()).float().cpu().clone()
    for name, b in engines.ae.module.named_buffers():
        state[name.removeprefix(prefix)] = b.detach().float().cpu().clone()
    return state
