"""Numerics guard: a non-finite (or spiking) step is skipped on every rank together, never saved.

The verdict is computed from values all-reduced over all ranks (MAX of a 'bad' flag), so a NaN on
one rank makes all ranks skip the same step before the optimizer update (torchtitan's lesson: a rank
that steps alone desynchronises the replicas). After ``max_consecutive_skips`` bad steps in a row, or
``max_total_skips`` in the run, training stops with an error rather than burning compute.

Used by both trainers: the AR trainer asks for the verdict between the gradient norm and the update
(``videoar_megatron.training.optim.guarded_step``); the tokenizer trainer after each window of
micro-batches, with DeepSpeed's gradient norm, and checks that DeepSpeed dropped exactly the steps the
guard rejects (``tokenizer.trainer``).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from videoar_common.distributed import DistContext


@dataclass(kw_only=True)
class NumericsConfig:
    """How bad steps are detected and handled."""

    max_consecutive_skips: int = 5
    """Stop after this many bad steps in a row."""
    max_total_skips: int = 50
    """Stop after this many bad steps in the whole run."""
    loss_spike_factor: float = 0.0
    """Treat a loss above factor × the mean of the last `loss_spike_window` good losses as bad
    (0 = off). Useful against rare data-driven blow-ups; keep it generous (e.g. 5)."""
    loss_spike_window: int = 50
    """Good losses remembered for the spike threshold."""

    def __post_init__(self) -> None:
        if self.max_consecutive_skips < 1 or self.max_total_skips < 1:
            raise ValueError("max_consecutive_skips and max_total_skips must be >= 1")
        if self.loss_spike_factor < 0:
            raise ValueError(f"loss_spike_factor must be >= 0, got {self.loss_spike_factor}")
        if self.loss_spike_window < 1:
            raise ValueError(f"loss_spike_window must be >= 1, got {self.loss_spike_window}")


class NumericsError(RuntimeError):
    """Too many bad steps; the message says how many and why."""


class NumericsGuard:
    def __init__(self, cfg: NumericsConfig):
        self.cfg = cfg
        self.consecutive = 0
        self.total = 0
        self._recent: deque[float] = deque(maxlen=cfg.loss_spike_window)

    def _local_problem(self, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm {grad_norm}"
        if self.cfg.loss_spike_factor and len(self._recent) >= min(10, self.cfg.loss_spike_window):
            mean = sum(self._recent) / len(self._recent)
            if loss > self.cfg.loss_spike_factor * mean:
                return f"loss spike {loss:.4g} > {self.cfg.loss_spike_factor} x recent mean {mean:.4g}"
        return None

    def check(self, loss: float, grad_norm: float, ctx: DistContext) -> str | None:
        """Collective. Returns the reason to skip this step (same on all ranks), or None if good.
        Raises :class:`NumericsError` once the skip budget is exhausted."""
        problem = self._local_problem(loss, grad_norm)
        if not ctx.any(problem is not None):
            self.consecutive = 0
            self._recent.append(loss)
            return None
        self.consecutive += 1
        self.total += 1
        reason = problem or "a bad step on another rank"
        if self.consecutive > self.cfg.max_consecutive_skips or self.total > self.cfg.max_total_skips:
            raise NumericsError(f"stopping: {self.consecutive} bad steps in a row, {self.total} in total "
                                f"(limits {self.cfg.max_consecutive_skips} / {self.cfg.max_total_skips}); "
                                f"last: {reason}")
        return reason

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total, "recent": list(self._recent)}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.total = state["consecutive"], state["total"]
        self._recent.clear()
        self._recent.extend(state["recent"])
