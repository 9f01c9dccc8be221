"""Optimizer, learning-rate schedule and the guarded optimizer step, on GPU and on CPU.

Design decision: both engines hand the loop a Megatron ``MegatronOptimizer``, so the step, the
gradient norm, clipping and the (reshardable) checkpoint format go through one interface and one
implementation, Megatron's.

- Megatron engine (GPU): ``get_megatron_optimizer`` (AdamW; bf16 → fp32 main weights; the distributed
  optimizer shards optimizer state over data-parallel ranks) on Megatron-DDP-wrapped model chunks.
- Local engine (CPU): Megatron's ``FP32Optimizer`` around ``torch.optim.AdamW``
  (:class:`HostFP32Optimizer`). ``get_megatron_optimizer`` cannot build it: it reads the DDP wrapper's
  config and grad buffers, which the local engine does not have. Its norm (``get_grad_norm_fp32``
  through Megatron's non-CUDA fallback ``local_multi_tensor_l2_norm``: tensor-parallel duplicates
  counted once, squared norm all-reduced over the model-parallel group), its clipping
  (``clip_grad_by_total_norm_fp32``), its update and its ``sharded_state_dict`` (optimizer state
  reshards across TP like the weights) are Megatron's, unchanged; only the tensors those calls create
  on ``"cuda"`` are made on the host, by :func:`.cuda_compat.host_allocations` around each.

The step is split as in Megatron's ``ChainedOptimizer.step`` (prepare grads → norm → clip → update) so
that the numerics guard can veto the update *between* the norm and the update, on every rank together.
Parameter groups follow Megatron's standard rule: no weight decay for biases and 1-D parameters.
The schedule is Megatron's ``OptimizerParamScheduler`` (plain Python, works on CPU), built by
:mod:`videoar_common.lr_schedule` as for the tokenizer trainer; it steps only after an applied update.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from videoar_common.lr_schedule import LRScheduler, build_lr_scheduler
from videoar_common.numerics import NumericsGuard
from videoar_megatron.training.config import OptimConfig
from videoar_megatron.training.cuda_compat import host_allocations


def megatron_optimizer_config(cfg: OptimConfig, *, bf16: bool, distributed: bool) -> OptimizerConfig:
    return OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                           adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, adam_eps=cfg.eps, clip_grad=cfg.clip_grad,
                           bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                           use_distributed_optimizer=distributed, decoupled_weight_decay=True)


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Megatron's standard rule: biases and 1-D parameters (norms, <SOS>) are not decayed."""
    return name.endswith(".bias") or param.dim() == 1


def host_param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two AdamW groups (decayed, not decayed) with the fields OptimizerParamScheduler reads: what
    ``get_megatron_optimizer`` builds for DDP-wrapped chunks (its builder is private and reads the DDP
    wrapper; ``tests/test_cuda_compat.py`` checks the groups equal Megatron's for the VideoAR model)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_weight_decay(name, p) else decay).append(p)
    common = {"lr_mult": 1.0, "max_lr": cfg.lr, "min_lr": cfg.min_lr, "default_config": True,
              "is_expert_parallel": False, "is_decoupled_lr": False}
    return [{"params": decay, "wd_mult": 1.0, **common}, {"params": plain, "wd_mult": 0.0, **common}]


def _init_adam_state(opt: torch.optim.Optimizer, config=None) -> None:
    """Create empty AdamW state (Megatron's ``init_state_fn``: needed before loading a checkpoint)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


class HostFP32Optimizer(FP32Optimizer):
    """Megatron's ``FP32Optimizer`` on host tensors: unchanged but for where three of its calls allocate.

    On a CPU host ``FP32Optimizer`` fails only at allocations, never in its arithmetic: the constructor
    makes its (constant 1) loss-scale tensor on ``"cuda"``; ``get_grad_norm_fp32`` makes an overflow
    flag there and its non-CUDA fallback ``local_multi_tensor_l2_norm`` returns the norm there;
    ``clip_grad_by_total_norm_fp32`` makes an overflow flag there and asserts that every gradient is a
    ``torch.cuda.FloatTensor``. Those three calls run inside :func:`.cuda_compat.host_allocations`;
    what they compute is Megatron's. ``init_state_fn`` is the AdamW one Megatron's builder defines
    inline (not importable).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig, mp_group, tp_group):
        with host_allocations():
            super().__init__(optimizer, config, _init_adam_state)
        # What get_megatron_optimizer sets on the FP32Optimizer it builds.
        self.grad_stats_parallel_group, self.tp_group = mp_group, tp_group

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        with host_allocations():
            return super().get_grad_norm()

    def clip_grad_norm(self, clip_grad: float) -> float:
        with host_allocations():
            return super().clip_grad_norm(clip_grad)


def clip_to_norm(optimizer: MegatronOptimizer, max_norm: float, total_norm: float) -> None:
    """Scale gradients so that their global norm (already computed, ``total_norm``) is <= max_norm:
    Megatron's ``clip_grad_by_total_norm_fp32`` per optimizer, as in ``ChainedOptimizer.step``."""
    if max_norm <= 0:
        return
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.optimizer.optimizer import ChainedOptimizer
    chained = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for opt in chained:
        params = opt.get_parameters()
        if getattr(opt, "is_stub_optimizer", False) or not params:
            continue
        scope = host_allocations if isinstance(opt, HostFP32Optimizer) else contextlib.nullcontext
        with scope():
            clip_grad_by_total_norm_fp32(params, max_norm, total_norm,
                                         opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


def build_host_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> HostFP32Optimizer:
    """Local engine: AdamW in fp32 over this rank's (tensor-parallel shard of the) parameters."""
    config = megatron_optimizer_config(cfg, bf16=False, distributed=False)
    adam = torch.optim.AdamW(host_param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, weight_decay=cfg.weight_decay)
    return HostFP32Optimizer(adam, config, parallel_state.get_model_parallel_group(),
                             parallel_state.get_tensor_model_parallel_group())


def build_megatron_optimizer(model_chunks: list, cfg: OptimConfig, *, bf16: bool) -> MegatronOptimizer:
    """Megatron engine: Megatron's optimizer over DDP-wrapped chunks (distributed optimizer when configured)."""
    from megatron.core.optimizer import get_megatron_optimizer
    config = megatron_optimizer_config(cfg, bf16=bf16, distributed=cfg.distributed_optimizer)
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(optimizer: MegatronOptimizer, cfg: OptimConfig, decay_steps: int) -> LRScheduler:
    """Linear warm-up from 0 to lr, then cosine/linear/constant decay to min_lr at ``decay_steps``
    (the schedule shared with the tokenizer trainer: :mod:`videoar_common.lr_schedule`).

    On resume the recipe's values win over the checkpoint's: only the step count is restored, so
    extending ``train.steps`` stretches the decay instead of leaving the new steps at min_lr.
    :func:`~videoar_common.lr_schedule.schedule_changes` lets the trainer warn about such a change."""
    return build_lr_scheduler(optimizer, peak_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                              decay_steps=decay_steps, decay_style=cfg.decay_style, weight_decay=cfg.weight_decay)


def current_lr(optimizer: MegatronOptimizer) -> float:
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            return float(group["lr"])
    return float("nan")


@dataclass
class StepOutcome:
    grad_norm: float
    """Global gradient norm before clipping (inf when fp16 scaling found an overflow)."""
    skipped: str | None
    """Why the update was skipped (same on every rank), or None when it was applied."""


def guarded_step(optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler, guard: NumericsGuard,
                 loss: float, clip_grad: float, ctx) -> StepOutcome:
    """Collective: norm → numerics verdict (all ranks together) → clip → update → schedule.

    A bad step leaves weights, optimizer state and schedule untouched. Raises
    :class:`~videoar_common.numerics.NumericsError` once the skip budget is spent.
    """
    found_inf = optimizer.prepare_grads()
    norm = optimizer.get_grad_norm()
    norm = math.inf if found_inf or norm is None else float(norm)
    reason = guard.check(loss, norm, ctx)
    if reason is None:
        clip_to_norm(optimizer, clip_grad, norm)
        optimizer.step_with_ready_grads()
        scheduler.step(increment=1)
    return StepOutcome(grad_norm=norm, skipped=reason)
