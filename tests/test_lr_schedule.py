"""The learning-rate schedule both trainers share (videoar_common.lr_schedule, Megatron's scheduler): the
tokenizer's two engines follow the formula docs/tokenizer.md states, and a checkpointed schedule resumes at
its step, also when loaded into a scheduler that has already stepped (the tokenizer's rollback)."""
from __future__ import annotations

import math

import pytest
import torch

from tokenizer.train_config import TokenizerOptimConfig
from tokenizer.train_engines import lr_schedule
from videoar_common.lr_schedule import build_lr_scheduler


def documented_lr(n: int, *, peak: float, floor: float, warmup: int, decay_end: int, style: str) -> float:
    """docs/tokenizer.md, "Learning-rate schedule", written out independently of the code."""
    if warmup and n <= warmup:
        return peak * n / warmup
    if style == "constant":
        return peak
    if n >= decay_end:
        return floor
    x = (n - warmup) / (decay_end - warmup)
    shape = 0.5 * (1 + math.cos(math.pi * x)) if style == "cosine" else 1 - x
    return floor + (peak - floor) * shape


def lrs(scheduler, updates: int) -> list[float]:
    """The learning rate before update 1, 2, ... (index n: after n applied updates)."""
    out = [scheduler.optimizer.param_groups[0]["lr"]]
    for _ in range(updates):
        scheduler.step()  # DeepSpeed's call after an applied update: no argument
        out.append(scheduler.optimizer.param_groups[0]["lr"])
    return out


def sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)


def test_tokenizer_schedules_by_hand():
    """lr 1.0 / disc_lr 0.5, floor 10%, 4 warm-up steps, 24 steps, discriminator from step 8."""
    o = TokenizerOptimConfig(lr=1.0, disc_lr=0.5, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    ae = lrs(lr_schedule(sgd(), o, peak_lr=1.0, first_step=0, steps=24), 30)
    assert ae[0] == 0.0 and ae[2] == 0.5 and ae[4] == 1.0          # warm-up from 0 (first update at lr 0)
    assert math.isclose(ae[14], 0.55, rel_tol=1e-12)                # cosine midpoint: (1.0 + 0.1) / 2
    assert math.isclose(ae[24], 0.1, rel_tol=1e-12) and math.isclose(ae[30], 0.1, rel_tol=1e-12)
    # the discriminator's first update is global step 8: its own warm-up, decay ending at global step 24
    disc = lrs(lr_schedule(sgd(), o, peak_lr=0.5, first_step=8, steps=24), 16)
    assert disc[2] == 0.25 and disc[4] == 0.5
    assert math.isclose(disc[10], 0.275, rel_tol=1e-12)             # midpoint of its 12 decay steps
    assert math.isclose(disc[16], 0.05, rel_tol=1e-12)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("first_step", [0, 5])
def test_tokenizer_schedule_follows_the_documented_formula(style, first_step):
    o = TokenizerOptimConfig(lr=3e-4, disc_lr=1e-4, warmup_steps=6, min_lr_ratio=0.2, schedule=style)
    peak, steps = (o.lr, 40) if first_step == 0 else (o.disc_lr, 40)
    got = lrs(lr_schedule(sgd(), o, peak_lr=peak, first_step=first_step, steps=steps), 45)
    want = [documented_lr(n, peak=peak, floor=peak * 0.2, warmup=6, decay_end=steps - first_step, style=style)
            for n in range(46)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_a_run_shorter_than_its_warmup_stays_in_it():
    o = TokenizerOptimConfig(lr=1.0, disc_lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lrs(lr_schedule(sgd(), o, peak_lr=1.0, first_step=0, steps=3), 3) == [0.0, 0.1, 0.2, 0.3]
    # a discriminator that starts after the last step is never stepped, but must still be buildable
    assert lrs(lr_schedule(sgd(), o, peak_lr=1.0, first_step=100, steps=3), 0) == [0.0]


def _scheduler(steps_taken: int = 0):
    s = build_lr_scheduler(sgd(), peak_lr=1.0, min_lr=0.1, warmup_steps=3, decay_steps=20, decay_style="cosine",
                           weight_decay=0.01)
    for _ in range(steps_taken):
        s.step()
    return s


@pytest.mark.parametrize("already_stepped", [0, 9])
def test_load_restores_the_saved_step(already_stepped):
    """A fresh scheduler (resume) and one that has run on (rollback) both continue at the saved step."""
    saved = _scheduler(5).state_dict()
    s = _scheduler(already_stepped)
    s.load_state_dict(saved)
    assert s.num_steps == 5
    assert s.optimizer.param_groups[0]["lr"] == _scheduler(5).optimizer.param_groups[0]["lr"]
    s.step()
    assert s.optimizer.param_groups[0]["lr"] == _scheduler(6).optimizer.param_groups[0]["lr"]


def test_recipe_wins_on_resume_and_the_change_is_listed():
    from videoar_common.lr_schedule import schedule_changes
    saved = _scheduler(5).state_dict()
    longer = build_lr_scheduler(sgd(), peak_lr=1.0, min_lr=0.1, warmup_steps=3, decay_steps=40,
                                decay_style="cosine", weight_decay=0.01)
    longer.load_state_dict(saved)
    assert longer.num_steps == 5 and longer.lr_decay_steps == 40
    assert schedule_changes(longer.loaded_state, longer) == ["lr_decay_steps: 20 -> 40", "wd_incr_steps: 20 -> 40"]


def test_a_torch_lambdalr_checkpoint_continues_at_its_step():
    """Tokenizer checkpoints written before this schedule hold torch LambdaLR state (last_epoch = updates)."""
    opt = sgd()
    old = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0)
    for _ in range(7):
        opt.step()
        old.step()
    s = _scheduler()
    s.load_state_dict(old.state_dict())
    assert s.num_steps == 7
    assert s.optimizer.param_groups[0]["lr"] == _scheduler(7).optimizer.param_groups[0]["lr"]


def test_warmup_must_end_before_the_decay():
    with pytest.raises(ValueError, match=r"warmup_steps \(20\) < decay_steps \(20\)"):
        build_lr_scheduler(sgd(), peak_lr=1.0, min_lr=0.0, warmup_steps=20, decay_steps=20, decay_style="cosine",
                           weight_decay=0.0)
