"""Distributed context: ranks from torchrun agree, collectives work; a single process works too."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from videoar_common.distributed import init_distributed, read_launch_env, shutdown_distributed

SCRIPTS = Path(__file__).parent / "dist_scripts"


def test_two_processes_agree_on_ranks_and_all_reduce(torchrun, tmp_path):
    torchrun(SCRIPTS / "allreduce.py", 2, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["backend"] == "gloo" for r in results)
    assert [r["local_rank"] for r in results] == [0, 1]
    assert all(r["sum"] == 3.0 for r in results)          # 1 + 2
    assert all(r["any"] is True for r in results)         # only rank 1 raised the flag


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "SLURM_PROCID",
                "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed(device="cpu")
    try:
        assert (ctx.rank, ctx.world_size, ctx.device.type, ctx.backend) == (0, 1, "cpu", "gloo")
        t = torch.ones(2)
        torch.distributed.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
        assert ctx.any(True) and not ctx.any(False)
    finally:
        shutdown_distributed()


def test_slurm_variables_are_read_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    assert read_launch_env() == (5, 8, 1, 4)
