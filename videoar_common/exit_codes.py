"""Process exit codes of both training entry points (``videoar train``, ``videoar tokenizer train``).

One table for both trainers because launchers act on it: ``slurm/lib.sh`` requeues a job that stopped to
be requeued, and a user or CI reads 2 as "fix the input" and 3 as "the run diverged". The README's
Troubleshooting section and ``--help`` of both commands list these values.
"""
from __future__ import annotations

EXIT_CONFIG = 2
"""The recipe, a checkpoint or the data was refused before or during training; the one-line message names
the knob, field or file. Nothing was trained after the refusal."""
EXIT_NUMERICS = 3
"""Training stopped on non-finite (or spiking) steps: the numerics guard's budget was spent, or the
tokenizer's ``numerics.on_nonfinite=stop``. Nothing was saved after the last good step."""
REQUEUE_EXIT_CODE = 75
"""Checkpoint saved after a signal or the wall-clock limit, please requeue (EX_TEMPFAIL). torchrun reports 1
for any failed worker, so the trainers also write the run directory's ``REQUEUE_REQUESTED`` marker
(:mod:`videoar_common.preemption`), which the sbatch scripts read."""
