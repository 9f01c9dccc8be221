"""Shared test setup: GPU tests skip without CUDA; SLURM tests can be skipped locally with a flag."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from tests.subprocess_env import child_env

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Quiet, offline, reproducible defaults for every test process and the subprocesses it starts.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def compile_cache_environment_restored():
    """A run in this process (a CLI or benchmark called in-process) points Inductor's and Triton's caches
    at its run directory through the environment (videoar_common.compile_cache); restore it after each
    test, so a later test's subprocesses do not inherit an earlier test's directory as a site setting."""
    from videoar_common.compile_cache import INDUCTOR_ENV, TRITON_ENV
    saved = {name: os.environ.get(name) for name in (INDUCTOR_ENV, TRITON_ENV)}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_addoption(parser):
    parser.addoption("--skip-slurm", action="store_true",
                     help="skip tests that start a real SLURM controller (never skipped in CI)")


def pytest_collection_modifyitems(config, items):
    import torch
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run `make test-gpu` on a GPU host)")
    skip_slurm = pytest.mark.skip(reason="--skip-slurm given")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slurm" in item.keywords and config.getoption("--skip-slurm"):
            item.add_marker(skip_slurm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun(tmp_path):
    """Run a Python file under torchrun with N processes on this machine; returns CompletedProcess."""
    import subprocess

    def run(script: str | Path, nproc: int, *args: str, timeout: float = 600, env: dict | None = None):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--nnodes=1", f"--master_port={free_port()}", str(script), *map(str, args)]
        full_env = child_env(**(env or {}))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                              cwd=tmp_path)
        if proc.returncode != 0:
            raise AssertionError(f"torchrun failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-6000:]}\n"
                                 f"STDERR:\n{proc.stderr[-6000:]}")
        return proc
    return run


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Token shards for the AR training tests, made once per session by the real pre-tokenizer."""
    from tests.train_helpers import make_tiny_shards
    return make_tiny_shards(tmp_path_factory.mktemp("tiny_ar"))


@pytest.fixture(scope="session")
def tiny_image_shards(tiny_shards):
    """One-frame (image) shards of the same corpus, for mixed-source training tests."""
    from tests.train_helpers import make_tiny_image_shards
    return make_tiny_image_shards(tiny_shards)


@pytest.fixture(scope="session")
def trained_ar_run(tmp_path_factory):
    """A real tiny training run (tokenizer, pre-tokenized shards, 2 trainer steps, both saved) whose
    checkpoints the sampling and evaluation tests load; made once per session (tests/sample_helpers.py)."""
    from tests.sample_helpers import train_tiny_run
    return train_tiny_run(tmp_path_factory.mktemp("trained_ar"))
