"""The shipped SLURM scripts, submitted unchanged to a real one-node SLURM controller.

Knobs used are the documented ones only: environment variables (VIDEOAR_*), the site file, and extra
sbatch arguments that size the request to this machine (a CI box has 2 cores and no GPUs; the test
cluster advertises GPU GRES without devices, so GPU requests are scheduled and the job runs on CPU).
"""
from __future__ import annotations

import json
import os
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
