"""The demo's console progress (issue 23: the AR stage printed nothing for minutes), on a stand-in
stage command that writes a metrics file as the trainers do; the real stages: tests/test_demo.py."""
from __future__ import annotations

import re
import sys

from videoar_megatron.demo import Progress, Stage, run_stage

WRITER = """
import json, sys, time
for step in range(1, 9):
    with open(sys.argv[1], "a") as f:
        f.write(json.dumps({"step": step, "loss": 1.0 / step, "bit_accuracy": 0.5 + step / 100}) + "\\n")
        if step == 3:
            f.write(json.dumps({"step": step, "eval/psnr": 20.0}) + "\\n")  # not a training record
    time.sleep(0.3)
"""


def test_a_training_stage_prints_step_loss_and_eta(tmp_path):
    metrics = tmp_path / "ar" / "metrics.jsonl"
    metrics.parent.mkdir()
    stage = Stage("ar", [[sys.executable, "-c", WRITER, str(metrics)]], [metrics],
                  Progress(metrics, 8, ("loss", "bit_accuracy")))
    console = []
    run_stage(stage, tmp_path, console.append, progress_every=0.25)
    lines = [re.fullmatch(r"\[demo\] ar: step (\d+)/8, loss ([\d.]+), bit_accuracy [\d.]+, \d+m\d\ds, ETA \d+m\d\ds",
                          line) for line in console]
    steps = [int(m.group(1)) for m in lines if m]
    assert len(steps) >= 2 and steps == sorted(set(steps)), console
    assert all(float(m.group(2)) == round(1.0 / int(m.group(1)), 3) for m in lines if m), console
    assert "demo stage" not in " ".join(console) and (tmp_path / "logs" / "ar.log").is_file()


def test_an_interrupted_stage_stops_its_command(tmp_path):
    """Ctrl-C while a stage runs: its command gets SIGTERM (the trainers save and exit 75) and is waited
    for, not left running behind the demo."""
    import os
    import pytest
    pid_file, metrics = tmp_path / "pid", tmp_path / "metrics.jsonl"
    script = ("import json, os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\n"
              "open(sys.argv[2], 'w').write(json.dumps({'step': 1, 'loss': 1.0}) + '\\n')\ntime.sleep(600)\n")
    stage = Stage("ar", [[sys.executable, "-c", script, str(pid_file), str(metrics)]], [],
                  Progress(metrics, 10, ("loss",)))

    def interrupt(_text):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, tmp_path, interrupt, progress_every=0.25)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
