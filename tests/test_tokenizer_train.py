"""Tokenizer training with DeepSpeed on 2 gloo processes: the loss goes down, resume after an
interruption reproduces the uninterrupted losses bit for bit, a NaN on one rank is handled by both
ranks together and never checkpointed, and unusable videos are logged and skipped.

All runs use a micro model (4x spatial, tau = 4, 16x16 clips of 5 frames) inheriting the tiny recipe.
The first DeepSpeed run on a machine builds its shm op (about a minute, cached afterwards).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data_prep.synth import make_corpus
from tests.conftest import REPO_ROOT, free_port
from tests.test_lr_schedule import documented_lr
from videoar_common.atomic import committed_steps
from videoar_common.run_logging import read_metrics
from tests.subprocess_env import child_env

SCRIPT = Path(__file__).parent / "dist_scripts" / "tokenizer_train.py"
pytestmark = pytest.mark.slow

MICRO = {
    "base": str(REPO_ROOT / "recipes" / "tokenizer" / "tiny.yaml"),
    "init": {"from_recipe": "", "reinflate": False},
    "model": {"latent_dim": 8, "base_channels": 8, "channel_mult": [1, 1, 2], "temporal_down_levels": [0, 1],
              "norm_groups": 4, "scale_schedule": [[1, 1], [2, 2], [4, 4]]},
    "discriminator": {"base_channels": 4, "channel_mult": [1, 2], "temporal_down_blocks": [0]},
    "loss": {"disc_start_step": 4},
    "optim": {"warmup_steps": 2},
    "data": {"clip": {"num_frames": 5, "height": 16, "width": 16}, "micro_batch_size": 2,
             "synth": {"enabled": False}},
    "eval": {"num_clips": 2, "batch_size": 2, "grid_clips": 1},
    "checkpoint": {"every": 2, "keep_last": 2},
    "logging": {"progress_bar": False},
    "steps": 8,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 good VP9 videos plus an unreadable file and a missing path in the training list."""
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root / "train", num=8, classes=4, frames=9, size=(16, 16), seed=0)
    make_corpus(root / "eval", num=2, classes=2, frames=9, size=(16, 16), seed=1)
    (root / "garbage.webm").write_bytes(b"this is not a video" * 100)
    lines = (root / "train" / "metadata.csv").read_text().splitlines()
    lines += [f"{root / 'garbage.webm'},,1", f"{root / 'missing.webm'},,2"]
    (root / "train" / "train_with_bad.csv").write_text("\n".join(lines) + "\n")
    return root


def write_recipe(path: Path, corpus: Path, **changes) -> Path:
    recipe = json.loads(json.dumps(MICRO))
    recipe["data"]["manifest"] = str(corpus / "train" / "train_with_bad.csv")
    recipe["eval"]["manifest"] = str(corpus / "eval" / "metadata.csv")
    for key, value in changes.items():
        node = recipe
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def torchrun(run_dir: Path, recipe: Path, *overrides: str, nproc: int = 2, expect_ok: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           f"--master_port={free_port()}", str(SCRIPT), "--recipe", str(recipe), "--run-dir", str(run_dir),
           *[a for o in overrides for a in ("--set", o)]]
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=run_dir.parent)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, dict]:
    """Per-step training records (last record per step wins, as after a resume)."""
    out = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if "g_total" in r:
            out[r["step"]] = r
    return out


def zero_fp32_masters(step_dir: Path) -> dict[str, torch.Tensor]:
    """The autoencoder's fp32 master weights in a committed step, gathered from every rank's ZeRO
    partition by DeepSpeed's own converter (docs/checkpoints.md, "Exporting an intermediate step")."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="autoencoder")
    return {k.removeprefix("tokenizer."): v for k, v in state.items()}


def assert_export_is_the_final_masters(run_dir: Path, final: int, earlier: int) -> None:
    """``run_dir/tokenizer`` holds exactly the fp32 masters of the final step (not an earlier step's)."""
    from tokenizer.checkpoint import load_tokenizer
    exported = load_tokenizer(run_dir / "tokenizer").state_dict()
    masters = zero_fp32_masters(run_dir / "checkpoints" / f"step_{final:08d}")
    assert sorted(exported) == sorted(masters)
    for key, value in masters.items():
        assert exported[key].dtype == torch.float32 and torch.equal(exported[key], value.float()), key
    before = zero_fp32_masters(run_dir / "checkpoints" / f"step_{earlier:08d}")
    assert any(not torch.equal(before[k], masters[k]) for k in masters)  # training moved them


KEYS = ("g_total", "rec", "commit", "entropy", "psnr", "lr", "grad_norm", "d_total", "lecam", "gan_g")


def test_zero2_training_lowers_loss_and_resume_is_bitwise(tmp_path, corpus):
    recipe = write_recipe(tmp_path / "micro.yaml", corpus, deepspeed__zero_stage=2, grad_accum_steps=2)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    torchrun(straight, recipe)
    proc = torchrun(interrupted, recipe, "stop_after=3")
    assert committed_steps(interrupted / "checkpoints") == [2, 3]
    # a crash during a later save left an uncommitted directory: resume must ignore it
    (interrupted / "checkpoints" / "step_00000004").mkdir()
    proc = torchrun(interrupted, recipe)
    assert "resumed from" in proc.stderr

    a, b = losses(straight), losses(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        for key in KEYS:
            assert a[step].get(key) == b[step].get(key), (step, key, a[step].get(key), b[step].get(key))
    assert "d_total" in a[8] and "lecam" in a[8] and "d_total" not in a[3]  # GAN from disc_start_step
    # DeepSpeed steps the shared schedule once per applied update: the logged rates (after step n) follow
    # docs/tokenizer.md (tiny: lr 1e-3, disc_lr 5e-4, floor 10%, cosine; here 2 warm-up steps, 8 steps, and
    # the discriminator's n - 4 updates from loss.disc_start_step=4 decay to its floor by step 8)
    for n in range(1, 9):
        want = documented_lr(n, peak=1e-3, floor=1e-4, warmup=2, decay_end=8, style="cosine")
        want_disc = documented_lr(max(0, n - 4), peak=5e-4, floor=5e-5, warmup=2, decay_end=4, style="cosine")
        assert math.isclose(a[n]["lr"], want, rel_tol=1e-9) and math.isclose(a[n]["disc_lr"], want_disc, rel_tol=1e-9)
    # the loss goes down (reconstruction term; the entropy term is a bounded offset)
    assert a[8]["rec"] < 0.5 * a[1]["rec"]

    # retention, export, evaluation and pictures
    assert committed_steps(straight / "checkpoints") == [6, 8]
    from tokenizer.checkpoint import load_tokenizer
    model = load_tokenizer(straight / "tokenizer")
    assert model.cfg.latent_dim == 8
    assert_export_is_the_final_masters(straight, final=8, earlier=6)
    before = json.loads((straight / "eval" / "step_00000000" / "eval.json").read_text())
    after = json.loads((straight / "eval" / "step_00000008" / "eval.json").read_text())
    assert after["psnr"] > before["psnr"] + 3
    for png in (straight / "loss_curves.png", straight / "eval" / "step_00000008" / "recon_grid.png"):
        assert png.stat().st_size > 1000
    # the unreadable and the missing video were logged with reasons and skipped
    rejects = [json.loads(line) for line in (straight / "rejects.jsonl").read_text().splitlines()]
    reasons = {Path(r["path"]).name: r["reason"] for r in rejects}
    assert "unreadable container" in reasons["garbage.webm"] and "missing file" in reasons["missing.webm"]


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_nan_on_one_rank_is_handled_by_all_ranks_together(tmp_path, corpus, policy):
    recipe = write_recipe(tmp_path / "micro.yaml", corpus, steps=5, checkpoint__every=1, checkpoint__keep_last=10,
                          numerics__on_nonfinite=policy, numerics__inject_nonfinite_step=2,
                          numerics__inject_nonfinite_rank=1, loss__disc_start_step=1)
    run = tmp_path / "run"
    proc = torchrun(run, recipe)
    events = [json.loads(line) for line in (run / "nonfinite.jsonl").read_text().splitlines()]
    assert sorted(e["rank"] for e in events) == [0, 1]          # both ranks decided together
    assert {e["step"] for e in events} == {2} and {e["policy"] for e in events} == {policy}
    if policy == "rollback":
        assert "rolled back to step_00000002" in proc.stderr
    recs = losses(run)
    assert sorted(recs) == [1, 2, 3, 4, 5]
    # the dropped step did not advance the LR schedule: step 3's LR is what step 3 always gets
    clean = tmp_path / "clean"
    torchrun(clean, write_recipe(tmp_path / "clean.yaml", corpus, steps=5, stop_after=3, checkpoint__every=1,
                                 loss__disc_start_step=1))
    assert recs[3]["lr"] == losses(clean)[3]["lr"]
    assert recs[3]["samples"] > losses(clean)[3]["samples"]  # a data window was skipped
    # every checkpoint holds finite weights
    for step in committed_steps(run / "checkpoints"):
        for f in (run / "checkpoints" / f"step_{step:08d}" / "autoencoder").glob("*model_states.pt"):
            sd = torch.load(f, map_location="cpu", weights_only=False)["module"]
            assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def test_nan_with_stop_policy_exits_and_saves_nothing_after_it(tmp_path, corpus):
    recipe = write_recipe(tmp_path / "micro.yaml", corpus, steps=6, checkpoint__every=1, checkpoint__keep_last=10,
                          numerics__on_nonfinite="stop", numerics__inject_nonfinite_step=3,
                          numerics__inject_nonfinite_rank=1)
    run = tmp_path / "run"
    proc = torchrun(run, recipe, expect_ok=False)
    assert proc.returncode != 0
    assert "numerics.on_nonfinite=stop" in proc.stderr
    assert committed_steps(run / "checkpoints") == [1, 2, 3]
    assert not (run / "checkpoints" / "step_00000004").exists()
    events = [json.loads(line) for line in (run / "nonfinite.jsonl").read_text().splitlines()]
    assert sorted(e["rank"] for e in events) == [0, 1]


def test_resume_refusals_exit_2_with_one_line_naming_the_cause(tmp_path, corpus):
    recipe = write_recipe(tmp_path / "micro.yaml", corpus, steps=2, checkpoint__every=2)
    run = tmp_path / "run"
    torchrun(run, recipe, nproc=1)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    # torchrun itself exits 1 on any failed child; its failure report carries the child's code
    changed = torchrun(run, recipe, "model.norm_groups=2", nproc=1, expect_ok=False)
    assert changed.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", changed.stderr), changed.stderr[-3000:]
    assert "videoar tokenizer train: " in changed.stderr
    assert ("recipe changed since the checkpoint was written (model.norm_groups: 4 in the checkpoint, 2 now "
            "(from --set model.norm_groups=2))") in changed.stderr
    assert "tokenizer/trainer.py" not in changed.stderr          # one line, no traceback of ours
    wider = torchrun(run, recipe, "steps=3", nproc=2, expect_ok=False)
    assert wider.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", wider.stderr), wider.stderr[-3000:]
    assert "was written by 1 ranks, this job has 2" in wider.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_init_from_recipe_trains_the_image_stage_first_then_reinflates(tmp_path, corpus):
    write_recipe(tmp_path / "image.yaml", corpus, steps=3, data__clip__num_frames=1,
                         checkpoint__every=3, loss__disc_start_step=100)
    video = write_recipe(tmp_path / "video.yaml", corpus, steps=2, checkpoint__every=2,
                         init={"from_recipe": "image.yaml", "reinflate": True})
    run = tmp_path / "run"
    proc = torchrun(run, video, nproc=1)
    assert (run / "init" / "image" / "tokenizer" / "COMMITTED").is_file()
    assert committed_steps(run / "init" / "image" / "checkpoints") == [3]
    assert "initialised the autoencoder from" in proc.stderr and "reinflated" in proc.stderr
    assert committed_steps(run / "checkpoints") == [2]
    # a second run finds its own checkpoint and neither retrains the stage nor re-initialises
    proc = torchrun(run, video, "steps=3", nproc=1)
    assert "training" not in proc.stderr.split("resumed from")[0] and "resumed from" in proc.stderr
    assert committed_steps(run / "init" / "image" / "checkpoints") == [3]


def test_signal_or_time_limit_saves_and_exits_for_requeue(tmp_path, corpus):
    """The AR trainer's preemption (videoar_common.preemption): save, REQUEUE_REQUESTED, exit 75."""
    import signal
    import time
    recipe = write_recipe(tmp_path / "micro.yaml", corpus, steps=10_000, checkpoint__every=1000)
    run = tmp_path / "run"
    run.mkdir()
    cmd = [sys.executable, "-m", "videoar_megatron.cli", "tokenizer", "train", "--recipe", str(recipe),
           "--run-dir", str(run)]
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r.get("step", 0) >= 3 for r in _records(run)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    last = max(losses(run))
    assert committed_steps(run / "checkpoints") == [last] and last >= 3
    assert "exiting with 75 for requeue" in err
    marker = json.loads((run / "REQUEUE_REQUESTED").read_text())
    assert marker["step"] == last and marker["reason"] == "signal SIGUSR1"
    # the requeued job resumes (and removes the marker), then stops on its wall-clock limit after one step
    again = subprocess.run([*cmd, "--set", "preemption.time_limit_minutes=0.0001"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=600)
    assert again.returncode == 75, again.stderr[-3000:]
    marker = json.loads((run / "REQUEUE_REQUESTED").read_text())
    assert marker["step"] == last + 1 and marker["reason"].startswith("wall-clock limit")
    assert committed_steps(run / "checkpoints") == [last, last + 1]


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []
