"""The writer stage: one partition of the input manifest → MDS shards and its rejects, committed.

A partition is written into ``.tmp-part-…`` (decoded batches from the clip stream, encoded, one MDS
sample per clip), its rejects sorted by (manifest row, clip start) into ``rejects.jsonl``, then the
commit marker is written last and the directory renamed to ``part-…``. A committed partition is
skipped; an uncommitted attempt is deleted and redone from scratch, so a rerun's bytes equal an
uninterrupted run's. A partition whose clips mostly fail to decode is aborted (:class:`DecoderBroken`)
rather than committed as a pile of rejects.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from data_prep import shards
from data_prep.manifest import VideoRecord
from data_prep.pretokenize.clip_stream import ClipJob, ClipStream, Reject
from data_prep.pretokenize.config import PretokenizeConfig
from data_prep.pretokenize.encoder import ClipEncoder, EncodedBatch
from videoar_common.atomic import fsync_dir, is_committed, mark_committed


class DecoderBroken(RuntimeError):
    """Too many clips of a partition failed to decode: the decoder setup, not the data, is at fault."""


MIN_DECODE_TRIES = 32


@dataclass
class PartitionStats:
    partition: str
    videos: int = 0
    videos_done: int = 0
    """Videos of the partition handled so far (for progress bars)."""
    clips: int = 0
    rejects: int = 0
    decode_s: float = 0.0
    """Decode thread busy time (overlaps with encoding)."""
    wait_s: float = 0.0
    """Time the encoder waited for decoded clips (decode-bound time)."""
    encode_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    skipped: bool = False

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.total_s if self.total_s > 0 else 0.0


Progress = Callable[[PartitionStats], None]


def _mds_writer():
    """The MDS writer class (a seam for tests that simulate a crash mid-partition)."""
    from streaming import MDSWriter
    return MDSWriter


def _sample(job: ClipJob, enc: EncodedBatch, i: int) -> dict[str, Any]:
    rec = job.record
    s = {"latent": enc.latents[i], "bits": enc.bits[i], "label": int(rec.label), "caption": rec.caption,
         "sample_id": shards.sample_id(job.source, job.plan.start_frame), "source": job.source,
         "clip_start": int(job.plan.start_frame), "clip_stride": int(job.plan.stride)}
    if enc.text is not None:
        s["text_features"], s["text_mask"] = enc.text[i]
    return s


class PartitionWriter:
    """Writes partitions into ``out``: clips from ``stream``, encoded by ``encoder``, as MDS shards."""

    def __init__(self, cfg: PretokenizeConfig, out: Path, stream: ClipStream, encoder: ClipEncoder):
        self.cfg, self.out, self.stream, self.encoder = cfg, out, stream, encoder

    def write_partition(self, name: str, rows: Sequence[tuple[int, VideoRecord]],
                        progress: Progress | None = None) -> PartitionStats:
        """Write and commit partition ``name`` of the (row, record) ``rows``, unless already committed."""
        final, tmp = self.out / name, self.out / f".tmp-{name}"
        stats = PartitionStats(partition=name)
        if is_committed(final):
            stats.skipped = True
            return stats
        if final.exists():
            raise RuntimeError(f"{final} exists without a COMMITTED marker (not written by this tool?); "
                               f"move it away and rerun")
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted attempt at this partition: redo it
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        rejects = self._write_partition(tmp, rows, stats, progress)
        rejects.sort(key=lambda r: (r.row, -1 if r.clip_start is None else r.clip_start))
        shards.write_jsonl(tmp / shards.REJECTS_FILE, [r.to_json() for r in rejects])
        stats.videos, stats.rejects = len(rows), len(rejects)
        stats.videos_done = len(rows)
        if progress is not None:
            progress(stats)
        mark_committed(tmp, {"samples": stats.clips, "rejects": stats.rejects, "videos": stats.videos})
        os.rename(tmp, final)
        fsync_dir(self.out)
        stats.total_s = time.perf_counter() - t0
        return stats

    def _write_partition(self, tmp: Path, rows, stats: PartitionStats, progress) -> list[Reject]:
        writer_cls = _mds_writer()
        rejects: list[Reject] = []
        columns = shards.mds_columns(self.encoder.text is not None)
        tries, fails, first_error = 0, 0, None
        with writer_cls(out=str(tmp), columns=columns, compression=self.cfg.compression or None,
                        size_limit=self.cfg.shard_size_limit) as writer:
            batches = self.stream(rows, rejects)
            while True:
                t_wait = time.perf_counter()
                try:
                    jobs, results, decode_s = next(batches)
                except StopIteration:
                    break
                stats.wait_s += time.perf_counter() - t_wait
                stats.decode_s += decode_s
                good = [(j, r) for j, r in zip(jobs, results) if isinstance(r, torch.Tensor)]
                failed = [Reject(j.row, j.source, j.plan.start_frame, r.kind, r.reason)
                          for j, r in zip(jobs, results) if not isinstance(r, torch.Tensor)]
                rejects += failed
                tries, fails = tries + len(jobs), fails + len(failed)
                first_error = first_error or (failed[0] if failed else None)
                self._check_decode_rate(tries, fails, first_error)
                if good:
                    self._encode_and_write(writer, good, stats)
                if progress is not None:
                    stats.rejects = len(rejects)
                    stats.videos_done = jobs[-1].row - rows[0][0] + 1
                    progress(stats)
        return rejects

    def _check_decode_rate(self, tries: int, fails: int, first: Reject | None) -> None:
        if tries >= MIN_DECODE_TRIES and fails > self.cfg.max_decode_error_rate * tries:
            raise DecoderBroken(
                f"{fails} of {tries} clips failed to decode with {self.cfg.decoder} on {self.stream.decode_device} "
                f"(max_decode_error_rate={self.cfg.max_decode_error_rate}); first: {first.source} @ frame "
                f"{first.clip_start}: {first.reason}. Check the decoder setup on this host; nothing of this "
                f"partition was committed")

    def _encode_and_write(self, writer, good, stats: PartitionStats) -> None:
        t0 = time.perf_counter()
        frames = [r for _, r in good]
        if frames[0].is_cuda:  # made on the decode thread's stream: keep it alive for this one
            for f in frames:
                f.record_stream(torch.cuda.current_stream(f.device))
        enc = self.encoder.encode(frames, [j.record.caption for j, _ in good])
        t1 = time.perf_counter()
        for i, (job, _) in enumerate(good):
            writer.write(_sample(job, enc, i))
        stats.encode_s += t1 - t0
        stats.write_s += time.perf_counter() - t1
        stats.clips += len(good)
