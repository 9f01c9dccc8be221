"""Training-time clip streams (tokenizer training): sharded, seeded, resumable, never substituting data.

Design decisions:
- A stream is **infinite and per rank**. Each epoch is a seeded permutation of the whole source list;
  rank r takes every world-th entry of it. Training runs for a number of optimizer steps, so ranks
  never have to agree on where an epoch ends (a rank that rejects more videos simply reads further).
- **Exact resume**: the position is ``(epoch, cursor)`` plus the set of sources found unusable so far.
  Random clip starts come from a generator seeded by ``(seed, epoch, index)``, not from a running
  RNG, so a restored position reproduces the same clips bit for bit.
- **Never zeros**: a source that cannot be used (missing, unreadable container, codec this device
  cannot decode, too short, decode error, truncated stream) is appended to ``rejects.jsonl`` with its
  reason and skipped for the rest of the run. If a whole pass over a rank's shard yields nothing, the
  stream raises :class:`NoUsableData` naming the manifest and the first reasons.
- Videos are probed with PyAV and decoded by :class:`data_prep.video.DaliClipDecoder` (CPU, or NVDEC
  on GPU hosts); images (``.jpg``, ``.png``, ...) are decoded with PIL and come out as 1-frame clips.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.manifest import VideoRecord, read_manifest
from data_prep.video import (ClipPlan, ClipSamplingConfig, DaliClipDecoder, VideoInfo, VideoUnusable, clip_range,
                             frames_to_model_input, probe_video)
from videoar_common.exit_codes import InputError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
REJECTS_FILE = "rejects.jsonl"


class NoUsableData(InputError, RuntimeError):
    """Every source of a stream's shard was rejected."""


def read_sources(path: str | Path) -> list[VideoRecord]:
    """Sources from a CSV/JSONL manifest (``data_prep.manifest``) or a ``.txt`` list of paths (one per
    line, ``#`` comments; relative paths resolve against the list's directory)."""
    path = Path(path)
    if path.suffix != ".txt":
        return read_manifest(path)
    if not path.is_file():
        raise FileNotFoundError(f"source list not found: {path}")
    root = path.parent.resolve()
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            full = Path(line) if Path(line).is_absolute() else root / line
            records.append(VideoRecord(path=str(full), caption=""))
    return records


def is_image(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


class RejectLog:
    """Appends ``{path, reason, stream, rank}`` lines to ``rejects.jsonl`` (one write per line, so
    lines from several ranks never interleave); each (path, reason) is written once per file."""

    def __init__(self, path: str | Path | None, rank: int = 0):
        self.path = Path(path) if path is not None else None
        self.rank = rank
        self._seen: set[tuple[str, str]] = set()
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self._seen.add((row["path"], row["reason"]))
                except (json.JSONDecodeError, KeyError):
                    continue

    def add(self, path: str, reason: str, stream: str) -> None:
        if (path, reason) in self._seen:
            return
        self._seen.add((path, reason))
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"path": path, "reason": reason, "stream": stream, "rank": self.rank,
                           "time": round(time.time(), 3)}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


class ClipSource(Protocol):
    """Turns a record into a plan (cheap, may raise VideoUnusable) and decodes plans in batches."""

    def plan(self, record: VideoRecord, rng: np.random.Generator | None) -> ClipPlan: ...

    def decode(self, plans: Sequence[ClipPlan]) -> list[torch.Tensor | VideoUnusable]: ...


class VideoSource:
    """Videos: probe (cached per path) → clip plan (random or centre start) → DALI decode."""

    def __init__(self, sampling: ClipSamplingConfig, *, device: str = "cpu", device_id: int = 0,
                 num_threads: int = 2, batch_size: int = 8):
        self.sampling = sampling
        self.device = device
        self.decoder = DaliClipDecoder(height=sampling.height, width=sampling.width, device=device,
                                       device_id=device_id, batch_size=batch_size, num_threads=num_threads)
        self._probes: dict[str, VideoInfo | VideoUnusable] = {}

    def _probe(self, path: str) -> VideoInfo:
        if path not in self._probes:
            try:
                self._probes[path] = probe_video(path, device=self.device)
            except VideoUnusable as e:
                self._probes[path] = e
        found = self._probes[path]
        if isinstance(found, VideoUnusable):
            raise found
        return found

    def plan(self, record: VideoRecord, rng: np.random.Generator | None) -> ClipPlan:
        """The centre clip (``rng=None``, evaluation) or a clip with a uniformly random start."""
        if is_image(record.path):
            raise VideoUnusable("an image file in a video list (put images in data.image_manifest)")
        info = self._probe(record.path)
        # clip_range validates the span (raises 'too short'); by time for a variable-rate video.
        clips = clip_range(info, self.sampling, start_s=record.start, end_s=record.end, fps_override=record.fps)
        return clips.spread(self.sampling.clips_per_video)[0] if rng is None else clips.random(rng)

    def decode(self, plans: Sequence[ClipPlan]) -> list[torch.Tensor | VideoUnusable]:
        return self.decoder.decode(plans)


class ImageSource:
    """Images decoded with PIL, resized to cover the target and centre-cropped: 1-frame clips."""

    def __init__(self, height: int, width: int, *, device: str = "cpu", device_id: int = 0):
        self.height, self.width = height, width
        self.device = torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu")

    def plan(self, record: VideoRecord, rng: np.random.Generator | None) -> ClipPlan:
        if not is_image(record.path):
            raise VideoUnusable(f"not an image file (suffix must be one of {sorted(IMAGE_SUFFIXES)})")
        if not Path(record.path).is_file():
            raise VideoUnusable(f"missing file: {record.path}")
        return ClipPlan(path=record.path, start_frame=0, stride=1, num_frames=1)

    def decode(self, plans: Sequence[ClipPlan]) -> list[torch.Tensor | VideoUnusable]:
        return [self._decode_one(p.path) for p in plans]

    def _decode_one(self, path: str) -> torch.Tensor | VideoUnusable:
        from PIL import Image
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:  # PIL raises many types on corrupt input
            return VideoUnusable(f"unreadable image: {type(e).__name__}: {e}")
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float()
        h, w = x.shape[-2:]
        scale = max(self.height / h, self.width / w)
        size = (max(self.height, round(h * scale)), max(self.width, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - self.height) // 2, (size[1] - self.width) // 2
        x = x[..., top:top + self.height, left:left + self.width]
        frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # (1, H, W, 3)
        return frames.to(self.device)


def source_for(records: Sequence[VideoRecord], sampling: ClipSamplingConfig, *, device: str = "cpu",
               device_id: int = 0, num_threads: int = 2, batch_size: int = 8, origin: str = "") -> ClipSource:
    """ImageSource when every record is an image file, VideoSource when none is; mixed lists are an error."""
    images = sum(is_image(r.path) for r in records)
    if images and images != len(records):
        raise ValueError(f"{origin or 'source list'}: mixes {images} images and {len(records) - images} videos; "
                         "give images and videos in separate lists")
    if images:
        if sampling.num_frames != 1:
            raise ValueError(f"{origin or 'source list'} holds images, but clips have {sampling.num_frames} frames")
        return ImageSource(sampling.height, sampling.width, device=device, device_id=device_id)
    return VideoSource(sampling, device=device, device_id=device_id, num_threads=num_threads, batch_size=batch_size)


@dataclass
class ClipBatch:
    video_BCTHW: torch.Tensor
    """Float clips in [-1, 1] on the decode device."""
    sample_ids: list[str]
    """``path@start_frame`` of each clip (for audits: which samples a step saw)."""


class ClipStream:
    """Infinite per-rank stream of clip batches over ``records`` (see the module docstring)."""

    def __init__(self, records: Sequence[VideoRecord], source: ClipSource, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, name: str = "video", rejects: RejectLog | None = None,
                 origin: str = ""):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(records) < world_size:
            raise NoUsableData(f"{origin or name}: {len(records)} sources cannot be sharded over "
                               f"{world_size} ranks (each rank needs at least one)")
        self.records = list(records)
        self.source = source
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.name, self.origin = name, origin or name
        self.rejects = rejects or RejectLog(None, rank)
        self.epoch, self.cursor = 0, 0
        self.bad: dict[str, str] = {}
        self._shard_cache: tuple[int, np.ndarray] | None = None
        self._since_success = 0

    # --- position -----------------------------------------------------------------------------
    def _shard(self, epoch: int) -> np.ndarray:
        if self._shard_cache is None or self._shard_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
            self._shard_cache = (epoch, perm[self.rank::self.world_size])
        return self._shard_cache[1]

    def _next_index(self) -> tuple[int, int]:
        shard = self._shard(self.epoch)
        if self.cursor >= len(shard):
            self.epoch, self.cursor = self.epoch + 1, 0
            shard = self._shard(self.epoch)
        idx = int(shard[self.cursor])
        self.cursor += 1
        return self.epoch, idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "bad": dict(self.bad), "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "num_records": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        for key, now in (("world_size", self.world_size), ("num_records", len(self.records)), ("seed", self.seed),
                         ("rank", self.rank)):
            if state[key] != now:
                raise ValueError(f"{self.origin}: cannot resume the data position: {key} was {state[key]} "
                                 f"when saved and is {now} now (the data order would change)")
        self.epoch, self.cursor, self.bad = int(state["epoch"]), int(state["cursor"]), dict(state["bad"])

    # --- batches ------------------------------------------------------------------------------
    def _reject(self, path: str, reason: str) -> None:
        self.bad[path] = reason
        self.rejects.add(path, reason, self.name)
        self._since_success += 1
        if self._since_success > len(self._shard(self.epoch)):
            reasons = "; ".join(f"{Path(p).name}: {r}" for p, r in list(self.bad.items())[:3])
            raise NoUsableData(f"{self.origin}: no usable {self.name} among the {len(self._shard(self.epoch))} "
                               f"sources of rank {self.rank}'s shard (see {self.rejects.path or 'the rejects log'}; "
                               f"first reasons: {reasons})")

    def _next_plan(self) -> ClipPlan:
        while True:
            epoch, idx = self._next_index()
            record = self.records[idx]
            if record.path in self.bad:
                self._reject(record.path, self.bad[record.path])
                continue
            rng = np.random.default_rng([self.seed, epoch, idx, 1])
            try:
                plan = self.source.plan(record, rng)
            except VideoUnusable as e:
                self._reject(record.path, e.reason)
                continue
            # Count only rejects in a row: a shard whose every source fails planning (first pass, or
            # later passes where decode failures are remembered as bad) raises after one pass.
            self._since_success = 0
            return plan

    def next_batch(self) -> ClipBatch:
        clips: list[tuple[ClipPlan, torch.Tensor]] = []
        while len(clips) < self.batch_size:
            plans = [self._next_plan() for _ in range(self.batch_size - len(clips))]
            for plan, result in zip(plans, self.source.decode(plans)):
                if isinstance(result, VideoUnusable):
                    self._reject(plan.path, result.reason)
                else:
                    clips.append((plan, result))
        video = torch.stack([frames_to_model_input(frames) for _, frames in clips])
        return ClipBatch(video_BCTHW=video, sample_ids=[f"{p.path}@{p.start_frame}" for p, _ in clips])

    def __iter__(self):
        return self

    def __next__(self) -> ClipBatch:
        return self.next_batch()


def eval_batches(records: Sequence[VideoRecord], source: ClipSource, *, batch_size: int, limit: int,
                 rejects: RejectLog | None = None, name: str = "eval"):
    """Deterministic held-out batches: records in file order, centre clips, at most ``limit`` clips.
    Unusable sources are logged and skipped; raises :class:`NoUsableData` if none is usable."""
    rejects = rejects or RejectLog(None)
    pending: list[ClipPlan] = []
    done = 0
    for record in records:
        if done + len(pending) >= limit:
            break
        try:
            pending.append(source.plan(record, None))
        except VideoUnusable as e:
            rejects.add(record.path, e.reason, name)
            continue
        if len(pending) == batch_size:
            batch = _decode_eval(pending, source, rejects, name)
            pending = []
            if batch is not None:
                done += batch.video_BCTHW.shape[0]
                yield batch
    if pending:
        batch = _decode_eval(pending, source, rejects, name)
        if batch is not None:
            done += batch.video_BCTHW.shape[0]
            yield batch
    if done == 0:
        raise NoUsableData(f"no usable held-out clip among {len(records)} sources "
                           f"(see {rejects.path or 'the rejects log'})")


def _decode_eval(plans, source, rejects, name) -> ClipBatch | None:
    good = []
    for plan, result in zip(plans, source.decode(plans)):
        if isinstance(result, VideoUnusable):
            rejects.add(plan.path, result.reason, name)
        else:
            good.append((plan, result))
    if not good:
        return None
    return ClipBatch(video_BCTHW=torch.stack([frames_to_model_input(f) for _, f in good]),
                     sample_ids=[f"{p.path}@{p.start_frame}" for p, _ in good])
