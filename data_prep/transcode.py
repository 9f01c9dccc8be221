"""Re-encode videos that DALI cannot decode on the target device (PyAV, parallel, resumable).

UCF-101 ships MPEG-4 Part 2 AVI files and many web corpora are H.264: DALI decodes those only on
the GPU (NVDEC). ``transcode_manifest`` rewrites such videos to VP9 WebM (decodable by DALI on CPU
and GPU) or MJPEG AVI and writes a new manifest pointing at the new files; videos that are already
decodable on the target device are kept where they are. Each output is written to a temporary name
and renamed, so an existing output is complete and a rerun skips it. A video that cannot be
transcoded is listed in ``transcode_rejects.jsonl`` with its reason and left out of the new manifest.

Frames are re-timed at the source's average frame rate (constant frame rate output), at the source
size unless ``max_short_side`` asks to shrink it (never enlarged; dimensions kept even).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Callable

from data_prep.manifest import VideoRecord, read_manifest, write_manifest
from data_prep.video import DALI_CPU_CODECS, DALI_GPU_CODECS

# codec → (PyAV encoder, suffix, pixel format, options); one thread per video, videos in parallel.
TARGETS = {
    "vp9": ("libvpx-vp9", ".webm", "yuv420p", {"deadline": "good", "cpu-used": "5", "crf": "20", "b": "0",
                                              "row-mt": "1", "threads": "1"}),
    "mjpeg": ("mjpeg", ".avi", "yuvj420p", {"q:v": "3", "threads": "1"}),
}
REJECTS_FILE = "transcode_rejects.jsonl"


@dataclass(frozen=True)
class TranscodeResult:
    row: int
    record: VideoRecord
    status: str
    """transcoded, skipped (output already there), kept (already decodable) or failed."""
    reason: str = ""


def needs_transcode(codec: str, target_device: str) -> bool:
    """Whether DALI on ``target_device`` (cpu, gpu, or all = always transcode) cannot decode ``codec``."""
    if target_device == "all":
        return True
    return codec not in (DALI_GPU_CODECS if target_device == "gpu" else DALI_CPU_CODECS)


def output_path(record_path: str, manifest_root: Path, out_dir: Path, codec: str) -> Path:
    """Mirror the source layout under ``out_dir`` (relative to the manifest root when under it)."""
    src = Path(record_path)
    try:
        rel = src.resolve().relative_to(manifest_root)
    except ValueError:
        rel = Path(*src.resolve().parts[1:])  # outside the root: mirror the absolute path
    return (out_dir / rel).with_suffix(TARGETS[codec][1])


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def transcode_video(src: str | Path, dst: str | Path, codec: str = "vp9", max_short_side: int = 0) -> Path:
    """Re-encode ``src`` to ``dst`` (atomically: temporary name, then rename)."""
    import av
    encoder, _, pix_fmt, options = TARGETS[codec]
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.{os.getpid()}.tmp{dst.suffix}")
    try:
        with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
            istream = inp.streams.video[0]
            rate = Fraction(istream.average_rate or istream.guessed_rate or 25).limit_denominator(1001)
            h, w = istream.codec_context.height, istream.codec_context.width
            scale = min(1.0, max_short_side / min(h, w)) if max_short_side else 1.0
            ostream = out.add_stream(encoder, rate=rate, options=dict(options))
            ostream.height, ostream.width = _even(h * scale), _even(w * scale)
            ostream.pix_fmt = pix_fmt
            frames = 0
            for frame in inp.decode(istream):
                frame = frame.reformat(width=ostream.width, height=ostream.height, format=pix_fmt)
                frame.pts = None
                for packet in ostream.encode(frame):
                    out.mux(packet)
                frames += 1
            for packet in ostream.encode():
                out.mux(packet)
        if frames == 0:
            raise ValueError("no frames decoded")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _probe_codec(path: str) -> str:
    import av
    with av.open(path) as c:
        return c.streams.video[0].codec_context.name


def _job(args: tuple) -> TranscodeResult:
    row, record, dst, codec, target_device, max_short_side = args
    if dst is not None and dst.exists():
        return TranscodeResult(row, replace(record, path=str(dst)), "skipped")
    try:
        if not Path(record.path).is_file():
            raise FileNotFoundError(f"missing file: {record.path}")
        if not needs_transcode(_probe_codec(record.path), target_device):
            return TranscodeResult(row, record, "kept")
        transcode_video(record.path, dst, codec, max_short_side)
        return TranscodeResult(row, replace(record, path=str(dst)), "transcoded")
    except Exception as e:  # noqa: BLE001 - every failure becomes a reject with its reason
        return TranscodeResult(row, record, "failed", f"{type(e).__name__}: {e}")


def transcode_manifest(manifest: str | Path, out_dir: str | Path, *, codec: str = "vp9",
                       target_device: str = "cpu", workers: int = 1, max_short_side: int = 0,
                       manifest_name: str = "", progress: Callable[[TranscodeResult], None] | None = None
                       ) -> tuple[Path, list[TranscodeResult]]:
    """Transcode what ``target_device`` cannot decode; write ``out_dir/<manifest name>`` and rejects."""
    if codec not in TARGETS:
        raise ValueError(f"codec must be one of {sorted(TARGETS)}, got {codec!r}")
    if target_device not in ("cpu", "gpu", "all"):
        raise ValueError(f"target_device must be cpu, gpu or all, got {target_device!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    manifest = Path(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = manifest.parent.resolve()
    records = read_manifest(manifest)
    jobs = [(i, r, output_path(r.path, root, out_dir, codec), codec, target_device, max_short_side)
            for i, r in enumerate(records)]
    results = []
    if workers == 1:
        mapped = map(_job, jobs)
    else:
        import multiprocessing as mp
        pool = mp.get_context("spawn").Pool(workers)
        mapped = pool.imap(_job, jobs, chunksize=1)
    try:
        for res in mapped:
            results.append(res)
            if progress is not None:
                progress(res)
    finally:
        if workers > 1:
            pool.close()
            pool.join()
    from data_prep.shards import write_jsonl
    write_jsonl(out_dir / REJECTS_FILE, [{"row": r.row, "source": r.record.path, "reason": r.reason}
                                         for r in results if r.status == "failed"])
    new_manifest = write_manifest(out_dir / (manifest_name or manifest.name),
                                  [r.record for r in results if r.status != "failed"], relative_to=out_dir)
    return new_manifest, results


def summarize(results: list[TranscodeResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts

