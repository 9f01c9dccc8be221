"""Synthetic class-labelled video corpus: moving shapes, encoded to real video files with PyAV.

Each class fixes a shape, a colour and a motion pattern, so a class-conditional model has something
class-dependent to learn and a human can check samples by eye. Per video, the start position, size
and speed vary with a seeded RNG. Files are bit-exact for a seed (encoders run single-threaded and
containers are written with the ``bitexact`` flag), which tests and the demo rely on.

Codecs: ``vp9`` (WebM) and ``mjpeg`` (AVI) decode with DALI on CPU and GPU; ``h264`` (MP4) decodes on
GPU only, and is there to exercise the reject path on CPU machines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.manifest import VideoRecord, write_manifest

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (230, 50, 40), "green": (40, 200, 70), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "magenta": (220, 60, 220), "cyan": (40, 220, 230), "orange": (250, 140, 30), "white": (235, 235, 235),
}
MOTIONS = ("right", "down", "left", "up", "down-right", "up-right", "clockwise", "counter-clockwise")
CODECS = {
    # codec name → (PyAV encoder, container suffix, pixel format, encoder options)
    "vp9": ("libvpx-vp9", "webm", "yuv420p", {"deadline": "good", "cpu-used": "4", "threads": "1",
                                              "row-mt": "0", "crf": "20", "b": "0"}),
    "mjpeg": ("mjpeg", "avi", "yuvj420p", {"threads": "1", "q:v": "3"}),
    "h264": ("libx264", "mp4", "yuv420p", {"threads": "1", "preset": "fast", "crf": "20"}),
}


@dataclass(frozen=True)
class ClassStyle:
    shape: str
    colour: str
    motion: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.motion}"


def class_style(label: int) -> ClassStyle:
    """Shape, colour and motion of a class; neighbouring classes differ in all three."""
    colours = list(COLOURS)
    return ClassStyle(shape=SHAPES[label % len(SHAPES)],
                      colour=colours[(5 * label + label // len(SHAPES)) % len(colours)],
                      motion=MOTIONS[(3 * label + label // 48) % len(MOTIONS)])


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Soft (anti-aliased) coverage in [0,1] of a shape of radius ``r`` centred at (cy, cx)."""
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        dist = np.hypot(dy, dx) - r
    elif shape == "square":
        dist = np.maximum(np.abs(dy), np.abs(dx)) - 0.8 * r
    elif shape == "diamond":
        dist = (np.abs(dy) + np.abs(dx)) - 1.1 * r
    elif shape == "triangle":
        # upward triangle: below the two slanted edges and above the base
        dist = np.maximum(dy - 0.7 * r, np.maximum(-dy * 0.5 + np.abs(dx) * 0.87, 0) - 0.55 * r)
    elif shape == "cross":
        arm = 0.3 * r
        dist = np.minimum(np.maximum(np.abs(dy) - arm, np.abs(dx) - r), np.maximum(np.abs(dx) - arm, np.abs(dy) - r))
    elif shape == "ring":
        dist = np.abs(np.hypot(dy, dx) - 0.75 * r) - 0.3 * r
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - dist, 0.0, 1.0)


def _trajectory(motion: str, t: float, start: np.ndarray, speed: float, size: tuple[int, int]) -> tuple[float, float]:
    """Centre (y, x) at frame ``t``; linear motions wrap around the frame edges."""
    h, w = size
    if motion in ("clockwise", "counter-clockwise"):
        sign = 1.0 if motion == "clockwise" else -1.0
        radius = 0.28 * min(h, w)
        angle = start[0] * 2 * math.pi + sign * speed * t / radius
        return h / 2 + radius * math.sin(angle), w / 2 + radius * math.cos(angle)
    direction = {"right": (0, 1), "down": (1, 0), "left": (0, -1), "up": (-1, 0),
                 "down-right": (0.707, 0.707), "up-right": (-0.707, 0.707)}[motion]
    y = (start[0] * h + direction[0] * speed * t) % h
    x = (start[1] * w + direction[1] * speed * t) % w
    return y, x


def render_video(label: int, num_frames: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 frames ``(F, H, W, 3)`` of one video of class ``label``."""
    h, w = size
    style = class_style(label)
    colour = np.array(COLOURS[style.colour], dtype=np.float32)
    start = rng.uniform(0.2, 0.8, size=2)
    radius = min(h, w) * rng.uniform(0.12, 0.18)
    speed = min(h, w) * rng.uniform(0.045, 0.07)
    background = np.array([18, 20, 28], dtype=np.float32) + rng.uniform(-6, 6, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    frames = np.empty((num_frames, h, w, 3), dtype=np.uint8)
    for t in range(num_frames):
        cy, cx = _trajectory(style.motion, float(t), start, speed, size)
        # Draw the shape on a torus so that it wraps smoothly across the frame edges.
        cover = np.max([_shape_mask(style.shape, yy, xx, cy + oy, cx + ox, radius)
                        for oy in (-h, 0, h) for ox in (-w, 0, w)], axis=0)[..., None]
        frames[t] = np.clip(background * (1 - cover) + colour * cover, 0, 255).astype(np.uint8)
    return frames


def encode_video(frames: np.ndarray, path: str | Path, codec: str, fps: int) -> Path:
    """Encode RGB frames ``(F, H, W, 3)`` to ``path`` bit-exactly (single thread, bitexact muxing)."""
    import av
    encoder, _, pix_fmt, options = CODECS[codec]
    path = Path(path)
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=fps, options=dict(options))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_corpus(out: str | Path, *, num: int, classes: int, codec: str = "vp9", frames: int = 17,
                size: tuple[int, int] = (64, 64), fps: int = 8, seed: int = 0,
                manifest_name: str = "metadata.csv", progress: bool = False) -> Path:
    """Write ``num`` videos (labels cycle over ``classes``) and a manifest; returns its path."""
    if codec not in CODECS:
        raise ValueError(f"--codec must be one of {sorted(CODECS)}, got {codec!r}")
    if num < 1 or classes < 1 or frames < 1 or fps < 1:
        raise ValueError("--num, --classes, --frames and --fps must all be >= 1")
    if size[0] < 16 or size[1] < 16 or size[0] % 2 or size[1] % 2:
        raise ValueError(f"--size must be even and at least 16x16, got {size[0]}x{size[1]}")
    out = Path(out)
    video_dir = out / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    suffix = CODECS[codec][1]
    records = []
    indices = range(num)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="synth", unit="video")
    for i in indices:
        label = i % classes
        rng = np.random.default_rng([seed, i])
        path = video_dir / f"{i:06d}_c{label:03d}.{suffix}"
        encode_video(render_video(label, frames, size, rng), path, codec, fps)
        records.append(VideoRecord(path=str(path), caption=class_style(label).caption, label=label))
    return write_manifest(out / manifest_name, records, relative_to=out)
