"""The clip stream: probe (thread pool) → plan → decode (decoder lanes), in manifest order.

Containers are probed with PyAV ahead of decoding (a missing, unreadable, too short or undecodable
video becomes a :class:`Reject` with its reason); each usable video is planned into clips, the clips
are cut into batches of ``batch_size`` and decoded by the decoder lanes (:mod:`.decoders`: DALI
pipelines, PyAV decoders), ``prefetch_batches`` batches in flight and as many decoded ahead of the
encoder; with ``decode_process`` the lanes run in a child process (:mod:`.decode_process`). Results
come out in manifest order whatever the timing, so the shards do not depend on it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from data_prep.manifest import VideoRecord
from data_prep.pretokenize.config import NVDEC_WITH_CPU_DECODERS, PretokenizeConfig
from data_prep.pretokenize.decode_process import DecodeProcess
from data_prep.pretokenize.decoders import DecoderLanes, Lane, dali_lanes, pyav_lanes
from data_prep.pretokenize.threads import background, ordered_map
from data_prep.video import ClipPlan, VideoUnusable, plan_clips, probe_video


@dataclass(frozen=True)
class ClipJob:
    """One clip to decode and encode: where it comes from and which frames."""

    row: int
    """Row of the input manifest (0-based)."""
    record: VideoRecord
    source: str
    plan: ClipPlan
    codec: str = ""
    """The video's codec (PyAV name): which decoder lanes can take it."""


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
    """The DALI pipeline count for ``cfg.decode_pipelines`` (0 = auto) on ``decode_device``; 0 with
    ``decoder: pyav``."""
    if cfg.decoder == "pyav":
        return 0
    wanted = cfg.decode_pipelines or (GPU_DECODE_PIPELINES if decode_device == "gpu" else 1)
    return min(wanted, cfg.batch_size)


def pyav_decoders(cfg: PretokenizeConfig) -> int:
    """PyAV decoder lanes: ``cfg.pyav_decoders``; with ``decoder: pyav`` and 0, ``decode_threads``."""
    if cfg.decoder == "pyav":
        return cfg.pyav_decoders or cfg.decode_threads
    return cfg.pyav_decoders


def decoder_lanes(cfg: PretokenizeConfig, decode_device: str, device_id: int) -> list[Lane]:
    """The lanes ``cfg`` asks for: DALI pipelines (NVDEC or CPU) and PyAV decoders."""
    c = cfg.clips
    lanes = []
    if n := decode_pipelines(cfg, decode_device):
        lanes += dali_lanes(count=n, device=decode_device, device_id=device_id, height=c.height, width=c.width,
                            batch_size=cfg.batch_size, threads=cfg.decode_threads,
                            stream_priority=cfg.decode_stream_priority)
    if n := pyav_decoders(cfg):
        lanes += pyav_lanes(count=n, height=c.height, width=c.width)
    return lanes


class ClipStream:
    """Yields, in manifest order, batches ``(jobs, results, decode_seconds)`` and rejects.

    ``decode_seconds``: lane-seconds the decoders spent on the batch (summed over lanes)."""

    def __init__(self, cfg: PretokenizeConfig, decode_device: str, device_id: int, manifest_root: Path):
        if decode_device == "gpu" and pyav_decoders(cfg):
            raise ValueError(NVDEC_WITH_CPU_DECODERS)
        self.cfg, self.decode_device, self.device_id = cfg, decode_device, device_id
        self.root = manifest_root
        self.lane_specs = decoder_lanes(cfg, decode_device, device_id)
        self._lanes: DecoderLanes | None = None
        # The probe accepts what some lane decodes: DALI's codecs on this device, or any with PyAV lanes.
        self._any_codec = any(lane.codecs is None for lane in self.lane_specs)

    def _probe(self, item: tuple[int, VideoRecord]) -> list[ClipJob] | Reject:
        row, rec = item
        source = source_name(rec.path, self.root)
        try:
            info = probe_video(rec.path, device=self.decode_device, any_codec=self._any_codec)
            plans = plan_clips(info, self.cfg.clips, start_s=rec.start, end_s=rec.end, fps_override=rec.fps)
        except VideoUnusable as e:
            return Reject(row, source, None, e.kind, e.reason)
        return [ClipJob(row, rec, source, p, info.codec) for p in plans]

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

    def lanes(self) -> DecoderLanes | DecodeProcess:
        """The decoder lanes (threads, DALI pipelines), started on first use and kept across partitions
        until :meth:`close`; with ``decode_process`` they run in a child process (:class:`DecodeProcess`)."""
        if self._lanes is None:
            if self.cfg.decode_process:
                self._lanes = DecodeProcess(self.cfg, self.decode_device, self.device_id, self.lane_specs)
            else:
                self._lanes = DecoderLanes(self.lane_specs)
        return self._lanes

    @property
    def decode_process(self) -> DecodeProcess | None:
        """The decode process, while one runs (``decode_process: true``, lanes started)."""
        return self._lanes if isinstance(self._lanes, DecodeProcess) else None

    def clips_by_lane(self) -> dict[str, int]:
        """Clips each decoder lane has decoded since the lanes started."""
        return dict(self._lanes.clips_by_lane) if self._lanes is not None else {}

    def handoff_s(self) -> dict[str, float] | None:
        """The decode process's hand-off seconds so far (:attr:`.DecodeProcess.handoff_s`); None without one."""
        return dict(self.decode_process.handoff_s) if self.decode_process is not None else None

    def close(self) -> None:
        """Stop the decoder lanes and drop their decoders (DALI pipelines, GPU memory)."""
        if self._lanes is not None:
            self._lanes.close()
            self._lanes = None

    def _decoded(self, rows, rejects) -> Iterator[tuple[list[ClipJob], list, float]]:
        lanes = self.lanes()
        in_flight: deque = deque()
        for jobs in self._batches(rows, rejects):
            in_flight.append((jobs, lanes.submit([j.plan for j in jobs], [j.codec for j in jobs])))
            if len(in_flight) >= self.cfg.prefetch_batches:
                yield self._finished(lanes, *in_flight.popleft())
        while in_flight:
            yield self._finished(lanes, *in_flight.popleft())

    @staticmethod
    def _finished(lanes: DecoderLanes, jobs: list[ClipJob], ticket) -> tuple[list[ClipJob], list, float]:
        results, busy_s = lanes.result(ticket)
        return jobs, results, busy_s

    def __call__(self, rows: Sequence[tuple[int, VideoRecord]], rejects: list[Reject]) -> Iterator:
        return background(self._decoded(rows, rejects), self.cfg.prefetch_batches, setup=self._decode_thread)

    def _decode_thread(self) -> None:
        """Set up the thread that submits batches and receives their frames: with a decode process on
        NVDEC, its idle receiving stream becomes the thread's current one (see DecodeProcess.stream)."""
        lanes = self.lanes()
        if isinstance(lanes, DecodeProcess) and lanes.stream is not None:
            torch.cuda.set_stream(lanes.stream)
