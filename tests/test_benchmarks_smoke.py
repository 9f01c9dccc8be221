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
    assert out.count("=> VideoAR / GPT tokens/s") == 2 and "S=651 from recipes/ar/ucf101_L.yaml" in out
    assert out.count("flex kernel: triton (auto: ") == 2   # the default, named with its reason
    assert out.count("Random Frame Mask window 0 drop 0.0") == 2   # ucf101_L.yaml's: full temporal context
    assert out.split("summary")[1].count(" ratio ") == 2


def test_train_step_benchmark_trains_each_recipes_random_frame_mask():
    """The benchmark's VideoAR carries its recipe's Random Frame Mask (stage III: window 4, drop 0.1),
    which sets the attended pairs and auto's kernel; --p-mask sets a drop without a window instead."""
    import argparse
    from benchmarks.bench_ar_train_step import videoar_config
    as_recipe = argparse.Namespace(latent_dim=8, p_mask=None, flex_kernel="auto")
    stage3 = videoar_config(as_recipe, "tiny", "stage3").mask
    assert (stage3.rfm_window, stage3.rfm_p_mask) == (4, 0.1) and stage3.reads_frame_table
    assert not videoar_config(as_recipe, "tiny", "ucf").mask.reads_frame_table
    chosen = videoar_config(argparse.Namespace(latent_dim=8, p_mask=0.2, flex_kernel="auto"), "tiny", "stage3").mask
    assert (chosen.rfm_window, chosen.rfm_p_mask) == (0, 0.2)


def test_checkpoint_benchmark_times_both_saves_through_the_trainer(capsys, tmp_path):
    """Tiny model on CPU: a synchronous and an asynchronous save per round through Trainer.save, each
    checked committed (the benchmark raises otherwise), measured and removed; same size both ways."""
    import json

    from benchmarks.bench_checkpoint import main
    out_json = tmp_path / "out.json"
    assert main(["--device", "cpu", "--size", "tiny", "--rounds", "1", "--frames", "2", "--steps-while-writing", "1",
                 "--work-dir", str(tmp_path), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "at recipes/ar/stage3.yaml: 4 prefix + 2 latent frames" in out  # the recipe, CPU-sized
    assert "first round, not counted" in out and "round 1: synchronous save" in out
    assert "=> stall / synchronous =" in out
    (row,) = json.loads(out_json.read_text())["rounds"]
    assert row["checkpoint_gib"] > 0 and abs(row["async_checkpoint_gib"] / row["checkpoint_gib"] - 1) < 0.01
    # the stall's phases, timed inside Trainer.save, account for no more than the stall timed around it
    assert list(row["stall_phases_s"]) == ["state_dict", "previous_commit", "plan", "copy_and_fork"]
    assert list(row["sync_phases_s"]) == ["state_dict", "write_and_commit"]
    for name, total in (("stall_phases_s", row["async_stall_s"]), ("sync_phases_s", row["sync_save_s"])):
        assert all(s >= 0 for s in row[name].values()) and sum(row[name].values()) <= total, (name, row)
    assert "where the time went: synchronous (state dict " in out and "copy and fork " in out
    assert not list(tmp_path.glob("run-*/checkpoints/step_*"))  # each removed once measured


def test_benchmark_layouts_are_the_recipes_sequences():
    """Each benchmark layout is the longest sequence of its recipe at TP = 1, counted here from the recipe's
    own num_frames and scale_schedule (1 + 4k frames -> 1 + k latent frames, prefix from the condition):
    the stage-III recipe trains 23,059 tokens, 65 frames 43,499."""
    import dataclasses
    from benchmarks.ar_common import LAYOUTS, MASKS, layout_recipes
    from videoar_common.config import load_config
    from videoar_megatron.training.config import TrainConfig
    for name, (recipe, overrides) in layout_recipes().items():
        cfg = load_config(TrainConfig, recipe, list(overrides))
        video = cfg.data  # the main source is the video one in every recipe (images are mixed in)
        frames = 1 + (video.num_frames - 1) // 4
        tokens = cfg.model.condition.prefix_len + frames * sum(h * w for h, w in video.scale_schedule)
        assert (LAYOUTS[name].seq_len, LAYOUTS[name].pad) == (tokens, 0), name
        assert LAYOUTS[name].scales == tuple(map(tuple, video.scale_schedule)), name
        assert MASKS[name] == dataclasses.asdict(cfg.model.mask), name
    assert [LAYOUTS[n].seq_len for n in ("ucf", "stage1", "stage2", "stage3", "stage3_65f")] == \
        [651, 2669, 12839, 23059, 43499]


def test_65_frame_layout_switches_to_its_recipe_when_it_lands(tmp_path, monkeypatch):
    """Until recipes/ar/stage3_65f.yaml exists the 65-frame layout is stage3.yaml with data.num_frames=65;
    once it exists, that recipe is read (here a stand-in with another caption length, so the two differ)."""
    import shutil
    from benchmarks import ar_common
    for recipe in ar_common.RECIPES.glob("*.yaml"):
        shutil.copy(recipe, tmp_path)
    (tmp_path / "stage3_65f.yaml").unlink(missing_ok=True)
    monkeypatch.setattr(ar_common, "RECIPES", tmp_path)
    recipe, overrides = ar_common.layout_recipes()["stage3_65f"]
    assert (recipe.name, overrides) == ("stage3.yaml", ("data.num_frames=65",))
    assert ar_common.recipe_layout(recipe, overrides).seq_len == 43499
    (tmp_path / "stage3_65f.yaml").write_text("base: stage3.yaml\nmodel: {condition: {text_len: 32}}\n"
                                              "data: {num_frames: 65}\n")
    recipe, overrides = ar_common.layout_recipes()["stage3_65f"]
    assert (recipe.name, overrides) == ("stage3_65f.yaml", ())
    assert ar_common.recipe_layout(recipe, overrides).seq_len == 43499 - 32
    assert ar_common.layout_origin("stage3_65f") == "recipes/ar/stage3_65f.yaml"


def test_compile_cache_benchmark_runs_cold_then_warm(capsys, tmp_path):
    """Two child runs share the given (empty) cache directory and the ratio is printed (on the CPU nothing
    is compiled: the cache fills on a GPU, tests/test_compile_cache.py shows a hit on CPU Inductor); a
    non-empty directory is refused (the first run would not be cold)."""
    from benchmarks.bench_compile_cache import main
    cache = tmp_path / "c"
    argv = ["--device", "cpu", "--size", "tiny", "--layout", "ucf", "--steps", "1", "--cache-dir", str(cache)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"compile cache (cold, then warm): {cache}" in out
    assert "cold: time to first step" in out and "warm: time to first step" in out
    assert "=> time to first step, cold / warm = " in out
    (cache / "fxgraph").mkdir()
    assert main(argv) == 2 and "is not empty" in capsys.readouterr().err


def test_per_pair_settings_look_up_size_and_layout_then_layout_then_size():
    from benchmarks.bench_ar_train_step import per_pair
    spec = "XL=full,4B=full,stage3_65f=full,4B/ucf=none"
    assert per_pair(spec, "L", "stage3", "none") == "none"
    assert per_pair(spec, "L", "stage3_65f", "none") == "full"
    assert per_pair(spec, "XL", "stage3", "none") == "full"
    assert per_pair(spec, "4B", "ucf", "full") == "none"
    assert per_pair("core_attn", "L", "ucf", "none") == "core_attn"


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


# --- bench_ar_train.py and the multi-GPU session (issue 27) ------------------------------------------

def test_training_benchmark_runs_context_parallel_at_another_sequence_on_two_gloo_ranks(capsys, tmp_path):
    """The real trainer under torchrun on CPU: the 1-rank baseline at the UCF-101 layout, CP=2 on 2 gloo
    ranks at stage I's (text-conditioned, 2,669 tokens); each row carries the dry run's estimate, and the
    CP line compares tokens/s per GPU with the baseline's."""
    import yaml

    from benchmarks.bench_ar_train import main
    assert main(["--device", "cpu", "--size", "tiny", "--layouts", "cp2@stage1", "--steps", "1", "--warmup", "0",
                 "--micro", "2", "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("1gpu ", "cp2@stage1 "))}
    assert rows["1gpu"][1:4] == ["1", "1x1x1x1", "2"] and rows["cp2@stage1"][1:4] == ["2", "1x2x1x1", "1"]
    for row in rows.values():
        assert float(row[11]) > 0 and float(row[12]) > 0   # the dry run's estimate, and without its allowance
    assert "=> cp2@stage1 (CP=2, stage1: 2669 tokens) vs 1gpu (ucf: 651 tokens): tokens/s per GPU ratio " in out
    (config,) = tmp_path.glob("runs-*/cp2_at_stage1/config.yaml")
    cfg = yaml.safe_load(config.read_text())   # what the launched trainer resolved: CP=2 on stage I's shards
    assert cfg["parallel"]["context_parallel"] == 2 and cfg["data"]["path"].endswith("shards_stage1_d8_text4x16")


def fake_result(per_gpu: float, gpus: int) -> dict:
    return {"tokens_per_s": per_gpu * gpus, "tokens_per_s_per_gpu": per_gpu, "mfu": 0.3, "step_time_s": 1.0,
            "data_time_s": 0.1, "mem_peak_gib": 40.0}


def test_training_benchmark_reports_cp_against_the_baseline_and_pipelines_against_their_bubble(capsys):
    """The lines after the rows, with measured figures given: a CP layout gets its tokens/s per GPU over the
    baseline's; a pure pipeline its efficiency over 1 / (1 + (PP-1)/(v m)), here m = 8 (stage III's
    micro-batches at its target: 128 samples / (1 x 16 replicas)): 1/(1 + 1/8) = 0.889 plain, 1/(1 + 1/16)
    = 0.941 interleaved; TP x PP gets no pipeline line (TP's cost is not bubble)."""
    from benchmarks.bench_ar_train import LAYOUTS, Run, accumulation, parse, replica_micro, report
    args = parse(["--sequence", "stage3", "--micro", "1", "--accumulation", "recipe"])
    base = Run("1gpu", "1gpu", LAYOUTS["1gpu"], "stage3", estimate=(50.0, 47.0))
    runs = {name: Run(label, name, LAYOUTS[name], seq, estimate=(40.0, 37.0)) for label, name, seq in [
        ("cp2@stage3_65f", "cp2", "stage3_65f"), ("pp2", "pp2", "stage3"), ("pp2v2", "pp2v2", "stage3"),
        ("tp2pp2", "tp2pp2", "stage3")]}
    assert [accumulation(args, r) for r in runs.values()] == [8, 8, 8, 8]
    assert replica_micro(args, runs["cp2"]) == 1          # 2 x 23,059 / 43,499 = 1.06 samples of 65 frames
    assert replica_micro(args, runs["tp2pp2"]) == 2
    for run, per_gpu in zip(runs.values(), [9000, 8500, 9000, 8000]):
        report(args, run, fake_result(per_gpu, run.par.gpus), base, 10000)
    out = capsys.readouterr().out
    assert "=> cp2@stage3_65f (CP=2, stage3_65f: 43499 tokens) vs 1gpu (stage3: 23059 tokens): tokens/s per GPU " \
           "ratio 0.900 (goal >= 0.85: met)" in out
    assert "=> pp2: pipeline efficiency 0.850 (tokens/s per GPU vs 1gpu) against the bubble bound " \
           "1/(1 + (PP-1)/(v m)) = 1/(1 + 1/(1 x 8)) = 0.889: 0.956 of the bound (goal >= 0.95: met); idle share " \
           "measured 1/efficiency - 1 = 0.176, bubble 0.125" in out
    assert "=> pp2v2: pipeline efficiency 0.900 (tokens/s per GPU vs 1gpu) against the bubble bound " \
           "1/(1 + (PP-1)/(v m)) = 1/(1 + 1/(2 x 8)) = 0.941: 0.956 of the bound (goal >= 0.95: met)" in out
    assert "=> tp2pp2" not in out
    row = next(line.split() for line in out.splitlines() if line.startswith("pp2v2 "))
    assert row[2:5] == ["1x1x2v2x1", "1", "x"] and row[5] == "8" and row[-1] == "0.900"
    assert row[-2] == f"{40.0 / 37.0:.3f}"                 # peak / the estimate without its runtime allowance


def test_interleaved_layouts_are_skipped_with_the_reason_until_the_knob_exists(capsys, monkeypatch):
    """pp2v2 needs parallel.virtual_pipeline_stages: while ParallelConfig has no such field it is skipped and
    named, once it has (stand-ins for both checkouts) it runs; a layout of more GPUs than the host is named."""
    import dataclasses

    from benchmarks.bench_ar_train import parse_runs, runnable
    from videoar_megatron.model import config
    runs = parse_runs("pp2v2", "ucf", gpus=2)
    assert [r.label for r in runs] == ["1gpu", "pp2v2"]
    without = dataclasses.make_dataclass("ParallelConfig", [("pipeline_parallel", int, 1)])
    with_knob = dataclasses.make_dataclass("ParallelConfig", [("pipeline_parallel", int, 1),
                                                              ("virtual_pipeline_stages", int, 1)])
    monkeypatch.setattr(config, "ParallelConfig", without)
    assert [r.label for r in runnable(runs, gpus=2)] == ["1gpu"]
    assert "pp2v2: skipped, parallel.virtual_pipeline_stages is not a config field" in capsys.readouterr().out
    monkeypatch.setattr(config, "ParallelConfig", with_knob)
    assert [r.label for r in runnable(runs, gpus=2)] == ["1gpu", "pp2v2"]
    assert [r.label for r in runnable(parse_runs("cp2tp2", "ucf", gpus=2), gpus=2)] == ["1gpu"]
    assert "cp2tp2: skipped, needs 4 GPUs (this host: 2)" in capsys.readouterr().out


def test_training_benchmark_refuses_unknown_layouts_and_sequences():
    import pytest

    from benchmarks.bench_ar_train import parse_runs
    with pytest.raises(SystemExit, match="--layouts: unknown layout 'cp3'"):
        parse_runs("cp3", "ucf", gpus=4)
    with pytest.raises(SystemExit, match="--layouts: unknown sequence 'stage9' in 'cp2@stage9'"):
        parse_runs("cp2@stage9", "ucf", gpus=4)


def run_session(tmp_path, **env) -> str:
    """The session's PLAN=1 output: session.log, then every step's log (tmp_path/out/NAME.log)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.subprocess_env import child_env
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(repo / "benchmarks/gpu/multi_gpu_session.sh")], capture_output=True, text=True,
                          timeout=300, env={**child_env(), "OUT": str(out), "PLAN": "1", "PYTHON": sys.executable,
                                            "WORK": str(tmp_path / "work"), **env}, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr
    return (out / "session.log").read_text() + "".join(p.read_text() for p in sorted(out.glob("*.log"))
                                                       if p.name != "session.log")


def test_multi_gpu_session_plans_every_step_on_four_gpus(tmp_path):
    """PLAN=1 on this CPU machine, pretending 4 GPUs: every step runs its plan (the GPU tests it would
    collect, each benchmark call's runs and dry-run estimates), so a GPU host cannot find a config error."""
    log = run_session(tmp_path, GPUS="4", BUDGET_S="100000")
    assert "NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1" in log
    for name in ("gpu_tests_cp", "runs_1_2", "gpu_tests_train_cp", "run3_XL", "run3_4B", "gpu_tests_train"):
        assert f"== {name}: exit 0 after" in log, name
    assert "test_cp2_equals_cp1_with_flex_attention_on_nccl" in log
    assert "test_tp2_with_sequence_parallelism_times_cp2_equals_the_unsplit_model_on_four_gpus" in log
    assert "test_save_at_one_layout_resume_at_another[tp2-pp2]" in log
    train_cp, train_rest = ((tmp_path / "out" / f"{name}.log").read_text()
                            for name in ("gpu_tests_train_cp", "gpu_tests_train"))
    assert "test_cp2_matches_cp1_losses_and_grad_norms_for_20_steps_bf16[rfm]" in train_cp
    assert "test_save_at_one_layout_resume_at_another[tp2-pp2]" in train_rest and "cp2" not in train_rest
    assert "cp2@stage3_65f: 2 GPU(s), TPxCPxPPxDP 1x2x1x1, 1 x 8 micro-batches per step, 43499 tokens" in log
    assert "pp2: 2 GPU(s), TPxCPxPPxDP 1x1x2x1, 1 x 8 micro-batches per step" in log
    assert "pp2v2: " in log
    # 4B cannot train on one 80 GB GPU (the dry run says so): TP=2 is run 3's baseline there
    assert "VideoAR-4B" in log and "1gpu: 1 GPU(s), TPxCPxPPxDP 1x1x1x1, 1 x 2 micro-batches per step, 23059 tokens, " \
           "dry-run estimate 80.5 GiB per GPU: skipped, > 85% of 80 GiB" in log
    assert log.count("cp2tp2: 4 GPU(s), TPxCPxPPxDP 2x2x1x1, 4 x 2 micro-batches per step") == 2


def test_multi_gpu_session_names_what_it_skips_and_the_command_for_the_rest(tmp_path):
    """Two GPUs and a budget that holds none of these steps' limits: the 4-GPU step is skipped for the GPUs,
    the others are not started (never cut by the budget) and the last line gives the command for them."""
    log = run_session(tmp_path, GPUS="2", BUDGET_S="300", STEPS="runs_1_2 run3_XL gpu_tests_train")
    assert "== run3_XL: skipped, needs 4 GPUs (this host: 2)" in log
    assert "== runs_1_2: not run, its limit 420s >" in log and "== gpu_tests_train: not run" in log
    assert "next command: OUT=" in log and 'STEPS="runs_1_2 gpu_tests_train" bash benchmarks/gpu/multi_gpu_session.sh' \
        in log


def test_gpu_session_scripts_are_shellcheck_clean():
    import subprocess
    from pathlib import Path

    from tests.test_pretokenize_slurm import shellcheck
    repo = Path(__file__).resolve().parents[1]
    scripts = sorted(str(p.relative_to(repo)) for p in (repo / "benchmarks/gpu").glob("*.sh"))
    assert "benchmarks/gpu/multi_gpu_session.sh" in scripts
    proc = subprocess.run([shellcheck(), "-x", "--shell=bash", *scripts], capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 0, proc.stdout
