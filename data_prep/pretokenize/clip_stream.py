"""The clip stream: probe (thread pool) → plan → decode (background thread), in manifest order.

Containers are probed with PyAV ahead of decoding (a missing, unreadable, too short or undecodable
video becomes a :class:`Reject` with its reason); each usable video is planned into clips, the clips
are cut into batches of ``batch_size`` and decoded by DALI (or PyAV, the CPU baseline) in a
background thread, ``prefetch_batches`` ahead of the encoder. Results come out in manifest order
whatever the timing, so the shards do not depend on it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from data_prep.manifest import VideoRecord
from data_prep.pretokenize.config import PretokenizeConfig
from data_prep.pretokenize.threads import background, ordered_map
from data_prep.video import ClipPlan, DaliClipDecoder, PyAVClipDecoder, VideoUnusable, plan_clips, probe_video


@dataclass(frozen=True)
class ClipJob:
    """One clip to decode and encode: where it comes from and which frames."""

    row: int
    """Row of the input manifest (0-based)."""
    record: VideoRecord
    source: str
    plan: ClipPlan


@dataclass(frozen=True)
class Reject:
    """A line of ``rejects.jsonl``: a whole video (``clip_start`` None, probe stage) or one clip."""

    row: int
    source: str
    clip_start: int | None
    kind: str
    reason: str

    def to_json(self) -> dict:
        return {"row": self.row, "source": self.source, "clip_start": self.clip_start,
                "kind": self.kind, "reason": self.reason}


def source_name(record_path: str, manifest_root: Path) -> str:
    """Path as recorded in samples: relative to the manifest's directory when under it."""
    try:
        return str(Path(record_path).relative_to(manifest_root))
    except ValueError:
        return record_path


GPU_DECODE_PIPELINES = 8
"""decode_pipelines=0 (auto) with NVDEC decode: the fastest count measured on an H100 by
benchmarks/bench_pretokenize.py (figures in docs/BENCHMARKS.md)."""


def decode_pipelines(cfg: PretokenizeConfig, decode_device: str) -> int:
    """The DALI pipeline count for ``cfg.decode_pipelines`` (0 = auto) on ``decode_device``."""
    wanted = cfg.decode_pipelines or (GPU_DECODE_PIPELINES if decode_device == "gpu" else 1)
    return min(wanted, cfg.batch_size)


class ClipStream:
    """Yields, in manifest order, batches ``(jobs, results, decode_seconds)`` and rejects."""

    def __init__(self, cfg: PretokenizeConfig, decode_device: str, device_id: int, manifest_root: Path):
        self.cfg, self.decode_device, self.device_id = cfg, decode_device, device_id
        self.root = manifest_root
        self._cached_decoder = None

    def _probe(self, item: tuple[int, VideoRecord]) -> list[ClipJob] | Reject:
        row, rec = item
        source = source_name(rec.path, self.root)
        try:
            info = probe_video(rec.path, device=self.decode_device if self.cfg.decoder == "dali" else "gpu")
            plans = plan_clips(info, self.cfg.clips, start_s=rec.start, end_s=rec.end, fps_override=rec.fps)
        except VideoUnusable as e:
            return Reject(row, source, None, e.kind, e.reason)
        return [ClipJob(row, rec, source, p) for p in plans]

    def _batches(self, rows: Sequence[tuple[int, VideoRecord]], rejects: list[Reject]) -> Iterator[list[ClipJob]]:
        batch: list[ClipJob] = []
        for result in ordered_map(self._probe, rows, self.cfg.probe_workers):
            if isinstance(result, Reject):
                rejects.append(result)
                continue
            for job in result:
                batch.append(job)
                if len(batch) == self.cfg.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _decoder(self):
        c = self.cfg
        if c.decoder == "pyav":
            return PyAVClipDecoder(height=c.clips.height, width=c.clips.width, num_threads=c.decode_threads)
        return DaliClipDecoder(height=c.clips.height, width=c.clips.width, device=self.decode_device,
                               device_id=self.device_id, batch_size=c.batch_size, num_threads=c.decode_threads,
                               pipelines=decode_pipelines(c, self.decode_device))

    def _decoded(self, rows, rejects) -> Iterator[tuple[list[ClipJob], list, float]]:
        # One decoder (its DALI pipelines) per process, built on first use and reused by later partitions.
        if self._cached_decoder is None:
            self._cached_decoder = self._decoder()
        decoder = self._cached_decoder
        # GPU: DALI's output is copied into torch tensors on a stream of this thread, which is
        # synchronised before the batch is handed over, so the encoder's stream never waits on it.
        stream = torch.cuda.Stream(self.device_id) if decoder.device == "gpu" else None
        for jobs in self._batches(rows, rejects):
            t0 = time.perf_counter()
            if stream is None:
                results = decoder.decode([j.plan for j in jobs])
            else:
                with torch.cuda.stream(stream):
                    results = decoder.decode([j.plan for j in jobs])
                stream.synchronize()
            yield jobs, results, time.perf_counter() - t0

    def __call__(self, rows: Sequence[tuple[int, VideoRecord]], rejects: list[Reject]) -> Iterator:
        def on_gpu() -> None:  # the decode thread's CUDA device (DALI output copies, its stream)
            torch.cuda.set_device(self.device_id)
        setup = on_gpu if self.decode_device == "gpu" else None
        return background(self._decoded(rows, rejects), self.cfg.prefetch_batches, setup)
