"""slurm/train_ar.sbatch without a controller (fake `srun`/`scontrol` on PATH, SLURM variables set by
hand; a later issue runs it under a real one-node slurmctld): USR1 to the batch shell reaches every
worker through srun and torchrun, the run saves and is requeued, the rerun resumes and finishes; an
unresolvable rendezvous host fails loudly before anything starts; per-rank logs are written."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from videoar_common.atomic import committed_steps
from videoar_megatron.training.audit import consumed_samples, step_metrics

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("getent") is None,
                                reason="needs bash and getent")


def fake_bin(tmp: Path) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [[ $1 == show && $2 == hostnames ]]; then echo "$FAKE_FIRST_HOST"; '
        'elif [[ $1 == requeue ]]; then echo "requeue $2" >> "$FAKE_SCONTROL_LOG"; else exit 1; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def slurm_env(tmp: Path, shards: Path, run_dir: Path, *sets: str, host: str = "localhost") -> dict:
    env = {**os.environ, "PATH": f"{fake_bin(tmp)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[001-002]",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_SUBMIT_DIR": str(REPO),
           "VIDEOAR_PYTHON": sys.executable, "VIDEOAR_GPUS_PER_NODE": "2", "VIDEOAR_RDZV_PORT": str(free_port()),
           "VIDEOAR_SHUTDOWN_TIMEOUT": "60", "FAKE_FIRST_HOST": host, "FAKE_SCONTROL_LOG": str(tmp / "scontrol.log"),
           "VIDEOAR_RECIPE": "recipes/ar/tiny.yaml", "VIDEOAR_RUN_DIR": str(run_dir),
           "VIDEOAR_SET": " ".join([f"data.path={shards}", "logging.progress_bar=false", *sets])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_unresolvable_rendezvous_host_fails_before_anything_starts(tmp_path, tiny_shards):
    env = slurm_env(tmp_path, tiny_shards, tmp_path / "run", host="no-such-host.invalid")
    proc = subprocess.run(["bash", str(SLURM / "train_ar.sbatch")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "cannot resolve the rendezvous host 'no-such-host.invalid'" in proc.stderr
    assert "refusing to fall back to localhost" in proc.stderr and not (tmp_path / "run").exists()
    missing = subprocess.run(["bash", str(SLURM / "train_ar.sbatch")], env={**env, "VIDEOAR_RECIPE": ""},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "set VIDEOAR_RECIPE" in missing.stderr


def test_usr1_to_the_batch_shell_saves_requeues_and_the_rerun_finishes(tmp_path, tiny_shards):
    run = tmp_path / "run"
    env = slurm_env(tmp_path, tiny_shards, run, "train.steps=150", "checkpoint.save_every=0",
                    "optim.warmup_steps=5")
    batch = subprocess.Popen(["bash", str(SLURM / "train_ar.sbatch")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and batch.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert batch.poll() is None, "training ended before the signal could be sent"
    batch.send_signal(signal.SIGUSR1)  # what SLURM does 600 s before the time limit (--signal=B:USR1@600)
    out, err = batch.communicate(timeout=120)
    assert batch.returncode == 0, err[-4000:]
    assert "received SIGUSR1, forwarding it" in err
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    marker = json.loads((run / "REQUEUE_REQUESTED").read_text())
    stopped = marker["step"]
    assert marker["reason"] == "signal SIGUSR1" and 3 <= stopped < 150
    assert committed_steps(run / "checkpoints") == [stopped]
    logs = sorted((run / "logs" / "job-4242" / "node-0").rglob("stderr.log"))
    assert len(logs) == 2 and "stopping at step" in logs[0].read_text()  # per-rank logs, rank 0 first

    (tmp_path / "scontrol.log").unlink()  # the requeued job: same script, same run directory
    rerun = subprocess.run(["bash", str(SLURM / "train_ar.sbatch")], env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert not (tmp_path / "scontrol.log").exists() and not (run / "REQUEUE_REQUESTED").exists()
    assert f"step_{stopped:08d} at step {stopped}" in rerun.stderr
    assert sorted(consumed_samples(run)) == list(range(1, 151)) and max(step_metrics(run)) == 150
