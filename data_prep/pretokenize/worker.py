"""Who am I: this process's worker slot among all pre-tokenization workers, from the launcher's
environment (torchrun, srun, a SLURM array, or both combined), and the partitions it owns.

Partitions, not ranks, are the unit of work: worker ``i`` of ``n`` owns partitions ``p`` with
``p % n == i``, so a rerun may use another number of workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Worker:
    """This process's slot among all pre-tokenization workers (passed explicitly, never global)."""

    index: int
    count: int
    local_rank: int = 0
    launcher: str = "single"

    def partitions(self, num_partitions: int) -> list[int]:
        return [p for p in range(num_partitions) if p % self.count == self.index]


def _env_int(env: dict, *names: str, default: int) -> int:
    for name in names:
        if env.get(name) not in (None, ""):
            return int(env[name])
    return default


def worker_from_env(env: dict | None = None) -> Worker:
    """Worker slot from a SLURM array (``SLURM_ARRAY_TASK_ID/COUNT/MIN``) and/or torchrun / srun ranks.

    Ranks are read like ``videoar_common.distributed.read_launch_env`` (torchrun first, then srun). Both
    combine: array task ``a`` of ``A`` running ``W`` ranks gives worker ``a * W + rank`` of ``A * W``.
    """
    env = dict(os.environ if env is None else env)
    rank = _env_int(env, "RANK", "SLURM_PROCID", default=0)
    world = _env_int(env, "WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int(env, "LOCAL_RANK", "SLURM_LOCALID", default=0)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the world of {world} (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    launcher = "torchrun" if "RANK" in env else ("srun" if world > 1 else "single")
    if env.get("SLURM_ARRAY_TASK_ID") not in (None, ""):
        task = int(env["SLURM_ARRAY_TASK_ID"]) - _env_int(env, "SLURM_ARRAY_TASK_MIN", default=0)
        tasks = _env_int(env, "SLURM_ARRAY_TASK_COUNT", default=0)
        if not 0 <= task < tasks:
            raise ValueError(f"SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']} is outside the array "
                             f"(SLURM_ARRAY_TASK_MIN={env.get('SLURM_ARRAY_TASK_MIN')}, "
                             f"SLURM_ARRAY_TASK_COUNT={tasks}); submit with --array=0-N (no step)")
        return Worker(index=task * world + rank, count=tasks * world, local_rank=local_rank,
                      launcher="slurm-array" if world == 1 else f"slurm-array+{launcher}")
    return Worker(index=rank, count=world, local_rank=local_rank, launcher=launcher)
