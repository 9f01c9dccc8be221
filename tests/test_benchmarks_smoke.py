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
    assert out.split("summary")[1].count(" ratio ") == 2


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
    assert not list(tmp_path.glob("run-*/checkpoints/step_*"))  # each removed once measured


def test_benchmark_layouts_are_the_recipes_sequences():
    """Each benchmark layout is the longest sequence of its recipe at TP = 1, counted here from the recipe's
    own num_frames and scale_schedule (1 + 4k frames -> 1 + k latent frames, prefix from the condition):
    the stage-III recipe trains 23,059 tokens, 65 frames 43,499."""
    from benchmarks.ar_common import LAYOUTS, layout_recipes
    from videoar_common.config import load_config
    from videoar_megatron.training.config import TrainConfig
    for name, (recipe, overrides) in layout_recipes().items():
        cfg = load_config(TrainConfig, recipe, list(overrides))
        video = cfg.data  # the main source is the video one in every recipe (images are mixed in)
        frames = 1 + (video.num_frames - 1) // 4
        tokens = cfg.model.condition.prefix_len + frames * sum(h * w for h, w in video.scale_schedule)
        assert (LAYOUTS[name].seq_len, LAYOUTS[name].pad) == (tokens, 0), name
        assert LAYOUTS[name].scales == tuple(map(tuple, video.scale_schedule)), name
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
