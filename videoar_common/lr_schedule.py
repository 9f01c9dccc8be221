"""Learning-rate schedule of both trainers: Megatron-core's ``OptimizerParamScheduler``.

Design decisions:
- **One schedule implementation.** The AR trainer (a Megatron optimizer) and the tokenizer trainer (two
  DeepSpeed engines over torch AdamW) both use Megatron's scheduler: plain Python that writes ``lr`` and
  ``weight_decay`` into any optimizer's ``param_groups``. With ``n`` applied updates so far, peak ``P``,
  floor ``F``, ``W`` warm-up steps and the decay ending at step ``D``:

      n <= W:      lr = P * n / W                       (linear warm-up from 0; W = 0: no warm-up)
      W < n < D:   lr = F + (P - F) * f((n - W) / (D - W)),   f(x) = (1 + cos(pi x)) / 2   (cosine)
                                                              f(x) = 1 - x                 (linear)
      n >= D:      lr = F                                (constant style: lr = P for every n > W)

  The first update therefore runs at lr 0 when W > 0 (Megatron's convention).
- **Stepped on applied updates only**: a step that the numerics guard (AR) or DeepSpeed's overflow check
  (tokenizer) drops does not advance the schedule.
- **The recipe wins on resume** (``override_opt_param_scheduler``): a checkpoint restores only the count of
  applied updates, so extending a run stretches the decay instead of leaving the new steps at the floor.
  :func:`schedule_changes` lists what the recipe changed, for a warning.
- Two changes to Megatron's class (:class:`LRScheduler`): ``step()`` without an argument is one update
  (DeepSpeed calls ``lr_scheduler.step()`` after each applied update; Megatron's signature has no default,
  and DeepSpeed's fallback would then pass the batch size), and ``load_state_dict`` *sets* the count
  (Megatron's adds the saved count to the current one: right for a fresh scheduler only, wrong for the
  tokenizer's in-place rollback to an earlier checkpoint).
"""
from __future__ import annotations

from typing import Literal

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

DecayStyle = Literal["cosine", "linear", "constant"]


class LRScheduler(OptimizerParamScheduler):
    """Megatron's ``OptimizerParamScheduler`` with a one-step default and an exact ``load_state_dict``."""

    loaded_state: dict | None = None
    """The state the last :meth:`load_state_dict` received (for :func:`schedule_changes`)."""

    def step(self, increment: int = 1) -> None:
        super().step(increment)

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = self._from_torch_scheduler(state_dict)
        self.loaded_state = dict(state_dict)
        self.num_steps = 0  # Megatron's load adds the saved count to the current one
        super().load_state_dict(state_dict)

    def _from_torch_scheduler(self, state_dict: dict) -> dict:
        """Tokenizer checkpoints written before this schedule held a ``torch.optim.lr_scheduler.LambdaLR``
        state, whose ``last_epoch`` counts the applied updates: continue from that count."""
        if "num_steps" in state_dict or "last_epoch" not in state_dict:
            return state_dict
        return {**self.state_dict(), "num_steps": int(state_dict["last_epoch"])}


def build_lr_scheduler(optimizer, *, peak_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                       decay_style: DecayStyle, weight_decay: float) -> LRScheduler:
    """The schedule of the module docstring over ``optimizer.param_groups`` (groups may carry their own
    ``max_lr`` / ``min_lr`` / ``wd_mult``). Needs ``0 <= warmup_steps < decay_steps``; callers check their
    own knobs first so that the message names them."""
    if not 0 <= warmup_steps < decay_steps:
        raise ValueError(f"LR schedule: need 0 <= warmup_steps ({warmup_steps}) < decay_steps ({decay_steps})")
    return LRScheduler(
        optimizer, init_lr=0.0, max_lr=peak_lr, min_lr=min_lr, lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps, lr_decay_style=decay_style, start_wd=weight_decay, end_wd=weight_decay,
        wd_incr_steps=decay_steps, wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True)


def schedule_changes(saved: dict, scheduler: OptimizerParamScheduler) -> list[str]:
    """Schedule settings that differ between a checkpoint's scheduler state and the recipe's."""
    now = scheduler.state_dict()
    return [f"{k}: {saved[k]} -> {now[k]}" for k in now if k != "num_steps" and k in saved and saved[k] != now[k]]
