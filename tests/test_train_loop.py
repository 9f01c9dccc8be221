"""AR training on CPU, one process: the tiny recipe learns; a crash during a save (before its commit, or
while the background writer of an asynchronous save is still writing) leaves the previous checkpoint
in use and the resumed run equals the uninterrupted one bitwise, and mixed sources resume exactly, on
both engines (the local CPU engine, and the production Megatron engine emulated on CPU);
the two engines compute the same run; the checkpoint holds the contract fields; recipe mistakes are
errors that name the key; shards it cannot train on are refused in one line (exit 2); a stop and the
end of the run wait for the background write, which the step loop does not."""
from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest

from tests.train_helpers import ENGINES, TINY_RECIPE, losses, run_train
from videoar_common.atomic import committed_steps
from videoar_common.config import ConfigError, load_config
from videoar_megatron.training.audit import consumed_samples, step_metrics
from videoar_megatron.training.config import TrainConfig

STEPS = ("train.steps=60", "checkpoint.save_every=20", "optim.warmup_steps=5")


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory) -> Path:
    """The uninterrupted tiny run: 60 steps, checkpoints every 20 (keep the last 2)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_train(1, run, tiny_shards, *STEPS, engine="local")
    return run


@pytest.fixture(scope="module")
def references(reference, tiny_shards, tmp_path_factory):
    """engine → its uninterrupted tiny run (the same recipe and steps as ``reference``), made on first use."""
    runs = {"local": reference}

    def get(engine: str) -> Path:
        if engine not in runs:
            runs[engine] = tmp_path_factory.mktemp(f"reference_{engine}") / "run"
            run_train(1, runs[engine], tiny_shards, *STEPS, engine=engine)
        return runs[engine]
    return get


def test_tiny_recipe_trains_and_its_loss_falls(reference):
    loss = losses(reference)
    assert sorted(loss) == list(range(1, 61))
    first, last = statistics.mean(loss[s] for s in range(1, 11)), statistics.mean(loss[s] for s in range(51, 61))
    assert last < 0.6 * first, (first, last)
    record = step_metrics(reference)[60]
    for key in ("bit_accuracy", "loss_scale0", "loss_scale1", "acc_scale1", "lr", "grad_norm", "tokens_per_s",
                "tflops_per_gpu", "mem_rss_max_gib", "step_time_s"):
        assert key in record, key
    assert record["consumed_samples"] == 60 * 8 and record["skipped"] == 0
    assert record["bit_accuracy"] > 0.8
    assert (reference / "loss_curves.png").stat().st_size > 10_000


def test_every_sample_is_audited_once_per_epoch(reference):
    steps = consumed_samples(reference)
    assert sorted(steps) == list(range(1, 61))
    flat = [i for s in sorted(steps) for replica in steps[s] for i in replica]
    assert all(len(steps[s]) == 1 and len(steps[s][0]) == 8 for s in steps)
    epochs = [flat[i:i + 32] for i in range(0, len(flat), 32)]  # 32 samples = 4 steps of 8
    assert all(len(set(e)) == 32 for e in epochs) and all(set(e) == set(epochs[0]) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_checkpoint_holds_the_contract_fields(reference):
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ckpts == ["step_00000040", "step_00000060"]  # keep_last = 2
    state = json.loads((reference / "checkpoints" / "step_00000060" / "train_state.json").read_text())
    for key in ("step", "consumed_samples", "model_config", "scale_schedule", "latent_frames", "tokenizer_hash",
                "logger_run_id", "layout", "data_state", "config", "scheduler", "numerics", "optimizer_format"):
        assert key in state, key
    assert state["step"] == 60 and state["consumed_samples"] == 480
    assert state["layout"]["tp"] == 1 and state["layout"]["dp"] == 1 and state["layout"]["pp"] == 1
    assert state["scale_schedule"] == [[1, 1], [2, 2]] and state["latent_frames"] == 3
    assert state["logger_run_id"] == (reference / "logger_run_id.txt").read_text().strip()
    assert state["model_config"]["latent_dim"] == 8 and state["config"]["train"]["steps"] == 60
    assert (reference / "checkpoints" / "step_00000060" / "COMMITTED").is_file()


def test_both_engines_compute_the_same_run(references):
    """One process, 60 steps with clipping active early on: the Megatron engine (DDP grad buffers, its
    no-pipelining schedule, the distributed optimizer with fp32 main weights) and the local engine
    (a loop, Megatron's FP32Optimizer) give the same losses, gradient norms and learning rates."""
    local, megatron = (step_metrics(references(engine)) for engine in ENGINES)
    assert sorted(local) == sorted(megatron) == list(range(1, 61))
    assert any(local[s]["grad_norm"] > 1.0 for s in local)  # optim.clip_grad=1 clipped some steps
    for s in local:
        for key in ("loss", "grad_norm", "lr"):
            assert math.isclose(megatron[s][key], local[s][key], rel_tol=1e-6), (s, key, megatron[s], local[s])


@pytest.mark.parametrize("engine", ENGINES)
def test_crash_during_save_leaves_the_previous_checkpoint_and_resume_is_bitwise(references, tiny_shards, tmp_path,
                                                                                engine):
    reference = references(engine)
    run = tmp_path / "run"
    run_train(1, run, tiny_shards, *STEPS, "logging.wandb=true", "debug.crash_in_save_at_step=40", expect_rc=17,
              engine=engine)
    ckpt = run / "checkpoints"
    assert (ckpt / "step_00000040").is_dir() and not (ckpt / "step_00000040" / "COMMITTED").exists()
    assert (ckpt / "step_00000020" / "COMMITTED").is_file()
    proc = run_train(1, run, tiny_shards, *STEPS, "logging.wandb=true", engine=engine)
    assert "resumed from" in proc.stderr and "step_00000020 at step 20" in proc.stderr
    run_id = (run / "logger_run_id.txt").read_text().strip()
    wandb_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(run_id) for name in wandb_runs)  # one wandb run, resumed
    assert losses(run) == losses(reference)  # bitwise: every step's loss, before and after the crash
    assert consumed_samples(run) == consumed_samples(reference)
    assert not (run / "REQUEUE_REQUESTED").exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_kill_during_an_async_save_resumes_from_the_previous_and_equals_uninterrupted(references, tiny_shards,
                                                                                      tmp_path, engine):
    """checkpoint.async_save (the default) with a slow background writer (10 s before each write) and
    keep_last=1: step 20's files are written while steps 21.. train, step 40's save first waits for step
    20's commit, and the job is killed at step 41 with step 40 still being written. Step 20 stays the
    newest committed (not pruned for the uncommitted 40), and the resumed run equals the uninterrupted
    one bitwise: the late write of step 20 holds step 20's state, not a later one."""
    reference = references(engine)
    run = tmp_path / "run"
    slow = ("checkpoint.keep_last=1", "debug.slow_async_save_s=10")
    proc = run_train(1, run, tiny_shards, *STEPS, *slow, "debug.crash_in_async_save_at_step=40", expect_rc=17,
                     engine=engine)
    assert "killing the job at step 41 while" in proc.stderr
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000020", "step_00000040"]
    assert (ckpt / "step_00000020" / "COMMITTED").is_file()
    assert not (ckpt / "step_00000040" / "COMMITTED").exists() and not (ckpt / "step_00000040" / ".metadata").exists()
    assert max(losses(run)) == 41  # training went on while step 40 was being written
    proc = run_train(1, run, tiny_shards, *STEPS, "checkpoint.keep_last=1", engine=engine)
    assert "step_00000020 at step 20" in proc.stderr
    assert losses(run) == losses(reference) and consumed_samples(run) == consumed_samples(reference)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000060"]


def test_a_stop_and_the_end_of_the_run_wait_for_the_background_write(tiny_shards, tmp_path):
    """Each background write waits 2 s before it starts: the step loop does not (the save of step 5
    stalls it for less than that), but the stop at step 7 (SIGUSR1) exits 75 only once steps 5 and 7 are
    committed, and the resumed run's last step is committed when it exits 0. A synchronous run from the
    same start reads those asynchronous checkpoints and computes the same losses."""
    run = tmp_path / "run"
    sets = ("train.steps=12", "checkpoint.save_every=5", "checkpoint.keep_last=0", "optim.warmup_steps=2",
            "debug.slow_async_save_s=2")
    proc = run_train(1, run, tiny_shards, *sets, "debug.signal_at_step=7", expect_rc=75)
    stalls = [float(s) for s in re.findall(r"step_00000005: the step loop stalled ([0-9.]+)s", proc.stderr)]
    assert len(stalls) == 1 and stalls[0] < 2, proc.stderr[-3000:]
    assert committed_steps(run / "checkpoints") == [5, 7]
    assert json.loads((run / "REQUEUE_REQUESTED").read_text())["step"] == 7
    run_train(1, run, tiny_shards, *sets)
    assert committed_steps(run / "checkpoints") == [5, 7, 10, 12]
    sync = tmp_path / "sync"
    shutil.copytree(run, sync)
    shutil.rmtree(sync / "checkpoints" / "step_00000010")
    shutil.rmtree(sync / "checkpoints" / "step_00000012")
    run_train(1, sync, tiny_shards, *sets, "checkpoint.async_save=false")
    assert losses(sync) == losses(run)


def test_resume_false_over_existing_checkpoints_is_refused(reference, tiny_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = run_train(1, run, tiny_shards, *STEPS, "checkpoint.resume=false", expect_rc=2)
    assert "checkpoint.resume=false but" in proc.stderr and "step_00000060" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resume_on_remade_shards_is_refused_before_any_step(reference, tiny_shards, tmp_path):
    """Same manifest, other index (as shards re-made with other samples would have): refused, naming it."""
    shards, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(tiny_shards, shards)
    index = json.loads((shards / "index.json").read_text())
    (shards / "index.json").write_text(json.dumps(index, indent=1))  # same shards, other bytes
    shutil.copytree(reference, run)
    proc = run_train(1, run, shards, *STEPS, "train.steps=61", expect_rc=2)
    assert "the token shards differ from the checkpoint's" in proc.stderr and "index_sha256" in proc.stderr
    assert max(losses(run)) == 60


def test_resume_may_switch_kernels_but_not_the_model(reference, tiny_shards, tmp_path):
    """A checkpoint written before model.flex_kernel existed resumes with a kernel choice changed;
    a change to the model itself is refused, naming the knob."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state_path = run / "checkpoints" / "step_00000060" / "train_state.json"
    state = json.loads(state_path.read_text())
    del state["model_config"]["flex_kernel"]
    state_path.write_text(json.dumps(state))
    proc = run_train(1, run, tiny_shards, *STEPS, "model.norm_eps=1e-5", "train.steps=61", expect_rc=2)
    assert "the model config changed since the checkpoint (model.norm_eps" in proc.stderr
    proc = run_train(1, run, tiny_shards, *STEPS, "model.flex_kernel=flash", "model.attention_split_tokens=64",
                     "train.steps=61")
    assert "step_00000060 at step 60" in proc.stderr and max(losses(run)) == 61


def test_start_log_names_the_compile_cache_each_sources_attention_and_the_time_to_first_step(
        tiny_shards, tiny_image_shards, tmp_path):
    """What a job prints at start (docs/training.md): where compiled kernels are cached (the run directory
    by default, created before anything compiles), the step's schedule, the attention path of each data
    source's sequence, and the time to the first step."""
    run = tmp_path / "run"
    proc = run_train(1, run, tiny_shards, "train.steps=2", "optim.warmup_steps=1", "data.name=video",
                     f"data.mix=[{{name: image, path: {tiny_image_shards}, num_frames: 1}}]")
    cache = (run / "compile_cache").absolute()
    assert f"compile cache {cache} (from the run directory; empty: " in proc.stderr and cache.is_dir()
    # tiny recipe: 1 class token + 3 latent frames x (1 + 4) tokens; the images are one frame
    assert "step schedule: the local engine's micro-batch loop (no pipeline)" in proc.stderr  # CPU: local engine
    assert "attention for data source video (16 tokens): dense-mask SDPA" in proc.stderr
    assert "attention for data source image (6 tokens): dense-mask SDPA" in proc.stderr
    assert re.search(r"time to the first step: \d+\.\d s from start \(the step itself \d+\.\d s", proc.stderr)


def test_unknown_recipe_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lr_max'.*--set optim.lr_max=1"):
        load_config(TrainConfig, TINY_RECIPE, ["optim.lr_max=1"])
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"base: {TINY_RECIPE}\ntrain:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=rf"unknown key 'train\.stepz' \(from {recipe}\)"):
        load_config(TrainConfig, recipe)


def test_cli_reports_a_bad_recipe_without_a_traceback(tmp_path, capsys):
    from videoar_megatron.cli import main
    assert main(["train", "--recipe", str(TINY_RECIPE), "--set", "model.sise=L", "--print-config"]) == 2
    assert "videoar train: unknown key 'model.sise'" in capsys.readouterr().err
    assert main(["train", "--recipe", str(TINY_RECIPE), "--print-config"]) == 0
    assert "global_batch_size: 8" in capsys.readouterr().out


@pytest.mark.parametrize("engine", ENGINES)
def test_mixed_sources_alternate_by_weight_and_resume_exactly(tiny_shards, tiny_image_shards, tmp_path, engine):
    mix = (f"data.mix=[{{name: image, path: {tiny_image_shards}, weight: 0.5, num_frames: 1}}]", "data.name=video",
           "train.steps=12", "checkpoint.save_every=6", "checkpoint.keep_last=0", "optim.warmup_steps=2")
    run = tmp_path / "run"
    run_train(1, run, tiny_shards, *mix, engine=engine)
    records = step_metrics(run)
    assert [records[s]["source"] for s in range(1, 7)] == ["video", "image", "video"] * 2  # weights 1 : 0.5
    assert all(f"{r['source']}/loss_scale1" in r and f"loss_{r['source']}" in r for r in records.values())
    state = json.loads((run / "checkpoints" / "step_00000006" / "train_state.json").read_text())
    assert sorted(state["data_state"]["sources"]) == ["image", "video"]
    assert state["data"]["sources"]["image"]["latent_frames"] == 1 and state["latent_frames"] == 3
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000012")
    run_train(1, resumed, tiny_shards, *mix, engine=engine)
    assert losses(resumed) == losses(run) and consumed_samples(resumed) == consumed_samples(run)


def test_shards_without_samples_or_with_an_unlabelled_sample_are_refused_in_one_line(tiny_shards, tmp_path):
    import dataclasses

    from data_prep.manifest import VideoRecord, read_manifest, write_manifest
    from tests.pretok_helpers import pretok_config, pretokenizer
    corpus, tokenizer = tiny_shards.parent / "corpus", tiny_shards.parent / "tokenizer"

    def shards_of(name: str, records: list[VideoRecord]) -> Path:
        manifest = write_manifest(corpus / f"{name}.csv", records, relative_to=corpus)
        pretokenizer(pretok_config(tokenizer, manifest, tmp_path / name, num_partitions=1)).run()
        return tmp_path / name

    empty = shards_of("all_rejected", [VideoRecord(path=str(corpus / "missing.webm"), label=1)])
    proc = run_train(1, tmp_path / "run_empty", empty, "train.steps=4", "optim.warmup_steps=1", expect_rc=2)
    assert "the shard set holds no samples" in proc.stderr and "rejects.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr
    # one caption-only video in a class-conditional run: found when its batch is built, mid-run
    records = read_manifest(corpus / "metadata.csv")
    records[5] = dataclasses.replace(records[5], label=-1, caption="a caption")
    proc = run_train(1, tmp_path / "run_unlabelled", shards_of("one_unlabelled", records), "train.steps=4",
                     "optim.warmup_steps=1", expect_rc=2)
    assert "has no class label (-1) but model.condition.kind=class" in proc.stderr
    assert "Traceback" not in proc.stderr
