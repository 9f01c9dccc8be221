"""Training data: token shards → per-step batches → teacher-forced ``VideoARBatch`` micro-batches.

Design decisions:

- **Sharded over data-parallel replicas, not ranks.** All tensor-, context- and pipeline-parallel ranks
  of one model replica must see the same samples (a context-parallel rank then keeps its share of each
  sequence: the model splits it, :mod:`videoar_megatron.model.context_parallel`). Every rank builds the
  shard reader, with mosaicml-streaming's ``replication`` = TP x CP x PP: streaming then treats each
  group of TP x CP x PP *consecutive* ranks as one sample stream. The trainer initialises Megatron with
  rank order ``tp-cp-pp-dp`` (see :func:`videoar_megatron.model.parallel.init_model_parallel`) so a
  replica's ranks are consecutive, and :func:`check_replicas_are_consecutive` refuses any other order.
  No broadcast is needed, every rank reads (the shards are small next to the model), and the reader's
  state (identical on every rank) is the state of the whole data pipeline.
- **One loader batch = one optimizer step of one replica** (``global_batch_size / DP`` samples), split
  here into micro-batches. The loader's global batch is then the global batch size, which does not
  change with the layout, so a checkpoint's data position resumes at another DP size (streaming's
  elastic determinism, fixed ``num_canonical_nodes``) and every step reads the same set of samples.
- **Several sources, one per step.** Staged recipes mix shard sets of different shapes (images and
  videos). Each optimizer step reads exactly one source (one step's micro-batches must share a
  sequence layout, and the pipeline's p2p buffers are sized per step); the source of step s is fixed by
  smooth weighted round-robin over the step index, so it does not depend on the layout or on where a
  run was interrupted. Every source has its own reader and its own saved position.
- **Randomness per sample.** Each sample's error-correction flips, Random Frame Mask and condition
  dropout are drawn from a generator seeded by (train.seed, step, sample id); a micro-batch is built
  in one pass with one generator per sample (:mod:`videoar_megatron.model.rng`), equal bit for bit to
  building it sample by sample. The draws are thus independent of the layout (which rank and
  micro-batch a sample lands in) and of where a run was interrupted: a resumed run replays them
  exactly, and TP/PP/DP layouts train on identical batches.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from data_prep.reader import ShardReaderConfig, TokenShardLoader, build_shard_loader
from data_prep.shards import INDEX_FILE, ShardContentError
from tokenizer.quantizer import MultiScaleBSQ
from videoar_megatron.model.config import ModelConfig
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.sequence import VideoARBatch, build_batch
from videoar_megatron.training.config import BatchLayout, DataConfig, SourceConfig


def check_replicas_are_consecutive(groups) -> None:
    """Refuse a rank order in which one model replica's ranks (TP x CP x PP) are not consecutive
    (streaming's ``replication`` groups consecutive ranks): the data-parallel peers of a rank must then
    be the ranks a whole replica apart."""
    import torch.distributed as dist
    size = groups.tp.size() * groups.cp.size() * groups.pp.size()
    if size == 1:
        return
    rank, dp_ranks = dist.get_rank(), sorted(dist.get_process_group_ranks(groups.dp))
    if dp_ranks != [rank % size + i * size for i in range(len(dp_ranks))]:
        raise RuntimeError(f"data-parallel peers {dp_ranks} of rank {rank} are not {size} ranks apart: the shard "
                           f"reader needs each replica's TP x CP x PP ranks consecutive (init_model_parallel(..., "
                           f"order='tp-cp-ep-pp-dp'))")


def expected_manifest(data: DataConfig, source: SourceConfig, model: ModelConfig) -> dict:
    """Fields a source's shard manifest must match (the check names the first mismatch)."""
    expect: dict[str, Any] = {"latent_dim": model.latent_dim}
    if data.tokenizer_hash:
        expect["tokenizer_hash"] = data.tokenizer_hash
    if source.resolution is not None:
        expect["resolution"] = list(source.resolution)
    if source.num_frames:
        expect["num_frames"] = source.num_frames
    return expect


def training_schedule(source: SourceConfig, manifest: Mapping[str, Any]) -> list[list[int]]:
    """The scale schedule to train on: the recipe's, or the shards' own."""
    stored = [list(s) for s in manifest["scale_schedule"]]
    if source.scale_schedule is None:
        return stored
    schedule = [list(s) for s in source.scale_schedule]
    if schedule[-1] != list(manifest["latent_hw"]):
        raise ValueError(f"source {source.name}: scale_schedule must end at the shards' latent grid "
                         f"{manifest['latent_hw']}, got {schedule[-1]} (re-quantization cannot change the latent size)")
    return schedule


def check_condition_fits(model: ModelConfig, manifest: Mapping[str, Any], where: str) -> None:
    """The condition kind needs what the shards hold (labels, or text features of the right shape)."""
    if model.condition.kind != "text_features":
        return
    enc = manifest.get("text_encoder")
    if not enc:
        raise ValueError(f"{where}: model.condition.kind=text_features but the shards have no text features "
                         "(pre-tokenize with text_encoder.path set)")
    for knob, key in (("text_len", "max_length"), ("feature_dim", "feature_dim")):
        if getattr(model.condition, knob) != enc[key]:
            raise ValueError(f"{where}: model.condition.{knob}={getattr(model.condition, knob)} but the shards' "
                             f"text encoder has {key}={enc[key]}")


def sample_seed(seed: int, step: int, sample_id: str) -> int:
    """Seed of one sample's random draws at one step (63-bit, platform independent)."""
    digest = hashlib.sha256(f"{seed}:{step}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def source_of_steps(weights: list[float], steps: int) -> list[int]:
    """Source index of steps 1..``steps`` by smooth weighted round-robin (nginx's): interleaved, and
    every prefix of the sequence is within one step of the weights' proportions."""
    total, current, out = sum(weights), [0.0] * len(weights), []
    for _ in range(steps):
        current = [c + w for c, w in zip(current, weights)]
        pick = max(range(len(weights)), key=lambda i: (current[i], -i))
        current[pick] -= total
        out.append(pick)
    return out


@dataclass
class StepData:
    """What one replica trains on in one step."""

    microbatches: list[VideoARBatch]
    sample_ids: list[str]
    """Sample ids of this replica's step batch, in micro-batch order."""
    source: str
    """Name of the source the step read."""


class SourceData:
    """One shard set: this rank's reader (replica-aware), its quantizer and the batch builder."""

    def __init__(self, data: DataConfig, source: SourceConfig, model: ModelConfig, layout: BatchLayout, *,
                 seed: int, device: torch.device, pad_to_multiple: int):
        self.cfg, self.model_cfg, self.layout = source, model, layout
        self.seed, self.device, self.pad_to_multiple = seed, device, pad_to_multiple
        reader = ShardReaderConfig(path=source.path, batch_size=layout.per_rank_batch, shuffle=data.shuffle,
                                   seed=data.seed, num_canonical_nodes=data.num_canonical_nodes,
                                   num_workers=data.num_workers, drop_last=True)
        self.loader: TokenShardLoader = build_shard_loader(reader, expect=expected_manifest(data, source, model),
                                                           replication=layout.replica_size)
        self.manifest = self.loader.manifest
        self.summary = {**manifest_summary(self.manifest), "index_sha256": index_digest(source.path)}
        where = f"data source {source.name} ({source.path})"
        check_condition_fits(model, self.manifest, where)
        self.schedule = training_schedule(source, self.manifest)
        self.use_stored_bits = self.schedule == [list(s) for s in self.manifest["scale_schedule"]]
        self.quantizer = MultiScaleBSQ(dim=int(self.manifest["latent_dim"]), scales=self.schedule)
        if len(self.schedule) > model.max_scales:
            raise ValueError(f"{where}: the scale schedule has {len(self.schedule)} scales > model.max_scales="
                             f"{model.max_scales}")
        if len(self.loader) == 0:
            raise ValueError(f"{where}: {len(self.loader.dataset)} samples per data-parallel replica, fewer "
                             f"than one step's {layout.per_rank_batch} (train.global_batch_size="
                             f"{layout.global_batch_size} over {layout.dp} replicas)")
        self._iter: Iterator[dict] | None = None

    @property
    def sequence_layout(self) -> TokenLayout:
        """The token layout of this source's batches (as ``build_batch`` makes them)."""
        return TokenLayout.padded(self.model_cfg.prefix_len, self.quantizer.scales, int(self.manifest["latent_frames"]),
                                  self.model_cfg.pad_to_multiple * self.pad_to_multiple)

    def _epochs(self) -> Iterator[dict]:
        empty = 0
        while True:
            n = 0
            for batch in self.loader:
                n += 1
                yield batch
            # A state saved right at the end of an epoch resumes into an empty epoch once.
            empty = empty + 1 if n == 0 else 0
            if empty > 1:
                raise RuntimeError(f"{self.cfg.path}: the shard reader yields no batches")

    def next_step(self, step: int) -> StepData:
        if self._iter is None:
            self._iter = self._epochs()
        raw = next(self._iter)
        ids = list(raw["sample_id"])
        mbs = self.layout.micro_batch_size
        micro = [self._build(raw, slice(i, i + mbs), step) for i in range(0, len(ids), mbs)]
        return StepData(microbatches=micro, sample_ids=ids, source=self.cfg.name)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["global_batch_size"] != self.layout.global_batch_size:
            raise ValueError(f"cannot resume the data position: train.global_batch_size was "
                             f"{state['global_batch_size']} when the checkpoint was written and is "
                             f"{self.layout.global_batch_size} now (the sample order would change); keep "
                             f"it, or start a new stage with checkpoint.load")
        self.loader.load_state_dict(state)
        self._iter = None

    def _condition(self, raw: dict, rows: slice):
        kind = self.model_cfg.condition.kind
        if kind == "class":
            labels = raw["label"][rows]
            if int(labels.min()) < 0:
                bad = next(i for i in range(rows.start, rows.stop) if int(raw["label"][i]) < 0)
                raise ShardContentError(f"sample {raw['sample_id'][bad]} of {self.cfg.path} has no class label "
                                        f"(-1) but model.condition.kind=class")
            return labels, None
        if kind == "text_features":
            mask = raw["text_mask"][rows]
            return raw["text_features"][rows].to(self.device), mask.sum(-1).clamp(min=1)
        return None, None

    def _build(self, raw: dict, rows: slice, step: int) -> VideoARBatch:
        """The micro-batch ``rows`` of ``raw`` in one pass; each sample draws its randomness from its
        own generator, seeded by (seed, step, sample id), so a sample's batch rows do not depend on its
        rank, micro-batch or position (see videoar_megatron/model/rng.py)."""
        rows = slice(rows.start, min(rows.stop, len(raw["sample_id"])))
        latent_BdTHW = raw["latent"][rows].permute(0, 2, 1, 3, 4).to(self.device)
        bits = raw["bits"][rows].to(self.device) if self.use_stored_bits else None
        cond, text_len = self._condition(raw, rows)
        gens = [torch.Generator(self.device).manual_seed(sample_seed(self.seed, step, sample_id))
                for sample_id in raw["sample_id"][rows]]
        return build_batch(self.quantizer, self.model_cfg, latent_BdTHW=latent_BdTHW, bits_BTLd=bits, cond=cond,
                           text_len_B=text_len, training=True, generator=gens, pad_to_multiple=self.pad_to_multiple)


class TrainData:
    """Every source of the run; ``next_step(step)`` reads the step's source → :class:`StepData`."""

    def __init__(self, data: DataConfig, model: ModelConfig, layout: BatchLayout, *, seed: int,
                 device: torch.device, pad_to_multiple: int = 1):
        """``pad_to_multiple``: what the layout's sequence length must divide by
        (:func:`videoar_megatron.model.context_parallel.sequence_multiple`)."""
        if not data.path:
            raise ValueError("data.path must be set (a token shard directory)")
        pad = pad_to_multiple
        self.sources = [SourceData(data, s, model, layout, seed=seed, device=device, pad_to_multiple=pad)
                        for s in data.sources]
        self.weights = [s.weight for s in data.sources]
        self._picks: list[int] = []

    @property
    def main(self) -> SourceData:
        return self.sources[0]

    def source_for(self, step: int) -> SourceData:
        if len(self.sources) == 1:
            return self.main
        if len(self._picks) < step:
            self._picks = source_of_steps(self.weights, max(step, 2 * len(self._picks)))
        return self.sources[self._picks[step - 1]]

    def next_step(self, step: int) -> StepData:
        """The micro-batches of optimizer step ``step`` (1-based) for this replica."""
        return self.source_for(step).next_step(step)

    def state_dict(self) -> dict:
        """Per-source reader positions (the main source's also at the top level, for readers of the
        single-source format)."""
        return {**self.main.state_dict(), "sources": {s.cfg.name: s.state_dict() for s in self.sources}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("sources", {self.main.cfg.name: state})
        names = [s.cfg.name for s in self.sources]
        if sorted(saved) != sorted(names):
            raise ValueError(f"cannot resume the data position: the checkpoint read sources {sorted(saved)}, "
                             f"this run reads {sorted(names)} (data.name, data.mix)")
        for s in self.sources:
            s.load_state_dict(saved[s.cfg.name])

    def manifests(self) -> dict:
        return {s.cfg.name: s.summary for s in self.sources}


def index_digest(shard_dir: str) -> str:
    """SHA-256 of a shard set's ``index.json`` (shard names, sizes, sample counts). Pre-tokenization is
    byte-identical on a rerun, so re-made shards of the same corpus keep it; shards with other samples
    change it, and a data position saved on the old ones means nothing on them."""
    return hashlib.sha256((Path(shard_dir) / INDEX_FILE).read_bytes()).hexdigest()


def manifest_summary(manifest: Mapping[str, Any]) -> dict:
    """The manifest fields a checkpoint records about its data."""
    keys = ("tokenizer_hash", "scale_schedule", "latent_dim", "latent_frames", "latent_hw", "resolution",
            "num_frames", "text_encoder", "input_manifest_sha256")
    return {k: manifest.get(k) for k in keys}
