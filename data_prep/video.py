"""Video probing, clip planning and DALI clip decoding, shared by tokenizer training and pre-tokenization.

Design decision: every video is probed first (PyAV, container metadata and packet count, no pixel
decoding) so that missing files, unknown codecs, codecs this device cannot decode and videos too short
for one clip are rejected with a precise reason *before* DALI sees them. DALI then decodes the clips
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
    height: int
    width: int


@dataclass(kw_only=True)
class ClipSamplingConfig:
    """How clips are cut from videos and resized; one definition for tokenizer training and
    pre-tokenization so both see identical frames."""

    num_frames: int = 17
    """Frames per clip. The causal tokenizer needs 1 + 4k frames (17, 33, 65, ...); 1 means images."""
    frame_stride: int = 1
    """Take every n-th source frame (ignored when target_fps > 0)."""
    target_fps: float = 0.0
    """Resample to this frame rate by striding (stride = round(source fps / target fps)); 0 = off."""
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
    """One clip to decode: ``num_frames`` frames from ``start_frame`` every ``stride`` frames."""

    path: str
    start_frame: int
    stride: int
    num_frames: int

    @property
    def frame_indices(self) -> list[int]:
        return [self.start_frame + i * self.stride for i in range(self.num_frames)]


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
        span = (plan.num_frames - 1) * plan.stride + 1
        if prev is not None and prev.path == plan.path and plan.start_frame <= prev.frame_indices[-1] + span:
            runs[-1].append(plan)
        else:
            runs.append([plan])
    return [_request(run) for run in runs]


def _request(plans: Sequence[ClipPlan]) -> VideoRequest:
    frames = sorted({i for p in plans for i in p.frame_indices})
    row = {f: r for r, f in enumerate(frames)}
    return VideoRequest(tuple(plans), tuple(frames), tuple(tuple(row[i] for i in p.frame_indices) for p in plans))


def probe_video(path: str | Path, device: str = "cpu") -> VideoInfo:
    """Container facts of a video without decoding pixels; raises :class:`VideoUnusable`."""
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
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            # Count packets of the stream: exact, and far cheaper than decoding.
            num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
            height, width = stream.codec_context.height, stream.codec_context.width
    except VideoUnusable:
        raise
    except Exception as e:  # PyAV raises many types for corrupt input
        raise VideoUnusable(f"unreadable container: {type(e).__name__}: {e}", "unreadable") from None
    supported = DALI_GPU_CODECS if device == "gpu" else DALI_CPU_CODECS
    if codec not in supported:
        where = "GPU (NVDEC)" if device == "gpu" else "CPU"
        hint = "" if device == "gpu" else " (transcode with `videoar transcode`, or run on a GPU host)"
        raise VideoUnusable(f"codec '{codec}' cannot be decoded by DALI on {where}{hint}", "codec")
    if num_frames == 0 or fps <= 0:
        raise VideoUnusable(f"no decodable frames (frames={num_frames}, fps={fps})", "no_frames")
    return VideoInfo(path=str(path), codec=codec, num_frames=num_frames, fps=fps, height=height, width=width)


def clip_stride(info: VideoInfo, cfg: ClipSamplingConfig, fps_override: float | None = None) -> int:
    fps = fps_override or info.fps
    if cfg.target_fps > 0:
        return max(1, round(fps / cfg.target_fps))
    return cfg.frame_stride


def plan_clips(info: VideoInfo, cfg: ClipSamplingConfig, *, start_s: float | None = None,
               end_s: float | None = None, fps_override: float | None = None) -> list[ClipPlan]:
    """Clip start points spread evenly over [start_s, end_s]; raises if not one clip fits."""
    fps = fps_override or info.fps
    stride = clip_stride(info, cfg, fps_override)
    first = 0 if start_s is None else max(0, int(math.floor(start_s * fps)))
    last = info.num_frames if end_s is None else min(info.num_frames, int(math.floor(end_s * fps)))
    span = (cfg.num_frames - 1) * stride + 1
    room = last - first - span
    if room < 0:
        raise VideoUnusable(f"too short: {last - first} usable frames, a clip needs {span} "
                            f"({cfg.num_frames} frames at stride {stride})", "too_short")
    n = cfg.clips_per_video
    starts = [first + (room * i // (n - 1) if n > 1 else room // 2) for i in range(n)]
    return [ClipPlan(path=info.path, start_frame=s, stride=stride, num_frames=cfg.num_frames)
            for s in dict.fromkeys(starts)]


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
                 batch_size: int = 8, num_threads: int = 2, pipelines: int = 1, group_by_video: bool = True):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"decode device must be cpu or gpu, got {device!r}")
        if pipelines < 1:
            raise ValueError(f"decode_pipelines must be >= 1, got {pipelines}")
        self.height, self.width = height, width
        self.device, self.device_id = device, device_id
        self.batch_size, self.num_threads = batch_size, num_threads
        self.group_by_video = group_by_video
        self.pipelines = min(pipelines, batch_size)  # more would never get a clip
        # The largest slice _split makes of a full batch: each pipeline's (maximum) DALI batch size.
        self.slice_size = math.ceil(batch_size / self.pipelines)
        self._pipes: list = [None] * self.pipelines
        self._pool = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.slice_size, num_threads=self.num_threads,
                      device_id=self.device_id if self.device == "gpu" else None,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def clip_pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            indices = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            frames = fn.decoders.video(encoded, device="mixed" if self.device == "gpu" else "cpu",
                                       frames=indices, pad_mode="none")
            frames = fn.resize(frames, size=[self.height, self.width], mode="not_smaller",
                               antialias=True)
            return fn.crop(frames, crop=[self.height, self.width], crop_pos_x=0.5, crop_pos_y=0.5,
                           out_of_bounds_policy="trim_to_shape")

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

    def _check(self, plan: ClipPlan, frames: torch.Tensor) -> torch.Tensor | VideoUnusable:
        expected = (plan.num_frames, self.height, self.width, 3)
        if tuple(frames.shape) != expected:
            return VideoUnusable(f"decoded {tuple(frames.shape)} but expected {expected} "
                                 f"(truncated or corrupt stream)", "frame_count")
        return frames

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
            return [self._check(request.plans[0], frames)]
        if frames is not None and tuple(frames.shape) == (len(request.frames), self.height, self.width, 3):
            return [frames[list(rows)] for rows in request.positions]
        return [self._decode_one(slot, _request([p])) for p in request.plans]

    def _decode_one(self, slot: int, request: VideoRequest) -> torch.Tensor | VideoUnusable:
        """The one clip of ``request``; a DALI error's text becomes its reject reason."""
        try:
            (frames,) = self._run(slot, [request])
        except Exception as e:
            self._pipes[slot] = None
            return VideoUnusable(f"decode error: {_first_dali_error(str(e))}", "decode_error")
        return self._check(request.plans[0], frames)


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


def resize_cover_crop(frames_FHWC: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``(F, h, w, 3)`` → uint8 ``(F, height, width, 3)``: scale so the frame covers the
    output (shorter side fits, aspect kept, antialiased bilinear), then centre-crop. The torch
    counterpart of the DALI pipeline's resize + crop (pixel values differ slightly between the two)."""
    import torch.nn.functional as F
    f, h, w, _ = frames_FHWC.shape
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    x = frames_FHWC.permute(0, 3, 1, 2).float()
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - height + 1) // 2, (rw - width + 1) // 2  # DALI crop_pos 0.5 rounds half up
    x = x[:, :, top:top + height, left:left + width]
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class PyAVClipDecoder:
    """CPU clip decoder on PyAV (libavcodec) with the same interface as :class:`DaliClipDecoder`.

    It is the baseline the pre-tokenization benchmark compares DALI against, and an independent
    reference for which source frames a :class:`ClipPlan` selects. Every codec libavcodec knows is
    decoded (so it does not reproduce DALI's codec limits; probe with the DALI device for that).
    Videos of a batch decode in parallel threads (libavcodec releases the GIL); the clips of one
    video are decoded together, in one pass from the start of the file up to their last frame.
    """

    def __init__(self, *, height: int, width: int, num_threads: int = 2, device: str = "cpu"):
        if device != "cpu":
            raise ValueError(f"PyAVClipDecoder decodes on cpu only, got device={device!r}")
        self.height, self.width, self.num_threads = height, width, num_threads
        self.device = "cpu"

    def _decode_video(self, request: VideoRequest) -> list[torch.Tensor | VideoUnusable]:
        import av
        wanted = request.frames
        frames: list[np.ndarray] = []
        try:
            with av.open(request.path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for index, frame in enumerate(container.decode(stream)):
                    if index == wanted[len(frames)]:
                        frames.append(frame.to_ndarray(format="rgb24"))
                        if len(frames) == len(wanted):
                            break
        except Exception as e:
            return [VideoUnusable(f"decode error: {type(e).__name__}: {e}", "decode_error")] * len(request.plans)
        return [self._clip(plan, rows, frames) for plan, rows in zip(request.plans, request.positions)]

    def _clip(self, plan: ClipPlan, rows: tuple[int, ...], frames: list[np.ndarray]) -> torch.Tensor | VideoUnusable:
        got = sum(r < len(frames) for r in rows)  # a truncated stream ends early: later clips come up short
        if got != plan.num_frames:
            return VideoUnusable(f"decoded {got} frames but expected {plan.num_frames} "
                                 f"(truncated or corrupt stream)", "frame_count")
        return resize_cover_crop(torch.from_numpy(np.stack([frames[r] for r in rows])), self.height, self.width)

    def decode(self, plans: Sequence[ClipPlan]) -> list[torch.Tensor | VideoUnusable]:
        """Decode clips; each result is frames ``(F, H, W, 3)`` uint8 (CPU) or the reason it failed."""
        requests = group_by_video(plans)
        if self.num_threads <= 1 or len(requests) <= 1:
            per_video = [self._decode_video(r) for r in requests]
        else:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(self.num_threads) as pool:
                per_video = list(pool.map(self._decode_video, requests))
        return [clip for clips in per_video for clip in clips]
