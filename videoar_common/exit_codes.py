"""Process exit codes of every ``videoar`` command, and the error type that selects code 2.

One table for every command because launchers act on it: ``slurm/lib.sh`` requeues a job that stopped to
be requeued, and a user or CI reads 2 as "fix the input" and 3 as "the run diverged". The README's
Troubleshooting section and ``--help`` of both trainers list these values.

The rule for 2 is applied in one place, the ``videoar`` dispatcher (``videoar_megatron/cli/__init__.py``):
an :class:`InputError` (every project error that refuses an input derives from it) or a missing file
escaping a subcommand becomes one line on stderr, ``videoar COMMAND: <message>``, and exit 2, without a
traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

EXIT_CONFIG = 2
"""An input was refused (a recipe or ``--set`` knob, a path, a checkpoint, a tokenizer, token shards, a
manifest), before or during the work; the one-line message names the knob, field or file. Nothing was
trained or committed after the refusal. argparse's usage errors use 2 as well."""
EXIT_NUMERICS = 3
"""Training stopped on non-finite (or spiking) steps: the numerics guard's budget was spent, or the
tokenizer's ``numerics.on_nonfinite=stop``. Nothing was saved after the last good step."""
REQUEUE_EXIT_CODE = 75
"""Checkpoint saved after a signal or the wall-clock limit, please requeue (EX_TEMPFAIL). torchrun reports 1
for any failed worker, so the trainers also write the run directory's ``REQUEUE_REQUESTED`` marker
(:mod:`videoar_common.preemption`), which the sbatch scripts read."""


class InputError(Exception):
    """An input cannot be used: a recipe knob, a path, a checkpoint, a tokenizer, a shard set or a manifest.

    The message names it (the knob, field or file) and fits on one line. Project errors of this kind
    derive from it (often together with ``ValueError`` or ``RuntimeError``, which older callers catch);
    every ``videoar`` command exits :data:`EXIT_CONFIG` on it."""
