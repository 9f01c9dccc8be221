"""Context parallelism through ``videoar train``: CP runs train like the unsplit single-process run from
the same seed checkpoint (losses and gradient norms), read the same samples (audit), and their
checkpoints resume at CP=1 with the uninterrupted run's losses. On the local engine with data x context
parallelism (its own all-reduce over Megatron's dp_cp group), on the Megatron engine emulated on gloo
(DDP + distributed optimizer over dp_cp), and PP=2 x CP=2 through Megatron's 1F1B schedule, plain and
interleaved (2 virtual stages)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from tests.train_helpers import losses, run_train
from videoar_megatron.training.audit import consumed_samples, step_metrics

SETS = ("train.steps=6", "checkpoint.save_every=3", "checkpoint.keep_last=0", "optim.warmup_steps=1",
        "train.micro_batch_size=2", "parallel.context_parallel_chunk=2", "model.num_layers=4")
"""Tiny recipe: 1 class token + 3 latent frames x 5 tokens = 16 tokens; chunks of 2 tokens, so each of
two CP ranks holds 8 tokens from across the sequence. 4 layers: one per virtual stage at PP=2 x 2."""


@pytest.fixture(scope="module")
def unsplit_reference(tiny_shards, tmp_path_factory) -> tuple[Path, Path]:
    """(seed checkpoint, run directory of the local engine at TP=CP=PP=DP=1 started from it)."""
    root = tmp_path_factory.mktemp("cp_reference")
    run_train(1, root / "seedrun", tiny_shards, *SETS, args=("--seed-checkpoint",))
    seed = root / "seedrun" / "seed"
    run_train(1, root / "unsplit", tiny_shards, *SETS, args=("--load", str(seed)), engine="local")
    return seed, root / "unsplit"


def close(got: Path, ref: Path, steps, tol: float) -> None:
    mine, want = step_metrics(got), step_metrics(ref)
    for s in steps:
        for key in ("loss", "grad_norm", "bit_accuracy"):
            assert math.isclose(mine[s][key], want[s][key], rel_tol=tol), (s, key, mine[s][key], want[s][key])


@pytest.mark.parametrize("engine,ranks,layout", [
    ("local", 4, ("parallel.context_parallel=2",)),
    ("megatron", 2, ("parallel.context_parallel=2",)),
], ids=["local-dp2xcp2", "megatron-cp2"])
def test_context_parallel_trains_like_the_unsplit_run_and_resumes_at_cp1(unsplit_reference, tiny_shards, tmp_path,
                                                                          engine, ranks, layout):
    seed, ref = unsplit_reference
    run = tmp_path / "run"
    run_train(ranks, run, tiny_shards, *SETS, *layout, f"checkpoint.load={seed}", engine=engine)
    assert sorted(losses(run)) == list(range(1, 7))
    close(run, ref, range(1, 7), 1e-6)
    # One audit record per replica: the CP ranks of a replica read the samples together.
    dp = ranks // 2
    assert all(len(ids) == dp for ids in consumed_samples(run).values())
    assert [sorted(sum(ids, [])) for ids in consumed_samples(run).values()] == \
        [sorted(sum(ids, [])) for ids in consumed_samples(ref).values()]
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    proc = run_train(1, run, tiny_shards, *SETS, "parallel.context_parallel=1", engine=engine)
    assert f"(saved at tp=1 cp=2 pp=1 dp={dp}, resharded)" in proc.stderr
    close(run, ref, range(4, 7), 1e-5)


@pytest.mark.parametrize("virtual_stages", [1, 2], ids=["1f1b", "interleaved"])
def test_pp2_times_cp2_on_the_megatron_engine_matches_the_unsplit_run(unsplit_reference, tiny_shards, tmp_path,
                                                                     virtual_stages):
    """Four ranks: two pipeline stages, each split over two CP ranks (Megatron's 1F1B schedule sizes its
    p2p buffers by the CP share and scales the loss by CP); with 2 virtual stages each rank runs two
    chunks of one layer through the interleaved schedule (2 groups of 2 micro-batches)."""
    seed, ref = unsplit_reference
    run = tmp_path / "run"
    run_train(4, run, tiny_shards, *SETS, "parallel.context_parallel=2", "parallel.pipeline_parallel=2",
              f"parallel.virtual_pipeline_stages={virtual_stages}", f"checkpoint.load={seed}", engine="megatron")
    close(run, ref, range(1, 7), 1e-6)


def test_attention_split_with_context_parallelism_is_refused_naming_the_knobs(tiny_shards, tmp_path):
    proc = run_train(1, tmp_path / "run", tiny_shards, *SETS, "parallel.context_parallel=2",
                     "model.attention_split_tokens=4", expect_rc=2)
    assert "model.attention_split_tokens=4" in proc.stderr and "parallel.context_parallel=2" in proc.stderr
