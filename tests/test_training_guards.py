"""Preemption and numerics decisions are collective: one rank's signal or NaN moves every rank."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from videoar_common.numerics import NumericsConfig, NumericsGuard
from videoar_common.preemption import PreemptionConfig

SCRIPTS = Path(__file__).parent / "dist_scripts"


def test_signal_and_nan_on_one_rank_are_acted_on_by_all(torchrun, tmp_path):
    torchrun(SCRIPTS / "collective_decisions.py", 2, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for r in (r0, r1):
        assert r["stop_before"] is False and r["stop_after"] is True
        assert r["good"] is None
        assert r["nan_on_rank1"] is not None and r["inf_grad_on_rank0"] is not None
        assert "3 bad steps in a row" in r["third_bad"]
    assert r1["local_reason"] == "signal SIGUSR1" and r0["local_reason"] is None
    assert r1["nan_on_rank1"].startswith("non-finite loss")
    assert r0["nan_on_rank1"] == "a bad step on another rank"


def test_loss_spike_is_a_bad_step():
    from videoar_common.distributed import DistContext
    import torch
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1,
                      device=torch.device("cpu"), backend="gloo")
    guard = NumericsGuard(NumericsConfig(loss_spike_factor=3.0, loss_spike_window=10))
    for _ in range(10):
        assert guard.check(1.0, 1.0, ctx) is None
    assert "loss spike" in guard.check(5.0, 1.0, ctx)
    assert guard.check(1.1, 1.0, ctx) is None and guard.consecutive == 0


def test_bad_config_names_the_knob():
    with pytest.raises(ValueError, match="signals: unknown signal name 'SIGFOO'"):
        PreemptionConfig(signals=["SIGFOO"])
    with pytest.raises(ValueError, match="loss_spike_factor"):
        NumericsConfig(loss_spike_factor=-1)


def test_tokenizer_max_nonfinite_is_the_shared_guards_budget_per_job():
    """numerics.max_nonfinite=2: the third bad step of the job stops it, good steps in between or not."""
    import math

    import torch

    from tokenizer.train_config import TokenizerNumericsConfig
    from videoar_common.distributed import DistContext
    from videoar_common.numerics import NumericsError
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1,
                      device=torch.device("cpu"), backend="gloo")
    guard = NumericsGuard(TokenizerNumericsConfig(max_nonfinite=2).guard_config())
    assert guard.check(math.nan, 0.0, ctx).startswith("non-finite loss")
    assert guard.check(1.0, 1.0, ctx) is None
    assert guard.check(1.0, math.inf, ctx).startswith("non-finite gradient norm")
    assert guard.check(1.0, 1.0, ctx) is None
    with pytest.raises(NumericsError, match="3 in total"):
        guard.check(math.nan, 0.0, ctx)
