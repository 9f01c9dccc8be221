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


def test_context_parallel_cost_benchmark_runs_both_paths(capsys):
    from benchmarks.bench_ar_cp import main
    assert main(["--device", "cpu", "--size", "tiny", "--layouts", "ucf", "--iters", "1", "--rounds", "1",
                 "--latent-dim", "8"]) == 0
    out = capsys.readouterr().out
    assert "plain  step" in out and "split  step" in out and "=> split / plain tokens/s" in out


def test_context_parallel_balance_table_prints_every_split(capsys):
    from benchmarks.cp_balance import main
    assert main(["--frames", "3", "--cp", "2", "--windows", "0,1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 2 and all(len(r) == 7 and float(r[4]) <= 1.1 for r in rows)
