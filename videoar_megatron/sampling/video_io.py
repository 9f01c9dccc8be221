"""Video files in and out: mp4 (PyAV), a GIF grid and a PNG frame sheet (PIL), inputs to extend.

Videos are float tensors ``(3, T, H, W)`` in [-1, 1] in the library and ``(T, H, W, 3)`` uint8 in
files. Every file is written to a temporary name in its directory and renamed, so a crash never
leaves a truncated video under its final name.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

CODEC_OPTIONS = {"libx264": {"crf": "12", "preset": "medium"}, "mpeg4": {"qscale": "2"}}


def to_uint8(video_CTHW: torch.Tensor) -> np.ndarray:
    """``(3, T, H, W)`` in [-1, 1] → ``(T, H, W, 3)`` uint8 (rounded, as a saved video is)."""
    x = ((video_CTHW.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def _temp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    return Path(tmp)


def write_mp4(path: str | Path, frames_THWC: np.ndarray, fps: int, codec: str = "libx264") -> Path:
    """H.264 (or MPEG-4 part 2) mp4, yuv420p; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if codec not in av.codecs_available:
        raise RuntimeError(f"output.codec={codec} is not in this PyAV build (has libx264: "
                           f"{'libx264' in av.codecs_available}, mpeg4: {'mpeg4' in av.codecs_available})")
    T, H, W, _ = frames_THWC.shape
    tmp = _temp_path(path)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=int(fps))
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            stream.options = dict(CODEC_OPTIONS.get(codec, {}))
            for frame in frames_THWC:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def tile(frames: Sequence[np.ndarray], columns: int, pad: int = 2) -> np.ndarray:
    """Images ``(H, W, 3)`` (same size) → one grid image with ``pad`` white pixels between tiles."""
    H, W = frames[0].shape[:2]
    rows = -(-len(frames) // columns)
    cols = min(columns, len(frames))
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(frames):
        r, c = divmod(i, columns)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img
    return grid


def _save_image(path: Path, save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_gif_grid(path: str | Path, videos_THWC: Sequence[np.ndarray], columns: int, fps: int) -> Path:
    """Animated GIF: every video a tile, all played together (shorter ones hold their last frame)."""
    length = max(v.shape[0] for v in videos_THWC)
    images = [Image.fromarray(tile([v[min(t, v.shape[0] - 1)] for v in videos_THWC], columns))
              for t in range(length)]
    duration = max(int(round(1000 / fps)), 20)
    return _save_image(Path(path), lambda p: images[0].save(p, format="GIF", save_all=True,
                                                            append_images=images[1:], duration=duration, loop=0))


def write_frame_sheet(path: str | Path, videos_THWC: Sequence[np.ndarray], max_frames: int = 17,
                      labels: Sequence[str] | None = None, pad: int = 2) -> Path:
    """PNG: one row per video, its frames left to right (evenly strided to at most ``max_frames``), after
    a tile with the row's label (its class or prompt) when ``labels`` are given."""
    rows = []
    for v in videos_THWC:
        idx = np.unique(np.linspace(0, v.shape[0] - 1, min(max_frames, v.shape[0])).round().astype(int))
        rows.extend(v[i] for i in idx)
    columns = len(rows) // len(videos_THWC)
    sheet = tile(rows, columns, pad)
    if labels is not None:
        sheet = np.concatenate([_label_column(labels, rows[0].shape[0], sheet.shape[0], pad), sheet], axis=1)
    return _save_image(Path(path), lambda p: Image.fromarray(sheet).save(p, format="PNG"))


def _label_column(labels: Sequence[str], row_height: int, height: int, pad: int) -> np.ndarray:
    """White column with each label in black, vertically centred on its row of the sheet."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(int(measure.textlength(text, font=font)) for text in labels) + 2 * pad + 2
    column = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(column)
    for r, text in enumerate(labels):
        top, bottom = draw.textbbox((0, 0), text, font=font)[1::2]
        y = pad + r * (row_height + pad) + max(0, (row_height - (bottom - top)) // 2) - top
        draw.text((pad + 1, y), text, fill="black", font=font)
    return np.asarray(column)


def _fit(x_CTHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize so the frame covers ``size`` (aspect kept, antialiased), then center-crop to it."""
    H, W = size
    h, w = x_CTHW.shape[-2:]
    scale = max(H / h, W / w)
    nh, nw = max(H, round(h * scale)), max(W, round(w * scale))
    if (nh, nw) != (h, w):
        x_CTHW = F.interpolate(x_CTHW.transpose(0, 1), size=(nh, nw), mode="bilinear", antialias=True,
                               align_corners=False).transpose(0, 1)
    top, left = (nh - H) // 2, (nw - W) // 2
    return x_CTHW[..., top:top + H, left:left + W]


def read_video(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """All frames of a video file as ``(3, T, H, W)`` float32 in [-1, 1], fitted to ``size``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video to extend not found: {path}")
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames decoded")
    x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1
    return _fit(x, size)


def read_image(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """An image file as a one-frame video ``(3, 1, H, W)`` in [-1, 1], fitted to ``size``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    img = np.asarray(Image.open(path).convert("RGB"))
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[:, None].float() / 127.5 - 1
    return _fit(x, size)
