"""The distributed context: one explicit object passed to whoever needs ranks, devices or groups.

Built from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, ...) or, when a job is started by
``srun`` without torchrun, from SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). Without either it
is a single process: a world of one is still initialised (on an in-memory store), so collectives and
Megatron's parallel state work the same way everywhere. gloo on CPU, NCCL on GPU. There are no
module-level globals: the context is returned and passed on.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_INIT_TIMEOUT_S = 1800.0  # generous: first-step compilation and slow file systems


@dataclass
class DistContext:
    """Ranks, device and (once model parallelism is set up) process groups of this process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    groups: Any = field(default=None)
    """Megatron ``ProcessGroupCollection`` (tp, pp, dp, ...) once model parallelism is initialised."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce_max(self, value: float, group: Any = None) -> float:
        """Max of a scalar over ranks (used for 'any rank saw X' decisions)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return float(t.item())

    def any(self, flag: bool, group: Any = None) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return self.all_reduce_max(1.0 if flag else 0.0, group) > 0.5

    def _collective_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _env_int(*names: str, default: int | None = None) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def read_launch_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun, else SLURM, else (0,1,0,1)."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    local_world = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=None)
    if local_world is None:
        local_world = world if world == 1 else max(1, world // max(_env_int("SLURM_NNODES", default=1), 1))
    return rank, world, local_rank, local_world


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` → the local GPU when CUDA is present, else CPU; ``cpu``/``cuda`` force it."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was requested but CUDA is not available on this host")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_INIT_TIMEOUT_S) -> DistContext:
    """Initialise torch.distributed from the launcher's environment and return the context."""
    rank, world, local_rank, local_world = read_launch_env()
    dev = pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            # A world of one needs no rendezvous: an in-process store keeps single-process runs
            # free of ports while every collective still works.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            if "MASTER_ADDR" not in os.environ:
                raise RuntimeError(
                    f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with torchrun, or export "
                    "MASTER_ADDR/MASTER_PORT from the SLURM allocation (see slurm/*.sbatch)")
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=timeout, device_id=dev if dev.type == "cuda" else None)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank,
                       local_world_size=local_world, device=dev, backend=backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
