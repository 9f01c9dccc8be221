"""Forward/backward of one optimizer step: the Megatron engine, and the local engine for CPU hosts.

Both engines take the step's micro-batches, accumulate gradients of ``loss / micro-batches`` (the
mean over the step's samples, as Megatron's schedules do), synchronise gradients over data-parallel
replicas (mean) and the sequence-parallel norm weights over tensor-parallel ranks (sum), and return
the per-micro-batch :class:`~videoar_megatron.model.loss.LossOutput` of this rank (empty on pipeline
stages without the head). Under context parallelism a rank's loss is its share of the sequence's
(:func:`micro_batch_loss`); its backward runs on ``CP x loss`` and gradients are averaged over the data
x context parallel ranks (``dp_cp``), which is the data-parallel mean of the unsplit gradients (what
Megatron's schedules and DDP do; :mod:`videoar_megatron.model.context_parallel`). The optimizer step is not theirs (see :mod:`.optim`). ``train.engine``
picks one (:func:`select_engine`; ``auto``: Megatron on CUDA, local on CPU).

- :class:`MegatronEngine` (production, CUDA): each model chunk wrapped in Megatron
  ``DistributedDataParallel`` (fp32 gradient buffers, reduce-scatter into the distributed optimizer),
  ``get_forward_backward_func()`` (no pipelining for PP = 1, 1F1B for PP > 1, interleaved 1F1B over the
  chunks with ``parallel.virtual_pipeline_stages`` > 1: every stage builds the same micro-batches, since
  the mask and RoPE need the layout), ``finalize_model_grads`` for the DP/SP reductions. CI runs it on
  CPU/gloo inside :func:`.cuda_compat.emulated_cuda` (``tests/test_train_emulated.py`` and the
  engine-parametrized resume tests).
- :class:`LocalEngine` (CPU, PP = 1): only what Megatron cannot do on a host. Megatron's DDP allocates
  its grad buffers on CUDA, its schedules count tokens in a CUDA tensor, and ``finalize_model_grads``
  needs the DDP wrapper; so: the same model code in a loop over micro-batches, then one coalesced
  all-reduce per reduction, on gloo (the mean over Megatron's ``dp_cp`` group, as its DDP). Pipeline parallelism and activation recompute (which saves CUDA
  RNG states) are refused by :func:`select_engine`; the sequence-parallel linears' CUDA buffers are made on the host by
  :func:`.cuda_compat.host_current_device`, open for the forward/backward only.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from videoar_megatron.model.config import LossConfig, ParallelConfig
from videoar_megatron.model.loss import LossOutput, bit_loss
from videoar_megatron.model.sequence import VideoARBatch
from videoar_megatron.training.cuda_compat import cuda_emulated, host_current_device

ENGINES = ("megatron", "local")


def select_engine(requested: str, device: torch.device, parallel: ParallelConfig) -> str:
    """``train.engine`` → the engine this run builds: ``auto`` is Megatron's on CUDA and the local one
    on CPU. Raises ``ValueError`` naming the knobs, before anything is built, for a combination that
    cannot run."""
    cuda = device.type == "cuda"
    engine = requested if requested != "auto" else ("megatron" if cuda else "local")
    if engine not in ENGINES:
        raise ValueError(f"train.engine must be auto, megatron or local, got {requested!r}")
    if engine == "megatron" and not cuda and not cuda_emulated():
        raise ValueError("train.engine=megatron needs CUDA (Megatron's DDP, schedules and optimizers allocate "
                         "there); on CPU it runs only inside the CI emulation (videoar_megatron.training."
                         "cuda_compat.emulated_cuda). Use train.engine=auto or local on CPU")
    if engine == "local":
        if cuda:
            raise ValueError("train.engine=local is the CPU engine; on CUDA use train.engine=auto or megatron")
        if parallel.pipeline_parallel > 1:
            raise ValueError("parallel.pipeline_parallel > 1 needs the Megatron engine (train.engine=megatron, "
                             "the default on CUDA): the local CPU engine runs pipeline_parallel=1 only")
        if parallel.recompute != "none":
            raise ValueError(f"parallel.recompute={parallel.recompute} needs CUDA (Megatron's recompute saves "
                             f"CUDA RNG states); use parallel.recompute=none with the local CPU engine")
    return engine


def micro_batch_loss(model, logits: torch.Tensor, mb: VideoARBatch, loss_cfg: LossConfig) -> LossOutput:
    """The loss of this rank's logits: the whole micro-batch's, or its context-parallel share of it."""
    index_n = model.video_index_n(mb.layout, logits.device)
    return bit_loss(logits, mb.targets_BNd, mb.layout, loss_cfg, video_index_n=index_n)


def _poison(loss: torch.Tensor, inject_nan: bool) -> torch.Tensor:
    """``debug.nan_at_steps``: a non-finite loss (and so non-finite gradients) on this rank."""
    return loss * float("nan") if inject_nan else loss


def _record(out: LossOutput, loss: torch.Tensor) -> LossOutput:
    """What the trainer reduces and logs: the micro-batch's (possibly poisoned) loss, detached."""
    return LossOutput(loss=loss.detach().clone(), per_scale_loss_K=out.per_scale_loss_K,
                      per_scale_acc_K=out.per_scale_acc_K, bit_accuracy=out.bit_accuracy)


class LocalEngine:
    """CPU engine (PP = 1): see the module docstring."""

    name = "local"
    schedule = "the local engine's micro-batch loop (no pipeline)"

    def __init__(self, model, loss_cfg: LossConfig, groups, *, sequence_parallel: bool):
        """PP = 1 and no recompute (checked by :func:`select_engine`)."""
        self.model, self.loss_cfg, self.groups = model, loss_cfg, groups
        self.model_chunks = [model]
        # Megatron's SP linears and sequence mappings (also the CP key/value gather) allocate their
        # all-gather / reduce-scatter buffers on torch.cuda.current_device(), in forward and backward.
        gathers = sequence_parallel or groups.cp.size() > 1
        self._buffer_scope = host_current_device if gathers else contextlib.nullcontext

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def forward_backward(self, microbatches: list[VideoARBatch], inject_nan: bool = False) -> list[LossOutput]:
        self.zero_grad()
        outs = []
        cp = self.groups.cp.size()
        with self._buffer_scope():
            for mb in microbatches:
                out = micro_batch_loss(self.model, self.model(mb), mb, self.loss_cfg)
                loss = _poison(out.loss, inject_nan)
                # x CP: the dp_cp mean below divides by CP what the CP ranks' shares add up to.
                (loss * cp / len(microbatches)).backward()
                outs.append(_record(out, loss))
        self._finalize_grads()
        return outs

    def _finalize_grads(self) -> None:
        dp_cp = self.groups.dp_cp
        if self.groups.cp.size() > 1:
            # A CP rank may hold no token that reaches some parameter (e.g. no video row for the head);
            # Megatron's DDP buffers hold zeros there too, and every rank must join the same reduction.
            for p in self.model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if dp_cp.size() > 1:
            _all_reduce_coalesced([p.grad for p in params], dp_cp, scale=1.0 / dp_cp.size())
        tp = self.groups.tp
        sp = [p.grad for p in params if getattr(p, "sequence_parallel", False)]
        if sp and tp.size() > 1:
            _all_reduce_coalesced(sp, tp)


def _all_reduce_coalesced(tensors: list[torch.Tensor], group, scale: float = 1.0) -> None:
    """Sum ``tensors`` over ``group`` in one collective (per dtype), times ``scale``, in place."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        for t, synced in zip(same, _unflatten_dense_tensors(flat, same)):
            t.copy_(synced)


class MegatronEngine:
    """Production engine: Megatron DDP + pipeline schedules; see the module docstring."""

    name = "megatron"

    def __init__(self, chunks: list, loss_cfg: LossConfig, *, distributed_optimizer: bool):
        """``chunks``: this rank's model chunks (one, or the virtual pipeline stages sharing one config)."""
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=distributed_optimizer)
        self.loss_cfg, self.config = loss_cfg, chunks[0].config
        self.head_chunk = chunks[-1]  # the chunk with the bit head on the last pipeline rank (loss_func's)
        self.model_chunks = []
        for i, chunk in enumerate(chunks):
            for p in chunk.parameters():  # as Megatron's get_model: replicated params get TP attributes
                tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
            # As Megatron's get_model: only the first chunk's buffers are bucketed (overlap is off here).
            self.model_chunks.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                                             disable_bucketing=i > 0))
        no_sync = [ddp.no_sync for ddp in self.model_chunks]
        self.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.config.finalize_model_grads_func = finalize_model_grads

    @property
    def schedule(self) -> str:
        """The Megatron schedule each step runs (for the start log): the parallel state, not this class,
        picks it (no pipelining, 1F1B, or interleaved 1F1B with virtual stages)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        return f"{get_forward_backward_func().__name__} over {len(self.model_chunks)} model chunk(s) per rank"

    def attach_optimizer(self, optimizer) -> None:
        """Loss scaling (fp16) goes through the optimizer, as in Megatron's training loop."""
        self.optimizer = optimizer
        self.config.grad_scale_func = optimizer.scale_loss

    def zero_grad(self) -> None:
        for ddp in self.model_chunks:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def forward_backward(self, microbatches: list[VideoARBatch], inject_nan: bool = False) -> list[LossOutput]:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        self.zero_grad()
        outs: list[LossOutput] = []

        def forward_step(data_iterator, model):
            mb = next(data_iterator)

            def loss_func(logits):
                out = micro_batch_loss(self.head_chunk, logits, mb, self.loss_cfg)
                loss = _poison(out.loss, inject_nan)
                outs.append(_record(out, loss))
                # The schedule multiplies the returned loss in place by CP and divides it by the number
                # of micro-batches (forward_step_calc_loss), as the local engine does.
                return loss.clone(), {"loss": loss.detach()}
            return model(mb), loss_func

        layout = microbatches[0].layout
        # The interleaved schedule wants one iterator per chunk; every chunk runs every micro-batch in
        # order and needs the batch itself (mask and RoPE come from its layout).
        data = (iter(microbatches) if len(self.model_chunks) == 1
                else [iter(microbatches) for _ in self.model_chunks])
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data,
                                    model=self.model_chunks, num_microbatches=len(microbatches),
                                    seq_length=layout.seq_len, micro_batch_size=microbatches[0].batch_size,
                                    forward_only=False)
        return outs
