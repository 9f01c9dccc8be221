"""Megatron model parallelism set up from our ``DistContext``.

Megatron's ``parallel_state`` is process-global by design; we initialise it once from the explicit
context and hand its groups back as a ``ProcessGroupCollection`` stored in ``ctx.groups``. Our code
takes its groups from there (modules receive ``pg_collection``), never from module globals of our own.

RNG: on CUDA, Megatron's tracker is seeded (``model_parallel_cuda_manual_seed``: TP ranks get distinct
init/dropout streams). On CPU there is no CUDA generator to track; the model has no dropout, so the
tracker is replaced by Megatron's no-op (inference) tracker, which sequence parallelism's
``tracker.fork()`` needs.

Rank order: the trainer uses ``tp-cp-pp-dp`` (Megatron supports it next to its default
``tp-cp-dp-pp``): the TP x CP x PP ranks of one model replica are consecutive, which is what the shard
reader's replica-aware sharding (mosaicml-streaming ``replication``) requires. With PP = 1 both orders
are identical.

Context parallelism (``parallel.context_parallel``): Megatron's own CP groups
(``initialize_model_parallel(context_parallel_size=...)``), in the collection as ``cp``; gradients of a
replica's CP ranks are reduced with the data-parallel ones over ``dp_cp`` (Megatron's
``get_data_parallel_group(with_context_parallel=True)``, what its DDP and distributed optimizer use).
"""
from __future__ import annotations

from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection

from videoar_common.distributed import DistContext
from videoar_megatron.model.config import ParallelConfig


DEFAULT_ORDER = "tp-cp-ep-dp-pp"
"""Megatron's default rank order."""
REPLICA_CONSECUTIVE_ORDER = "tp-cp-ep-pp-dp"
"""A model replica's TP x CP x PP ranks are consecutive (the trainer's order)."""


def init_model_parallel(ctx: DistContext, parallel: ParallelConfig, seed: int = 1234,
                        order: str = DEFAULT_ORDER) -> ProcessGroupCollection:
    """Create TP/CP/PP/DP groups for ``parallel``; returns (and stores in ``ctx.groups``) the collection."""
    if ctx.world_size % parallel.replica_size:
        raise ValueError(f"world size {ctx.world_size} is not divisible by parallel.tensor_parallel "
                         f"({parallel.tensor_parallel}) x parallel.context_parallel ({parallel.context_parallel}) "
                         f"x parallel.pipeline_parallel ({parallel.pipeline_parallel})")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # The model has no experts, but Megatron (0.16.1) lays out an expert grid anyway, sized without CP,
    # and with PP > 1 in an order not ending in pp it requires that grid's data-parallel size to equal
    # the attention's. Folding CP into the (unused) expert-parallel dimension makes them equal.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=parallel.tensor_parallel,
                                             pipeline_model_parallel_size=parallel.pipeline_parallel,
                                             virtual_pipeline_model_parallel_size=parallel.megatron_virtual_stages,
                                             context_parallel_size=parallel.context_parallel,
                                             expert_model_parallel_size=parallel.context_parallel,
                                             order=order)
    if ctx.device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    ctx.groups = ProcessGroupCollection.use_mpu_process_groups()
    return ctx.groups


def destroy_model_parallel(ctx: DistContext) -> None:
    parallel_state.destroy_model_parallel()
    ctx.groups = None


def stage_flags(groups: ProcessGroupCollection) -> tuple[bool, bool]:
    """(pre_process, post_process) of this pipeline rank: first stage embeds, last stage has the head."""
    pp = groups.pp
    return pp.rank() == 0, pp.rank() == pp.size() - 1
