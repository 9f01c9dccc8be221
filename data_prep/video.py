"""Video probing, clip planning and DALI clip decoding, shared by tokenizer training and pre-tokenization.

Design decision: every video is probed first (PyAV, container metadata and packet timestamps, no pixel
decoding) so that missing files, unknown codecs, codecs this device cannot decode and videos too short
for one clip are rejected with a precise reason *before* DALI sees them. Clips are planned in
real-world time: ``target_fps`` strides a constant-rate video by its frame rate and picks, in a
variable-rate one, the frame nearest each target time (:mod:`data_prep.frame_times`). DALI then decodes the clips
(``device="mixed"`` = NVDEC on GPU hosts, libavcodec on CPU), the clips of one video together as one
sample (each needed source frame once), resizes so the frame covers the target size and centre-crops.
A DALI decode error kills the pipeline object ("Current pipeline object is no longer valid"), so on an
error the slice of the batch that pipeline ran is re-decoded one clip at a time on fresh pipelines
and the first error's text becomes that clip's reject reason. Decoded frame counts are always checked.
"""
from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from data_prep.frame_times import StreamTiming, nearest_frames, stream_timing

# What DALI 2.x decodes (PyAV codec names). CPU: libavcodec inside DALI; mixed: NVDEC.
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = DALI_CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}


class VideoUnusable(Exception):
    """A video cannot be used; ``reason`` is what goes into rejects.jsonl.

    ``kind`` is a short category for summaries: missing, unreadable, codec, no_frames, too_short,
    decode_error, frame_count (or ``unusable`` when unspecified).
    """

    def __init__(self, reason: str, kind: str = "unusable"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class VideoInfo:
    path: str
    codec: str
    num_frames: int
    fps: float
    """The rate index arithmetic uses: the declared rate, or the measured one where the stream
    contradicts it (:attr:`StreamTiming.fps`)."""
    height: int
    width: int
    timing: StreamTiming | None = None
    """Declared and measured rates, and the frame times of a variable-rate stream (None: a
    constant-rate stream at ``fps``, e.g. a VideoInfo built by hand)."""

    @property
    def frame_times(self) -> tuple[float, ...] | None:
        return self.timing.frame_times if self.timing is not None else None

    def describe_rate(self) -> str:
        return self.timing.describe() if self.timing is not None else f"{self.fps:.4g} fps"


@dataclass(kw_only=True)
class ClipSamplingConfig:
    """How clips are cut from videos and resized; one definition for tokenizer training and
    pre-tokenization so both see identical frames."""

    num_frames: int = 17
    """Frames per clip. The causal tokenizer needs 1 + 4k frames (17, 33, 65, ...); 1 means images."""
    frame_stride: int = 1
    """Take every n-th source frame (ignored when target_fps > 0)."""
    target_fps: float = 0.0
    """Resample to this frame rate; 0 = off. A constant-rate video is strided (stride = round(source fps
    / target_fps)); in a variable-rate one (frame gaps irregular, or contradicting the declared rate)
    each clip frame is the source frame nearest its target time (start + k / target_fps)."""
    clips_per_video: int = 1
    """Clips per video, start points spread evenly over the usable span."""
    height: int = 64
    """Output height in pixels (after resizing the frame to cover the output and centre-cropping)."""
    width: int = 64
    """Output width in pixels."""

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {self.frame_stride}")
        if self.target_fps < 0:
            raise ValueError(f"target_fps must be >= 0, got {self.target_fps}")
        if self.clips_per_video < 1:
            raise ValueError(f"clips_per_video must be >= 1, got {self.clips_per_video}")
        if self.height < 16 or self.width < 16 or self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16 (the tokenizer's spatial "
                             f"compression), got {self.height}x{self.width}")


@dataclass(frozen=True)
class ClipPlan:
    """One clip to decode: ``num_frames`` frames from ``start_frame`` every ``stride`` frames, or, with
    ``stride`` 0, the frames ``indices`` picked by presentation time (a variable-rate video)."""

    path: str
    start_frame: int
    stride: int
    num_frames: int
    indices: tuple[int, ...] = ()
    """Source frame indices of a time-picked clip (``stride`` 0); may repeat a frame across a gap."""

    def __post_init__(self) -> None:
        if (self.stride == 0) != bool(self.indices) or (self.indices and len(self.indices) != self.num_frames):
            raise ValueError(f"a ClipPlan has a stride > 0 or num_frames indices (stride 0), got stride "
                             f"{self.stride} and {len(self.indices)} indices for {self.num_frames} frames")

    @property
    def frame_indices(self) -> list[int]:
        if self.indices:
            return list(self.indices)
        return [self.start_frame + i * self.stride for i in range(self.num_frames)]

    @property
    def span(self) -> int:
        """Source frames from the clip's first to its last, both included."""
        return self.frame_indices[-1] - self.start_frame + 1


@dataclass(frozen=True)
class VideoRequest:
    """Consecutive clips of one video, decoded together: ``frames`` is the sorted union of their frame
    indices (each source frame decoded once) and ``positions[i]`` are clip i's rows in that decode."""

    plans: tuple[ClipPlan, ...]
    frames: tuple[int, ...]
    positions: tuple[tuple[int, ...], ...]

    @property
    def path(self) -> str:
        return self.plans[0].path


def group_by_video(plans: Sequence[ClipPlan]) -> list[VideoRequest]:
    """Runs of consecutive plans of one video (``plan_clips`` lists a video's clips together) that lie
    close: a clip joins the run when it starts at most one clip span after the run's last frame.

    Decoding a run decodes every frame between its clips; across a longer gap a fresh decode, which
    seeks, can do less work (an ungated trial on CPU decoded 2 clips of 9 frames 12 frames apart more
    slowly together). The UCF-101 recipe's 4 overlapping clips per video decoded 1.4-1.7x faster
    together (DALI on CPU; docs/BENCHMARKS.md)."""
    runs: list[list[ClipPlan]] = []
    for plan in plans:
        prev = runs[-1][-1] if runs else None
        if prev is not None and prev.path == plan.path and plan.start_frame <= prev.frame_indices[-1] + plan.span:
            runs[-1].append(plan)
        else:
            runs.append([plan])
    return [_request(run) for run in runs]


def _request(plans: Sequence[ClipPlan]) -> VideoRequest:
    frames = sorted({i for p in plans for i in p.frame_indices})
    row = {f: r for r, f in enumerate(frames)}
    return VideoRequest(tuple(plans), tuple(frames), tuple(tuple(row[i] for i in p.frame_indices) for p in plans))


def probe_video(path: str | Path, device: str = "cpu", any_codec: bool = False) -> VideoInfo:
    """Container facts and frame timing of a video without decoding pixels; raises :class:`VideoUnusable`.

    ``device`` decides the accepted codecs (what DALI decodes there); ``any_codec`` accepts every codec
    (PyAV decoders decode whatever libavcodec knows)."""
    import av
    path = Path(path)
    if not path.is_file():
        raise VideoUnusable(f"missing file: {path}", "missing")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoUnusable("no video stream", "unreadable")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            height, width = stream.codec_context.height, stream.codec_context.width
            timing, num_frames = _probe_timing(container, stream)
    except VideoUnusable:
        raise
    except Exception as e:  # PyAV raises many types for corrupt input
        raise VideoUnusable(f"unreadable container: {type(e).__name__}: {e}", "unreadable") from None
    supported = DALI_GPU_CODECS if device == "gpu" else DALI_CPU_CODECS
    if codec not in supported and not any_codec:
        where = "GPU (NVDEC)" if device == "gpu" else "CPU"
        hint = "" if device == "gpu" else " (transcode with `videoar transcode`, or run on a GPU host)"
        raise VideoUnusable(f"codec '{codec}' cannot be decoded by DALI on {where}{hint}", "codec")
    if num_frames == 0 or timing.fps <= 0:
        raise VideoUnusable(f"no decodable frames (frames={num_frames}, {timing.describe()})", "no_frames")
    return VideoInfo(path=str(path), codec=codec, num_frames=num_frames, fps=timing.fps, height=height,
                     width=width, timing=timing)


def _probe_timing(container, stream) -> tuple[StreamTiming, int]:
    """The stream's timing from its packets (counting them is exact, and far cheaper than decoding)."""
    stamps: list[int] | None = []
    num_frames = 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream flush packet
            continue
        num_frames += 1
        stamp = packet.pts if packet.pts is not None else packet.dts
        if stamp is None or stamps is None:
            stamps = None
        else:
            stamps.append(stamp)
    declared = float(stream.average_rate or stream.guessed_rate or 0)
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1e6  # AV_TIME_BASE
    tick = float(stream.time_base) if stream.time_base is not None else 0.0
    return stream_timing(stamps, tick, declared, duration, num_frames), num_frames


def clip_stride(info: VideoInfo, cfg: ClipSamplingConfig, fps_override: float | None = None) -> int:
    """Source frames between clip frames in index arithmetic (constant-rate video, or frame_stride)."""
    fps = fps_override or info.fps
    if cfg.target_fps > 0:
        return max(1, round(fps / cfg.target_fps))
    return cfg.frame_stride


def plan_clips(info: VideoInfo, cfg: ClipSamplingConfig, *, start_s: float | None = None,
               end_s: float | None = None, fps_override: float | None = None) -> list[ClipPlan]:
    """``clips_per_video`` clips spread evenly over [start_s, end_s]; raises if not one clip fits."""
    return clip_range(info, cfg, start_s=start_s, end_s=end_s, fps_override=fps_override).spread(cfg.clips_per_video)


def clip_range(info: VideoInfo, cfg: ClipSamplingConfig, *, start_s: float | None = None,
               end_s: float | None = None, fps_override: float | None = None) -> "StridedRange | TimedRange":
    """Where clips of ``info`` can lie under ``cfg`` within [start_s, end_s]; raises ``too_short``.

    By time (:class:`TimedRange`) for a variable-rate video under ``target_fps``, else by index
    (:class:`StridedRange`; a manifest ``fps`` override is the user's word and keeps index arithmetic)."""
    if cfg.target_fps > 0 and info.frame_times is not None and not fps_override:
        return TimedRange(info, cfg, start_s, end_s)
    return StridedRange(info, cfg, start_s, end_s, fps_override)


def _window(info: VideoInfo, fps: float, start_s: float | None, end_s: float | None,
            use_times: bool) -> tuple[int, int]:
    """Frames [first, last) shown within [start_s, end_s): the frame on screen at ``start_s`` up to the
    last one that starts before ``end_s`` (by timestamps for a variable-rate video)."""
    if use_times:
        times = info.frame_times
        first = 0 if start_s is None else max(0, int(np.searchsorted(times, start_s, side="right")) - 1)
        last = info.num_frames if end_s is None else min(info.num_frames, int(np.searchsorted(times, end_s)))
        return first, last
    first = 0 if start_s is None else max(0, int(math.floor(start_s * fps)))
    last = info.num_frames if end_s is None else min(info.num_frames, int(math.floor(end_s * fps)))
    return first, last


class StridedRange:
    """Clips at a fixed stride in frame indices: constant-rate videos (target_fps strides by the frame
    rate), ``frame_stride`` sampling, or a manifest ``fps`` override."""

    def __init__(self, info: VideoInfo, cfg: ClipSamplingConfig, start_s, end_s, fps_override=None):
        self.info, self.cfg = info, cfg
        fps = fps_override or info.fps
        self.stride = clip_stride(info, cfg, fps_override)
        use_times = info.frame_times is not None and not fps_override
        self.first, last = _window(info, fps, start_s, end_s, use_times)
        need = (cfg.num_frames - 1) * self.stride + 1
        self.room = last - self.first - need
        if self.room < 0:
            rate = f"{fps_override:g} fps from the manifest" if fps_override else info.describe_rate()
            raise VideoUnusable(f"too short: {last - self.first} usable frames, a clip needs {need} "
                                f"({cfg.num_frames} frames at stride {self.stride}; {rate})", "too_short")

    def at(self, offset: int) -> ClipPlan:
        """The clip starting ``offset`` frames into the range (0 <= offset <= room)."""
        return ClipPlan(path=self.info.path, start_frame=self.first + offset, stride=self.stride,
                        num_frames=self.cfg.num_frames)

    def spread(self, n: int) -> list[ClipPlan]:
        offsets = [self.room * i // (n - 1) if n > 1 else self.room // 2 for i in range(n)]
        return [self.at(o) for o in dict.fromkeys(offsets)]

    def random(self, rng: np.random.Generator) -> ClipPlan:
        return self.at(int(rng.integers(self.room + 1)))


class TimedRange:
    """Clips by presentation time in a variable-rate video: a clip starts at the frame nearest its
    start time t0, and frame k is the frame nearest t(start) + k / target_fps. Target times are taken
    from the start frame's own timestamp, so (source, clip start, target_fps) alone rebuild a clip."""

    def __init__(self, info: VideoInfo, cfg: ClipSamplingConfig, start_s=None, end_s=None):
        self.info, self.cfg = info, cfg
        self.times = np.asarray(info.frame_times, dtype=np.float64)
        self.period = 1.0 / cfg.target_fps
        self.first, self.last = _window(info, info.fps, start_s, end_s, use_times=True)
        need = (cfg.num_frames - 1) * self.period
        span = float(self.times[self.last - 1] - self.times[self.first]) if self.last > self.first else 0.0
        self.room = span - need
        if self.last <= self.first or self.room < -1e-9:
            raise VideoUnusable(
                f"too short: {max(self.last - self.first, 0)} usable frames over {span:.3g} s, a clip of "
                f"{cfg.num_frames} frames at target_fps {cfg.target_fps:g} needs {need:.3g} s "
                f"({info.describe_rate()})", "too_short")
        self.room = max(self.room, 0.0)

    def _nearest(self, targets_s: np.ndarray) -> np.ndarray:
        return nearest_frames(self.times, targets_s, self.first, self.last)

    def from_frame(self, start: int) -> ClipPlan:
        """The clip whose first frame is ``start`` (how a stored clip start is turned back into frames)."""
        targets = self.times[start] + self.period * np.arange(self.cfg.num_frames)
        indices = tuple(int(i) for i in self._nearest(targets))
        return ClipPlan(path=self.info.path, start_frame=int(start), stride=0, num_frames=self.cfg.num_frames,
                        indices=(int(start),) + indices[1:])

    def at(self, offset_s: float) -> ClipPlan:
        """The clip starting nearest ``offset_s`` seconds into the range (0 <= offset_s <= room)."""
        start = int(self._nearest(np.array([self.times[self.first] + offset_s]))[0])
        return self.from_frame(start)

    def spread(self, n: int) -> list[ClipPlan]:
        offsets = [self.room * i / (n - 1) if n > 1 else self.room / 2 for i in range(n)]
        plans = {}
        for plan in (self.at(o) for o in offsets):
            plans.setdefault(plan.start_frame, plan)
        return list(plans.values())

    def random(self, rng: np.random.Generator) -> ClipPlan:
        return self.at(float(rng.random()) * self.room)


def clip_at(info: VideoInfo, cfg: ClipSamplingConfig, start_frame: int, stride: int) -> ClipPlan:
    """A stored clip (``clip_start``, ``clip_stride`` of a shard sample) as frames to decode: a stride of
    0 marks a clip picked by time, rebuilt from the video's timestamps."""
    if stride > 0:
        return ClipPlan(path=info.path, start_frame=start_frame, stride=stride, num_frames=cfg.num_frames)
    if info.frame_times is None:
        raise VideoUnusable(f"{info.path}: a clip picked by time (clip_stride 0) but the video is "
                            f"constant-rate now ({info.describe_rate()}): was it replaced?", "frame_count")
    return TimedRange(info, cfg).from_frame(start_frame)


def frames_to_model_input(frames_FHWC: torch.Tensor) -> torch.Tensor:
    """uint8 frames ``(F, H, W, 3)`` → float ``(3, F, H, W)`` in [-1, 1], on the frames' device; a batch
    ``(B, F, H, W, 3)`` → ``(B, 3, F, H, W)`` (the same values as clip by clip)."""
    return frames_FHWC.movedim(-1, -4).float().div_(127.5).sub_(1.0)


class DaliClipDecoder:
    """Decodes batches of :class:`ClipPlan` into uint8 tensors ``(F, H, W, 3)``.

    ``device="gpu"`` decodes with NVDEC and returns CUDA tensors (no host round trip); ``"cpu"``
    returns CPU tensors. Failed clips come back as :class:`VideoUnusable` in their slot.

    ``pipelines`` > 1 keeps that many DALI pipelines and splits every batch into contiguous slices, one
    per pipeline, run concurrently from a thread pool (``pipe.run`` releases the GIL). On the GPU each
    pipeline has its own CUDA stream and NVDEC sessions, so several decode engines can work at once
    (one synchronous pipeline decoded 17x128² clips at a quarter of the encoder's rate on an H100).

    Nearby clips of one video (:func:`group_by_video`, on by default) are one DALI sample: the decoder
    is handed the file and set up once, and decodes the union of the clips' frames once (DALI's
    ``frames`` argument); the clips are then rows of that output. Decoding was the measured bottleneck
    at 17x128² (about 10 ms per clip on NVDEC, one clip per sample), and the shipped UCF-101 recipe
    cuts 4 clips per video. A video whose decode fails or comes back short is decoded again clip by
    clip, so each clip gets its own result and reason, as without grouping. Frames do not depend on
    the grouping or on the pipeline count (tested).
    """

    def __init__(self, *, height: int, width: int, device: str = "cpu", device_id: int = 0,
                 batch_size: int = 8, num_threads: int = 2, pipelines: int = 1, group_by_video: bool = True,
                 stream_priority: int = 0):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"decode device must be cpu or gpu, got {device!r}")
        if pipelines < 1:
            raise ValueError(f"decode_pipelines must be >= 1, got {pipelines}")
        self.height, self.width = height, width
        self.device, self.device_id = device, device_id
        self.batch_size, self.num_threads = batch_size, num_threads
        self.group_by_video = group_by_video
        # CUDA priority of DALI's streams (NVDEC output mapping, colour conversion, resize); lower runs
        # first. Frames do not depend on it; callers copy the output on a stream of the same priority.
        self.stream_priority = stream_priority
        self.pipelines = min(pipelines, batch_size)  # more would never get a clip
        # The largest slice _split makes of a full batch: each pipeline's (maximum) DALI batch size.
        self.slice_size = math.ceil(batch_size / self.pipelines)
        self._pipes: list = [None] * self.pipelines
        self._pool = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"
        priority = self.stream_priority if gpu and self.stream_priority else None  # None: DALI's default
        # prefetch_queue_depth 1: each run is fed one batch of clips and its output taken at once, so a
        # deeper DALI queue would only hold frames; the pipeline's depth is prefetch_batches (clip_stream).

        @pipeline_def(batch_size=self.slice_size, num_threads=self.num_threads,
                      device_id=self.device_id if gpu else None, exec_dynamic=True, prefetch_queue_depth=1,
                      default_cuda_stream_priority=priority)
        def clip_pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            indices = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            frames = fn.decoders.video(encoded, device="mixed" if self.device == "gpu" else "cpu",
                                       frames=indices, pad_mode="none")
            return cover_and_crop(frames, self.height, self.width)

        pipe = clip_pipeline()
        pipe.build()
        return pipe

    def _run(self, slot: int, requests: Sequence[VideoRequest]) -> list[torch.Tensor]:
        """Decoded frames ``(len(r.frames), H, W, 3)`` of each request (one DALI sample each)."""
        if self._pipes[slot] is None:
            self._pipes[slot] = self._build()
        pipe = self._pipes[slot]
        pipe.feed_input("encoded", [np.fromfile(r.path, dtype=np.uint8) for r in requests])
        pipe.feed_input("frames", [np.asarray(r.frames, dtype=np.int32) for r in requests])
        (out,) = pipe.run()
        return [self._to_torch(out[i]) for i in range(len(requests))]

    def _to_torch(self, tensor) -> torch.Tensor:
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray
            result = torch.empty(tensor.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
            feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(self.device_id))
            return result
        return torch.from_numpy(np.array(tensor.as_array() if hasattr(tensor, "as_array") else tensor))

    def _check(self, request: VideoRequest, frames: torch.Tensor) -> torch.Tensor | VideoUnusable:
        """The one clip of ``request`` from its decoded ``frames`` (each distinct source frame once),
        or why it cannot be."""
        expected = (len(request.frames), self.height, self.width, 3)
        if tuple(frames.shape) != expected:
            return VideoUnusable(f"decoded {tuple(frames.shape)} but expected {expected} "
                                 f"(truncated or corrupt stream)", "frame_count")
        return _rows(frames, request.positions[0])

    def decode(self, plans: Sequence[ClipPlan]) -> list[torch.Tensor | VideoUnusable]:
        """Decode clips; each result is frames ``(F, H, W, 3)`` uint8 or the reason it failed.

        GPU frames are allocated and copied on the caller's current CUDA stream (also when a pool
        thread runs the pipeline), so the caller synchronises that one stream before using them.
        """
        stream = torch.cuda.current_stream(self.device_id) if self.device == "gpu" else None
        requests = group_by_video(plans) if self.group_by_video else [_request([p]) for p in plans]
        results: list[torch.Tensor | VideoUnusable] = []
        for i in range(0, len(requests), self.batch_size):
            slices = _split(requests[i:i + self.batch_size], self.pipelines)
            if len(slices) == 1:  # one pipeline: run it on the caller's thread, as without a pool
                results += self._decode_slice(0, slices[0], None)
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.pipelines, thread_name_prefix="dali-decode")
            for part in self._pool.map(self._decode_slice, range(len(slices)), slices,
                                       [stream] * len(slices)):
                results += part
        return results

    def _decode_slice(self, slot: int, requests: Sequence[VideoRequest], stream) -> list[torch.Tensor | VideoUnusable]:
        """Decode ``requests`` on pipeline ``slot`` (on a pool thread, with the caller's CUDA stream);
        one result per clip."""
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            try:
                decoded = self._run(slot, requests)
            except Exception:
                self._pipes[slot] = None  # a failed DALI pipeline object is dead; isolate the culprit
                decoded = [None] * len(requests)
            return [clip for r, frames in zip(requests, decoded) for clip in self._clips(slot, r, frames)]

    def _clips(self, slot: int, request: VideoRequest, frames) -> list[torch.Tensor | VideoUnusable]:
        """The clips of ``request`` from its decoded ``frames`` (None: its pipeline run failed). A failed
        run is redone clip by clip on a fresh pipeline, and so is a short decode of several clips (a
        truncated file still yields its early clips), so every clip gets its own result and reason."""
        if frames is not None and len(request.plans) == 1:
            return [self._check(request, frames)]
        if frames is not None and tuple(frames.shape) == (len(request.frames), self.height, self.width, 3):
            return [_rows(frames, rows) for rows in request.positions]
        return [self._decode_one(slot, _request([p])) for p in request.plans]

    def _decode_one(self, slot: int, request: VideoRequest) -> torch.Tensor | VideoUnusable:
        """The one clip of ``request``; a DALI error's text becomes its reject reason."""
        try:
            (frames,) = self._run(slot, [request])
        except Exception as e:
            self._pipes[slot] = None
            return VideoUnusable(f"decode error: {_first_dali_error(str(e))}", "decode_error")
        return self._check(request, frames)


def _rows(frames: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
    """``frames[rows]``, without a copy when the rows are all the frames in order."""
    return frames if rows == tuple(range(len(frames))) else frames[list(rows)]


def _split(items: Sequence, parts: int) -> list[Sequence]:
    """Non-empty ``items`` in at most ``parts`` contiguous slices of near-equal size, in order."""
    size = math.ceil(len(items) / parts)
    return [items[k:k + size] for k in range(0, len(items), size)]


def _first_dali_error(text: str) -> str:
    """The informative line of a DALI error: the one after 'encountered:' (the rest is boilerplate)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "encountered:" in lines:
        rest = lines[lines.index("encountered:") + 1:]
        if rest:
            return rest[0][:500]
    return (lines[0] if lines else text)[:500]


def cover_and_crop(frames, height: int, width: int):
    """DALI graph: resize frames ``(F, h, w, 3)`` so they cover ``height x width`` (shorter side fits,
    aspect kept, antialiased linear), then centre-crop. The one resize rule: the DALI decode pipelines
    and the PyAV decoder's resize pipeline both build it, so equal decoded frames give equal bytes."""
    from nvidia.dali import fn
    frames = fn.resize(frames, size=[height, width], mode="not_smaller", antialias=True)
    return fn.crop(frames, crop=[height, width], crop_pos_x=0.5, crop_pos_y=0.5, out_of_bounds_policy="trim_to_shape")


# libswscale flags of DALI's CPU video decoder (its RGB conversion: bilinear, full horizontal chroma
# interpolation, accurate rounding). DALI sets no colour details, so libswscale's default (BT.601)
# applies whatever the stream is tagged; PyAV otherwise follows the tag (a BT.709 tag moved pixels by
# up to 18 levels in a trial). With both, PyAV's RGB equals DALI CPU's bit for bit (tested).
DALI_SWS_INTERPOLATION = 2 | 0x2000 | 0x40000  # SWS_BILINEAR | SWS_FULL_CHR_H_INT | SWS_ACCURATE_RND
DALI_SWS_COLORSPACE = "DEFAULT"


class PyAVClipDecoder:
    """CPU clip decoder on PyAV (libavcodec) with the same interface and the same pixels as the DALI
    CPU decoder of :class:`DaliClipDecoder`.

    libavcodec's output is converted to RGB as DALI's CPU decoder converts it
    (``DALI_SWS_INTERPOLATION``, ``DALI_SWS_COLORSPACE``) and resized by a DALI CPU pipeline built by
    :func:`cover_and_crop`, so a clip decodes to the same bytes here and in DALI (tested; for MJPEG
    and MPEG-4, whose IDCT is not bit-exact by standard, this holds while both link libavcodecs with
    the same IDCT). It decodes every codec libavcodec knows, which makes it the decoder for codecs
    DALI's CPU decoder lacks (H.264, HEVC, MPEG-4, AV1) beside DALI CPU pipelines, the benchmark's
    baseline, and an independent reference for which source frames a :class:`ClipPlan` selects.
    Videos of a batch decode in parallel threads (libavcodec releases the GIL); the clips of one
    video are decoded together, in one pass from the start of the file up to their last frame.
    """

    def __init__(self, *, height: int, width: int, num_threads: int = 2, device: str = "cpu",
                 max_batch: int = 64):
        if device != "cpu":
            raise ValueError(f"PyAVClipDecoder decodes on cpu only, got device={device!r}")
        self.height, self.width, self.num_threads = height, width, num_threads
        self.device = "cpu"
        self.max_batch = max_batch
        self._resizer = None
        self._pool = None

    def _decode_video(self, request: VideoRequest) -> list[np.ndarray | VideoUnusable]:
        """Full-size RGB frames ``(F, h, w, 3)`` of each clip of ``request``, or why not."""
        import av
        wanted = request.frames
        frames: list[np.ndarray] = []
        try:
            with av.open(request.path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for index, frame in enumerate(container.decode(stream)):
                    if index == wanted[len(frames)]:
                        rgb = frame.reformat(format="rgb24", interpolation=DALI_SWS_INTERPOLATION,
                                             src_colorspace=DALI_SWS_COLORSPACE)
                        frames.append(rgb.to_ndarray())
                        if len(frames) == len(wanted):
                            break
        except Exception as e:
            return [VideoUnusable(f"decode error: {type(e).__name__}: {e}", "decode_error")] * len(request.plans)
        return [self._clip(plan, rows, frames) for plan, rows in zip(request.plans, request.positions)]

    def _clip(self, plan: ClipPlan, rows: tuple[int, ...], frames: list[np.ndarray]) -> np.ndarray | VideoUnusable:
        got = sum(r < len(frames) for r in rows)  # a truncated stream ends early: later clips come up short
        if got != plan.num_frames:
            return VideoUnusable(f"decoded {got} frames but expected {plan.num_frames} "
                                 f"(truncated or corrupt stream)", "frame_count")
        return np.stack([frames[r] for r in rows])

    def _build_resizer(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.max_batch, num_threads=max(1, self.num_threads), device_id=None,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def resize_pipeline():
            frames = fn.external_source(name="frames", dtype=types.UINT8, ndim=4, layout="FHWC")
            return cover_and_crop(frames, self.height, self.width)

        pipe = resize_pipeline()
        pipe.build()
        return pipe

    def _resize(self, clips: list[np.ndarray]) -> list[torch.Tensor]:
        if self._resizer is None:
            self._resizer = self._build_resizer()
        out = []
        for i in range(0, len(clips), self.max_batch):
            self._resizer.feed_input("frames", clips[i:i + self.max_batch])
            (batch,) = self._resizer.run()
            out += [torch.from_numpy(np.array(batch[k])) for k in range(len(batch))]
        return out

    def decode(self, plans: Sequence[ClipPlan]) -> list[torch.Tensor | VideoUnusable]:
        """Decode clips; each result is frames ``(F, H, W, 3)`` uint8 (CPU) or the reason it failed."""
        requests = group_by_video(plans)
        if self.num_threads <= 1 or len(requests) <= 1:
            per_video = [self._decode_video(r) for r in requests]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="pyav-decode")
            per_video = list(self._pool.map(self._decode_video, requests))
        results = [clip for clips in per_video for clip in clips]
        good = [i for i, r in enumerate(results) if isinstance(r, np.ndarray)]
        for i, frames in zip(good, self._resize([results[i] for i in good])):
            results[i] = frames
        return results
