"""Shard reader promises: seeded order, exact mid-epoch resume, the same global batches at any world
size (or an explicit error), manifest checks naming the field."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import shards
from data_prep.reader import ShardReaderConfig, build_shard_loader, collate_samples

NUM = 40
MANIFEST = {"format_version": 1, "latent_dim": 12, "latent_dtype": "float16", "num_partitions": 2,
            "tokenizer_hash": "abc", "scale_schedule": [[1, 1], [2, 2]], "resolution": [32, 32], "num_frames": 9}


def write_fake_shards(out: Path, num: int = NUM) -> Path:
    """A merged shard set of ``num`` samples whose latent encodes the sample index."""
    from streaming import MDSWriter
    out.mkdir(parents=True)
    shards.write_json(out / shards.MANIFEST_FILE, MANIFEST)
    for p in range(2):
        part = out / shards.partition_name(p, 2)
        with MDSWriter(out=str(part), columns=shards.mds_columns(False), size_limit=1 << 12) as w:
            for i in shards.partition_range(p, 2, num):
                rng = np.random.default_rng(i)
                w.write({"latent": np.full((3, 12, 2, 2), i, np.float16),
                         "bits": shards.pack_bits(rng.random((3, 5, 12)) > 0.5), "label": i % 3,
                         "caption": f"clip {i}", "sample_id": f"{i:04d}", "source": f"v{i}.webm",
                         "clip_start": 0, "clip_stride": 1})
        shards.write_jsonl(part / shards.REJECTS_FILE, [])
        from videoar_common.atomic import mark_committed
        mark_committed(part)
    shards.merge_partitions(out, 2)
    return out


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_fake_shards(tmp_path_factory.mktemp("reader") / "shards")


def epoch_ids(cfg: ShardReaderConfig, stop_after: int | None = None, state=None):
    loader = build_shard_loader(cfg)
    if state is not None:
        loader.load_state_dict(state)
    ids, saved = [], None
    it = iter(loader)
    for batch in it:
        ids.append(batch["sample_id"])
        if stop_after is not None and len(ids) == stop_after:
            saved = loader.state_dict()
            break
    it.close()
    del it, loader
    gc.collect()
    return ids, saved


def test_samples_decode_to_contract_tensors(shard_dir):
    loader = build_shard_loader(ShardReaderConfig(path=str(shard_dir), batch_size=4, shuffle=False))
    batch = next(iter(loader))
    assert batch["latent"].dtype == torch.float32 and batch["latent"].shape == (4, 3, 12, 2, 2)
    assert batch["bits"].dtype == torch.bool and batch["bits"].shape == (4, 3, 5, 12)
    assert batch["label"].dtype == torch.int64 and batch["sample_id"] == ["0000", "0001", "0002", "0003"]
    rng = np.random.default_rng(2)
    assert np.array_equal(batch["bits"][2].numpy(), rng.random((3, 5, 12)) > 0.5)
    assert torch.all(batch["latent"][3] == 3)
    assert len(loader) == NUM // 4
    del loader
    gc.collect()


def test_order_is_seeded_and_resume_mid_epoch_is_exact(shard_dir):
    cfg = ShardReaderConfig(path=str(shard_dir), batch_size=4, seed=7)
    full, _ = epoch_ids(cfg)
    assert sorted(i for b in full for i in b) == [f"{i:04d}" for i in range(NUM)]
    assert epoch_ids(cfg)[0] == full
    assert epoch_ids(ShardReaderConfig(path=str(shard_dir), batch_size=4, seed=8))[0] != full
    head, state = epoch_ids(cfg, stop_after=3)
    assert head == full[:3] and state["streaming"]["sample_in_epoch"] == 12
    state = json.loads(json.dumps(state))  # it must survive a checkpoint round trip
    tail, _ = epoch_ids(cfg, state=state)
    assert head + tail == full
    # a second interruption after a resume still lands exactly
    mid, state2 = epoch_ids(cfg, stop_after=2, state=state)
    rest, _ = epoch_ids(cfg, state=state2)
    assert head + mid + rest == full


def test_resume_with_another_global_batch_is_refused(shard_dir):
    _, state = epoch_ids(ShardReaderConfig(path=str(shard_dir), batch_size=4), stop_after=1)
    loader = build_shard_loader(ShardReaderConfig(path=str(shard_dir), batch_size=5))
    with pytest.raises(ValueError, match="batch_size x world size was 4 .* is 5"):
        loader.load_state_dict(state)
    del loader
    gc.collect()


def test_manifest_mismatch_and_bad_node_count_are_explicit(shard_dir, monkeypatch):
    cfg = ShardReaderConfig(path=str(shard_dir))
    with pytest.raises(shards.ShardManifestMismatch, match="'scale_schedule' is .* but"):
        build_shard_loader(cfg, expect={"tokenizer_hash": "abc", "scale_schedule": [[1, 1], [2, 2], [4, 4]]})
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # three one-GPU nodes
    with pytest.raises(ValueError, match="num_canonical_nodes=2 and the 3 physical nodes"):
        build_shard_loader(ShardReaderConfig(path=str(shard_dir), num_canonical_nodes=2))


def test_collate_refuses_unequal_shapes():
    a = {"latent": torch.zeros(3, 2), "caption": "a"}
    b = {"latent": torch.zeros(4, 2), "caption": "b"}
    with pytest.raises(ValueError, match="cannot batch 'latent'"):
        collate_samples([a, b])
    assert collate_samples([a, a])["latent"].shape == (2, 3, 2)


def test_global_batches_are_the_same_at_two_ranks_and_resume_across_world_sizes(shard_dir, torchrun, tmp_path):
    script = Path(__file__).parent / "dist_scripts" / "reader_world.py"
    cfg = ShardReaderConfig(path=str(shard_dir), batch_size=4, seed=3, num_canonical_nodes=2)
    full, _ = epoch_ids(cfg)
    head, state = epoch_ids(cfg, stop_after=4)
    (tmp_path / "state.json").write_text(json.dumps(state))
    torchrun(script, 2, str(shard_dir), str(tmp_path), timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    full2 = [a + b for a, b in zip(ranks[0]["full"], ranks[1]["full"])]
    assert [sorted(b) for b in full2] == [sorted(b) for b in full]  # same samples per global step
    resumed2 = [a + b for a, b in zip(ranks[0]["resumed"], ranks[1]["resumed"])]
    assert [sorted(b) for b in resumed2] == [sorted(b) for b in full[4:]]


def test_resume_is_exact_with_dataloader_workers(shard_dir):
    cfg = ShardReaderConfig(path=str(shard_dir), batch_size=4, seed=5, num_workers=2)
    full, _ = epoch_ids(cfg)
    assert sorted(i for b in full for i in b) == [f"{i:04d}" for i in range(NUM)]
    head, state = epoch_ids(cfg, stop_after=3)
    tail, _ = epoch_ids(cfg, state=state)
    assert head == full[:3] and head + tail == full
    with pytest.raises(ValueError, match="num_workers was 2 when the state was saved and is 0 now"):
        loader = build_shard_loader(ShardReaderConfig(path=str(shard_dir), batch_size=4, seed=5))
        try:
            loader.load_state_dict(state)
        finally:
            del loader
            gc.collect()
