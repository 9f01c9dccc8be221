"""Shared by the evaluation tests and their torchrun scripts: class-dependent synthetic clips and a
cheap feature map for testing protocol plumbing (sampling, folds, sharding, merging), which does not
depend on which network makes the features. The I3D itself is tested in test_eval_i3d.py."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 4
FRAMES, RES = 9, 16


def class_clip(label: int, sample_id: int, shift: float = 0.0) -> torch.Tensor:
    """A float clip (3, FRAMES, RES, RES) in [-1, 1]: class colour and motion plus per-sample noise."""
    g = torch.Generator().manual_seed(int(sample_id))
    colour = torch.tensor([np.cos(label), np.sin(label), np.cos(2 * label)], dtype=torch.float32) * 0.5
    t = torch.arange(FRAMES, dtype=torch.float32).view(1, FRAMES, 1, 1)
    x = torch.arange(RES, dtype=torch.float32).view(1, 1, 1, RES)
    wave = torch.sin((x + t * (label + 1)) / 3.0) * 0.3
    noise = torch.randn(3, FRAMES, RES, RES, generator=g) * 0.2
    return (colour.view(3, 1, 1, 1) + wave + noise + shift).clamp(-1, 1)


def make_generator(shift: float = 0.0, log: list | None = None):
    """A generator in the protocol's contract: (labels_B, sample_ids_B) → clips, seeded per sample id."""
    def generate(labels_B: torch.Tensor, ids_B: torch.Tensor) -> torch.Tensor:
        if log is not None:
            log.extend(ids_B.tolist())
        return torch.stack([class_clip(int(c), 1_000_000 + int(i), shift) for c, i in zip(labels_B, ids_B)])
    return generate


def real_clips(n: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """n uint8 clips with imbalanced class labels (what a decoder would hand over)."""
    labels = np.random.default_rng(seed).choice(NUM_CLASSES, size=n, p=[0.4, 0.3, 0.2, 0.1])
    clips = torch.stack([class_clip(int(c), i) for i, c in enumerate(labels)])
    return torch.round((clips + 1) * 127.5).to(torch.uint8), labels


class ProjectionExtractor:
    """Pools a clip to 2x4x4 per channel and projects it to ``dim`` features (float64)."""

    def __init__(self, dim: int = 12, seed: int = 0):
        self.dim, self.device = dim, torch.device("cpu")
        self.proj = torch.randn(3 * 2 * 4 * 4, dim, generator=torch.Generator().manual_seed(seed))

    def identity(self) -> dict:
        return {"network": "projection-test", "dim": self.dim}

    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        x = videos.float() / 127.5 - 1 if videos.dtype == torch.uint8 else videos.float()
        pooled = F.adaptive_avg_pool3d(x, (2, 4, 4)).flatten(1)
        return (pooled @ self.proj).double()
