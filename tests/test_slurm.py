"""The shipped SLURM scripts, submitted unchanged to a real one-node SLURM controller.

Knobs used are the documented ones only: environment variables (VIDEOAR_*), the site file, and extra
sbatch arguments that size the request to this machine (a CI box has 2 cores and no GPUs; the test
cluster advertises GPU GRES without devices, so GPU requests are scheduled and the job runs on CPU).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretok_helpers import make_clean_corpus, make_tiny_tokenizer
from tests.slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SMALL = ["--cpus-per-task=1", "--mem=2G", "--time=30"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


def _job_env(tmp: Path) -> dict:
    return {"VIDEOAR_REPO": str(REPO), "VIDEOAR_PYTHON": sys.executable,
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_pretokenize_array_and_merge(cluster, tmp_path):
    tok = make_tiny_tokenizer(tmp_path / "tok")
    manifest = make_clean_corpus(tmp_path / "corpus", num=4)
    out = tmp_path / "shards"
    env = {**_job_env(tmp_path), "VIDEOAR_RECIPE": "recipes/pretokenize/tiny.yaml",
           "VIDEOAR_SET": f"tokenizer={tok} input_manifest={manifest} output_dir={out} num_partitions=2",
           "VIDEOAR_TASKS": "2"}
    submit = subprocess.run(["bash", str(REPO / "slurm/pretokenize_submit.sh"), *SMALL,
                             f"--chdir={tmp_path}"], env={**cluster.env, **env},
                            capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    words = submit.stdout.split()
    array_job, merge_job = words[2], words[-1]
    states = cluster.wait_done(array_job, timeout=600)
    assert states == ["COMPLETED", "COMPLETED"], (states, _outputs(tmp_path), cluster.logs())
    assert cluster.wait_done(merge_job, timeout=300) == ["COMPLETED"], _outputs(tmp_path)
    committed = json.loads((out / "COMMITTED").read_text())
    assert committed["partitions"] == 2 and committed["samples"] == 8       # 4 videos x 2 clips
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000-of-00002", "part-00001-of-00002"]


def _outputs(directory: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(directory.glob("slurm-*.out")))


TRAIN_SMALL = ["--gpus-per-node=2", "--cpus-per-task=2", "--mem=8G", "--time=30"]


def _train_env(tmp: Path, shards: Path, run_dir: Path, steps: int) -> dict:
    return {"VIDEOAR_HOME": str(REPO), "VIDEOAR_PYTHON": sys.executable, "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1", "VIDEOAR_GPUS_PER_NODE": "2", "VIDEOAR_RDZV_PORT": str(_port()),
            "VIDEOAR_RECIPE": "recipes/ar/tiny.yaml", "VIDEOAR_RUN_DIR": str(run_dir),
            "VIDEOAR_SET": f"data.path={shards} train.steps={steps} checkpoint.save_every=1000 "
                           "logging.progress_bar=false",
            "VIDEOAR_SHUTDOWN_TIMEOUT": "120"}


def _port() -> int:
    from tests.conftest import free_port
    return free_port()


def test_train_ar_runs_with_per_rank_logs_and_the_sites_compile_cache(cluster, tmp_path, tiny_shards):
    """A 2-rank job through slurm/train_ar.sbatch: every step once, a committed checkpoint, one log per
    local rank; the site file (VIDEOAR_SITE_FILE, as slurm/site.sh.example shows) points the compile
    cache at one shared path, which the job uses instead of its run directory."""
    run_dir, shared_cache = tmp_path / "run", tmp_path / "shared" / "compile"
    site = tmp_path / "site.sh"
    site.write_text(f"export TORCHINDUCTOR_CACHE_DIR={shared_cache}\n")
    job = cluster.sbatch(*TRAIN_SMALL, f"--chdir={tmp_path}", str(REPO / "slurm/train_ar.sbatch"),
                         env={**_train_env(tmp_path, tiny_shards, run_dir, steps=30), "VIDEOAR_SITE_FILE": str(site)})
    assert cluster.wait_done(job, timeout=600) == ["COMPLETED"], (_outputs(tmp_path), cluster.logs())
    from videoar_megatron.training.audit import consumed_samples
    assert sorted(consumed_samples(run_dir)) == list(range(1, 31))
    assert (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*/COMMITTED"))
    rank_logs = sorted(p.parent.name for p in (run_dir / "logs").rglob("stdout.log"))
    assert rank_logs == ["0", "1"], rank_logs                      # one log per local rank
    logs = _outputs(tmp_path) + "".join(p.read_text(errors="replace") for p in (run_dir / "logs").rglob("*.log"))
    assert f"compile cache {shared_cache} (from environment TORCHINDUCTOR_CACHE_DIR;" in logs, logs[-3000:]
    assert shared_cache.is_dir() and not (run_dir / "compile_cache").exists()


def test_preemption_drill_requeues_and_resumes(cluster, tmp_path, tiny_shards):
    """USR1 to the batch shell, as SLURM sends before the time limit: the job saves, requeues itself,
    resumes from that checkpoint and finishes, with one logger run id and no sample skipped or repeated."""
    from videoar_megatron.training.audit import consumed_samples
    run_dir = tmp_path / "run"
    steps = 200  # far past where the stop lands (~step 30) on a 2-core host; each step is re-run time after the requeue
    job = cluster.sbatch(*TRAIN_SMALL, f"--chdir={tmp_path}", str(REPO / "slurm/train_ar.sbatch"),
                         env=_train_env(tmp_path, tiny_shards, run_dir, steps=steps))
    progressed = lambda: (run_dir / "metrics.jsonl").is_file() and sum(
        1 for _ in open(run_dir / "metrics.jsonl")) >= 20
    cluster.wait_for(progressed, 300, "training to pass step 20", interval=1.0)
    run_id = (run_dir / "logger_run_id.txt").read_text().strip()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True, timeout=30)
    # the job requeues itself: its restart count goes up, then it runs again and completes
    cluster.wait_for(lambda: cluster.job_field(job, "Restarts") not in ("", "0"), 300, "the job to requeue")
    saved = sorted((run_dir / "checkpoints").glob("step_*/COMMITTED"))
    assert saved, "no committed checkpoint after the stop request"
    stop_step = int(saved[-1].parent.name.split("_")[1])
    assert 20 <= stop_step < steps
    assert cluster.wait_done(job, timeout=900) == ["COMPLETED"], (_outputs(tmp_path), cluster.logs())
    assert (run_dir / "logger_run_id.txt").read_text().strip() == run_id
    consumed = consumed_samples(run_dir)
    assert sorted(consumed) == list(range(1, steps + 1))
    ids = [i for step in consumed.values() for replica in step for i in replica]
    assert len(ids) == steps * 8                                    # global batch 8, every step once
    log = "".join(p.read_text(errors="replace") for p in tmp_path.glob("slurm-*.out"))
    assert "requeueing job" in log and "(restart 1)" in log, log[-3000:]


def test_unresolvable_rendezvous_host_fails_loudly(cluster, tmp_path, tiny_shards):
    """The rendezvous host comes from the allocation's node list (expanded by the real scontrol); a
    node name that does not resolve stops the script before torchrun starts, naming the host."""
    run_dir = tmp_path / "run"
    env = {**cluster.env, **_train_env(tmp_path, tiny_shards, run_dir, steps=5),
           "SLURM_JOB_ID": "999", "SLURM_JOB_NODELIST": "nosuchnode-[07-08]", "SLURM_JOB_NUM_NODES": "2"}
    proc = subprocess.run(["bash", str(REPO / "slurm/train_ar.sbatch")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "cannot resolve the rendezvous host 'nosuchnode-07'" in proc.stderr, proc.stderr
    assert "localhost" in proc.stderr and not (run_dir / "metrics.jsonl").exists()
