"""The AR benchmarks run end to end on CPU (their `--device cpu` smoke modes), so a GPU session does not
discover a broken script; the data benchmark also checks that the batched build equals the baseline's."""
from __future__ import annotations


def test_batch_building_benchmark_runs_and_checks_equality(capsys):
    from benchmarks.bench_ar_data import main
    assert main(["--device", "cpu", "--layouts", "ucf,stage3", "--micro", "ucf=3,stage3=1", "--iters", "1",
                 "--latent-dim", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("batched == per-sample: yes") == 2 and out.count("=> per-sample / batched") == 2


def test_train_step_benchmark_runs_with_and_without_split_attention(capsys):
    from benchmarks.bench_ar_train_step import main
    assert main(["--device", "cpu", "--size", "tiny", "--layouts", "ucf", "--batch", "ucf=2", "--iters", "1",
                 "--split-tokens", "0,16"]) == 0
    out = capsys.readouterr().out
    assert "attention_split_tokens=0" in out and "attention_split_tokens=16" in out
    assert out.count("=> VideoAR / GPT tokens/s") == 2


def test_checkpoint_benchmark_times_both_saves_through_the_trainer(capsys, tmp_path):
    """Tiny model on CPU: a synchronous and an asynchronous save per round through Trainer.save, each
    checked committed (the benchmark raises otherwise), measured and removed; same size both ways."""
    import json

    from benchmarks.bench_checkpoint import main
    out_json = tmp_path / "out.json"
    assert main(["--device", "cpu", "--size", "tiny", "--rounds", "1", "--frames", "2", "--steps-while-writing", "1",
                 "--work-dir", str(tmp_path), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "first round, not counted" in out and "round 1: synchronous save" in out
    assert "=> stall / synchronous =" in out
    (row,) = json.loads(out_json.read_text())["rounds"]
    assert row["checkpoint_gib"] > 0 and abs(row["async_checkpoint_gib"] / row["checkpoint_gib"] - 1) < 0.01
    assert not list(tmp_path.glob("run-*/checkpoints/step_*"))  # each removed once measured
