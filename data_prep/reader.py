"""Streaming reader of token shards for the AR trainer.

Design decision: ordering, sharding over ranks and resumption are delegated to mosaicml-streaming's
``StreamingDataset`` instead of re-implemented: it gives a seeded global order, exact mid-epoch resume
from a small state dict, and *elastic determinism*: with a fixed ``num_canonical_nodes``, seed and
global batch size, every global step sees the same set of samples whatever the number of ranks (the
order inside a global batch follows the ranks). What this module adds: the manifest check (refuse
shards from another tokenizer / schedule / resolution, naming the field), unpacking of the stored
bits and latents into tensors, a collate that stacks equal shapes (and says which key differs
otherwise), a loader that counts consumed samples exactly, and explicit errors where streaming
would silently reshuffle (a canonical node count that does not fit the node count, or a resume with
another global batch size).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from data_prep import shards


@dataclass(kw_only=True)
class ShardReaderConfig:
    """Token shards → batches for the AR trainer."""

    path: str = ""
    """Merged token shard directory (output_dir of `videoar pretokenize`)."""
    batch_size: int = 8
    """Samples per batch per data-parallel stream (the global batch is batch_size x world size /
    replication; see :class:`TokenShardLoader`)."""
    shuffle: bool = True
    """Shuffle samples (streaming's py1e algorithm); false reads in shard order."""
    seed: int = 0
    """Shuffle seed; the same seed gives the same order."""
    num_canonical_nodes: int = 1
    """Streaming's canonical node count: fixes the global sample order across world sizes. Keep it
    constant for a whole training run; the number of physical nodes must divide it or be a multiple."""
    num_workers: int = 0
    """DataLoader worker processes per rank (part of the order: keep constant across resumes)."""
    drop_last: bool = True
    """Drop a last partial batch of an epoch."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must be set (a token shard directory)")
        for knob in ("batch_size", "num_canonical_nodes"):
            if getattr(self, knob) < 1:
                raise ValueError(f"{knob} must be >= 1, got {getattr(self, knob)}")
        if self.num_workers < 0 or self.seed < 0:
            raise ValueError("num_workers and seed must be >= 0")


def decode_sample(raw: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """One stored MDS sample → tensors: latent float32 ``(T, d, H, W)``, bits bool ``(T, L, d)``, ..."""
    d = int(manifest["latent_dim"])
    out = {"latent": shards.latent_from_storage(raw["latent"], manifest["latent_dtype"]),
           "bits": torch.from_numpy(shards.unpack_bits(raw["bits"], d)),
           "label": torch.tensor(int(raw["label"]), dtype=torch.int64),
           "caption": raw["caption"], "sample_id": raw["sample_id"], "source": raw["source"],
           "clip_start": torch.tensor(int(raw["clip_start"]), dtype=torch.int64)}
    if "text_features" in raw:
        out["text_features"] = torch.from_numpy(np.array(raw["text_features"], dtype=np.float32))
        out["text_mask"] = torch.from_numpy(np.array(raw["text_mask"], dtype=bool))
    return out


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack tensors along a new batch dim (shapes must be equal), strings into lists."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot batch '{key}': samples have shapes {sorted(shapes)}; "
                                 f"shards of one run share one shape (mixed shard sets?)")
            batch[key] = torch.stack(values)
        else:
            batch[key] = list(values)
    return batch


def _streaming_world(replication: int = 1) -> tuple[int, int]:
    """(sample streams, physical nodes) as streaming sees them (RANK/WORLD_SIZE/LOCAL_WORLD_SIZE),
    after grouping every ``replication`` consecutive ranks into one stream."""
    from streaming.base.world import World
    world = World.detect()
    if replication > 1:
        if world.num_ranks % replication:
            raise ValueError(f"{world.num_ranks} ranks cannot be grouped into model replicas of "
                             f"{replication} consecutive ranks")
        world = world.replicate(replication)
    return world.num_ranks, world.num_nodes


def _dataset_class():
    from streaming import StreamingDataset

    class TokenShardDataset(StreamingDataset):
        """A ``StreamingDataset`` over one token shard directory that returns decoded tensors."""

        def __init__(self, directory: Path, manifest: dict, **kwargs):
            super().__init__(local=str(directory), **kwargs)
            self.shard_manifest = manifest

        def __getitem__(self, idx: int) -> dict[str, Any]:
            return decode_sample(super().__getitem__(idx), self.shard_manifest)

    return TokenShardDataset


class TokenShardLoader:
    """Batches of decoded samples with an exact, resumable position (``state_dict``).

    ``replication``: how many consecutive ranks read the *same* samples (the tensor- and
    pipeline-parallel ranks of one model replica; streaming's ``replication``). Samples are then
    sharded over ``world size / replication`` data-parallel streams, and ``batch_size`` is per stream.
    """

    def __init__(self, cfg: ShardReaderConfig, expect: Mapping[str, Any] | None = None, *,
                 replication: int = 1):
        directory = shards.require_complete(cfg.path)
        self.manifest = shards.read_shard_manifest(directory)
        if expect:
            shards.check_manifest_matches(self.manifest, expect, source=str(directory))
        if replication < 1:
            raise ValueError(f"replication must be >= 1, got {replication}")
        ranks, nodes = _streaming_world(replication)
        ncn = cfg.num_canonical_nodes
        if ncn % nodes and nodes % ncn:
            raise ValueError(f"num_canonical_nodes={ncn} and the {nodes} physical nodes must divide one "
                             f"another for a deterministic order across world sizes; pick a multiple "
                             f"of every node count you will run at")
        self.cfg, self.num_ranks = cfg, ranks
        self.global_batch_size = cfg.batch_size * ranks
        if not any(s["samples"] for s in shards.read_index(directory)):
            raise shards.ShardContentError(f"{directory}: the shard set holds no samples (every video rejected? "
                                           f"see {directory / shards.REJECTS_FILE})")
        self.dataset = _dataset_class()(directory, self.manifest, shuffle=cfg.shuffle, shuffle_seed=cfg.seed,
                                        shuffle_algo="py1e", num_canonical_nodes=ncn, batch_size=cfg.batch_size,
                                        replication=replication if replication > 1 else None)
        self.samples_yielded = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.cfg.batch_size if self.cfg.drop_last else -(-n // self.cfg.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader
        loader = DataLoader(self.dataset, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers,
                            collate_fn=collate_samples, drop_last=self.cfg.drop_last,
                            persistent_workers=False)
        self.samples_yielded = 0
        for batch in loader:
            self.samples_yielded += len(batch["sample_id"])
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches yielded so far (identical on every rank)."""
        return {"streaming": self.dataset.state_dict(self.samples_yielded * self.num_ranks, False),
                "global_batch_size": self.global_batch_size, "seed": self.cfg.seed,
                "num_workers": self.cfg.num_workers}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved position; the next ``iter`` continues exactly where it stopped."""
        for key, have in (("global_batch_size", self.global_batch_size), ("seed", self.cfg.seed),
                          ("num_workers", self.cfg.num_workers)):
            if state[key] != have:
                knob = "batch_size x world size" if key == "global_batch_size" else key
                raise ValueError(f"cannot resume the shard reader: {knob} was {state[key]} when the state "
                                 f"was saved and is {have} now (the sample order would change)")
        self.dataset.load_state_dict(dict(state["streaming"]))


def build_shard_loader(cfg: ShardReaderConfig, expect: Mapping[str, Any] | None = None, *,
                       replication: int = 1) -> TokenShardLoader:
    """The AR trainer's entry point: a loader over ``cfg.path``, refusing mismatched shards.
    ``replication``: consecutive ranks that read the same samples (see :class:`TokenShardLoader`)."""
    return TokenShardLoader(cfg, expect, replication=replication)
