"""Optimizer, learning-rate schedule and the guarded optimizer step, on GPU and on CPU.

Design decision: both paths hand the loop a Megatron ``MegatronOptimizer``, so the step, the
gradient norm, clipping and the (reshardable) checkpoint format go through one interface.

- GPU: ``get_megatron_optimizer`` (AdamW; bf16 → fp32 main weights; the distributed optimizer shards
  optimizer state over data-parallel ranks) on Megatron-DDP-wrapped model chunks.
- CPU: Megatron's ``FP32Optimizer`` around ``torch.optim.AdamW`` (:class:`HostFP32Optimizer`). Megatron
  assumes CUDA in two places of that class (the loss-scale tensor, and the multi-tensor grad norm and
  clip kernels), which are replaced here by host implementations with the same semantics: the norm
  counts tensor-parallel duplicates once (``param_is_not_tensor_parallel_duplicate``) and all-reduces
  the squared norm over the model-parallel group. Its ``sharded_state_dict`` is Megatron's own, so
  optimizer state reshards across TP like the weights.

The step is split as in Megatron's ``ChainedOptimizer.step`` (prepare grads → norm → clip → update) so
that the numerics guard can veto the update *between* the norm and the update, on every rank together.
Parameter groups follow Megatron's standard rule: no weight decay for biases and 1-D parameters.
The schedule is Megatron's ``OptimizerParamScheduler`` (plain Python, works on CPU), built by
:mod:`videoar_common.lr_schedule` as for the tokenizer trainer; it steps only after an applied update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from videoar_common.lr_schedule import LRScheduler, build_lr_scheduler
from videoar_common.numerics import NumericsGuard
from videoar_megatron.training.config import OptimConfig


def megatron_optimizer_config(cfg: OptimConfig, *, bf16: bool, distributed: bool) -> OptimizerConfig:
    return OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                           adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, adam_eps=cfg.eps, clip_grad=cfg.clip_grad,
                           bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                           use_distributed_optimizer=distributed, decoupled_weight_decay=True)


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Megatron's standard rule: biases and 1-D parameters (norms, <SOS>) are not decayed."""
    return name.endswith(".bias") or param.dim() == 1


def host_param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two AdamW groups (decayed, not decayed) with the fields OptimizerParamScheduler reads."""
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
    """Megatron's FP32Optimizer with host implementations of its CUDA-only pieces (see module doc)."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig, mp_group):
        MegatronOptimizer.__init__(self, optimizer, config, _init_adam_state)
        self._scale = torch.tensor([1.0])
        self.is_stub_optimizer = False
        self.grad_stats_parallel_group = mp_group

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        squares = torch.zeros((), dtype=torch.float64)
        for grad in self.get_main_grads_for_grad_norm():
            squares += grad.double().pow(2).sum()
        if dist.is_initialized() and self.grad_stats_parallel_group.size() > 1:
            dist.all_reduce(squares, group=self.grad_stats_parallel_group)
        return float(squares.sqrt())

    def clip_grad_norm(self, clip_grad: float) -> float:
        norm = self.get_grad_norm()
        clip_to_norm(self, clip_grad, norm)
        return norm


def clip_to_norm(optimizer: MegatronOptimizer, max_norm: float, total_norm: float) -> None:
    """Scale gradients so that their global norm (already computed, ``total_norm``) is <= max_norm."""
    if max_norm <= 0:
        return
    from megatron.core.optimizer.optimizer import ChainedOptimizer
    chained = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for opt in chained:
        params = [p for p in opt.get_parameters() if p.grad is not None]
        if not params:
            continue
        if isinstance(opt, HostFP32Optimizer):
            coeff = max_norm / (total_norm + 1.0e-6)
            if coeff < 1.0:
                torch._foreach_mul_([p.grad for p in params], coeff)
        else:
            from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
            clip_grad_by_total_norm_fp32(opt.get_parameters(), max_norm, total_norm,
                                         opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


def build_host_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> HostFP32Optimizer:
    """CPU: AdamW in fp32 over this rank's (tensor-parallel shard of the) parameters."""
    config = megatron_optimizer_config(cfg, bf16=False, distributed=False)
    adam = torch.optim.AdamW(host_param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, weight_decay=cfg.weight_decay)
    return HostFP32Optimizer(adam, config, parallel_state.get_model_parallel_group())


def build_megatron_optimizer(model_chunks: list, cfg: OptimConfig, *, bf16: bool) -> MegatronOptimizer:
    """GPU: Megatron's optimizer over DDP-wrapped chunks (distributed optimizer when configured)."""
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
