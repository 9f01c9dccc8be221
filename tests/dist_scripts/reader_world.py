"""Run under torchrun: read a shard set at batch 2 per rank (global 4), a full epoch and one resumed
from a state saved by a single process; each rank writes its batches' sample ids to OUT/rank{r}.json."""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from data_prep.reader import ShardReaderConfig, build_shard_loader
from videoar_common.distributed import init_distributed, shutdown_distributed


def epoch(cfg: ShardReaderConfig, state=None) -> list[list[str]]:
    loader = build_shard_loader(cfg)
    if state is not None:
        loader.load_state_dict(state)
    ids = [batch["sample_id"] for batch in loader]
    del loader
    gc.collect()
    return ids


def main() -> None:
    shard_dir, out = sys.argv[1], Path(sys.argv[2])
    # As in the trainer: one process group for the whole run (otherwise streaming creates and
    # destroys a temporary one per dataset, which races between ranks).
    ctx = init_distributed(device="cpu")
    cfg = ShardReaderConfig(path=shard_dir, batch_size=2, seed=3, num_canonical_nodes=2)
    full = epoch(cfg)
    state = json.loads((out / "state.json").read_text())
    state["global_batch_size"] = 4  # saved at 1 rank x 4, resumed at 2 ranks x 2
    resumed = epoch(cfg, state)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps({"full": full, "resumed": resumed}))
    shutdown_distributed()


if __name__ == "__main__":
    main()
