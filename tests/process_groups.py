"""Megatron process groups of a one-process world, for tests that build models in-process."""
from __future__ import annotations

from contextlib import contextmanager

from videoar_common.distributed import init_distributed, shutdown_distributed
from videoar_megatron.model.config import ParallelConfig
from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel


@contextmanager
def single_process_groups(device: str = "cpu"):
    """TP = PP = DP = 1 groups on ``device``; torn down (groups, then the process group) on exit."""
    ctx = init_distributed(device=device)
    try:
        yield init_model_parallel(ctx, ParallelConfig())
    finally:
        destroy_model_parallel(ctx)
        shutdown_distributed()
