"""The production engine (Megatron DDP, distributed optimizer, 1F1B and interleaved pipeline schedules)
emulated on CPU/gloo: ``videoar train --set train.engine=megatron`` inside ``cuda_compat.emulated_cuda``
(tests/dist_scripts/emulated_megatron_train.py). PP=2, PP=2 x 2 virtual stages, TP=2 x PP=2 and DP=2 x PP=2
train like the local engine at TP=PP=DP=1 from the same seed checkpoint, and their distributed-optimizer
checkpoints resume at another layout with the same losses; TP=2 with sequence parallelism matches it on
both engines. The real thing runs in tests/test_train_gpu.py on a GPU host."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from tests.train_helpers import ENGINES, losses, run_train

SETS = ("train.steps=6", "checkpoint.save_every=3", "checkpoint.keep_last=0", "optim.warmup_steps=1",
        "train.micro_batch_size=2")


@pytest.fixture(scope="module")
def host_reference(tiny_shards, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """(seed checkpoint, losses of the local engine at TP=PP=DP=1 started from it)."""
    root = tmp_path_factory.mktemp("emulated")
    run_train(1, root / "seedrun", tiny_shards, *SETS, args=("--seed-checkpoint",))
    seed = root / "seedrun" / "seed"
    run_train(1, root / "host", tiny_shards, *SETS, args=("--load", str(seed)), engine="local")
    return seed, losses(root / "host")


def close(got: dict[int, float], ref: dict[int, float], steps, tol: float) -> None:
    for s in steps:
        assert math.isclose(got[s], ref[s], rel_tol=tol), (s, got, ref)


def test_pp2_megatron_engine_matches_the_host_engine_and_resumes_at_tp2(host_reference, tiny_shards, tmp_path):
    seed, ref = host_reference
    run = tmp_path / "pp2"
    run_train(2, run, tiny_shards, *SETS, "parallel.pipeline_parallel=2", f"checkpoint.load={seed}",
              engine="megatron")
    pp2 = losses(run)
    assert sorted(pp2) == list(range(1, 7))
    close(pp2, ref, range(1, 7), 1e-6)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    proc = run_train(2, run, tiny_shards, *SETS, "parallel.tensor_parallel=2", engine="megatron")
    assert "saved at tp=1 pp=2 dp=1, resharded" in proc.stderr
    close(losses(run), ref, range(4, 7), 1e-5)


@pytest.fixture(scope="module")
def four_layer_reference(tiny_shards, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """As ``host_reference`` with 4 layers (2 pipeline ranks x 2 virtual stages need one layer each)."""
    root = tmp_path_factory.mktemp("emulated4")
    sets = (*SETS, "model.num_layers=4")
    run_train(1, root / "seedrun", tiny_shards, *sets, args=("--seed-checkpoint",))
    seed = root / "seedrun" / "seed"
    run_train(1, root / "host", tiny_shards, *sets, args=("--load", str(seed)), engine="local")
    return seed, losses(root / "host")


def test_pp2_with_virtual_stages_matches_the_host_engine_and_resumes_at_pp1(four_layer_reference, tiny_shards,
                                                                           tmp_path):
    """Interleaved 1F1B (Megatron's schedule over 2 model chunks per rank: rank 0 holds layers 0 and 2,
    rank 1 layers 1 and 3; 4 micro-batches in 2 groups) trains like the host engine at PP=1, and its
    checkpoint (chunks saved under global layer keys) resumes on one rank without virtual stages."""
    seed, ref = four_layer_reference
    run = tmp_path / "vpp"
    sets = (*SETS, "model.num_layers=4")
    proc = run_train(2, run, tiny_shards, *sets, "parallel.pipeline_parallel=2", "parallel.virtual_pipeline_stages=2",
                     f"checkpoint.load={seed}", engine="megatron")
    assert "step schedule: forward_backward_pipelining_with_interleaving over 2 model chunk(s) per rank" in proc.stderr
    vpp = losses(run)
    assert sorted(vpp) == list(range(1, 7))
    close(vpp, ref, range(1, 7), 1e-6)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    proc = run_train(1, run, tiny_shards, *sets, engine="megatron")
    assert "step_00000003 at step 3 (saved at tp=1 pp=2 dp=1, resharded)" in proc.stderr
    close(losses(run), ref, range(4, 7), 1e-6)


@pytest.mark.parametrize("layout,resume,saved", [
    (("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"), ("parallel.pipeline_parallel=2",),
     "saved at tp=2 pp=2 dp=1, resharded"),
    (("parallel.pipeline_parallel=2",), ("parallel.tensor_parallel=2",), "saved at tp=1 pp=2 dp=2, resharded"),
], ids=["tp2xpp2", "dp2xpp2"])
def test_four_rank_layouts_match_the_host_engine_and_resume_on_two_ranks(host_reference, tiny_shards, tmp_path,
                                                                          layout, resume, saved):
    """The 4-GPU layouts of tests/test_train_gpu.py on 4 gloo ranks (TP=2 inside each of 2 pipeline
    stages; 2 data-parallel replicas of 2 stages), then the step-3 checkpoint resumed on 2 ranks."""
    seed, ref = host_reference
    run = tmp_path / "run"
    run_train(4, run, tiny_shards, *SETS, *layout, f"checkpoint.load={seed}", engine="megatron")
    assert sorted(losses(run)) == list(range(1, 7))
    close(losses(run), ref, range(1, 7), 1e-6)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    proc = run_train(2, run, tiny_shards, *SETS, *resume, engine="megatron")
    assert saved in proc.stderr
    close(losses(run), ref, range(4, 7), 1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_tp2_with_sequence_parallelism_matches_the_host_engine(host_reference, tiny_shards, tmp_path, engine):
    """Sequence parallelism splits the sequence over the TP ranks outside attention (the builder pads it
    to a multiple of TP); the losses must not notice, on either engine."""
    seed, ref = host_reference
    run = tmp_path / "tp2sp"
    run_train(2, run, tiny_shards, *SETS, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
              f"checkpoint.load={seed}", engine=engine)
    close(losses(run), ref, range(1, 7), 1e-6)


def test_loading_weights_into_another_model_is_refused_naming_the_knob(host_reference, tiny_shards, tmp_path):
    seed, _ = host_reference
    proc = run_train(1, tmp_path / "run", tiny_shards, *SETS, "model.condition.tokens_per_class=2",
                     args=("--load", str(seed)), expect_rc=2)
    assert ("the weights do not fit this model (model.condition.tokens_per_class: 1 in the checkpoint, 2 now "
            "(from --set model.condition.tokens_per_class=2))") in proc.stderr


def test_the_megatron_engine_on_cpu_outside_the_emulation_is_refused_naming_the_knob(tiny_shards, tmp_path):
    """The plain CLI (no emulation) refuses train.engine=megatron on a CPU host before building anything."""
    proc = run_train(1, tmp_path / "run", tiny_shards, *SETS, "train.engine=megatron", expect_rc=2)
    assert "train.engine=megatron needs CUDA" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
