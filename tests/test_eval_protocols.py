"""gFVD protocols: label draws follow the training distribution, folds and rank shards tile without
overlap, the whole protocol runs, and 2 ranks on gloo give what 1 process gives."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from eval_helpers import ProjectionExtractor, make_generator, real_clips
from videoar_common.config import ConfigError, load_config
from videoar_common.distributed import DistContext
from videoar_megatron.evaluation.config import EvalConfig
from videoar_megatron.evaluation.fvd import FeatureStats, RealStatsCache
from videoar_megatron.evaluation.protocols import (FVDPlan, FVDProtocolConfig, TensorClipSource,
                                                   class_distribution, draw_labels, fold_bounds,
                                                   run_fvd_protocol, shard_bounds)

SCRIPTS = Path(__file__).parent / "dist_scripts"
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "eval"
SINGLE = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                     backend="gloo")


def test_labels_follow_the_training_class_distribution():
    train_labels = np.repeat(np.arange(5), [500, 300, 120, 60, 20])  # imbalanced, like UCF-101's
    p = class_distribution(train_labels)
    drawn = draw_labels(p, 40_000, seed=0)
    counts = np.bincount(drawn, minlength=5)
    # Chi-square goodness of fit against the training frequencies; a correct sampler fails this
    # 1 time in 1000, a sampler off by 1% on the largest class (400 draws) fails it always.
    assert scipy.stats.chisquare(counts, f_exp=p * len(drawn)).pvalue > 1e-3
    assert np.array_equal(drawn, draw_labels(p, 40_000, seed=0))      # deterministic per seed
    assert not np.array_equal(drawn, draw_labels(p, 40_000, seed=1))


def test_missing_class_labels_are_refused():
    with pytest.raises(ValueError, match="class label"):
        class_distribution(np.array([0, 1, -1]))


def test_folds_are_disjoint_consecutive_blocks():
    n, folds = 10_000, 4
    blocks = [set(range(*fold_bounds(n, k))) for k in range(folds)]
    assert all(len(b) == n for b in blocks)
    assert set().union(*blocks) == set(range(n * folds))
    assert sum(len(b) for b in blocks) == n * folds                  # no overlap


@pytest.mark.parametrize("n", [0, 1, 7, 10_000, 10_001])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_shards_tile_without_overlap_or_gap(n, world):
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    ids = [i for lo, hi in bounds for i in range(lo, hi)]
    assert ids == list(range(n))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_real_sets_are_distinct_clips_per_fold_and_shared_is_one_set():
    clips, labels = real_clips(50)
    source = TensorClipSource(clips, labels)
    per_fold = FVDPlan(FVDProtocolConfig(num_samples=10, num_folds=4, num_frames=9, resolution=16), source)
    sets = [per_fold.real_indices(k) for k in range(4)]
    union = np.concatenate(sets)
    assert len(np.unique(union)) == 40 and union.max() < 50          # without replacement
    shared = FVDPlan(FVDProtocolConfig(num_samples=10, num_folds=4, real_set="shared", real_num_samples=30,
                                       num_frames=9, resolution=16), source)
    assert shared.num_real_sets == 1 and len(shared.real_indices(0)) == 30
    assert all(shared.real_set_of_fold(k) == 0 for k in range(4))
    too_many = FVDPlan(FVDProtocolConfig(num_samples=20, num_folds=3, num_frames=9, resolution=16), source)
    with pytest.raises(ValueError, match="needs 60 distinct real clips.*has 50.*clips_per_video"):
        too_many.real_indices(0)


def test_single_run_labels_are_those_of_the_real_clips():
    clips, labels = real_clips(40)
    cfg = FVDProtocolConfig(num_samples=25, num_folds=1, label_source="real_clips", seed=42,
                            num_frames=9, resolution=16)
    plan = FVDPlan(cfg, TensorClipSource(clips, labels))
    chosen = plan.real_indices(0)
    assert len(np.unique(chosen)) == 25
    assert np.array_equal(plan.gen_labels, labels[chosen])


def test_protocol_config_checks_name_the_knob():
    with pytest.raises(ValueError, match="real_set=per_fold"):
        FVDProtocolConfig(label_source="real_clips", real_set="shared")
    with pytest.raises(ValueError, match="num_frames must be >= 9"):
        FVDProtocolConfig(num_frames=8)


def test_protocol_ranks_a_closer_generator_lower_and_reuses_cached_real_stats(tmp_path):
    clips, labels = real_clips(80)
    source = TensorClipSource(clips, labels)
    cfg = FVDProtocolConfig(num_frames=9, resolution=16, num_samples=30, num_folds=2, batch_size=7)
    cache = RealStatsCache(tmp_path)
    kwargs = dict(source=source, extractor=ProjectionExtractor(), ctx=SINGLE, cache=cache)
    ids: list[int] = []
    close = run_fvd_protocol(cfg, generate=make_generator(0.0, log=ids), **kwargs)
    far = run_fvd_protocol(cfg, generate=make_generator(0.4), **kwargs)
    assert sorted(ids) == list(range(60))                            # every sample of both folds once
    assert len(close.fvd_per_fold) == 2 and close.real_cache_hits == [False, False]
    assert far.real_cache_hits == [True, True]                       # second run reads the cache
    assert all(c < f for c, f in zip(close.fvd_per_fold, far.fvd_per_fold))
    assert close.mean == pytest.approx(np.mean(close.fvd_per_fold))
    assert close.std == pytest.approx(np.std(close.fvd_per_fold))
    again = run_fvd_protocol(cfg, generate=make_generator(0.0), **kwargs)
    assert again.fvd_per_fold == close.fvd_per_fold                  # cached stats are the same stats


def test_generator_with_the_wrong_clip_shape_is_a_clear_error():
    clips, labels = real_clips(20)
    cfg = FVDProtocolConfig(num_frames=9, resolution=16, num_samples=4, num_folds=1)

    def seventeen_frames(labels_B, ids_B):
        return torch.zeros(len(labels_B), 3, 17, 16, 16)

    with pytest.raises(ValueError, match=r"the generator returned.*protocol.num_frames"):
        run_fvd_protocol(cfg, generate=seventeen_frames, source=TensorClipSource(clips, labels),
                         extractor=ProjectionExtractor(), ctx=SINGLE)


def test_two_ranks_on_gloo_equal_one_process(torchrun, tmp_path):
    torchrun(SCRIPTS / "eval_protocol.py", 2, tmp_path)
    views = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    # Statistics merged by all-reduce equal those of the whole set in one process.
    feats = torch.from_numpy(np.random.default_rng(0).normal(size=(101, 12)) + 5.0)
    whole = FeatureStats(12)
    whole.update(feats)
    for r in range(2):
        z = np.load(tmp_path / f"stats_rank{r}.npz")
        assert int(z["n"]) == 101
        np.testing.assert_allclose(z["sum_D"], whole.sum_D.numpy(), rtol=1e-13)
        np.testing.assert_allclose(z["outer_DD"], whole.outer_DD.numpy(), rtol=1e-13)

    # Each rank generated its own slice: together every sample id once.
    ids = views[0]["ids"] + views[1]["ids"]
    assert sorted(ids) == list(range(40)) and not set(views[0]["ids"]) & set(views[1]["ids"])

    # The protocol over 2 ranks gives the 1-process FVDs, on both ranks.
    clips, labels = real_clips(60)
    cfg = FVDProtocolConfig(num_frames=9, resolution=16, num_samples=20, num_folds=2, batch_size=3, seed=7)
    single = run_fvd_protocol(cfg, generate=make_generator(0.1), source=TensorClipSource(clips, labels),
                              extractor=ProjectionExtractor(), ctx=SINGLE)
    for view in views:
        np.testing.assert_allclose(view["result"]["fvd_per_fold"], single.fvd_per_fold, rtol=1e-9)
    assert len(list((tmp_path / "cache").glob("real_*.npz"))) == 2   # rank 0 cached both real sets


@pytest.mark.parametrize("recipe", ["ucf101_fvd.yaml", "ucf101_fvd_single.yaml", "tiny.yaml"])
def test_eval_recipes_load_and_are_consistent(recipe):
    cfg = load_config(EvalConfig, RECIPES / recipe)
    p = cfg.protocol
    needed = p.real_count * (1 if p.real_set == "shared" else p.num_folds)
    assert p.num_frames >= 9 and p.num_samples >= 2
    if recipe == "ucf101_fvd.yaml":
        assert (p.num_frames, p.resolution, p.num_samples, p.num_folds) == (17, 128, 10_000, 4)
        assert 9537 * cfg.data.clips_per_video >= needed             # UCF-101 split 1 train videos
    if recipe == "ucf101_fvd_single.yaml":
        assert p.num_folds == 1 and p.label_source == "real_clips"


def test_unknown_recipe_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {RECIPES / 'tiny.yaml'}\nprotocol:\n  num_sample: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'protocol.num_sample'"):
        load_config(EvalConfig, bad)
