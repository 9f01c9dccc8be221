"""Shared by the AR training tests: tiny token shards made by the real pre-tokenizer, and a runner for
``videoar train`` (one process, or N under torchrun). ``engine``: None runs the production CLI as a user
would (``train.engine`` from the recipe: auto); ``local`` runs the same and checks that the run used the
local engine (auto on CPU); ``megatron`` runs the same CLI with ``train.engine=megatron`` inside the
CUDA emulation (tests/dist_scripts/emulated_megatron_train.py) and checks that engine ran."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.subprocess_env import child_env

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "ar" / "tiny.yaml"
EMULATED_CLI = REPO / "tests" / "dist_scripts" / "emulated_megatron_train.py"
ENGINES = ("local", "megatron")
"""What the engine-parametrized tests run on: every promise they state holds on both."""


def make_tiny_shards(root: Path) -> Path:
    """16 synthetic VP9 videos of 4 classes → random tiny tokenizer → 32 samples (3 latent frames of
    2x2, d = 8, scales 1x1 and 2x2) through `data_prep`'s pre-tokenizer, as the tiny recipe expects."""
    from data_prep.synth import make_corpus
    from tests.pretok_helpers import make_tiny_tokenizer, pretok_config, pretokenizer
    tok = make_tiny_tokenizer(root / "tokenizer")
    corpus = make_corpus(root / "corpus", num=16, classes=4, codec="vp9", frames=12, size=(48, 64), fps=8, seed=1)
    out = root / "shards"
    pretokenizer(pretok_config(tok, corpus, out, num_partitions=2)).run()
    return out


def make_tiny_image_shards(video_shards: Path) -> Path:
    """One-frame clips (images: 1 latent frame) of the same corpus and tokenizer as ``video_shards``."""
    from tests.pretok_helpers import pretok_config, pretokenizer
    root = video_shards.parent
    out = root / "image_shards"
    cfg = pretok_config(root / "tokenizer", root / "corpus" / "metadata.csv", out, num_partitions=1,
                        clips={"num_frames": 1, "clips_per_video": 2})
    pretokenizer(cfg).run()
    return out


def train_command(nproc: int, run_dir: Path, shards: Path, *sets: str, recipe: Path = TINY_RECIPE,
                  args: tuple[str, ...] = (), engine: str | None = None) -> list[str]:
    if engine not in (None, *ENGINES):
        raise ValueError(f"engine must be None or one of {ENGINES}, got {engine!r}")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        f"--master_port={_free_port()}"]
    entry = ["-m", "videoar_megatron.cli", "train"] if engine != "megatron" else [
        str(EMULATED_CLI), "--set", "train.engine=megatron"]
    cli = [*entry, "--recipe", str(recipe), "--run-dir", str(run_dir),
           "--set", f"data.path={shards}", "--set", "logging.progress_bar=false", *args]
    for item in sets:
        cli += ["--set", item]
    return launcher + cli


def run_train(nproc: int, run_dir: Path, shards: Path, *sets: str, recipe: Path = TINY_RECIPE,
              expect_rc: int | None = 0, timeout: float = 300, args: tuple[str, ...] = (),
              engine: str | None = None) -> subprocess.CompletedProcess:
    """Run ``videoar train`` on ``engine`` (see the module docstring); checks the exit code unless
    ``expect_rc`` is None, and that a run that started went through the engine asked for."""
    env = child_env(OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(train_command(nproc, run_dir, shards, *sets, recipe=recipe, args=args, engine=engine),
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"videoar train exited {proc.returncode}, expected {expect_rc}:\n"
                             f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    if engine is not None and "(train.engine: " in proc.stderr:  # the run started
        assert f"(train.engine: {engine})" in proc.stderr, proc.stderr[-4000:]
    return proc


def _free_port() -> int:
    from tests.conftest import free_port
    return free_port()


def losses(run_dir: Path) -> dict[int, float]:
    from videoar_megatron.training.audit import step_metrics
    return {s: r["loss"] for s, r in step_metrics(run_dir).items()}
