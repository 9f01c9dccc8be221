"""Tensor-parallel slices of a TP=1 model's tensors and back, following Megatron's partition attributes
(for the parity scripts under tests/dist_scripts that copy a TP=1 model into a TP>1 one)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_glu_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def shard(name: str, param, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of a TP=1 tensor, following Megatron's partition attributes."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    if is_glu_fc1(name):  # per rank [gate_r; up_r], the full weight is [gate; up]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]], dim=0)
    return full.chunk(tp, dim=param.partition_dim)[rank]


def unshard(name: str, param, local: torch.Tensor, group) -> torch.Tensor:
    """Full tensor from every rank's slice (inverse of :func:`shard`)."""
    if not getattr(param, "tensor_model_parallel", False):
        return local
    parts = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(parts, local.contiguous(), group=group)
    if is_glu_fc1(name):
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([torch.cat(gates), torch.cat(ups)], dim=0)
    return torch.cat(parts, dim=param.partition_dim)


def allreduce_sequence_parallel_grads(model, group) -> None:
    """What Megatron's finalize_model_grads does for norm weights under sequence parallelism."""
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)
