"""Reading a run's audit trail: which samples each step consumed, and the final metrics per step.

``sample_ids.jsonl`` (written by rank 0, append-only) holds a ``{"start_step": s, "resumed": ...}``
record each time a job of the run starts, then one ``{"step": n, "ids": [[ids of replica 0], ...]}``
record per step. A job that crashed after its last checkpoint logged steps that the next job redoes;
its start record (at the checkpoint's step) supersedes them. :func:`consumed_samples` replays the file
with that rule, so the result is exactly the samples the surviving training trajectory consumed, step
by step — what an audit compares against an uninterrupted run to prove that nothing was skipped or
repeated.
"""
from __future__ import annotations

import json
from pathlib import Path

from videoar_common.run_logging import METRICS_FILE, read_metrics

SAMPLE_IDS_FILE = "sample_ids.jsonl"


def consumed_samples(run_dir: str | Path) -> dict[int, list[list[str]]]:
    """step → sample ids per data-parallel replica, for the steps of the surviving trajectory."""
    steps: dict[int, list[list[str]]] = {}
    with open(Path(run_dir) / SAMPLE_IDS_FILE) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a torn last line from a crash
                continue
            if "start_step" in record:
                steps = {s: ids for s, ids in steps.items() if s <= record["start_step"]}
            else:
                steps[record["step"]] = record["ids"]
    return dict(sorted(steps.items()))


def step_metrics(run_dir: str | Path) -> dict[int, dict]:
    """step → the last metrics record logged for it (a redone step's record replaces the lost one)."""
    return {r["step"]: r for r in read_metrics(Path(run_dir) / METRICS_FILE)}
