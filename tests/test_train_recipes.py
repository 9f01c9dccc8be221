"""Every shipped AR recipe: parses (strict keys), names its base, fits its target layout (batch and
heads divisible, memory estimate under the GPU), and agrees with the pre-tokenization recipe that makes
its shards (frames, resolution, scale schedule, text encoder)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from data_prep.pretokenize.config import PretokenizeConfig
from videoar_common.config import load_config
from videoar_megatron.model.params import count_parameters
from videoar_megatron.training.config import TrainConfig
from videoar_megatron.training.dry_run import dry_run, estimate_gib, sequence_layouts

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
AR = sorted((RECIPES / "ar").glob("*.yaml"))
PRETOKENIZE = {load_config(PretokenizeConfig, p).output_dir: load_config(PretokenizeConfig, p)
               for p in sorted((RECIPES / "pretokenize").glob("*.yaml")) if p.name != "base.yaml"}


def test_the_recipe_set_is_complete():
    names = {p.stem for p in AR}
    assert {"base", "tiny", "ucf101_L_1k", "ucf101_L", "ucf101_XL", "stage1", "stage2", "stage3",
            "stage3_65f", "stage3_129f", "videoar_4b"} <= names


@pytest.mark.parametrize("recipe", AR, ids=[p.stem for p in AR])
def test_recipe_names_its_base_and_fits_its_target(recipe):
    raw = yaml.safe_load(recipe.read_text())
    if recipe.stem != "base":
        assert (recipe.parent / raw["base"]).is_file(), f"{recipe.name}: base {raw.get('base')!r} missing"
    cfg = load_config(TrainConfig, recipe)
    fits, report = dry_run(cfg)
    assert fits, report
    layout = cfg.check_layout(cfg.target.world_size)
    assert layout.dp * layout.micro_batch_size * layout.accumulation == cfg.train.global_batch_size
    if cfg.data.path:
        assert estimate_gib(cfg) < cfg.target.gpu_memory_gib


@pytest.mark.parametrize("recipe", [p for p in AR if load_config(TrainConfig, p).data.path],
                         ids=lambda p: p.stem)
def test_recipe_data_matches_the_pretokenize_recipe_of_its_shards(recipe):
    cfg = load_config(TrainConfig, recipe)
    layouts = sequence_layouts(cfg)
    for source in cfg.data.sources:
        pre = PRETOKENIZE.get(source.path)
        assert pre is not None, f"{recipe.name}: no recipes/pretokenize recipe writes {source.path}"
        assert source.num_frames == pre.clips.num_frames
        assert source.resolution == [pre.clips.height, pre.clips.width]
        if pre.scale_schedule:
            assert source.scale_schedule == pre.scale_schedule
        assert layouts[source.name][0].frames == 1 + (pre.clips.num_frames - 1) // 4
        if cfg.model.condition.kind == "text_features":
            assert pre.text_encoder.path, f"{pre.output_dir}: no text encoder but {recipe.name} trains on text features"
            assert pre.text_encoder.max_length == cfg.model.condition.text_len
    tokenizers = {PRETOKENIZE[s.path].tokenizer for s in cfg.data.sources}
    assert len(tokenizers) == 1, f"{recipe.name}: sources come from different tokenizers {tokenizers}"


def test_stages_chain_their_weights_and_share_one_tokenizer():
    stages = [load_config(TrainConfig, RECIPES / "ar" / f"stage{i}.yaml") for i in (1, 2, 3)]
    assert not stages[0].checkpoint.load
    assert stages[1].checkpoint.load == "runs/ar/stage1" and stages[2].checkpoint.load == "runs/ar/stage2"
    tokenizers = {PRETOKENIZE[s.path].tokenizer for cfg in stages for s in cfg.data.sources}
    assert len(tokenizers) == 1, tokenizers
    assert [len(cfg.data.sources) for cfg in stages] == [2, 2, 1]  # images + video, then video only
    assert stages[2].data.num_frames == 33 and stages[2].data.resolution == [384, 672]


@pytest.mark.parametrize("recipe,size,params", [("ucf101_L", "L", 0.906e9), ("ucf101_XL", "XL", 2.148e9),
                                                ("videoar_4b", "4B", 3.78e9)])
def test_named_sizes_have_the_expected_parameter_counts(recipe, size, params):
    cfg = load_config(TrainConfig, RECIPES / "ar" / f"{recipe}.yaml")
    assert cfg.model.size == size
    assert abs(count_parameters(cfg.model)["transformer"] / params - 1) < 0.01


MEASURED_STAGE3_PEAK_GIB = {"L": 19.0, "XL": 44.2, "4B": 77.6}
"""Allocator peaks of `benchmarks/bench_ar_memory.py` (stage III, 23,059 tokens, TP=1, micro-batch 1,
bf16, full recompute, distributed optimizer): L and XL on an H100 (session 4), 4B on an H200 (session
5); docs/BENCHMARKS.md."""


def stage3_at_tp1(size: str, gpu_gib: float) -> TrainConfig:
    return load_config(TrainConfig, RECIPES / "ar/stage3.yaml", [
        f"model.size={size}", "parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
        "parallel.recompute=full", "train.micro_batch_size=1", "train.global_batch_size=1", "data.mix=[]",
        "target.nodes=1", "target.gpus_per_node=1", f"target.gpu_memory_gib={gpu_gib}"])


@pytest.mark.parametrize("size", list(MEASURED_STAGE3_PEAK_GIB))
def test_memory_estimate_matches_the_measured_gpu_peaks(size):
    """The dry run's model (without its fixed runtime allowance) is within 5% of the measured peak,
    and never more than 3% above it; before the optimizer step's working list was counted it ran up
    to 12% under (4B), which told users a 4B recipe fit an 80 GB GPU that it did not."""
    from videoar_megatron.training.dry_run import RUNTIME_OVERHEAD_GIB
    estimate = estimate_gib(stage3_at_tp1(size, 140.0)) - RUNTIME_OVERHEAD_GIB
    measured = MEASURED_STAGE3_PEAK_GIB[size]
    assert 0.97 <= measured / estimate <= 1.05, (size, estimate, measured)


def test_4b_at_tp1_does_not_fit_an_80gb_gpu():
    fits, report = dry_run(stage3_at_tp1("4B", 80.0))
    assert not fits and "DOES NOT FIT" in report, report


def stage3_pipeline(pp: int, v: int, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, RECIPES / "ar/stage3.yaml", [
        f"parallel.pipeline_parallel={pp}", f"parallel.virtual_pipeline_stages={v}", *sets])


def test_dry_run_prints_the_pipeline_bubble_and_warns_above_ten_percent():
    """Stage III at PP=4 on its 32 GPUs (DP=4) with 16 micro-batches per step: plain 1F1B idles
    3/16 of the compute time (warned), two virtual stages halve it (no warning)."""
    _, plain = dry_run(stage3_pipeline(4, 1, "train.global_batch_size=64"))
    assert "pipeline bubble: (PP-1)/(v x m) = 3/(1 x 16) = 18.8% of the compute time" in plain
    assert "WARNING: the pipeline bubble 18.8% is above 10%" in plain
    _, interleaved = dry_run(stage3_pipeline(4, 2, "train.global_batch_size=64", "model.num_layers=48"))
    assert "= 3/(2 x 16) = 9.4% of the compute time (interleaved 1F1B" in interleaved
    assert "WARNING" not in interleaved
    _, unpiped = dry_run(load_config(TrainConfig, RECIPES / "ar/stage3.yaml"))
    assert "pipeline bubble: none (parallel.pipeline_parallel=1)" in unpiped


@pytest.mark.parametrize("pp,v,m", [(4, 1, 8), (4, 1, 2), (4, 2, 8), (4, 3, 4), (2, 2, 2), (8, 2, 16)])
def test_activations_in_flight_follow_megatrons_schedule(pp, v, m):
    """The dry run's activation memory per stage counts the chunk forwards that Megatron's schedule runs
    before the stage's first backward (its own warm-up count, plus the one in steady state)."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches
    from videoar_megatron.training.dry_run import in_flight_layers
    cfg = stage3_pipeline(pp, v, "model.num_layers=48")
    for stage in range(pp):
        comm = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda s=stage: s),
                               virtual_pipeline_model_parallel_size=v if v > 1 else None)
        total, _, warmup, _ = get_pp_rank_microbatches(m, v, pp, p2p_communicator=comm)
        assert in_flight_layers(cfg, stage, m) == min(warmup + 1, total) * 48 / (pp * v), (stage, warmup)


def stage3(*sets: str) -> TrainConfig:
    return load_config(TrainConfig, RECIPES / "ar/stage3.yaml", ["data.path=runs/shards/unreadable", *sets])


def test_dry_run_proposes_the_smallest_context_parallel_that_fits():
    """129 frames without recompute at CP=1 does not fit; the report prints every CP's estimate and
    proposes the smallest that fits (the shipped 129-frame recipe's CP)."""
    cfg = load_config(TrainConfig, RECIPES / "ar/stage3_129f.yaml", ["parallel.context_parallel=1"])
    fits, report = dry_run(cfg)
    assert not fits and "DOES NOT FIT" in report
    shipped = load_config(TrainConfig, RECIPES / "ar/stage3_129f.yaml")
    by_cp = {cp: estimate_gib(load_config(TrainConfig, RECIPES / "ar/stage3_129f.yaml",
                                          [f"parallel.context_parallel={cp}"])) for cp in (2, 4)}
    assert by_cp[2] > 80 >= by_cp[4]
    assert f"CP=2: {by_cp[2]:.1f}; CP=4: {by_cp[4]:.1f}" in report
    assert f"smallest context_parallel that fits: {shipped.parallel.context_parallel}" in report


def test_the_dry_run_prints_attended_pairs_per_context_parallel_rank():
    _, report = dry_run(load_config(TrainConfig, RECIPES / "ar/stage3_65f.yaml"))
    line = next(x for x in report.splitlines() if x.startswith("context parallel: CP=2"))
    ratio = float(line.rsplit("max/min ", 1)[1].rstrip(")"))
    assert 1.0 <= ratio <= 1.1, line


def test_context_parallel_divides_activations_except_the_gathered_keys_and_values():
    from videoar_megatron.training.dry_run import layer_activation_bytes, longest, stages_memory
    one, two = stage3("parallel.recompute=none"), stage3("parallel.recompute=none", "parallel.context_parallel=2")
    seq = longest(two)  # one sequence for both (CP=2 pads to a multiple of 2 x 128)
    (full1, input1), (full2, input2) = layer_activation_bytes(one, seq), layer_activation_bytes(two, seq)
    m = one.model
    gathered_kv = 2 * seq.seq_len * 2 * m.num_attention_heads * m.head_dim / one.parallel.tensor_parallel  # bf16 k, v
    assert input2 == input1 / 2
    assert full2 == pytest.approx(full1 / 2 + gathered_kv / 2, rel=1e-12)
    # The distributed optimizer shards over DP x CP: same share at the same world size.
    assert two.check_layout(32).dp == one.check_layout(32).dp // 2
    assert stages_memory(one, seq, one.check_layout(32))[0].optimizer_distributed == \
        stages_memory(two, seq, two.check_layout(32))[0].optimizer_distributed


def test_the_context_parallel_table_in_the_training_docs_is_the_dry_runs():
    """docs/training.md quotes dry-run estimates for L/XL/4B at 33/65/129 frames and CP=1..8: each cell
    equals the dry run of recipes/ar/stage3.yaml with those knobs (so the table cannot go stale)."""
    import re
    docs = (RECIPES.parent / "docs" / "training.md").read_text()
    rows = re.findall(r"^\| (L|XL|4B) \| (33|65|129) \| ([\d,]+) \| (.+) \|$", docs, flags=re.M)
    assert len(rows) == 9, rows
    for size, frames, tokens, cells in rows:
        values = [float(c) for c in cells.split(" | ")]
        base = [f"model.size={size}", f"data.num_frames={frames}"]
        options = [[f"parallel.context_parallel={cp}", "parallel.recompute=none"] for cp in (1, 2, 4, 8)]
        options.append(["parallel.context_parallel=1", "parallel.recompute=full"])
        assert len(values) == len(options), (size, frames)
        for value, sets in zip(values, options):
            cfg = stage3(*base, *sets)
            assert round(estimate_gib(cfg), 1) == value, (size, frames, sets)
        layout = sequence_layouts(cfg)["video"][0]
        assert layout.prefix_len + layout.video_len == int(tokens.replace(",", ""))


def test_dry_run_with_context_and_pipeline_parallelism_prints_both():
    """The 65-frame recipe (CP=2) at PP=2, plain and with 2 virtual stages: the bubble line and the CP
    estimates in one report."""
    for v, bubble in ((1, "1/(1 x 32) = 3.1%"), (2, "1/(2 x 32) = 1.6%")):
        _, report = dry_run(load_config(TrainConfig, RECIPES / "ar/stage3_65f.yaml", [
            "parallel.pipeline_parallel=2", f"parallel.virtual_pipeline_stages={v}"]))
        assert "TP=2 CP=2 PP=2 DP=4" in report
        assert f"pipeline bubble: (PP-1)/(v x m) = {bubble} of the compute time" in report
        assert "estimate per GPU (GiB) by parallel.context_parallel at 32 GPUs: CP=1:" in report
