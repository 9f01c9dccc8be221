"""Run under torchrun: gFVD protocol and statistics merge over ranks; each rank writes its view."""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for eval_helpers
from eval_helpers import ProjectionExtractor, make_generator, real_clips  # noqa: E402

from videoar_common.distributed import init_distributed, shutdown_distributed  # noqa: E402
from videoar_megatron.evaluation.fvd import FeatureStats, RealStatsCache  # noqa: E402
from videoar_megatron.evaluation.protocols import (FVDProtocolConfig, TensorClipSource,  # noqa: E402
                                                   run_fvd_protocol, shard_bounds)

out = Path(sys.argv[1])
ctx = init_distributed(device="cpu")

# 1. Statistics of a global feature set, each rank holding its shard, merged by all-reduce.
feats = torch.from_numpy(np.random.default_rng(0).normal(size=(101, 12)) + 5.0)
lo, hi = shard_bounds(len(feats), ctx.rank, ctx.world_size)
stats = FeatureStats(12)
stats.update(feats[lo:hi])
stats.all_reduce(ctx)
np.savez(out / f"stats_rank{ctx.rank}.npz", n=stats.n, sum_D=stats.sum_D.numpy(), outer_DD=stats.outer_DD.numpy())

# 2. The whole protocol: generation, real statistics (cached by rank 0), FVD per fold.
clips, labels = real_clips(60)
cfg = FVDProtocolConfig(num_frames=9, resolution=16, num_samples=20, num_folds=2, batch_size=3, seed=7)
ids = []
result = run_fvd_protocol(cfg, generate=make_generator(0.1, log=ids), source=TensorClipSource(clips, labels),
                          extractor=ProjectionExtractor(), ctx=ctx, cache=RealStatsCache(out / "cache"))
(out / f"rank{ctx.rank}.json").write_text(json.dumps({"result": result.to_dict(), "ids": ids}))
shutdown_distributed()
