"""Preemption and wall-clock limits: every rank decides together to save and exit for a requeue.

Used by both trainers (AR and tokenizer). A signal handler only sets a flag (signal handlers must not
do collective work). Once per step the flags of all ranks are all-reduced, so if SLURM signalled only
the batch step or one node, every rank still stops at the same step, saves, writes the requeue marker
(rank 0, once the checkpoint is committed) and the job exits with
:data:`~videoar_common.exit_codes.REQUEUE_EXIT_CODE`; the sbatch scripts turn the marker into
``scontrol requeue`` (torchrun itself reports 1 for any failed worker).
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from videoar_common.atomic import atomic_write_json
from videoar_common.distributed import DistContext


@dataclass(kw_only=True)
class PreemptionConfig:
    """When a job saves and exits so that the scheduler can requeue it."""

    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that request save-and-exit (default SIGTERM and SIGUSR1; SLURM sends USR1 with
    --signal=B:USR1@600 before the time limit, and SIGTERM on preemption)."""
    time_limit_minutes: float = 0.0
    """Wall-clock budget of this process; save and exit once it is used up (0 = no limit)."""

    def __post_init__(self) -> None:
        for name in self.signals:
            if not hasattr(signal, name):
                raise ValueError(f"signals: unknown signal name {name!r}")
        if self.time_limit_minutes < 0:
            raise ValueError(f"time_limit_minutes must be >= 0, got {self.time_limit_minutes}")


class PreemptionWatcher:
    """Installs the handlers; :meth:`should_stop` is a collective call, made once per step."""

    def __init__(self, cfg: PreemptionConfig, start_time: float | None = None):
        self.cfg = cfg
        self.start_time = time.monotonic() if start_time is None else start_time
        self.signal_received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionWatcher":
        for name in self.cfg.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal_received = signal.Signals(signum).name

    def local_reason(self) -> str | None:
        if self.signal_received:
            return f"signal {self.signal_received}"
        limit = self.cfg.time_limit_minutes * 60
        if limit and time.monotonic() - self.start_time >= limit:
            return f"wall-clock limit of {self.cfg.time_limit_minutes} min reached"
        return None

    def should_stop(self, ctx: DistContext) -> bool:
        """True on every rank if any rank received a signal or ran out of time."""
        return ctx.any(self.local_reason() is not None)


REQUEUE_MARKER = "REQUEUE_REQUESTED"
"""File in the run directory: the job saved and asks to be requeued (read by slurm/lib.sh)."""


def request_requeue(run_dir: str | Path, step: int, reason: str) -> None:
    """Write the requeue marker (rank 0, after the checkpoint is committed)."""
    atomic_write_json(Path(run_dir) / REQUEUE_MARKER, {"step": step, "reason": reason, "time": time.time()})


def clear_requeue(run_dir: str | Path) -> None:
    """Remove a marker left by the previous job of this run (this job is the requeued one)."""
    (Path(run_dir) / REQUEUE_MARKER).unlink(missing_ok=True)
