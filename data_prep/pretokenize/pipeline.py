"""One worker's pre-tokenization run: build the stages, write this worker's partitions, merge.

``Pretokenizer`` wires the stages together (see :mod:`data_prep.pretokenize` for the map): it picks
the worker's devices, loads the tokenizer through the caller's loader onto the encoder's device,
writes or checks the run manifest, then hands each of its unfinished partitions to the writer.
Whichever worker finds every partition committed merges the indexes.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch

from data_prep import shards
from data_prep.manifest import read_manifest
from data_prep.pretokenize.clip_stream import ClipStream, decode_pipelines, pyav_decoders
from data_prep.pretokenize.config import PretokenizeConfig, resolve_decode_device
from data_prep.pretokenize.encoder import ClipEncoder
from data_prep.pretokenize.run_manifest import build_run_manifest
from data_prep.pretokenize.worker import Worker
from data_prep.pretokenize.writer import PartitionStats, PartitionWriter, Progress
from data_prep.tokenizer_api import EncodingTokenizer, TokenizerLoader, require
from videoar_common.atomic import is_committed
from videoar_common.distributed import pick_device


class Pretokenizer:
    """Runs the partitions of one worker. Build once per process (it loads the tokenizer).

    ``load_tokenizer``: ``tokenizer.load_tokenizer`` (or anything with its call signature and a result
    that provides :class:`data_prep.tokenizer_api.EncodingTokenizer`); it is called once, with
    ``cfg.tokenizer`` and this worker's encoder device.
    """

    def __init__(self, cfg: PretokenizeConfig, worker: Worker, load_tokenizer: TokenizerLoader):
        self.cfg, self.worker = cfg, worker
        self.out = Path(cfg.output_dir)
        self.records = read_manifest(cfg.input_manifest)
        self.manifest_root = Path(cfg.input_manifest).parent.resolve()
        self.device = pick_device(cfg.device, worker.local_rank)
        if cfg.deterministic and self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.decode_device = resolve_decode_device(cfg, self.device)
        if self.decode_device == "gpu" and not torch.cuda.is_available():
            raise ValueError("decode_device=gpu needs CUDA (NVDEC), which this host does not have; "
                             "use decode_device=cpu (and `videoar transcode` for codecs DALI CPU cannot decode)")
        self.num_partitions = cfg.num_partitions or worker.count
        tokenizer = load_tokenizer(cfg.tokenizer, self.device)
        require(tokenizer, EncodingTokenizer, f"tokenizer {cfg.tokenizer}")
        self.encoder = ClipEncoder(cfg, tokenizer, self.device)
        self.manifest = build_run_manifest(cfg, self.encoder, num_partitions=self.num_partitions,
                                           decode_device=self.decode_device)
        if self.device.type == "cuda":
            device_id = self.device.index or 0
        else:  # encoder on CPU, NVDEC decode: still one GPU per local rank
            device_id = worker.local_rank % max(torch.cuda.device_count(), 1)
        self.stream = ClipStream(cfg, self.decode_device, device_id, self.manifest_root)
        self.writer = PartitionWriter(cfg, self.out, self.stream, self.encoder)

    def run(self, progress: Progress | None = None) -> list[PartitionStats]:
        """Write this worker's unfinished partitions, then merge if every partition is committed."""
        shards.ensure_run_manifest(self.out, self.manifest)
        stats = []
        try:
            for p in self.worker.partitions(self.num_partitions):
                stats.append(self.run_partition(p, progress))
        finally:
            self.stream.close()  # decoder threads and DALI pipelines (GPU memory) go with the run
        self.maybe_merge()
        return stats

    def pending(self) -> dict[int, int]:
        """Partition → number of videos, for this worker's partitions not committed yet."""
        return {p: len(shards.partition_range(p, self.num_partitions, len(self.records)))
                for p in self.worker.partitions(self.num_partitions)
                if not is_committed(self.out / shards.partition_name(p, self.num_partitions))}

    def maybe_merge(self) -> dict | None:
        if len(shards.committed_partitions(self.out, self.num_partitions)) == self.num_partitions:
            return shards.merge_partitions(self.out, self.num_partitions)
        return None

    def run_partition(self, p: int, progress: Progress | None = None) -> PartitionStats:
        rows = [(i, self.records[i]) for i in shards.partition_range(p, self.num_partitions, len(self.records))]
        before, handoff_before = self.stream.clips_by_lane(), self.stream.handoff_s()
        stats = self.writer.write_partition(shards.partition_name(p, self.num_partitions), rows, progress)
        if not stats.skipped:
            after, handoff = self.stream.clips_by_lane(), self.stream.handoff_s()
            if handoff is not None:  # this partition's share (the process serves every partition of the worker)
                handoff = {k: round(v - (handoff_before or {}).get(k, 0.0), 4) for k, v in handoff.items()}
            self._log(stats, {lane: n - before.get(lane, 0) for lane, n in after.items()}, handoff)
        return stats

    def _log(self, stats: PartitionStats, clips_by_decoder: dict[str, int],
             decode_process_handoff_s: dict[str, float] | None) -> None:
        log = {**stats.__dict__, "clips_by_decoder": clips_by_decoder, "clips_per_s": stats.clips_per_s,
               "decode_process_handoff_s": decode_process_handoff_s,
               "host": socket.gethostname(), "pid": os.getpid(), "worker": self.worker.index,
               "workers": self.worker.count,
               "launcher": self.worker.launcher, "device": str(self.device), "decode_device": self.decode_device,
               "decode_pipelines": decode_pipelines(self.cfg, self.decode_device),
               "pyav_decoders": pyav_decoders(self.cfg), "decode_process": self.stream.decode_process is not None,
               "decode_stream_priority": self.cfg.decode_stream_priority,
               "encoder_memory_format": str(self.encoder.memory_format).removeprefix("torch."),
               "encoder_micro_batch": self.encoder.micro_batch, "encoder_compile": self.cfg.encoder_compile,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        shards.write_json(self.out / shards.LOG_DIR / f"{stats.partition}.json", log)


def merge_only(cfg_or_dir: PretokenizeConfig | str | Path) -> dict:
    """Merge step for a finished SLURM array (the dependent job): requires every partition committed."""
    out = Path(cfg_or_dir.output_dir if isinstance(cfg_or_dir, PretokenizeConfig) else cfg_or_dir)
    manifest = shards.read_shard_manifest(out)
    return shards.merge_partitions(out, int(manifest["num_partitions"]))
