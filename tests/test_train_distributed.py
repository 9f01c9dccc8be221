"""AR training with 2 processes on gloo: a signal on one rank stops both, which save and ask for a
requeue, and the resumed run equals the uninterrupted one bitwise; the checkpoint resumes at another
DP size (same samples per step) and another TP size (equal weights, equal next losses); a NaN on rank
1 of 2 is skipped by both ranks together and nothing is saved after the run gives up. Every test runs
on both engines (``engine`` fixture): the local CPU engine and the production Megatron engine (DDP,
distributed optimizer) emulated on CPU."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.train_helpers import ENGINES, losses, run_train
from videoar_common.atomic import committed_steps
from videoar_megatron.training.audit import consumed_samples, step_metrics

SCRIPTS = Path(__file__).parent / "dist_scripts"
STEPS = ("train.steps=12", "checkpoint.save_every=4", "optim.warmup_steps=2")


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(engine, tiny_shards, tmp_path_factory) -> Path:
    """Uninterrupted run at DP = 2 (2 processes, micro-batch 4, global batch 8)."""
    run = tmp_path_factory.mktemp(f"dp2_reference_{engine}") / "run"
    run_train(2, run, tiny_shards, *STEPS, engine=engine)
    return run


@pytest.fixture(scope="module")
def interrupted(engine, tiny_shards, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory right after SIGUSR1 reached rank 1 at step 6, a pristine copy of it)."""
    run = tmp_path_factory.mktemp(f"dp2_signal_{engine}") / "run"
    proc = run_train(2, run, tiny_shards, *STEPS, "debug.signal_at_step=6", "debug.signal_rank=1", expect_rc=None,
                     engine=engine)
    assert proc.returncode != 0, "the job must not report success when it stopped early"
    copy = run.parent / "pristine"
    shutil.copytree(run, copy)
    return run, copy


def test_signal_on_one_rank_stops_both_saves_and_resume_is_bitwise(engine, reference, interrupted, tiny_shards):
    run, _ = interrupted
    marker = json.loads((run / "REQUEUE_REQUESTED").read_text())
    assert marker["step"] == 6 and "signal" in marker["reason"]
    assert committed_steps(run / "checkpoints") == [4, 6]
    assert max(step_metrics(run)) == 6  # both ranks stopped after the same step
    run_id = (run / "logger_run_id.txt").read_text()
    proc = run_train(2, run, tiny_shards, *STEPS, engine=engine)
    assert "step_00000006 at step 6" in proc.stderr
    assert losses(run) == losses(reference)  # bitwise, all 12 steps
    assert consumed_samples(run) == consumed_samples(reference)  # nothing skipped or repeated
    assert (run / "logger_run_id.txt").read_text() == run_id
    state = json.loads((run / "checkpoints" / "step_00000012" / "train_state.json").read_text())
    assert state["logger_run_id"] == run_id.strip() and not (run / "REQUEUE_REQUESTED").exists()


def test_dp2_checkpoint_resumes_at_dp1_with_the_same_samples(engine, reference, interrupted, tiny_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted[1], run)
    proc = run_train(1, run, tiny_shards, *STEPS, engine=engine)
    assert "saved at tp=1 pp=1 dp=2, resharded" in proc.stderr
    ref_ids, ids = consumed_samples(reference), consumed_samples(run)
    assert sorted(ids) == list(range(1, 13))
    for step in range(7, 13):  # one replica now reads what two read before, step by step
        assert len(ids[step]) == 1 and sorted(ids[step][0]) == sorted(i for r in ref_ids[step] for i in r)
    ref, got = losses(reference), losses(run)
    for step in range(7, 13):  # same math, another summation order
        assert math.isclose(got[step], ref[step], rel_tol=1e-4), (step, got[step], ref[step])


def test_nan_on_rank_1_is_skipped_by_both_ranks_and_nothing_is_saved_after_giving_up(engine, tiny_shards, tmp_path):
    run = tmp_path / "run"
    proc = run_train(2, run, tiny_shards, *STEPS, "checkpoint.save_every=1", "checkpoint.keep_last=0",
                     "debug.nan_at_steps=[3,6,7,8]", "debug.nan_rank=1", "numerics.max_consecutive_skips=2",
                     expect_rc=None, engine=engine)
    assert proc.returncode != 0
    out = proc.stderr
    for step in (3, 6, 7):  # every rank logs the skip of the same step
        assert out.count(f"step {step} skipped on every rank") == 2, out[-3000:]
    assert out.count("stopping: 3 bad steps in a row") == 2, out[-3000:]  # both ranks give up together
    metrics = step_metrics(run)
    assert [s for s, r in metrics.items() if r["skipped"]] == [3, 6, 7]
    assert "non-finite loss" in metrics[3]["skip_reason"] and max(metrics) == 7
    assert metrics[4]["lr"] == metrics[3]["lr"]  # the skipped step did not advance the schedule
    assert committed_steps(run / "checkpoints") == [1, 2, 4, 5]  # nothing at or after a bad step
    assert not (run / "REQUEUE_REQUESTED").exists()


def test_tp2_checkpoint_loads_at_tp1_with_equal_weights_and_next_losses(engine, torchrun, tiny_shards, tmp_path):
    script = SCRIPTS / "train_reshard.py"
    torchrun(script, 2, "save", tmp_path / "tp2", tiny_shards, tmp_path / "tp2.json", 2, engine)
    run = tmp_path / "tp1"
    shutil.copytree(tmp_path / "tp2", run)
    for extra in run.glob("checkpoints/step_*"):
        if extra.name != "step_00000006":
            shutil.rmtree(extra)
    torchrun(script, 1, "load", run, tiny_shards, tmp_path / "tp1.json", 1, engine)
    tp2, tp1 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("tp2", "tp1"))
    assert tp2["tp"] == 2 and tp1["tp"] == 1 and tp1["step"] == 8
    assert tp2["engine"] == tp1["engine"] == engine
    assert "resharded" in tp1["restored"]
    saved, loaded = torch.load(tmp_path / "tp2.pt"), torch.load(tmp_path / "tp1.pt")
    assert saved.keys() == loaded.keys() and len(saved) > 10
    for name in saved:
        torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=0, msg=name)
    # Step 7 checks the weights, step 8 also the resharded optimizer state (TP=2 vs TP=1 numerics).
    for a, b in zip(tp1["losses"], tp2["losses"]):
        assert math.isclose(a, b, rel_tol=1e-5), (tp1["losses"], tp2["losses"])
    for a, b in zip(tp1["grad_norms"], tp2["grad_norms"]):  # TP duplicates counted once in the norm
        assert math.isclose(a, b, rel_tol=1e-5), (tp1["grad_norms"], tp2["grad_norms"])
