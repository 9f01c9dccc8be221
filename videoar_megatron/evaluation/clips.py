"""Real clips for evaluation, read from an input manifest with data_prep's probe, clip plan and
DALI decoder (the same frames tokenizer training and pre-tokenization see).

Design decision: the candidate clips of a manifest are every clip ``plan_clips`` places in every
usable video (``clips_per_video`` start points spread over the video), in manifest order. Videos that
cannot be used (missing, undecodable codec, too short) are left out and listed in ``rejects``; a clip
that fails to decode after probing is an error, not a gap in the real set. The class distribution
comes from the manifest's labels (one per training video), which needs no probing, so a cached real
statistic is reused without touching the videos.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from data_prep.manifest import read_manifest
from data_prep.video import ClipPlan, ClipSamplingConfig, DaliClipDecoder, VideoUnusable, plan_clips, probe_video


@dataclass(kw_only=True)
class EvalDataConfig:
    """Where real and held-out clips come from, and how they are decoded."""

    train_manifest: str = ""
    """Manifest (CSV/JSONL, with class labels) of the training videos: the real set of gFVD and the
    class distribution of the generated labels."""
    heldout_manifest: str = ""
    """Manifest of the held-out videos the tokenizer's reconstructions are measured on (rFVD)."""
    clips_per_video: int = 1
    """Candidate clips per training video (start points spread evenly); the real set is drawn from
    these without replacement, so it must reach num_samples x num_folds (UCF-101 at 4 x 10k: 5)."""
    heldout_clips_per_video: int = 1
    """Clips per held-out video for rFVD."""
    decode_device: Literal["auto", "cpu", "gpu"] = "auto"
    """DALI decoding: gpu (NVDEC; H.264/HEVC too), cpu (VP8/VP9/MJPEG only), auto = gpu when CUDA."""
    decode_batch_size: int = 8
    """Clips per DALI pipeline run."""
    decode_threads: int = 2
    """DALI CPU threads."""

    def __post_init__(self) -> None:
        if self.clips_per_video < 1 or self.heldout_clips_per_video < 1:
            raise ValueError("data.clips_per_video and data.heldout_clips_per_video must be >= 1")
        if self.decode_batch_size < 1 or self.decode_threads < 1:
            raise ValueError("data.decode_batch_size and data.decode_threads must be >= 1")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ManifestClipSource:
    """A :class:`~videoar_megatron.evaluation.protocols.RealClipSource` over a manifest's videos.

    Clips come out as uint8 ``(B, 3, num_frames, resolution, resolution)``: frames strided to ``fps``
    (0 = native), resized to cover the square and centre-cropped (data_prep's DALI pipeline).
    """

    def __init__(self, manifest: str | Path, *, num_frames: int, resolution: int, fps: float,
                 clips_per_video: int, decode_device: str = "cpu", device_id: int = 0,
                 batch_size: int = 8, num_threads: int = 2):
        self.manifest = Path(manifest)
        self.records = read_manifest(self.manifest)
        self.sampling = ClipSamplingConfig(num_frames=num_frames, target_fps=fps, clips_per_video=clips_per_video,
                                           height=resolution, width=resolution)
        self.decode_device = decode_device
        self.decoder = DaliClipDecoder(height=resolution, width=resolution, device=decode_device,
                                       device_id=device_id, batch_size=batch_size, num_threads=num_threads)
        self._manifest_sha = _sha256(self.manifest)
        self._clips: list[tuple[ClipPlan, int]] | None = None
        self.rejects: list[tuple[str, str]] = []

    def identity(self) -> dict:
        s = self.sampling
        return {"source": "manifest", "manifest": str(self.manifest.resolve()), "manifest_sha256": self._manifest_sha,
                "num_frames": s.num_frames, "fps": float(s.target_fps), "clips_per_video": s.clips_per_video,
                "height": s.height, "width": s.width, "resize": "dali not_smaller antialias + centre crop"}

    def class_labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    def _plan(self) -> list[tuple[ClipPlan, int]]:
        if self._clips is None:
            probe_device = "gpu" if self.decode_device == "gpu" else "cpu"
            clips = []
            for record in self.records:
                try:
                    info = probe_video(record.path, device=probe_device)
                    plans = plan_clips(info, self.sampling, start_s=record.start, end_s=record.end,
                                       fps_override=record.fps)
                except VideoUnusable as e:
                    self.rejects.append((record.path, e.reason))
                    continue
                clips += [(plan, record.label) for plan in plans]
            self._clips = clips
        return self._clips

    def num_clips(self) -> int:
        return len(self._plan())

    def clip_labels(self, indices: np.ndarray) -> np.ndarray:
        clips = self._plan()
        return np.array([clips[i][1] for i in indices], dtype=np.int64)

    def load(self, indices: np.ndarray) -> torch.Tensor:
        clips = self._plan()
        plans = [clips[i][0] for i in indices]
        frames = self.decoder.decode(plans)
        for plan, f in zip(plans, frames):
            if isinstance(f, VideoUnusable):
                raise RuntimeError(f"{plan.path} (frames from {plan.start_frame}, stride {plan.stride}): "
                                   f"{f.reason}; fix or remove it from {self.manifest}")
        # (F, H, W, 3) per clip → (B, 3, F, H, W), on the decoder's device.
        return torch.stack([f.permute(3, 0, 1, 2) for f in frames])
