"""The sampling recipe: guidance schedule, per-bit sampling, output length, seeds, engine knobs.

Design decision: everything that changes which video comes out of a checkpoint (guidance, temperature,
top-p, frames, seed, extension context) is a recipe knob, written with the videos (``config.yaml``
and ``index.json``), so a sample directory says how to reproduce it. Paths (checkpoint, tokenizer,
inputs) and the conditions are command-line arguments of ``videoar sample``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class GuidanceConfig:
    """Classifier-free guidance on logits: ``γ·cond + (1 − γ)·uncond`` with γ per (frame, scale)."""

    schedule: Literal["constant", "ucf101", "t2v", "table"] = "constant"
    """How γ depends on the latent frame t and the scale k (paper §4.2, temporal-spatial CFG):
    'constant': gamma everywhere. 'ucf101': the first scale of frame t gets
    first_scale[0] + (first_scale[1] - first_scale[0])·t/(T-1), then γ rises linearly within the
    frame to last_scale at its last scale (paper: 1 → 5 across frames, up to 10). 't2v': γ goes
    linearly from ramp[0] to ramp[1] over the decoding order of (frame, scale) steps (paper: 5 → 3).
    'table': the per-(frame, scale) values of table. γ = 1 everywhere skips the unconditional branch."""
    gamma: float = 3.0
    """γ of schedule 'constant'."""
    first_scale: tuple[float, float] = (1.0, 5.0)
    """Schedule 'ucf101': γ of the first scale of the first and of the last latent frame."""
    last_scale: float = 10.0
    """Schedule 'ucf101': γ reached at the last scale of every frame."""
    ramp: tuple[float, float] = (5.0, 3.0)
    """Schedule 't2v': γ at the first and at the last (frame, scale) step."""
    table: list[list[float]] | None = None
    """Schedule 'table': rows = latent frames, columns = scales. A table with fewer rows than a
    window has frames repeats its last row."""

    def __post_init__(self):
        if self.schedule == "table":
            if not self.table or not all(self.table) or len({len(r) for r in self.table}) != 1:
                raise ValueError("guidance.table must be a non-empty list of equally long rows "
                                 "(frames x scales) when guidance.schedule is 'table'")


@dataclass(kw_only=True)
class OutputConfig:
    """What ``videoar sample`` writes besides the raw tensors."""

    fps: int = 8
    """Frame rate written into the mp4 files and used for the GIF grid (UCF-101 protocol: 8)."""
    codec: Literal["libx264", "mpeg4"] = "libx264"
    """mp4 video codec (PyAV's bundled FFmpeg has both; libx264 at crf 12, mpeg4 at q 2)."""
    grid_columns: int = 8
    """Videos per row of grid.gif (frames.png has one row per video)."""
    grid_max_videos: int = 64
    """At most this many videos (the first ones) go into grid.gif and frames.png, where each row is
    labelled with its class or prompt."""

    def __post_init__(self):
        for name in ("fps", "grid_columns", "grid_max_videos"):
            if getattr(self, name) < 1:
                raise ValueError(f"output.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class SamplingConfig:
    """One sampling run: ``videoar sample`` and the generator of ``videoar eval fvd``."""

    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """Classifier-free guidance schedule."""
    temperature: float = 1.0
    """Per-bit temperature: a bit with logit z is 1 with probability sigmoid(z / temperature).
    0 = greedy (a bit is 1 iff its guided logit is > 0)."""
    top_p: float = 1.0
    """Per-bit nucleus sampling over the 2-class distribution (Infinity's rule): when the likelier
    value of a bit has probability >= top_p it is taken, otherwise the bit is sampled. 1.0 = off;
    values <= 0.5 make every bit greedy. Infinity's default is 0.97."""
    frames: int = 0
    """Pixel frames per output video. 0 = one window of the checkpoint (1 + 4·(latent_frames - 1),
    e.g. 17). More than a window: the video is extended window by window (see context_latent_frames);
    fewer: the last window is cut."""
    context_latent_frames: int = 2
    """Extension (V2V, long videos): latent frames re-encoded from the end of the video so far
    (1 + 4·(c - 1) pixel frames) and teacher-forced as the known start of the next window. Must be
    below the checkpoint's latent_frames. Image-to-video always uses the one given frame."""
    seed: int = 0
    """Run seed: sample i draws its bits from a stream keyed by (seed, i), so a video does not depend
    on the batch size, the batch it lands in or the number of ranks."""
    batch_size: int = 8
    """Videos decoded together per rank (the CFG forward runs 2x this many rows)."""
    kv_cache: bool = True
    """Decode with the KV cache (one forward per (frame, scale) over that step's tokens). False
    recomputes the whole prefix at every step: the slow reference the cache is measured against."""
    cuda_graph: bool = True
    """On CUDA, capture the whole AR decode of a batch (prefix + every (frame, scale) step) as one
    CUDA graph, replayed for every later batch of the same shape. Ignored on CPU."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Model weights and activations: auto = bfloat16 on CUDA, float32 on CPU. Guidance, sampling and
    the feature accumulation always run in float32."""
    tensor_parallel: int = 1
    """Tensor-parallel size of the sampling model (every TP rank decodes the same samples; the
    checkpoint is resharded on load). Data parallel over the remaining ranks."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = the local GPU when CUDA is present."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Files written by ``videoar sample``."""
    progress: bool = True
    """tqdm progress bar on rank 0."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.frames < 0:
            raise ValueError(f"frames must be >= 0 (0 = one window), got {self.frames}")
        if self.context_latent_frames < 1:
            raise ValueError(f"context_latent_frames must be >= 1, got {self.context_latent_frames}")
        if self.batch_size < 1 or self.tensor_parallel < 1:
            raise ValueError("batch_size and tensor_parallel must be >= 1")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")
